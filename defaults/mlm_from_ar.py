"""The demo MLM's architecture and its initialisation from the AR (used by defaults/pretrain_mlm.py).

ModernBERT's blocks are the same computation as Llama's except for LayerNorm in place of RMSNorm
(mean subtraction), so the AR's blocks copied into it, now run with bidirectional attention,
start close to what the AR computes; its token embeddings (tied to the MLM's decoder) give the
output layer the AR's lexical knowledge from step 0.
"""

from __future__ import annotations

import math

import torch
from transformers import ModernBertConfig, ModernBertForMaskedLM

LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3", "olmo", "olmo2")  # q/k/v/o + gate/up/down, rotary, silu


def resolve_sizes(cfg, ar_config) -> dict:
    """Fill the None sizes from the AR, and decide whether its blocks can be copied."""
    d_ar = ar_config.hidden_size
    ar_inter = getattr(ar_config, "intermediate_size", None)  # GPT-2 style configs call it n_inner
    hidden = cfg.hidden_size or (d_ar if cfg.init_from_ar else 256)
    llama_like = getattr(ar_config, "model_type", "") in LLAMA_LIKE
    want_layers = cfg.init_from_ar and cfg.copy_ar_layers and llama_like and cfg.first_ar_layer + cfg.num_layers <= ar_config.num_hidden_layers
    heads = cfg.num_heads or (ar_config.num_attention_heads if want_layers else 4)
    inter = cfg.intermediate_size or (ar_inter if want_layers else 2 * hidden)
    head_dim_ok = getattr(ar_config, "head_dim", d_ar // ar_config.num_attention_heads) * ar_config.num_attention_heads == d_ar
    copy_layers = want_layers and hidden == d_ar and heads == ar_config.num_attention_heads and inter == ar_inter and head_dim_ok
    if cfg.init_from_ar and cfg.copy_ar_layers and not copy_layers:
        print(
            f"note: not copying AR blocks ({ar_config.model_type}, hidden {d_ar}, heads {ar_config.num_attention_heads}, "
            f"mlp {ar_inter} vs MLM {hidden}/{heads}/{inter}); copying embeddings only"
        )
    if hidden % heads:
        raise ValueError(f"hidden_size {hidden} is not a multiple of num_heads {heads}; set num_heads")
    return dict(hidden=hidden, heads=heads, inter=inter, copy_layers=copy_layers)


def build_mlm(cfg, sizes: dict, tokenizer, ar_config):
    rope_theta = float(getattr(ar_config, "rope_parameters", None) and ar_config.rope_parameters.get("rope_theta") or 160000.0)
    config = ModernBertConfig(
        vocab_size=math.ceil(len(tokenizer) / 64) * 64,  # rows past len(tokenizer) are never targets
        hidden_size=sizes["hidden"],
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=sizes["heads"],
        intermediate_size=sizes["inter"],
        hidden_activation="silu" if sizes["copy_layers"] else "gelu",  # Llama's MLP is SiLU-gated
        layer_types=["full_attention"] * cfg.num_layers,  # short windows: global attention everywhere
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": rope_theta}},
        max_position_embeddings=max(cfg.seq_len, getattr(ar_config, "max_position_embeddings", 0) or 0, 512),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        cls_token_id=tokenizer.bos_token_id,
        sep_token_id=tokenizer.eos_token_id,
        sparse_prediction=True,  # logits only at masked positions while training: the (V x d) head dominates otherwise
        tie_word_embeddings=True,
    )
    return ModernBertForMaskedLM(config).float()


@torch.no_grad()
def init_from_ar(mlm, ar, tokenizer, copy_layers: bool, unigram_logp: torch.Tensor, first_layer: int = 0) -> set[str]:
    """Copy the AR's embeddings (and blocks first_layer..) into the MLM; return the names of copied parameters."""
    copied = set()
    emb = ar.get_input_embeddings().weight.float()
    n, d_ar = emb.shape
    target = mlm.model.embeddings.tok_embeddings.weight
    d = target.shape[1]
    if d <= d_ar:  # keep the d directions of largest variance (exact copy when d == d_ar)
        basis = torch.eye(d_ar) if d == d_ar else torch.linalg.svd(emb - emb.mean(0), full_matrices=False).Vh[:d].T
        new = emb @ basis
    else:  # pad with zeros: the extra dimensions start unused
        new = torch.cat([emb, torch.zeros(n, d - d_ar)], 1)
    n = min(n, target.shape[0])
    target[:n] = new[:n]
    target[tokenizer.mask_token_id] = new[:n].mean(0)  # the mask token starts as "an average token"
    copied.add("model.embeddings.tok_embeddings.weight")
    mlm.decoder.bias.copy_(unigram_logp)  # start the tied output at the unigram distribution
    # the AR's embedding rows are ~15x larger than a fresh init's: damp the random head at first,
    # or its noise (logit std ~ row norm) swamps the unigram start
    mlm.head.norm.weight.fill_(0.1)
    if not copy_layers:
        return copied
    layers = ar.model.layers[first_layer:]
    rms = emb.pow(2).mean(1).sqrt().mean()  # typical embedding norm: the AR's residual stream starts at this scale
    mlm.model.embeddings.norm.weight.fill_(rms)  # so the MLM's (normalised) stream starts at the AR's scale
    for i, block in enumerate(mlm.model.layers):
        src = layers[i].self_attn
        n_rep = src.q_proj.weight.shape[0] // src.k_proj.weight.shape[0]
        head_dim = src.q_proj.weight.shape[0] // ar.config.num_attention_heads

        def expand(w, head_dim=head_dim, n_rep=n_rep):  # grouped-query k/v heads -> one k/v head per query head, as repeat_kv does
            return w.view(-1, head_dim, w.shape[1]).repeat_interleave(n_rep, 0).reshape(-1, w.shape[1])

        wqkv = torch.cat([src.q_proj.weight, expand(src.k_proj.weight), expand(src.v_proj.weight)], 0)
        norm_w = layers[i].input_layernorm.weight
        if i == 0:  # ModernBERT's first block has no attention norm: fold the AR's into Wqkv
            wqkv = wqkv * (norm_w / rms)[None, :]
        else:
            block.attn_norm.weight.copy_(norm_w)
        block.attn.Wqkv.weight.copy_(wqkv)
        block.attn.Wo.weight.copy_(src.o_proj.weight)
        block.mlp_norm.weight.copy_(layers[i].post_attention_layernorm.weight)
        mlp = layers[i].mlp
        block.mlp.Wi.weight.copy_(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight], 0))  # act(first half) * second
        block.mlp.Wo.weight.copy_(mlp.down_proj.weight)
        copied |= {f"model.layers.{i}.{k}" for k, _ in block.named_parameters()}
    copied.add("model.embeddings.norm.weight")
    return copied
