"""The ``vmamba`` command: ``vmamba train``, ``vmamba eval`` and the analysis subcommands.

Each module in :data:`SUBCOMMANDS` exposes ``add_parser(subparsers)``, which registers its
subcommand(s) with ``set_defaults(func=...)``; ``func(args)`` returns the exit status. Modules
are imported lazily and one that does not exist (yet) is skipped.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys

SUBCOMMANDS = ("vmamba.train", "vmamba.evaluate", "vmamba.analysis.cli")


def _missing(module: str, err: ModuleNotFoundError) -> bool:
    """True when ``err`` says ``module`` itself (or a parent package) does not exist."""
    return err.name is not None and (module == err.name or module.startswith(err.name + "."))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vmamba",
        description="Train, evaluate and analyse VMamba models.",
    )
    sub = parser.add_subparsers(title="commands", dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if _missing(name, e):
                continue
            raise
        module.add_parser(sub)
    return parser


def _setup_logging() -> None:
    # Only rank 0 of a torchrun job talks; the others report warnings and errors.
    rank0 = int(os.environ.get("RANK", "0")) == 0
    logging.basicConfig(
        level=logging.INFO if rank0 else logging.WARNING,
        format="%(message)s",
        stream=sys.stderr,
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return 2
    _setup_logging()
    from scanlib.errors import ScanlibError

    from .data.errors import UsageError
    from .train import TrainingInterrupted

    prog = f"vmamba {args.command}"
    try:
        return int(args.func(args) or 0)
    except TrainingInterrupted as e:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"{prog}: {e}", file=sys.stderr)
        return 128 + int(e.signum)
    except (UsageError, ScanlibError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 128 + int(signal.SIGINT)


if __name__ == "__main__":
    sys.exit(main())
