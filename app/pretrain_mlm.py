"""Pre-train a small ModernBERT masked LM that shares the AR's tokenizer (the demo's MLM expert).

MARIA needs an MLM and an AR with one vocabulary. For the offline demo there is no such MLM to
download, so we build one: the AR's tokenizer plus a mask token, a small ModernBERT, trained
with masked-token prediction on CPU for a few minutes.

Tokenizer (decision): the MLM tokenizer is the AR tokenizer with one added special token,
`<|mask|>`; ordinary text gets exactly the AR's ids. It wraps input in nothing (SmolLM2's
tokenizer adds no BOS/EOS): no [CLS]/[SEP], so MLM position i is token i and training windows
look exactly like the windows MARIA feeds at extraction time.

Initialisation from the AR (init_from_ar): a from-scratch 8-minute MLM reaches only ~10%
masked-token accuracy (METHOD.md), so by default the MLM starts from the AR: its token
embeddings (the MLM decoder is tied to them, so the output layer starts with the AR's lexical
knowledge) and, for Llama-style ARs, its first `num_layers` transformer blocks, now run with
bidirectional attention. ModernBERT's blocks are the same computation as Llama's except for
LayerNorm in place of RMSNorm (mean subtraction), so the copied blocks start close to the AR's.

Measured on 2 CPU cores, same token budget (150k tokens, wiki sample, 50% masking held out):
AR-initialised 576x4 9.4% at batch 32 vs 14.3% at batch 8; from scratch ~4.8% (barely above the
unigram start). Freezing the tied embeddings costs nothing in accuracy and makes steps cheaper;
training at 50% masking beats 30% slightly (15.0% vs 14.3%). Hence the defaults below.
"""
from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow.parquet as pq
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, ModernBertConfig, ModernBertForMaskedLM
from tqdm.auto import tqdm

from app.corpus_wiki import prepare_wiki_corpus
from app.defaults import default_cache_dir
from maria.device import cpu_threads

MASK_TOKEN = "<|mask|>"
LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3", "olmo", "olmo2")  # q/k/v/o + gate/up/down, rotary, silu


@dataclass
class PretrainMLMConfig:
    """One MLM pre-training run. None sizes are resolved from the AR (see resolve_sizes)."""

    tokenizer_from: str  # AR folder (save_pretrained): its tokenizer, and its weights when init_from_ar
    corpus: str  # parquet file/dir (column "text"), text file/dir, or "wiki" (the offline Wikipedia sample)
    out: str  # output folder: model + tokenizer (save_pretrained), metrics.json, pretrain_config.json
    hidden_size: int | None = None  # None: the AR's hidden size when init_from_ar (exact embedding copy), else 256
    num_layers: int = 4  # encoder blocks; with init_from_ar these are the AR's first blocks
    num_heads: int | None = None  # None: the AR's head count when its blocks are copied, else 4
    intermediate_size: int | None = None  # None: the AR's MLP width when its blocks are copied, else 2 * hidden_size
    seq_len: int = 128  # training window in tokens; windows never mix two documents
    mask_prob: float = 0.5  # fraction masked per training window; 0.5 = MARIA's mean rate (r ~ U(0,1)) and the eval rate
    batch_size: int = 8  # windows per step; on a CPU budget more small steps beat fewer big ones (measured)
    lr: float = 1e-3  # peak AdamW learning rate for new weights
    ar_lr_scale: float = 0.3  # weights copied from the AR train at lr * this, so they are adapted, not erased
    max_minutes: float = 8.0  # wall-clock training budget; the cosine schedule follows time or steps, whichever ends first
    max_steps: int | None = None  # step budget (None: time only)
    seed: int = 0  # model init, batch order, masks
    init_from_ar: bool = True  # start from the AR's embeddings (+ blocks, see copy_ar_layers); False: from scratch
    copy_ar_layers: bool = True  # with init_from_ar, also copy the AR's first num_layers blocks when shapes allow
    freeze_embeddings: bool = True  # with init_from_ar, keep the copied (tied) embeddings fixed: cheaper steps, AR output space
    val_corpus: str | None = None  # held-out corpus; None: the wiki val split for "wiki", else val_fraction of documents
    val_fraction: float = 0.1  # documents held out when val_corpus is None
    eval_mask_prob: float = 0.5  # masking rate of the held-out accuracy measurement
    eval_windows: int = 256  # held-out windows evaluated (keeps evaluation under a minute on CPU)
    weight_decay: float = 0.01  # AdamW weight decay (not on norms, biases or embeddings)
    warmup_steps: int = 20  # linear warm-up steps before the cosine decay

    def __post_init__(self):
        if not Path(self.tokenizer_from).expanduser().exists():
            raise ValueError(f"tokenizer_from {self.tokenizer_from!r} does not exist; pass the AR folder (e.g. from `convert_gguf_ar`)")
        if self.corpus != "wiki" and not Path(self.corpus).expanduser().exists():
            raise ValueError(f"corpus {self.corpus!r} does not exist; pass a parquet/text file or folder, or 'wiki'")
        if not 0.0 < self.mask_prob < 1.0 or not 0.0 < self.eval_mask_prob < 1.0:
            raise ValueError(f"mask_prob and eval_mask_prob must be in (0, 1), got {self.mask_prob}, {self.eval_mask_prob}")
        if self.max_minutes <= 0 or (self.max_steps is not None and self.max_steps < 1):
            raise ValueError("max_minutes must be > 0 and max_steps >= 1 (or None)")
        for name in ("num_layers", "seq_len", "batch_size", "eval_windows"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden_size is not None and self.num_heads is not None and self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} must be a multiple of num_heads {self.num_heads}")


# ---------------------------------------------------------------------------------------------
# data


def _read_documents(path: str) -> list[str]:
    p = Path(path).expanduser()
    files = sorted(p.glob("*.parquet")) or sorted(p.glob("*.txt")) if p.is_dir() else [p]
    if not files:
        raise ValueError(f"corpus folder {p} holds no .parquet or .txt files")
    docs = []
    for f in files:
        if f.suffix == ".parquet":
            table = pq.read_table(f)
            if "text" not in table.column_names:
                raise ValueError(f"{f} has no 'text' column (columns: {table.column_names})")
            docs += [t for t in table.column("text").to_pylist() if t]
        else:  # plain text: blank-line separated paragraphs are documents
            docs += [d.strip() for d in f.read_text(encoding="utf-8").split("\n\n") if d.strip()]
    return docs


def load_corpora(cfg: PretrainMLMConfig) -> tuple[list[str], list[str]]:
    """(train documents, held-out documents), split by document and deterministic in cfg.seed."""
    if cfg.corpus == "wiki":
        train, val = prepare_wiki_corpus(default_cache_dir() / "wiki", seed=cfg.seed)
        return _read_documents(str(train)), _read_documents(str(cfg.val_corpus or val))
    docs = _read_documents(cfg.corpus)
    if cfg.val_corpus:
        return docs, _read_documents(cfg.val_corpus)
    if len(docs) < 2:  # a single document: hold out its tail
        cut = int(len(docs[0]) * (1 - cfg.val_fraction))
        return [docs[0][:cut]], [docs[0][cut:]]
    order = list(range(len(docs)))
    random.Random(cfg.seed).shuffle(order)
    n_val = max(1, round(cfg.val_fraction * len(docs)))
    return [docs[i] for i in sorted(order[n_val:])], [docs[i] for i in sorted(order[:n_val])]


def make_windows(docs: list[str], tokenizer, seq_len: int, pad_id: int, min_len: int = 8) -> torch.Tensor:
    """(N, seq_len) token windows, each inside one document; a short last piece is padded with pad_id."""
    windows = []
    for ids in tokenizer(docs, add_special_tokens=False).input_ids:
        for start in range(0, len(ids), seq_len):
            piece = ids[start : start + seq_len]
            if len(piece) >= min(min_len, len(ids)):
                windows.append(piece + [pad_id] * (seq_len - len(piece)))
    if not windows:
        raise ValueError("the corpus produced no token windows; is it empty?")
    return torch.tensor(windows, dtype=torch.long)


def mask_batch(windows: torch.Tensor, attn: torch.Tensor, prob: float, mask_id: int, gen: torch.Generator):
    """Replace a random `prob` of real tokens by the mask token (at least one per window); labels -100 elsewhere.

    Always the mask token, never BERT's 80/10/10: MARIA only ever shows the MLM mask tokens."""
    masked = (torch.rand(windows.shape, generator=gen) < prob) & attn.bool()
    first = torch.zeros_like(masked)
    first[:, 0] = True
    masked |= first & ~masked.any(1, keepdim=True)  # never a window with nothing to predict
    inputs = windows.masked_fill(masked, mask_id)
    labels = windows.masked_fill(~masked, -100)
    return inputs, labels


# ---------------------------------------------------------------------------------------------
# model


def resolve_sizes(cfg: PretrainMLMConfig, ar_config) -> dict:
    """Fill the None sizes from the AR, and decide whether its blocks can be copied."""
    d_ar = ar_config.hidden_size
    ar_inter = getattr(ar_config, "intermediate_size", None)  # GPT-2 style configs call it n_inner
    hidden = cfg.hidden_size or (d_ar if cfg.init_from_ar else 256)
    llama_like = getattr(ar_config, "model_type", "") in LLAMA_LIKE
    want_layers = cfg.init_from_ar and cfg.copy_ar_layers and llama_like and cfg.num_layers <= ar_config.num_hidden_layers
    heads = cfg.num_heads or (ar_config.num_attention_heads if want_layers else 4)
    inter = cfg.intermediate_size or (ar_inter if want_layers else 2 * hidden)
    head_dim_ok = getattr(ar_config, "head_dim", d_ar // ar_config.num_attention_heads) * ar_config.num_attention_heads == d_ar
    copy_layers = (want_layers and hidden == d_ar and heads == ar_config.num_attention_heads
                   and inter == ar_inter and head_dim_ok)
    if cfg.init_from_ar and cfg.copy_ar_layers and not copy_layers:
        print(f"note: not copying AR blocks ({ar_config.model_type}, hidden {d_ar}, heads {ar_config.num_attention_heads}, "
              f"mlp {ar_inter} vs MLM {hidden}/{heads}/{inter}); copying embeddings only")
    if hidden % heads:
        raise ValueError(f"hidden_size {hidden} is not a multiple of num_heads {heads}; set num_heads")
    return dict(hidden=hidden, heads=heads, inter=inter, copy_layers=copy_layers)


def build_mlm(cfg: PretrainMLMConfig, sizes: dict, tokenizer, ar_config):
    rope_theta = float(getattr(ar_config, "rope_parameters", None) and ar_config.rope_parameters.get("rope_theta") or 160000.0)
    config = ModernBertConfig(
        vocab_size=math.ceil(len(tokenizer) / 64) * 64,  # rows past len(tokenizer) are never targets
        hidden_size=sizes["hidden"], num_hidden_layers=cfg.num_layers, num_attention_heads=sizes["heads"],
        intermediate_size=sizes["inter"],
        hidden_activation="silu" if sizes["copy_layers"] else "gelu",  # Llama's MLP is SiLU-gated
        layer_types=["full_attention"] * cfg.num_layers,  # short windows: global attention everywhere
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": rope_theta}},
        max_position_embeddings=max(cfg.seq_len, getattr(ar_config, "max_position_embeddings", 0) or 0, 512),
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        cls_token_id=tokenizer.bos_token_id, sep_token_id=tokenizer.eos_token_id,
        sparse_prediction=True,  # logits only at masked positions while training: the (V x d) head dominates otherwise
        tie_word_embeddings=True,
    )
    return ModernBertForMaskedLM(config).float()


@torch.no_grad()
def init_from_ar(mlm, ar, tokenizer, copy_layers: bool, unigram_logp: torch.Tensor) -> set[str]:
    """Copy the AR's embeddings (and first blocks) into the MLM; return the names of copied parameters."""
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
    layers = ar.model.layers
    rms = emb.pow(2).mean(1).sqrt().mean()  # typical embedding norm: the AR's residual stream starts at this scale
    mlm.model.embeddings.norm.weight.fill_(rms)  # so the MLM's (normalised) stream starts at the AR's scale
    for i, block in enumerate(mlm.model.layers):
        src = layers[i].self_attn
        n_rep = src.q_proj.weight.shape[0] // src.k_proj.weight.shape[0]
        head_dim = src.q_proj.weight.shape[0] // ar.config.num_attention_heads

        def expand(w):  # grouped-query k/v heads -> one k/v head per query head, as repeat_kv does
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


# ---------------------------------------------------------------------------------------------
# training


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, pad_id: int, mask_id: int, prob: float, seed: int, batch_size: int) -> dict:
    """Masked-token accuracy and loss on held-out windows at a fixed masking rate (fixed masks)."""
    model.eval()
    gen = torch.Generator().manual_seed(seed + 12345)
    correct = total = 0
    loss_sum = 0.0
    for start in range(0, len(windows), batch_size):
        x = windows[start : start + batch_size]
        attn = (x != pad_id).long()
        inputs, labels = mask_batch(x, attn, prob, mask_id, gen)
        out = model(input_ids=inputs, attention_mask=attn, labels=labels)
        target = labels[labels != -100]  # sparse prediction: logits are only the masked positions, in order
        correct += (out.logits.argmax(-1) == target).sum().item()
        loss_sum += out.loss.item() * target.numel()
        total += target.numel()
    model.train()
    return {"accuracy": correct / max(total, 1), "loss": loss_sum / max(total, 1), "masked_tokens": total}


def _config_key(cfg: PretrainMLMConfig) -> dict:
    key = asdict(cfg)
    key.pop("out")
    return key


def pretrain_mlm(cfg: PretrainMLMConfig) -> dict:
    """Train (or reuse) the MLM described by cfg; save it to cfg.out and return its metrics."""
    out = Path(cfg.out).expanduser()
    key = _config_key(cfg)
    if (out / "metrics.json").exists() and (out / "pretrain_config.json").exists():
        if json.loads((out / "pretrain_config.json").read_text()) == key:
            print(f"reusing the MLM in {out} (same config; delete the folder to retrain)")
            return json.loads((out / "metrics.json").read_text())
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cpu_threads())

    tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer_from)
    if tokenizer.mask_token is None:
        tokenizer.add_special_tokens({"mask_token": MASK_TOKEN})
    if tokenizer.pad_token is None:  # padding only fills a document's last window; any special token will do
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token or tokenizer.mask_token
    ar_config = AutoConfig.from_pretrained(cfg.tokenizer_from)
    sizes = resolve_sizes(cfg, ar_config)

    train_docs, val_docs = load_corpora(cfg)
    pad_id, mask_id = tokenizer.pad_token_id, tokenizer.mask_token_id
    train = make_windows(train_docs, tokenizer, cfg.seq_len, pad_id)
    val = make_windows(val_docs, tokenizer, cfg.seq_len, pad_id)
    val = val[torch.randperm(len(val), generator=torch.Generator().manual_seed(cfg.seed))[: cfg.eval_windows]]
    n_train_tokens = int((train != pad_id).sum())
    print(f"MLM corpus: {len(train_docs)} train docs ({n_train_tokens:,} tokens, {len(train)} windows), "
          f"{len(val_docs)} held-out docs ({len(val)} windows evaluated)")

    model = build_mlm(cfg, sizes, tokenizer, ar_config)
    counts = torch.bincount(train[train != pad_id], minlength=model.config.vocab_size).float()
    unigram_logp = torch.log((counts + 0.1) / (counts + 0.1).sum())
    copied: set[str] = set()
    if cfg.init_from_ar:
        ar = AutoModelForCausalLM.from_pretrained(cfg.tokenizer_from, dtype=torch.float32)
        copied = init_from_ar(model, ar, tokenizer, sizes["copy_layers"], unigram_logp)
        del ar
    else:
        with torch.no_grad():
            model.decoder.bias.copy_(unigram_logp)
    init = "scratch" if not cfg.init_from_ar else ("ar-embeddings+blocks" if sizes["copy_layers"] else "ar-embeddings")
    n_params = sum(p.numel() for p in model.parameters())
    print(f"MLM: ModernBERT {sizes['hidden']}x{cfg.num_layers} (heads {sizes['heads']}, mlp {sizes['inter']}), "
          f"{n_params / 1e6:.1f}M parameters, init {init}")

    # three groups: copied weights learn slower; decay only on matrices that are not embeddings
    groups = {"copied": [], "decay": [], "no_decay": []}
    for name, p in model.named_parameters():
        if cfg.init_from_ar and cfg.freeze_embeddings and name == "model.embeddings.tok_embeddings.weight":
            p.requires_grad_(False)
        elif name in copied:
            groups["copied"].append(p)
        elif p.ndim >= 2 and "embeddings" not in name:
            groups["decay"].append(p)
        else:
            groups["no_decay"].append(p)
    param_groups = [
        {"params": groups["copied"], "lr_scale": cfg.ar_lr_scale, "weight_decay": 0.0},
        {"params": groups["decay"], "lr_scale": 1.0, "weight_decay": cfg.weight_decay},
        {"params": groups["no_decay"], "lr_scale": 1.0, "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW([g for g in param_groups if g["params"]], lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)

    gen = torch.Generator().manual_seed(cfg.seed)
    budget_s = cfg.max_minutes * 60
    before = evaluate(model, val, pad_id, mask_id, cfg.eval_mask_prob, cfg.seed, cfg.batch_size)
    print(f"held-out masked-token accuracy at {cfg.eval_mask_prob:.0%} masking before training: {before['accuracy']:.2%}")
    model.train()
    step, tokens, order, pos = 0, 0, torch.randperm(len(train), generator=gen), 0
    t0 = time.time()
    bar = tqdm(total=cfg.max_steps, desc="pretrain-mlm", unit="step")
    while True:
        elapsed = time.time() - t0
        progress = max(elapsed / budget_s, step / cfg.max_steps if cfg.max_steps else 0.0)
        if progress >= 1.0:
            break
        # warm-up, then cosine to 10% of the peak, following whichever budget (time, steps) ends first
        scale = min(1.0, (step + 1) / cfg.warmup_steps) * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))
        for g in opt.param_groups:
            g["lr"] = cfg.lr * g["lr_scale"] * scale
        if pos + cfg.batch_size > len(order):
            order, pos = torch.randperm(len(train), generator=gen), 0
        x = train[order[pos : pos + cfg.batch_size]]
        pos += cfg.batch_size
        attn = (x != pad_id).long()
        inputs, labels = mask_batch(x, attn, cfg.mask_prob, mask_id, gen)
        loss = model(input_ids=inputs, attention_mask=attn, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        step += 1
        tokens += int(attn.sum())
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{tokens / (time.time() - t0):.0f}", min=f"{(time.time() - t0) / 60:.1f}")
    bar.close()
    train_s = time.time() - t0
    after = evaluate(model, val, pad_id, mask_id, cfg.eval_mask_prob, cfg.seed, cfg.batch_size)
    metrics = {
        "accuracy": after["accuracy"], "loss": after["loss"], "eval_mask_prob": cfg.eval_mask_prob,
        "eval_masked_tokens": after["masked_tokens"], "accuracy_before_training": before["accuracy"],
        "steps": step, "train_tokens_seen": tokens, "epochs": tokens / max(n_train_tokens, 1),
        "train_minutes": train_s / 60, "init": init, "parameters": n_params,
        "hidden_size": sizes["hidden"], "num_heads": sizes["heads"], "intermediate_size": sizes["inter"],
    }
    print(f"held-out masked-token accuracy at {cfg.eval_mask_prob:.0%} masking: {after['accuracy']:.2%} "
          f"(loss {after['loss']:.3f}; {step} steps, {train_s / 60:.1f} min, {metrics['epochs']:.2f} epochs, init {init})")

    model.config.sparse_prediction = False  # users call it without labels and expect logits at every position
    out.mkdir(parents=True, exist_ok=True)
    model.eval().save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "pretrain_config.json").write_text(json.dumps(key, indent=2))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))  # written last: it marks a complete folder
    return metrics
