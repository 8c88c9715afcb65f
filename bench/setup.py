"""What every benchmark shares: BenchConfig, the backbone presets, random backbones, timing.
The dispatcher is bench/run.py; the benchmarks are listed in bench/__init__.py.
Backbones are random-weight models built from configs (no hub), or --mlm/--ar folders.
Imports no store and no Ray: the device check (bench/device_check.py) uses it on an image without them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

import torch
from transformers import ModernBertConfig, ModernBertForMaskedLM, OlmoConfig, OlmoForCausalLM

from maria.backbones import Backbones, load_backbones
from maria.device import Device, DType, resolve_device, resolve_dtype
from maria.head import init_head

PRESETS = {  # (mlm hidden, mlm layers, ar hidden, ar layers, vocab)
    "tiny": (64, 2, 64, 2, 2048),
    "small": (256, 4, 384, 6, 8192),
    "smollm": (576, 6, 576, 30, 49152),  # the demo pair's shapes (SmolLM2-135M as AR)
    "paper": (1024, 28, 2048, 16, 50304),  # ModernBERT-large + OLMo-1B shapes
}
PEAK_TFLOPS_BF16 = {
    "H100 PCIe": 756.0,
    "H100": 989.0,
    "H200": 989.0,
    "GH200": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10": 125.0,
}  # dense bf16 tensor-core TFLOP/s by GPU name, from the vendors' data sheets
WHATS = ("decode", "extract", "train", "anneal", "quality", "serve", "fp8", "shapes", "checksum")


@dataclass
class BenchConfig:
    what: str  # decode | extract | train | anneal | quality | serve | fp8 | shapes | checksum
    json: str = "bench.json"  # output JSON (a PNG with the same stem is written beside it)
    overwrite: bool = False  # replace a --json written by an earlier `maria bench`
    preset: Literal["tiny", "small", "smollm", "paper"] = "small"  # random backbones: tiny | small | smollm | paper (ModernBERT-large + OLMo-1B shapes)
    mlm: str | None = None  # or real backbones: MLM folder/id ...
    ar: str | None = None  # ... and AR folder/id
    model: str | None = (
        None  # anneal, checksum: a MARIA checkpoint folder (default: random backbones with the PoE head); serve: the checkpoint to serve (required)
    )
    store: str | None = None  # train/extract: an existing store or corpus to measure on; fp8: the float16 training store (default: the demo's)
    val_store: str | None = None  # fp8: the float16 validation store (default: the demo's)
    workdir: str | None = None  # shapes/fp8: folder for what they build (backbones, stores, heads, checkpoint); default a temporary one, removed after
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
    device: Device = "auto"  # auto | cpu | cuda
    dtype: DType = "auto"  # auto (bfloat16 on GPU, float32 on CPU)
    seed: int = 0  # seeds the random backbones and inputs
    windows: int = 64  # quality: 128-token windows scored per text set (validation articles, another domain); shapes: windows extracted
    runs: list[str] = field(
        default_factory=list
    )  # quality: `pretrain-mlm` --out folders, one curve each over its step-N snapshots (default: --mlm, else the demo's MNTP MLM)
    texts: str | None = None  # serve: JSONL of {"text": ...} requests (default: spans masked in the demo's validation articles)
    requests: int = 64  # serve: requests per phase (the same texts one at a time and from --clients clients)
    clients: int = 16  # serve: concurrent clients (also the server's --max-batch-size)
    time_limit_s: float = 300.0  # serve: a phase sends no request after this many seconds (then it is marked truncated)

    def __post_init__(self):
        if self.what not in WHATS:
            raise ValueError(f"unknown benchmark {self.what!r}; use one of {', '.join(WHATS)}")
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; use one of {sorted(PRESETS)}")
        if self.repeats < 1 or not self.batch_sizes or min(self.batch_sizes) < 1 or not self.lengths or min(self.lengths) < 2:
            raise ValueError("bench needs --repeats >= 1, --batch-sizes >= 1 and --lengths >= 2")
        if not 0 < self.mask_rate <= 1 or self.max_chunk < 0 or self.threads < 0:
            raise ValueError("bench needs 0 < --mask-rate <= 1, --max-chunk >= 0 and --threads >= 0")
        if self.requests < 1 or self.clients < 1 or not self.time_limit_s > 0:
            raise ValueError("bench serve needs --requests >= 1, --clients >= 1 and --time-limit-s > 0")


def resolve(device: str, dtype: str) -> tuple[str, torch.dtype]:
    dev = resolve_device(device)
    return dev, resolve_dtype(dtype, dev)


def random_models(preset: str, device: str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0):
    """A ModernBERT-style MLM (vocabulary V + 64: its special tokens come after the shared ones) and an
    OLMo-style AR (vocabulary V) with random weights at a preset's shapes, built directly on `device`
    (a 1.6B pair is initialised in seconds on a GPU, not minutes on its host), frozen, in `dtype`."""
    hm, lm, ha, la, v = PRESETS[preset]
    torch.manual_seed(seed)
    with torch.device(device):
        mlm = ModernBertForMaskedLM(
            ModernBertConfig(
                vocab_size=v + 64,
                hidden_size=hm,
                intermediate_size=int(hm * 2.625) // 2 * 2,
                num_hidden_layers=lm,
                num_attention_heads=max(1, hm // 64),
                max_position_embeddings=8192,
                pad_token_id=v + 1,
                bos_token_id=v + 2,
                eos_token_id=v + 3,
                cls_token_id=v + 2,
                sep_token_id=v + 3,
                attn_implementation="sdpa",
            )
        )
        ar = OlmoForCausalLM(
            OlmoConfig(
                vocab_size=v,
                hidden_size=ha,
                intermediate_size=ha * 4,
                num_hidden_layers=la,
                num_attention_heads=max(1, ha // 128) if ha >= 1024 else max(1, ha // 64),
                max_position_embeddings=4096,
                pad_token_id=1,
                bos_token_id=None,
                eos_token_id=0,
            )
        )
    return tuple(m.to(dtype=dtype).eval().requires_grad_(False) for m in (mlm, ar))


def random_backbones(preset: str, device: str, dtype: torch.dtype, seed: int = 0):
    """random_models as Backbones sharing one vocabulary (ids 0..V-1; the MLM's mask token is V), in memory:
    benchmarks need no tokenizer or hub."""
    v = PRESETS[preset][4]
    mlm, ar = random_models(preset, device, dtype, seed)
    ident = torch.arange(v)
    mlm_to_ar = torch.cat([ident, torch.full((64,), -1)])
    identity = {
        "mlm": {"id": f"random-{preset}-mlm", "revision": None, "fingerprint": "random"},
        "ar": {"id": f"random-{preset}-ar", "revision": None, "fingerprint": "random"},
        "tokenizer_fingerprint": "random",
    }
    return Backbones(mlm, ar, None, None, mlm_to_ar, ident, [v + 2], [v + 3], v, v + 1, 0, identity)


def peak_tflops(device: str) -> float | None:
    """Dense bf16 peak of this GPU (None on a CPU or an unlisted GPU): the fraction-of-peak lines' denominator."""
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(torch.device(device))
    return next((tf for key, tf in PEAK_TFLOPS_BF16.items() if all(w in name for w in key.split())), None)


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
