"""``towerflow release``: list and show registered releases, promote one, roll back. Thin over infra/promote.py."""

from __future__ import annotations

import argparse
import json


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
    pr.set_defaults(handler=_promote)

    rb = rsub.add_parser("rollback", help="point champion back at the previous champion")
    rb.set_defaults(handler=_rollback)


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
    print(promote(version, settings))
    return 0


def _rollback(args: argparse.Namespace) -> int:
    from towerflow.config import Settings
    from towerflow.infra.promote import rollback

    print(rollback(Settings()))
    return 0
