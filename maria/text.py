"""The text interface of infilling: masked spans written {{N}} (N tokens; {{}} is one)."""
from __future__ import annotations

import re

MASK_SPAN = re.compile(r"\{\{(\d*)\}\}")


def parse_masked_text(text: str, tokenizer, max_tokens: int | None = None) -> tuple[list[int], list[bool]]:
    """Token ids and mask of a text whose masked spans are written {{N}} (N tokens)."""
    if text.count("{{") != text.count("}}") or len(MASK_SPAN.findall(text)) != text.count("{{"):
        raise ValueError(f"bad mask syntax in {text[:60]!r}: write each masked span as {{{{N}}}} with N a number of tokens, e.g. 'Paris is the {{{{2}}}} of France'")
    ids, mask, pos = [], [], 0
    for m in MASK_SPAN.finditer(text):
        piece = tokenizer(text[pos : m.start()], add_special_tokens=False).input_ids
        n = int(m.group(1) or 1)
        if n == 0:
            raise ValueError("a masked span {{0}} has no tokens; write {{N}} with N >= 1")
        if max_tokens is not None and len(ids) + len(piece) + n > max_tokens:
            raise ValueError(f"text {text[:40]!r}... needs more than {max_tokens} tokens, the models' limit; shorten it or its {{{{N}}}} spans")
        ids += piece + [0] * n
        mask += [False] * len(piece) + [True] * n
        pos = m.end()
    piece = tokenizer(text[pos:], add_special_tokens=False).input_ids
    if max_tokens is not None and len(ids) + len(piece) > max_tokens:
        raise ValueError(f"text {text[:40]!r}... has {len(ids) + len(piece)} tokens, over the models' limit of {max_tokens}; shorten it")
    return ids + piece, mask + [False] * len(piece)
