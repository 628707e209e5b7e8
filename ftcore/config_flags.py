"""The run flags, made from RunConfig's fields: `add_run_options` adds one flag per field (its help,
choices and group from ftcore.config.option), `config_from_args` makes the config from the parsed
flags (an unset flag keeps the field's default)."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from enum import StrEnum
from typing import Any

from ftcore.config import RunConfig


def _flag_type(hint: Any) -> Any:
    """The field's type without None: `int | None` -> int."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        rest = [a for a in typing.get_args(hint) if a is not type(None)]
        return rest[0] if len(rest) == 1 else hint
    return typing.get_origin(hint) or hint


def _shown(default: Any) -> str:
    if isinstance(default, bool):
        return "on" if default else "off"
    if isinstance(default, tuple):
        return ",".join(default)
    return f"{default:g}" if isinstance(default, float) else str(default)


def add_run_options(p: argparse.ArgumentParser, config: type = RunConfig) -> None:
    """One flag per field of `config` (dest = field name), made from the field
    (ftcore.config.option): int/float fields take that type, str, StrEnum and tuple fields a string
    (the config makes the StrEnum member of it, and splits a tuple's comma list), a bool a switch
    (--x when its default is off; --x/--no-x otherwise). Every flag's default is None: an unset flag
    keeps the config's own default."""
    hints = typing.get_type_hints(config)
    group: argparse._ActionsContainer = p
    for f in dataclasses.fields(config):
        meta = f.metadata
        if "group" in meta:
            group = p.add_argument_group(meta["group"])
        kind, default = _flag_type(hints[f.name]), f.default
        help_text = meta.get("help", "")
        if default is not None and "(default" not in help_text and default is not False:
            help_text = f"{help_text} (default {_shown(default)})".strip()
        kw: dict[str, Any] = {"help": help_text, "default": None}
        if kind is bool:
            kw["action"] = "store_true" if default is False else argparse.BooleanOptionalAction
        elif kind in (int, float):
            kw["type"] = kind
        elif kind not in (str, tuple) and not (
            isinstance(kind, type) and issubclass(kind, StrEnum)
        ):
            raise TypeError(f"RunConfig.{f.name}: no flag for type {hints[f.name]}")
        if "choices" in meta:
            kw["choices"] = meta["choices"]
        group.add_argument("--" + f.name.replace("_", "-"), **kw)


def config_from_args(args: argparse.Namespace, config: type = RunConfig) -> Any:
    fields = {f.name for f in dataclasses.fields(config)}
    return config(**{k: v for k, v in vars(args).items() if k in fields and v is not None})
