"""What every benchmark shares: BenchConfig, the backbone presets, random backbones, timing.
The dispatcher is bench/__init__.py.

decode   bench/decode.py   infilling tokens/s against plain AR generation and MLM decoding (Figure 3)
extract  bench/extract.py  the extraction job against bare backbone forwards; store write speed
train    bench/train.py    head training rows/s against its read and head-step bounds
anneal   bench/anneal.py   generative perplexity against wall-clock time (Figure 5)
quality  bench/quality.py  MARIA's gain over the AR alone against MLM strength
checksum bench/checksum.py checking a checkpoint's sha256 digests at load, against reading its weights
Backbones are random-weight models built from configs (no hub), or --mlm/--ar folders.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import ModernBertConfig, ModernBertForMaskedLM, OlmoConfig, OlmoForCausalLM

from maria.backbones import Backbones, load_backbones
from maria.device import resolve_device, resolve_dtype
from maria.head import init_head

PRESETS = {  # (mlm hidden, mlm layers, ar hidden, ar layers, vocab)
    "tiny": (64, 2, 64, 2, 2048),
    "small": (256, 4, 384, 6, 8192),
    "smollm": (576, 6, 576, 30, 49152),  # the demo pair's shapes (SmolLM2-135M as AR)
    "paper": (1024, 28, 2048, 16, 50304),  # ModernBERT-large + OLMo-1B shapes
}
PEAK_TFLOPS_BF16 = 790.0  # H200 dense bf16, for the fraction-of-peak line on a GPU


@dataclass
class BenchConfig:
    what: str  # decode | extract | train | anneal | quality | checksum
    json: str = "bench.json"  # output JSON (a PNG with the same stem is written beside it)
    overwrite: bool = False  # replace a --json written by an earlier `maria bench`
    preset: str = "small"  # random backbones: tiny | small | smollm | paper (ModernBERT-large + OLMo-1B shapes)
    mlm: str | None = None  # or real backbones: MLM folder/id ...
    ar: str | None = None  # ... and AR folder/id
    model: str | None = None  # anneal, checksum: a MARIA checkpoint folder (default: random backbones with the PoE head)
    store: str | None = None  # train/extract: an existing store or corpus to measure on
    lengths: list[int] = field(default_factory=lambda: [128, 256, 512])  # decode: window lengths
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8, 32])  # decode: windows decoded together (each with its own mask)
    repeats: int = 3  # decode, checksum: timed runs per figure; the JSON gives their median and spread (min/max, quartiles)
    mask_rate: float = 0.5  # decode: fraction of each window's tokens that are masked
    max_chunk: int = 0  # decode: MARIA's cut on the tokens a window feeds per step (0: automatic)
    batch_size: int = 1  # train: feature rows per head step (1 means 1024)
    mlm_ar_columns: int = 4  # decode: MLM left-to-right columns timed per figure (each is one full MLM pass)
    unmask_steps: int = 16  # decode: k steps of MLM iterative unmasking (0: skip it)
    steps: int = 200  # train/anneal: steps to time
    threads: int = 0  # CPU threads for torch (0: $MARIA_TORCH_THREADS, else every core); 1 keeps timings steady on a shared CPU
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto (bfloat16 on GPU, float32 on CPU)
    seed: int = 0  # seeds the random backbones and inputs
    windows: int = 64  # quality: 128-token windows scored per text set (validation articles, another domain)

    def __post_init__(self):
        if self.what not in ("decode", "extract", "train", "anneal", "quality", "checksum"):
            raise ValueError(f"unknown benchmark {self.what!r}; use decode, extract, train, anneal, quality or checksum")
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; use one of {sorted(PRESETS)}")
        if self.repeats < 1 or not self.batch_sizes or min(self.batch_sizes) < 1 or not self.lengths or min(self.lengths) < 2:
            raise ValueError("bench needs --repeats >= 1, --batch-sizes >= 1 and --lengths >= 2")
        if not 0 < self.mask_rate <= 1 or self.max_chunk < 0 or self.threads < 0:
            raise ValueError("bench needs 0 < --mask-rate <= 1, --max-chunk >= 0 and --threads >= 0")


def resolve(device: str, dtype: str) -> tuple[str, torch.dtype]:
    dev = resolve_device(device)
    return dev, resolve_dtype(dtype, dev)


def random_backbones(preset: str, device: str, dtype: torch.dtype, seed: int = 0):
    """A ModernBERT-style MLM and an OLMo-style AR with random weights sharing one vocabulary
    (ids 0..V-1; the MLM's mask token is V), in memory: benchmarks need no tokenizer or hub."""
    hm, lm, ha, la, v = PRESETS[preset]
    torch.manual_seed(seed)
    mlm = ModernBertForMaskedLM(ModernBertConfig(vocab_size=v + 64, hidden_size=hm, intermediate_size=int(hm * 2.625) // 2 * 2,
                                                 num_hidden_layers=lm, num_attention_heads=max(1, hm // 64), max_position_embeddings=8192,
                                                 pad_token_id=v + 1, bos_token_id=v + 2, eos_token_id=v + 3, cls_token_id=v + 2, sep_token_id=v + 3,
                                                 attn_implementation="sdpa"))
    ar = OlmoForCausalLM(OlmoConfig(vocab_size=v, hidden_size=ha, intermediate_size=ha * 4, num_hidden_layers=la,
                                    num_attention_heads=max(1, ha // 128) if ha >= 1024 else max(1, ha // 64), max_position_embeddings=4096,
                                    pad_token_id=1, bos_token_id=None, eos_token_id=0))
    mlm, ar = (m.to(device=device, dtype=dtype).eval().requires_grad_(False) for m in (mlm, ar))
    ident = torch.arange(v)
    mlm_to_ar = torch.cat([ident, torch.full((64,), -1)])
    identity = {"mlm": {"id": f"random-{preset}-mlm", "revision": None, "fingerprint": "random"},
                "ar": {"id": f"random-{preset}-ar", "revision": None, "fingerprint": "random"}, "tokenizer_fingerprint": "random"}
    return Backbones(mlm, ar, None, None, mlm_to_ar, ident, [v + 2], [v + 3], v, v + 1, 0, identity)


def _timed(fn, device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def model_backbones(cfg, device: str, dtype: torch.dtype) -> Backbones:
    """--mlm/--ar folders when given, else random backbones of --preset."""
    if cfg.mlm and cfg.ar:
        return load_backbones(cfg.mlm, cfg.ar, dtype=dtype, device=device)
    return random_backbones(cfg.preset, device, dtype, cfg.seed)


def poe_head(bb: Backbones):
    return init_head("poe", bb.expert_weights())


