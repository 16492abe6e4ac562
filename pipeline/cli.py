"""``mdeploy``: one entry point, one subcommand per stage.

Every subcommand lives in ``pipeline/commands/<name>.py`` with ``add_parser(sub)``
(which sets ``func``) so a new stage is one new module plus one name below.
Errors: ``InputError`` (bad user input) -> one line on stderr, exit 2; with
``--debug`` the traceback too. Anything else is a bug and shows its traceback.
"""
from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys

_ENVIRONMENT_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)

COMMANDS = ("run", "doctor", "models", "train", "export", "quantize", "verify", "profile")


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line (no usage dump) and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("global options")
    g.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="show tracebacks on errors")
    g.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                   help="no progress or chatter")
    g.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                   help="print one machine-readable JSON document on stdout")
    parser = _Parser(prog="mdeploy", parents=[common],
                     description="Deploy PyTorch vision models to phones: export, quantize, "
                                 "verify parity, profile.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name in COMMANDS:
        mod = importlib.import_module(f"pipeline.commands.{name}")
        mod.add_parser(sub, common)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    parser = build_parser()
    args = parser.parse_args(argv)
    for flag in ("debug", "quiet", "json"):
        if not hasattr(args, flag):
            setattr(args, flag, False)
    from models.errors import InputError
    from pipeline.ui import UI
    ui = UI(quiet=args.quiet, json_mode=args.json, debug=args.debug)
    from exporters.fileio import scratch_tempdir
    try:
        # every temporary file of this run (ours and the converters') in one folder that a
        # later run deletes if this process is killed
        with scratch_tempdir():
            code = args.func(args, ui)
    except InputError as exc:
        if args.debug:
            raise
        ui.error(str(exc))
        return 2
    except KeyboardInterrupt:
        ui.error("interrupted")
        return 130
    except OSError as exc:
        # a full disk or a read-only file system is the machine's state, not a bug: one line
        # (the staged writes have already removed their temporary files)
        if exc.errno not in _ENVIRONMENT_ERRNOS or args.debug:
            raise
        ui.error(environment_error_line(exc, getattr(args, "out", None)))
        return 2
    return int(code or 0)


def environment_error_line(exc: OSError, out: str | os.PathLike | None) -> str:
    """One line for a full disk / read-only file system: the file the write failed on and the
    ``--out`` the command was writing, so the user knows which disk to free without reading
    a staging folder's (or a temporary file's) name. The staged writes have removed their
    partial files by then; an earlier result in ``--out`` is kept."""
    where = exc.filename or out or "output"
    line = f"{where}: {os.strerror(exc.errno)}"
    if out is not None:
        line += f" (while writing --out {out}; free space there and rerun)"
    return line


if __name__ == "__main__":
    sys.exit(main())
