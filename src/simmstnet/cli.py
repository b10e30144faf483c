"""The ``simmstnet`` command line.

Each command lives in ``simmstnet.commands.<module>`` and exposes ``register(subparsers)``, which
adds its parser and sets ``func`` (called with the parsed namespace; returns an exit code or
None). A :class:`~simmstnet.errors.UserError` becomes one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import warnings

from simmstnet import __version__
from simmstnet.errors import UserError

# Order is the order of `simmstnet --help`.
COMMAND_MODULES = (
    "data",
    "simulate",
    "calibrate",
    "train",
    "models",
    "bench",
    "demo",
)


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors in the same one-line style, exit code 2."""

    def error(self, message: str) -> None:  # pragma: no cover - exercised through the CLI tests
        self.print_usage(sys.stderr)
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="simmstnet",
                     description="Sim2real multi-task spatiotemporal forecasting of cellular traffic.")
    parser.add_argument("--version", action="version", version=f"simmstnet {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in COMMAND_MODULES:
        modname = f"simmstnet.commands.{name}"
        try:
            module = importlib.import_module(modname)
        except ModuleNotFoundError as exc:
            if exc.name == modname:  # command not built in this version of the package
                continue
            raise
        module.register(sub)
    return parser


_default_formatwarning = warnings.formatwarning


def _formatwarning(message, category, filename, lineno, line=None) -> str:
    """The package's own warnings as one line, like its errors (no source line)."""
    if getattr(category, "__module__", "").startswith("simmstnet"):
        return f"simmstnet: warning: {message}\n"
    return _default_formatwarning(message, category, filename, lineno, line)


def main(argv: list[str] | None = None) -> int:
    warnings.formatwarning = _formatwarning
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        code = args.func(args)
    except UserError as exc:
        sys.stderr.write(f"simmstnet: error: {exc}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("simmstnet: interrupted\n")
        return 130
    return int(code or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
