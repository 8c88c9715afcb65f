"""Tiny random backbones built from transformers configs and saved like real checkpoints.

Two pairs, as the tests need them:
- "modernbert-olmo": OLMo-style AR tokenizer; the MLM's tokenizer has the same ids plus its own
  special tokens ([CLS] [SEP] [MASK] [PAD]) appended, like ModernBERT's relation to OLMo's.
- "bert-gpt2": one identical tokenizer, plus a mask token for the MLM.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    BertConfig,
    BertForMaskedLM,
    GPT2Config,
    GPT2LMHeadModel,
    ModernBertConfig,
    ModernBertForMaskedLM,
    OlmoConfig,
    OlmoForCausalLM,
    PreTrainedTokenizerFast,
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog. It was 1984, and 3.14159 is pi!",
    "Infilling: fill in the blanks between a past and a future context.\nNew line, tabs\tand 'quotes'.",
    "Paris is the capital of France. Berlin is the capital of Germany. Rome is in Italy.",
    "Masked language models read both sides; autoregressive models read only the past.",
    "A cat sat on the mat, and the dog slept by the door while rain fell outside.",
    "Numbers like 12, 345 and 6789 appear in text; so do symbols such as %, $ and #.",
] * 4

EOT = "<|endoftext|>"


def _bpe(corpus, vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    return tok


def make_tokenizers(vocab_size: int = 400, corpus=CORPUS, mlm_specials: bool = True):
    """(ar_tokenizer, mlm_tokenizer) sharing ids; the MLM's special tokens come after the shared ones."""
    core = _bpe(corpus, vocab_size)
    ar = PreTrainedTokenizerFast(tokenizer_object=copy.deepcopy(core), bos_token=EOT, eos_token=EOT, pad_token=EOT)
    mlm_core = copy.deepcopy(core)
    if mlm_specials:
        mlm_core.add_special_tokens(["[CLS]", "[SEP]", "[MASK]", "[PAD]"])
        cls, sep = mlm_core.token_to_id("[CLS]"), mlm_core.token_to_id("[SEP]")
        mlm_core.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
        mlm = PreTrainedTokenizerFast(tokenizer_object=mlm_core, cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]", pad_token="[PAD]")
    else:
        mlm_core.add_special_tokens(["[MASK]"])
        mlm = PreTrainedTokenizerFast(tokenizer_object=mlm_core, mask_token="[MASK]", pad_token=EOT, eos_token=EOT)
    return ar, mlm


def build_pair(root: Path, kind: str = "modernbert-olmo", seed: int = 0, hidden: int = 32, mismatched: bool = False) -> tuple[str, str]:
    """Save a tiny (mlm, ar) pair under root and return their folder paths."""
    torch.manual_seed(seed)
    ar_tok, mlm_tok = make_tokenizers(mlm_specials=(kind == "modernbert-olmo"))
    if mismatched:  # an MLM whose tokenizer splits text differently
        _, mlm_tok = make_tokenizers(vocab_size=300, corpus=[c[::-1] for c in CORPUS], mlm_specials=(kind == "modernbert-olmo"))
    v_ar, v_mlm = len(ar_tok), len(mlm_tok)
    common = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=512)
    if kind == "modernbert-olmo":
        mlm = ModernBertForMaskedLM(
            ModernBertConfig(
                vocab_size=v_mlm,
                pad_token_id=mlm_tok.pad_token_id,
                cls_token_id=mlm_tok.cls_token_id,
                sep_token_id=mlm_tok.sep_token_id,
                bos_token_id=mlm_tok.cls_token_id,
                eos_token_id=mlm_tok.sep_token_id,
                global_attn_every_n_layers=2,
                local_attention=16,
                **common,
            )
        )
        ar = OlmoForCausalLM(
            OlmoConfig(
                vocab_size=v_ar + 8, num_key_value_heads=4, pad_token_id=ar_tok.eos_token_id, bos_token_id=None, eos_token_id=ar_tok.eos_token_id, **common
            )
        )
    elif kind == "bert-gpt2":
        mlm = BertForMaskedLM(BertConfig(vocab_size=v_mlm, pad_token_id=mlm_tok.pad_token_id, **common))
        ar = GPT2LMHeadModel(
            GPT2Config(vocab_size=v_ar, n_embd=hidden, n_layer=2, n_head=4, n_positions=512, bos_token_id=ar_tok.bos_token_id, eos_token_id=ar_tok.eos_token_id)
        )
    else:
        raise ValueError(kind)
    paths = []
    for name, model, tok in (("mlm", mlm, mlm_tok), ("ar", ar, ar_tok)):
        out = Path(root) / f"{kind}-{name}"
        model.eval().save_pretrained(out)
        tok.save_pretrained(out)
        paths.append(str(out))
    return paths[0], paths[1]
