"""Stage configs as dataclasses: the same fields come from YAML (--config) and from flags.

Each field's comment in its dataclass is its documentation; `field_help` turns the
`# comment` after a field into its --help text, so the two never drift apart.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import typing
from pathlib import Path

import yaml


def cpu_threads() -> int:
    """Torch CPU threads: $MARIA_TORCH_THREADS, else every core (on a shared CPU, fewer threads than
    cores avoids torch's spin-wait collapse on small matrices)."""
    import os

    return max(1, int(os.environ.get("MARIA_TORCH_THREADS") or os.cpu_count() or 1))


def field_help(cls) -> dict[str, str]:
    helps = {}
    try:
        src = inspect.getsource(cls)
    except (OSError, TypeError):
        return helps
    for m in re.finditer(r"^\s+(\w+):[^=\n]*(?:=[^#\n]*)?#\s*(.+)$", src, re.M):
        helps[m.group(1)] = m.group(2).strip()
    return helps


def _parse_type(tp):
    origin = typing.get_origin(tp)
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)) and len(args) == 1:
        return _parse_type(args[0])
    if origin in (list, tuple):
        inner = args[0] if args else str
        return ("list", inner)
    return ("one", tp)


def add_dataclass_args(parser: argparse.ArgumentParser, cls) -> None:
    """One --flag per field (underscores become dashes), plus --config FILE.yaml."""
    parser.add_argument("--config", help="YAML file with the same fields (flags override it)")
    helps = field_help(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind, tp = _parse_type(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        h = helps.get(f.name, "") + ("" if required else f" (default: {f.default if f.default is not dataclasses.MISSING else f.default_factory()})")
        if tp is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=h)
        elif kind == "list":
            parser.add_argument(flag, dest=f.name, nargs="+", type=tp, default=None, help=h)
        else:
            parser.add_argument(flag, dest=f.name, type=tp if tp in (int, float, str) else str, default=None, help=h)


def build_config(cls, args: argparse.Namespace):
    """YAML values, then flags given on the command line; the dataclass validates the result."""
    values = {}
    if getattr(args, "config", None):
        loaded = yaml.safe_load(Path(args.config).read_text()) or {}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(loaded) - names
        if unknown:
            raise ValueError(f"{args.config}: unknown field(s) {sorted(unknown)}; valid fields are {sorted(names)}")
        values.update(loaded)
    for f in dataclasses.fields(cls):
        v = getattr(args, f.name, None)
        if v is not None:
            values[f.name] = v
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in values
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ValueError(f"missing required option(s): {', '.join('--' + m.replace('_', '-') for m in missing)}")
    return cls(**values)
