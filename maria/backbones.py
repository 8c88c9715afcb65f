"""The two frozen backbones: loading, vocabulary alignment, and their output projections.

METHOD.md contracts implemented here:
- the target vocabulary is the AR's; MLM ids map to AR ids by token string, and two tokenizers
  that tokenize probe text differently are refused, naming the first differing token;
- each model's feature is the *input* of its output projection (get_output_embeddings()),
  captured with a forward pre-hook, so that W h + b reproduces the model's logits exactly;
  a model that changes logits after the projection fails the parity check with a clear error;
- where the MLM predicts x[i] (its offset): at i for a classic MLM (0), at i - 1 for a masked
  next-token (MNTP) MLM (-1), read from its config's `prediction_offset` (maria pretrain-mlm
  writes it) unless the caller says otherwise. An MNTP MLM predicts x[0] at the token before the
  window: its tokenizer's leading special token ([CLS]), else the AR's start token, which it then
  reads first; with neither, position 0 is never masked (as for an AR without a start token).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from maria.transformers_compat import causal_lm_model_types, masked_lm_model_types

PROBE_TEXTS = (
    "The quick brown fox jumps over the lazy dog. It was 1984, and 3.14159 is pi!",
    "Infilling: fill in the blanks between a past and a future context.\nNew line, tabs\tand 'quotes'.",
)


class BackboneError(ValueError):
    """A backbone or pair of backbones MARIA cannot use; the message names the fix."""


@dataclass
class Backbones:
    """A masked LM and a causal LM that share one vocabulary, with everything the features need."""

    mlm: torch.nn.Module
    ar: torch.nn.Module
    mlm_tokenizer: object
    ar_tokenizer: object
    mlm_to_ar: torch.Tensor  # (V_mlm,) AR id of each MLM id, -1 where the AR lacks the token
    ar_to_mlm: torch.Tensor  # (V_ar,) MLM id of each AR id (the MLM's unk/mask id where it lacks it)
    mlm_prefix: list[int]  # what the MLM reads before a window: its tokenizer's leading specials ([CLS]); see mntp_prefix
    mlm_suffix: list[int]  # ... and after it ([SEP])
    mlm_mask_id: int
    mlm_pad_id: int
    start_id: int | None  # AR start token: BOS, else EOS, else None (position 0 is then never masked)
    identity: dict = field(default_factory=dict)  # ids, revisions and fingerprints, stored with features
    mlm_offset: int = 0  # where the MLM predicts x[i]: at MLM position i + mlm_offset (0 classic MLM, -1 MNTP)

    @property
    def first_maskable(self) -> int:
        """0, or 1 when nothing precedes x[0] for the AR (no start token) or for an MNTP MLM (no leading token)."""
        return int(self.start_id is None or len(self.mlm_prefix) + self.mlm_offset < 0)

    @property
    def d_mlm(self) -> int:
        return self.mlm.get_output_embeddings().weight.shape[1]

    @property
    def d_ar(self) -> int:
        return self.ar.get_output_embeddings().weight.shape[1]

    @property
    def vocab_size(self) -> int:
        return self.ar.get_output_embeddings().weight.shape[0]

    @property
    def device(self) -> torch.device:
        return next(self.ar.parameters()).device

    def describe(self, as_dtype: torch.dtype | None = None) -> dict:
        """Identity (ids, revisions, fingerprints) and sizes: what stores, heads and checkpoints record.
        With `as_dtype`, the fingerprints are those a load in that dtype would give (see weights_fingerprint)."""
        identity = self.identity
        if as_dtype is not None:
            identity = {**identity, **{k: {**identity[k], "fingerprint": weights_fingerprint(m, as_dtype)} for k, m in (("mlm", self.mlm), ("ar", self.ar))}}
        return {
            **identity,
            "d_mlm": self.d_mlm,
            "d_ar": self.d_ar,
            "vocab_size": self.vocab_size,
            "start_token_id": self.start_id,
            "mlm_offset": self.mlm_offset,
        }

    def max_window(self) -> int | None:
        """Longest window both backbones can read: the MLM also reads its special tokens, and the AR the
        start token before the window. Extraction, decoding and the text interface all use this one limit."""
        limits = []
        for model, extra in ((self.mlm, len(self.mlm_prefix) + len(self.mlm_suffix)), (self.ar, 1)):
            limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
            if limit is not None:
                limits.append(limit - extra)
        return min(limits) if limits else None

    def expert_weights(self) -> dict[str, torch.Tensor]:
        """W1/b1 (MLM, rows mapped into AR ids, zero where the MLM lacks a token) and W2/b2 (AR), fp32 on CPU."""
        w1, b1 = output_projection(self.mlm)
        w2, b2 = output_projection(self.ar)
        valid = self.mlm_to_ar >= 0
        w1_ar = torch.zeros(self.vocab_size, w1.shape[1])
        b1_ar = torch.zeros(self.vocab_size)
        w1_ar[self.mlm_to_ar[valid]] = w1[valid]
        b1_ar[self.mlm_to_ar[valid]] = b1[valid]
        return {"W1": w1_ar, "b1": b1_ar, "W2": w2, "b2": b2}


def output_projection(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(W, b) of the model's output embedding, fp32 on CPU; b is zeros when the layer has no bias."""
    emb = model.get_output_embeddings()
    w = emb.weight.detach().float().cpu()
    b = emb.bias.detach().float().cpu() if getattr(emb, "bias", None) is not None else torch.zeros(w.shape[0])
    return w, b


class _StopForward(Exception):
    pass


def projection_input(model: torch.nn.Module, stop: bool = True, **inputs) -> torch.Tensor:
    """Run `model(**inputs)` and return the input of its output projection (the MARIA feature).

    With stop=True the forward is cut right there, so the (V x d) projection is never computed:
    feature extraction pays only for the backbone. KV caches are already updated by then."""
    captured = {}

    def hook(module, args):
        captured["h"] = args[0]
        if stop:
            raise _StopForward

    handle = model.get_output_embeddings().register_forward_pre_hook(hook)
    try:
        model(**inputs)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if "h" not in captured:
        raise BackboneError(
            f"{type(model).__name__} never calls its output embedding module; MARIA needs an architecture whose logits come from get_output_embeddings()"
        )
    return captured["h"]


def check_logit_parity(model: torch.nn.Module, input_ids: torch.Tensor, name: str) -> float:
    """Refuse a model whose logits are not exactly W h + b at its output projection."""
    with torch.no_grad():
        captured = {}
        handle = model.get_output_embeddings().register_forward_pre_hook(lambda m, a: captured.__setitem__("h", a[0]))
        try:
            logits = model(input_ids=input_ids).logits.float()
        finally:
            handle.remove()
        w, b = output_projection(model)
        rebuilt = captured["h"].float().cpu() @ w.T + b
        diff = (rebuilt - logits.cpu()).abs().max().item()
    scale = logits.abs().max().item() + 1.0
    tol = 1e-4 if w.dtype == torch.float32 and next(model.parameters()).dtype == torch.float32 else 2e-2
    if diff > tol * scale:
        raise BackboneError(
            f"{name} ({type(model).__name__}) changes its logits after the output projection (max |W h + b - logits| = {diff:.3g}): "
            "soft-capping or logit scaling cannot be reproduced by MARIA's linear head; use a model without it"
        )
    return diff


def weights_fingerprint(model: torch.nn.Module, as_dtype: torch.dtype | None = None) -> str:
    """A cheap, stable fingerprint: names, shapes, dtypes and a strided sample of every tensor.

    It depends on the dtype the model was loaded in. `as_dtype` gives the fingerprint the same weights
    would have if loaded in that dtype: exactly so from a float32 load (a bfloat16 or float16 load is
    the same rounding of the file's values), not the other way round."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        flat = t.detach().reshape(-1)
        step = max(1, flat.numel() // 4096)
        sample = flat[::step][:4096]
        if as_dtype is not None and t.is_floating_point():
            sample = sample.to(as_dtype)
        h.update(f"{name}:{tuple(t.shape)}:{sample.dtype}".encode())
        h.update(sample.float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def tokenizer_fingerprint(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(vocab).encode()).hexdigest()[:16]


def special_wrap(tokenizer) -> tuple[list[int], list[int]]:
    """(leading, trailing) special tokens the tokenizer puts around a text, e.g. ([CLS], [SEP])."""
    plain = tokenizer("hello world", add_special_tokens=False).input_ids
    wrapped = tokenizer("hello world", add_special_tokens=True).input_ids
    for k in range(len(wrapped) - len(plain) + 1):
        if wrapped[k : k + len(plain)] == plain:
            return wrapped[:k], wrapped[k + len(plain) :]
    return [], []


def align_vocabularies(mlm_tokenizer, ar_tokenizer, v_mlm: int, v_ar: int, fallback_mlm_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Map MLM ids to AR ids by token string, then prove on probe text that both tokenize alike."""
    ar_vocab = ar_tokenizer.get_vocab()
    mlm_to_ar = torch.full((v_mlm,), -1, dtype=torch.long)
    for token, i in mlm_tokenizer.get_vocab().items():
        j = ar_vocab.get(token)
        if j is not None and i < v_mlm and j < v_ar:
            mlm_to_ar[i] = j
    ar_to_mlm = torch.full((v_ar,), fallback_mlm_id, dtype=torch.long)
    valid = (mlm_to_ar >= 0).nonzero().squeeze(1)
    ar_to_mlm[mlm_to_ar[valid]] = valid
    for text in PROBE_TEXTS:
        a = ar_tokenizer(text, add_special_tokens=False).input_ids
        m = mlm_tokenizer(text, add_special_tokens=False).input_ids
        mapped = [int(mlm_to_ar[i]) if i < v_mlm else -1 for i in m]
        if mapped != a:
            k = next((k for k, (x, y) in enumerate(zip(mapped, a)) if x != y), min(len(mapped), len(a)))
            mt = mlm_tokenizer.convert_ids_to_tokens(m[k]) if k < len(m) else "<end>"
            at = ar_tokenizer.convert_ids_to_tokens(a[k]) if k < len(a) else "<end>"
            raise BackboneError(
                f"the MLM and AR tokenizers disagree at token {k} of probe text {text[:30]!r}...: MLM {mt!r} vs AR {at!r}; "
                "MARIA needs two models that share one vocabulary (e.g. ModernBERT with OLMo)"
            )
    return mlm_to_ar, ar_to_mlm


MLM_OFFSETS = (0, -1)  # where an MLM predicts x[i]: at i (classic masked LM) or at i - 1 (masked next-token prediction)


def ar_start_token(ar_tokenizer) -> int | None:
    """The token the AR reads before a window: its BOS, else its EOS (pre-training separates documents with it)."""
    return ar_tokenizer.bos_token_id if ar_tokenizer.bos_token_id is not None else ar_tokenizer.eos_token_id


def resolve_mlm_offset(mlm_model: torch.nn.Module, mlm_offset: int | None, name: str) -> int:
    """The caller's offset, else the MLM config's `prediction_offset` (written by `maria pretrain-mlm --objective mntp`), else 0."""
    offset = getattr(mlm_model.config, "prediction_offset", 0) if mlm_offset is None else mlm_offset
    if offset not in MLM_OFFSETS:
        where = "--mlm-offset" if mlm_offset is not None else f"{name!r}'s config.json prediction_offset"
        raise BackboneError(f"{where} is {offset!r}; an MLM predicts x[i] at i (0, a classic MLM) or at i - 1 (-1, masked next-token prediction)")
    return int(offset)


def mntp_prefix(prefix: list[int], offset: int, start: int | None, mlm_to_ar: torch.Tensor, ar_to_mlm: torch.Tensor) -> list[int]:
    """What the MLM reads before the window. An MNTP MLM predicts x[0] at the token before it: its tokenizer's
    leading special token, else the AR's start token (in MLM ids; the MLM must know it), else nothing (x[0] stays known)."""
    if offset == 0 or prefix or start is None:
        return prefix
    mapped = int(ar_to_mlm[start])
    if int(mlm_to_ar[mapped]) != start:
        raise BackboneError(
            f"the MNTP MLM's tokenizer adds no leading token and lacks the AR's start token (id {start}), so nothing "
            "sits where it predicts x[0]; use an MLM whose vocabulary has the AR's BOS/EOS"
        )
    return [mapped]


def _resolve(name_or_path: str, kind: str) -> str:
    """A local folder must hold a config.json; anything else is treated as a hub id."""
    p = Path(name_or_path).expanduser()
    if p.exists():
        if not (p / "config.json").exists():
            raise BackboneError(f"{kind} folder {p} has no config.json; pass a folder written by save_pretrained or a hub id")
        return str(p)
    if name_or_path.startswith((".", "/", "~")):
        raise BackboneError(f"{kind} {name_or_path!r} does not exist; check the path")
    return name_or_path


def _load(auto_cls, name: str, kind: str, **kw):
    try:
        return auto_cls.from_pretrained(name, **kw)
    except OSError as e:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
        hint = (
            "it is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; download it first or pass a local folder"
            if offline
            else "pass a local folder or a valid hub id"
        )
        raise BackboneError(f"cannot load {kind} {name!r}: {hint} ({type(e).__name__})") from None


def _check_kind(config, kind: str, name: str) -> None:
    mt = config.model_type
    masked, causal = masked_lm_model_types(), causal_lm_model_types()
    if kind == "MLM" and mt not in masked:
        raise BackboneError(f"{name!r} ({mt}) is not a masked LM; did you swap --mlm and --ar?")
    if kind == "AR":
        is_encoder = mt in masked and not getattr(config, "is_decoder", False)
        if mt not in causal or is_encoder:
            raise BackboneError(f"{name!r} ({mt}) is not a causal LM; did you swap --mlm and --ar?")


def load_backbones(
    mlm: str,
    ar: str,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
    mlm_revision: str | None = None,
    ar_revision: str | None = None,
    check_parity: bool = True,
    safetensors_only: bool = False,
    mlm_offset: int | None = None,
) -> Backbones:
    """Load both backbones (hub id or local folder), frozen and in eval mode, and align them.
    Local folders are always read from safetensors only; `safetensors_only` asks it of hub ids too
    (a checkpoint's references: never a pickle, even one sitting in the cache). `mlm_offset`: where
    the MLM predicts x[i] (0 or -1; None: its config's prediction_offset, else 0)."""
    hf_logging.disable_progress_bar()  # "Loading weights" bars for two small folders are noise in every log
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise BackboneError(f"device {device!r} was asked for but no CUDA GPU is visible; pass --device cpu")
    models, toks = {}, {}
    for kind, name, rev, auto_cls in (("MLM", mlm, mlm_revision, AutoModelForMaskedLM), ("AR", ar, ar_revision, AutoModelForCausalLM)):
        path = _resolve(name, kind)
        kw = dict(revision=rev, trust_remote_code=trust_remote_code)
        config = _load(AutoConfig, path, kind, **kw)
        _check_kind(config, kind, name)
        extra = {"attn_implementation": "sdpa"} if config.model_type in ("modernbert",) else {}
        model = _load(auto_cls, path, kind, dtype=dtype, use_safetensors=True if safetensors_only or Path(path).exists() else None, **extra, **kw)
        models[kind] = model.to(device).eval().requires_grad_(False)
        toks[kind] = _load(AutoTokenizer, path, kind, **kw)
    return assemble_backbones(
        models["MLM"],
        models["AR"],
        toks["MLM"],
        toks["AR"],
        mlm,
        ar,
        mlm_revision=mlm_revision,
        ar_revision=ar_revision,
        check_parity=check_parity,
        mlm_offset=mlm_offset,
    )


def assemble_backbones(
    mlm_model: torch.nn.Module,
    ar_model: torch.nn.Module,
    mlm_tok,
    ar_tok,
    mlm: str | None = None,
    ar: str | None = None,
    mlm_revision: str | None = None,
    ar_revision: str | None = None,
    check_parity: bool = True,
    mlm_offset: int | None = None,
) -> Backbones:
    """Backbones from two models already in memory (loaded by load_backbones, or by the caller:
    quantized, PEFT-wrapped, on any device) and their tokenizers: aligned and checked, never copied."""
    for kind, model in (("MLM", mlm_model), ("AR", ar_model)):
        if not callable(getattr(model, "get_output_embeddings", None)) or model.get_output_embeddings() is None:
            raise BackboneError(
                f"the {kind} object {type(model).__name__} has no output projection (get_output_embeddings); "
                f"pass the model with its LM head ({'AutoModelForMaskedLM' if kind == 'MLM' else 'AutoModelForCausalLM'})"
            )
    mlm_model.eval().requires_grad_(False)
    ar_model.eval().requires_grad_(False)
    mlm = mlm or getattr(mlm_model, "name_or_path", None) or type(mlm_model).__name__
    ar = ar or getattr(ar_model, "name_or_path", None) or type(ar_model).__name__
    if mlm_tok.mask_token_id is None:
        raise BackboneError(f"the MLM tokenizer of {mlm!r} has no mask token; a masked LM needs one")
    v_mlm = mlm_model.get_output_embeddings().weight.shape[0]
    v_ar = ar_model.get_output_embeddings().weight.shape[0]
    fallback = mlm_tok.unk_token_id if mlm_tok.unk_token_id is not None else mlm_tok.mask_token_id
    mlm_to_ar, ar_to_mlm = align_vocabularies(mlm_tok, ar_tok, v_mlm, v_ar, fallback)
    offset = resolve_mlm_offset(mlm_model, mlm_offset, mlm)
    start = ar_start_token(ar_tok)
    prefix, suffix = special_wrap(mlm_tok)
    prefix = mntp_prefix(prefix, offset, start, mlm_to_ar, ar_to_mlm)
    if check_parity:
        device = next(ar_model.parameters()).device
        probe = torch.tensor([ar_tok(PROBE_TEXTS[0], add_special_tokens=False).input_ids[:16]], device=device)
        check_logit_parity(ar_model, probe, f"AR {ar!r}")
        check_logit_parity(mlm_model, ar_to_mlm.to(device)[probe].to(next(mlm_model.parameters()).device), f"MLM {mlm!r}")
    identity = {
        "mlm": {"id": mlm, "revision": mlm_revision, "fingerprint": weights_fingerprint(mlm_model)},
        "ar": {"id": ar, "revision": ar_revision, "fingerprint": weights_fingerprint(ar_model)},
        "tokenizer_fingerprint": tokenizer_fingerprint(ar_tok),
    }
    pad = mlm_tok.pad_token_id if mlm_tok.pad_token_id is not None else mlm_tok.mask_token_id
    return Backbones(mlm_model, ar_model, mlm_tok, ar_tok, mlm_to_ar, ar_to_mlm, prefix, suffix, mlm_tok.mask_token_id, pad, start, identity, offset)
