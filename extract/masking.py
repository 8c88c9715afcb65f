"""Masks: which tokens of a window are hidden (METHOD.md, "Masking").

Deterministic from (seed, document, window, mask index): a re-run of the job draws identical
masks, and any block can be recomputed alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np


@dataclass
class MaskingConfig:
    mode: Literal["token", "word", "span"] = "token"  # token (independent) | word (all tokens of a word) | span (contiguous spans)
    rate: float | None = None  # fixed mask rate; None = a rate r ~ Uniform(min_rate, max_rate) per window
    min_rate: float = 0.0  # lower end of the uniform rate
    max_rate: float = 1.0  # upper end of the uniform rate
    span_mean: float = 3.0  # mean span length in tokens (mode span)
    masks_per_window: int = 1  # K masks of each window; the AR runs once for all K

    def __post_init__(self):
        if self.mode not in ("token", "word", "span"):
            raise ValueError(f"masking mode {self.mode!r} is unknown; use token, word or span")
        for name in ("rate", "min_rate", "max_rate"):
            v = getattr(self, name)
            if v is not None and not 0.0 <= v <= 1.0:
                raise ValueError(f"mask {name.replace('_', ' ')} {v} is outside [0, 1]; pick a rate between 0 and 1")
        if self.min_rate > self.max_rate:
            raise ValueError(f"mask min rate {self.min_rate} is above max rate {self.max_rate}")
        if self.masks_per_window < 1 or self.span_mean < 1:
            raise ValueError("masks per window and span mean must be >= 1")


def word_starts(tokenizer, vocab_size: int) -> np.ndarray:
    """starts[v] = True when token v begins a new word (a leading space marker or whitespace)."""
    starts = np.zeros(vocab_size, dtype=bool)
    for v, tok in enumerate(tokenizer.convert_ids_to_tokens(list(range(min(vocab_size, len(tokenizer)))))):
        starts[v] = tok is not None and (tok[:1] in ("Ġ", "▁", " ", "Ċ", "\n") or not tok[:1].isalnum())
    return starts


def sample_mask(
    ids: np.ndarray, cfg: MaskingConfig, seed: int, doc: int, window: int, k: int, starts: np.ndarray | None = None, first_maskable: int = 0
) -> tuple[np.ndarray, float]:
    """(mask, rate) for one window, from its own RNG stream (seed, doc, window, k)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, doc, window, k]))
    n = len(ids)
    rate = cfg.rate if cfg.rate is not None else float(rng.uniform(cfg.min_rate, cfg.max_rate))
    if cfg.mode == "token":
        mask = rng.random(n) < rate
    elif cfg.mode == "word":
        word = np.cumsum(starts[ids] if starts is not None else np.ones(n, dtype=bool)) - 1
        word -= word.min() if n else 0
        mask = (rng.random(int(word.max()) + 1 if n else 0) < rate)[word]
    else:  # span: place geometric-length spans until the rate is reached
        mask = np.zeros(n, dtype=bool)
        target = int(round(rate * n))
        while mask.sum() < target:
            length = min(int(rng.geometric(1.0 / cfg.span_mean)), target - int(mask.sum()))
            start = int(rng.integers(0, max(1, n - length + 1)))
            mask[start : start + length] = True
    mask[:first_maskable] = False
    return mask, rate
