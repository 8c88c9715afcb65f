"""Shared helpers for the extraction tests (the fixtures themselves live in conftest.py)."""
import dataclasses
import sys
import typing

from extract.job import ExtractConfig

ARRAYS = ("features", "targets", "doc_ids", "window_ids", "positions", "mask_rates")


def config(pairs, corpus, out, kind="modernbert-olmo", **kw):
    kw = {"window_length": 24, "docs_per_block": 3, "batch_size": 4, "masks_per_window": 2, **kw}
    return ExtractConfig(mlm=pairs[kind][0], ar=pairs[kind][1], corpus=corpus, out=str(out), **kw)


def block(file: int, row: int) -> str:
    from extract.corpus import block_id

    return block_id(file, row)


def read_all(url, **kw):
    from storage import open_store

    store = open_store(url, **kw)
    return {b: store.read_block(b) for b in store.committed_blocks()}


def maria_command(*args) -> list[str]:
    """The `maria` CLI as a subprocess command (one line to change when the CLI module moves)."""
    return [sys.executable, "-m", "app.cli", *map(str, args)]


def config_from_args(argv: list[str]) -> ExtractConfig:
    """`maria extract` arguments -> ExtractConfig without argparse: --flag value pairs and boolean
    --flag / --no-flag, typed by the dataclass's annotations (to be re-pointed at the real CLI parser)."""
    hints = typing.get_type_hints(ExtractConfig)
    names = {f.name for f in dataclasses.fields(ExtractConfig)}
    values, i = {}, 0
    while i < len(argv):
        flag = argv[i]
        assert flag.startswith("--"), f"expected a --flag, got {flag!r}"
        name = flag[2:].replace("-", "_")
        if name.startswith("no_") and name[3:] in names and hints[name[3:]] is bool:
            values[name[3:]], i = False, i + 1
            continue
        assert name in names, f"{flag} is not an ExtractConfig field"
        if hints[name] is bool:
            values[name], i = True, i + 1
            continue
        kinds = [t for t in typing.get_args(hints[name]) or (hints[name],) if t is not type(None)]
        values[name], i = kinds[0](argv[i + 1]), i + 2
    return ExtractConfig(**values)
