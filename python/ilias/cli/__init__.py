"""The `ilias` command. Each subcommand is a module here with `add_parser(subparsers)` and
`run(args) -> int`; this file only dispatches and turns user errors into one clear line.

Set ILIAS_DEBUG=1 to see the full traceback of an error.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# subcommand name -> module (imported lazily so that `ilias --help` stays fast)
COMMANDS = {
    "import": "import_",
    "export": "export",
    "info": "info",
    "search": "search",
    "index": "index",
    "evaluate": "evaluate",
    "models": "models",
    "extract": "extract",
    "demo": "demo",
    "run": "run",
    "adapt": "adapt",
    "locals": "locals",
    "rerank": "rerank",
    "bench": "bench",
}

# the errors a user can cause and fix; anything else is a bug and keeps its traceback
USER_ERRORS = (ValueError, OSError, KeyError, ImportError, IndexError)


class Parser(argparse.ArgumentParser):
    """A bad option is a user error like any other: one line, exit code 1."""

    def error(self, message: str):
        self.exit(1, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = Parser(
        prog="ilias",
        description="ILIAS benchmark toolkit: vector stores, exact search, official evaluation.",
    )
    parser.add_argument("--version", action="version", version=f"ilias-core {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMANDS.values():
        try:
            mod = importlib.import_module(f".{module}", __name__)
        except ModuleNotFoundError as e:
            if e.name and e.name.endswith(module):
                continue  # subcommand not part of this build
            raise
        mod.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, or a bad option (already printed)
        return int(e.code or 0)
    if not getattr(args, "run", None):
        parser.print_help()
        return 1
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print("ilias: interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as e:
        if os.environ.get("ILIAS_DEBUG"):
            raise
        print(f"ilias {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
