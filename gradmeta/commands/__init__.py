"""Subcommands of the ``gradmeta`` command beyond ``run`` / ``report`` / ``tasks``.

Each module here defines ``add_parser(subparsers)``, which registers its parser and calls
``parser.set_defaults(func=callable)``; the callable gets the parsed ``args`` and returns an exit
status (``None`` means 0). Other packages add subcommands through the ``gradmeta.commands``
entry-point group (each entry point names such a module).
"""
from __future__ import annotations

import importlib

__all__ = ["BUILTIN", "ENTRY_POINT_GROUP", "command_modules"]

#: Built-in subcommand modules, in the order ``gradmeta --help`` lists them.
BUILTIN = ("curvature", "inr", "lora")
ENTRY_POINT_GROUP = "gradmeta.commands"


def command_modules() -> list:
    """The built-in subcommand modules, then those of installed ``gradmeta.commands`` entry points."""
    from importlib.metadata import entry_points

    mods = [importlib.import_module(f"{__name__}.{name}") for name in BUILTIN]
    return mods + [ep.load() for ep in entry_points(group=ENTRY_POINT_GROUP)]
