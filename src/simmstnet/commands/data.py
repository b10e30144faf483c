"""``simmstnet data {prepare,fetch,import,info}``: the data commands.

Each subcommand lives in its own module under ``simmstnet.commands`` (``data_prepare``,
``data_fetch``, ``data_import``, ``data_info``) with a ``register(subparsers)`` function.
"""
from __future__ import annotations

import importlib

SUBCOMMANDS = ("data_prepare", "data_fetch", "data_import", "data_info")


def register(sub) -> None:
    parser = sub.add_parser("data", help="prepare, download, import and inspect traffic grids",
                            description="Prepare, download, import and inspect traffic grids.")
    inner = parser.add_subparsers(dest="data_command", metavar="SUBCOMMAND", parser_class=type(parser))
    for name in SUBCOMMANDS:
        modname = f"simmstnet.commands.{name}"
        try:
            module = importlib.import_module(modname)
        except ModuleNotFoundError as exc:
            if exc.name == modname:
                continue
            raise
        module.register(inner)
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])
