"""``towerflow release``: list and show registered releases, promote one, roll back. Thin over infra/promote.py."""

from __future__ import annotations

import argparse
import json
import sys

from towerflow.commands.common import seconds


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("release", help="list, show, promote and roll back releases (user tower + item index)")
    rsub = p.add_subparsers(dest="release_command", metavar="SUBCOMMAND", required=True)

    ls = rsub.add_parser("list", help="registered releases, newest first, with aliases and metrics")
    ls.add_argument("--json", action="store_true", help="print JSON (a list of releases)")
    ls.set_defaults(handler=_list)

    sh = rsub.add_parser("show", help="one release with the sha256 of every artifact")
    sh.add_argument("id", help="release id (r-...) or registered model version number")
    sh.add_argument("--json", action="store_true", help="print JSON")
    sh.set_defaults(handler=_show)

    pr = rsub.add_parser("promote", help="make a release the champion (registering a local release first)")
    pr.add_argument("id", help="release id (r-...) or registered model version number")
    _wait_option(pr)
    pr.set_defaults(handler=_promote)

    rb = rsub.add_parser("rollback", help="point champion back at the previous champion")
    _wait_option(rb)
    rb.set_defaults(handler=_rollback)

    gc = rsub.add_parser(
        "gc", help="remove releases nothing references (directories, registered versions, their artifacts)",
        description="Remove every release that no alias, no backfill ledger entry, none of the newest --keep "
                    "releases and no release younger than --min-age-hours references, from the registry (the "
                    "version and its logged artifacts), <data_root>/releases and <data_root>/release_cache. The "
                    "champion and the previous champion (the rollback target) are never removed. gc sees only its "
                    "own data root: it reads <data_root>/backfill/ledger.sqlite, not the ledger of a backfill run "
                    "with another data root. Prints what it kept and removed.")
    gc.add_argument("--keep", type=int, default=3, help="newest releases kept whatever references them (default "
                                                        "3, at least 1)")
    gc.add_argument("--min-age-hours", type=float, default=None, metavar="H",
                    help="keep every release younger than H hours: a retrain between assembling and promoting it "
                         "(default TOWERFLOW_RELEASE_GC_MIN_AGE_HOURS, 24)")
    gc.add_argument("--dry-run", action="store_true", help="list what would be removed, remove nothing")
    _wait_option(gc)
    gc.set_defaults(handler=_gc)


def _wait_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--wait-s", type=seconds, default=0.0, metavar="S",
                   help="wait up to S seconds for a promotion in progress (its holder is printed) instead of "
                        "failing at once (default 0)")


def _say(message: str) -> None:
    print(message, file=sys.stderr)


def _metrics(m: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in sorted(m.items())) or "-"


def _list(args: argparse.Namespace) -> int:
    from towerflow.config import Settings
    from towerflow.infra.promote import list_releases

    releases = list_releases(Settings())
    if args.json:
        print(json.dumps([r.to_dict() for r in releases], indent=2))
        return 0
    if not releases:
        print("no releases registered")
        return 0
    for r in releases:
        aliases = ",".join(r.aliases) or "-"
        print(f"v{r.version:<4} {r.release_id}  {aliases:<18} {r.created_at}  {r.index_kind or '-'}"
              f"  items={r.n_items}  {_metrics(r.metrics)}")
    return 0


def _show(args: argparse.Namespace) -> int:
    from towerflow.config import Settings
    from towerflow.infra.promote import show_release

    info = show_release(args.id, Settings())
    if args.json:
        print(json.dumps(info.to_dict(), indent=2))
        return 0
    d = info.to_dict()
    checksums = d.pop("checksums") or {}
    for key, value in d.items():
        print(f"{key:<18} {_metrics(value) if key == 'metrics' else value}")
    print("artifacts:")
    for rel, sha in checksums.items():
        print(f"  {sha}  {rel}")
    return 0


def _promote(args: argparse.Namespace) -> int:
    from towerflow.config import Settings
    from towerflow.infra.promote import promote, register_release, resolve_version
    from towerflow.infra.releases import ReleaseNotFoundError

    settings = Settings()
    try:
        version = resolve_version(args.id, settings)
    except ReleaseNotFoundError:
        local = settings.releases_dir / args.id
        if not local.is_dir():
            raise
        version = register_release(local, None, settings)
        print(f"registered {args.id} as version {version}")
    print(promote(version, settings, wait_s=args.wait_s, on_wait=_say, note="towerflow release promote"))
    return 0


def _rollback(args: argparse.Namespace) -> int:
    from towerflow.config import Settings
    from towerflow.infra.promote import rollback

    print(rollback(Settings(), wait_s=args.wait_s, on_wait=_say))
    return 0


def _gc(args: argparse.Namespace) -> int:
    from towerflow.config import Settings
    from towerflow.infra.release_gc import gc_releases

    result = gc_releases(Settings(), keep=args.keep, min_age_hours=args.min_age_hours, dry_run=args.dry_run,
                         wait_s=args.wait_s, on_wait=_say)
    print("\n".join(result.lines()))
    return 0
