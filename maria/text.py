"""The text interface of infilling: masked spans written {{N}} (N tokens; {{}} is one).

Whitespace before a span belongs to the span (decision). Byte-level BPE tokenizers (GPT-2,
SmolLM2, OLMo) attach a word's leading space to the word: " river" is one token. Tokenizing
"The river {{3}}" as "The river" + " " + 3 masks would hand the model a lone space token, after
which SmolLM2 mostly continues with digits ("The river 100 through"). So the text before a span
is right-stripped and the N masked tokens include the space: the model writes " flows".
The text after a span keeps its leading space (" through" is the ordinary token).
"""

from __future__ import annotations

import re

MASK_SPAN = re.compile(r"\{\{(\d*)\}\}")


def parse_masked_text(text: str, tokenizer, max_tokens: int | None = None) -> tuple[list[int], list[bool]]:
    """Token ids and mask of a text whose masked spans are written {{N}} (N tokens, any leading space included)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate: bytes that were not UTF-8 on the command line, or a JSON "\ud800"
        raise ValueError(
            f"text {text[:40]!r} has a character that is not valid Unicode at position {e.start} (a lone "
            f"surrogate, e.g. from bytes that are not UTF-8); pass UTF-8 text"
        ) from None
    if text.count("{{") != text.count("}}") or len(MASK_SPAN.findall(text)) != text.count("{{"):
        raise ValueError(
            f"bad mask syntax in {text[:60]!r}: write each masked span as {{{{N}}}} with N a number of tokens, e.g. 'Paris is the {{{{2}}}} of France'"
        )
    ids, mask, pos = [], [], 0
    for m in MASK_SPAN.finditer(text):
        before = text[pos : m.start()]
        # strip only spaces/tabs: a newline before a span stays context (the model is not asked to write it)
        piece = tokenizer(before.rstrip(" \t"), add_special_tokens=False).input_ids if before.strip(" \t") else []
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
