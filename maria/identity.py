"""Backbone identity: the one test of whether features, stores, heads and checkpoints belong to
the same pair of backbones (and tokenizer). Plain dicts, no torch: stores and heads record it."""

from __future__ import annotations


class IdentityMismatchError(ValueError):
    """Two things were made by different backbones; the message names both values and the fix."""


IDENTITY_FIELDS = ("mlm", "ar", "tokenizer_fingerprint", "d_mlm", "d_ar", "vocab_size", "mlm_offset")  # what records carry


def identity_record(record: dict) -> dict:
    """The identity fields of a manifest/config, to be stored in another record and compared later."""
    return {k: record.get(k, 0) if k == "mlm_offset" else record.get(k) for k in IDENTITY_FIELDS}


def backbone_identity(record: dict) -> dict:
    """What must agree for features to be interchangeable, from a store manifest, a head's
    metadata, a checkpoint config or `Backbones.describe()`."""
    return {
        "mlm fingerprint": (record.get("mlm") or {}).get("fingerprint"),
        "ar fingerprint": (record.get("ar") or {}).get("fingerprint"),
        "tokenizer_fingerprint": record.get("tokenizer_fingerprint"),
        "d_mlm": record.get("d_mlm"),
        "d_ar": record.get("d_ar"),
        "vocab_size": record.get("vocab_size"),
        # where the MLM predicts x[i] (0 classic, -1 MNTP): the same weights read at another position are other
        # features. Records made before it existed were all classic MLMs (0)
        "mlm_offset": record.get("mlm_offset") or 0,
    }


def check_same_backbones(ref: dict, other: dict, ref_name: str, other_name: str, fix: str) -> None:
    a, b = backbone_identity(ref), backbone_identity(other)
    for key in a:
        if a[key] != b[key]:
            raise IdentityMismatchError(f"{other_name} was made by other backbones than {ref_name} ({key}: {b[key]} vs {a[key]}); {fix}")
