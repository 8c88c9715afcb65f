"""`maria bench <what>`: benchmarks that measure (never tests). JSON out, a PNG beside it.

decode  infilling tokens/s at mask rate 0.5 over lengths: MARIA (KV-cached), plain KV-cached AR
        generation of the same number of tokens, the MLM decoded left to right, and the MLM's
        iterative unmasking in k steps (masked-diffusion style); the paper's Figure 3.
extract / train / anneal live beside their stages and are dispatched from here.
Backbones are random-weight models built from configs (no hub), or --mlm/--ar folders.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

PRESETS = {  # (mlm hidden, mlm layers, ar hidden, ar layers, vocab)
    "tiny": (64, 2, 64, 2, 2048),
    "small": (256, 4, 384, 6, 8192),
    "smollm": (576, 6, 576, 30, 49152),  # the demo pair's shapes (SmolLM2-135M as AR)
    "paper": (1024, 28, 2048, 16, 50304),  # ModernBERT-large + OLMo-1B shapes
}
PEAK_TFLOPS_BF16 = 790.0  # H200 dense bf16, for the fraction-of-peak line on a GPU


@dataclass
class BenchConfig:
    what: str  # decode | extract | train | anneal
    json: str = "bench.json"  # output JSON (a PNG with the same stem is written beside it)
    preset: str = "small"  # random backbones: tiny | small | smollm | paper (ModernBERT-large + OLMo-1B shapes)
    mlm: str | None = None  # or real backbones: MLM folder/id ...
    ar: str | None = None  # ... and AR folder/id
    model: str | None = None  # anneal: a MARIA checkpoint folder (default: random backbones with the PoE head)
    store: str | None = None  # train/extract: an existing store or corpus to measure on
    lengths: list[int] = field(default_factory=lambda: [128, 256, 512, 1024])  # decode: window lengths
    batch_size: int = 1  # decode: windows decoded together
    mlm_ar_columns: int = 16  # decode: MLM left-to-right columns timed per length (each is one full MLM pass)
    unmask_steps: int = 16  # decode: k steps of MLM iterative unmasking
    steps: int = 200  # train/anneal: steps to time
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto (bfloat16 on GPU, float32 on CPU)
    seed: int = 0  # seeds the random backbones and inputs

    def __post_init__(self):
        if self.what not in ("decode", "extract", "train", "anneal"):
            raise ValueError(f"unknown benchmark {self.what!r}; use decode, extract, train or anneal")
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; use one of {sorted(PRESETS)}")


def resolve_device(device: str, dtype: str) -> tuple[str, torch.dtype]:
    dev = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    if dev.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA GPU is visible; pass --device cpu")
    dt = (torch.bfloat16 if dev.startswith("cuda") else torch.float32) if dtype == "auto" else getattr(torch, dtype)
    return dev, dt


def random_backbones(preset: str, device: str, dtype: torch.dtype, seed: int = 0):
    """A ModernBERT-style MLM and an OLMo-style AR with random weights sharing one vocabulary
    (ids 0..V-1; the MLM's mask token is V), in memory: benchmarks need no tokenizer or hub."""
    from transformers import ModernBertConfig, ModernBertForMaskedLM, OlmoConfig, OlmoForCausalLM

    from maria.backbones import Backbones

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


def bench_decode(cfg: BenchConfig) -> dict:
    from tqdm import tqdm

    from maria.baselines import ar_generate, mlm_iterative_unmasking, mlm_left_to_right
    from maria.decode import infill
    from maria.head import FusionHead

    device, dtype = resolve_device(cfg.device, cfg.dtype)
    if cfg.mlm and cfg.ar:
        from maria.backbones import load_backbones

        bb = load_backbones(cfg.mlm, cfg.ar, dtype=dtype, device=device)
    else:
        bb = random_backbones(cfg.preset, device, dtype, cfg.seed)
    e = bb.expert_weights()
    head = FusionHead.from_experts(e["W1"], e["b1"], e["W2"], e["b2"]).to(device=device, dtype=dtype)
    g = torch.Generator().manual_seed(cfg.seed)
    V, B = min(bb.vocab_size, int((bb.mlm_to_ar >= 0).sum())), cfg.batch_size
    warm = torch.randint(2, V, (B, 16), generator=g).to(device)
    infill(bb, head, warm, torch.rand(B, 16, generator=g).to(device) < 0.5)
    ar_generate(bb, warm, 4)
    rows = []
    for L in tqdm(cfg.lengths, desc="bench decode", unit="length"):
        ids = torch.randint(2, V, (B, L), generator=g).to(device)
        mask = (torch.rand(B, L, generator=g) < 0.5).to(device)
        n_masked = int(mask.sum())
        t_maria = _timed(lambda: infill(bb, head, ids, mask), device)
        new = n_masked // B
        t_ar = _timed(lambda: ar_generate(bb, ids[:, : L - new], new), device)
        cols = mask.any(0).nonzero().squeeze(1)[: cfg.mlm_ar_columns]
        part = torch.zeros_like(mask)
        part[:, cols] = mask[:, cols]
        t_l2r = _timed(lambda: mlm_left_to_right(bb, ids, part), device)
        t_unmask = _timed(lambda: mlm_iterative_unmasking(bb, ids, mask, cfg.unmask_steps), device)
        row = {"length": L, "masked_tokens": n_masked,
               "maria_tok_s": n_masked / t_maria, "ar_generate_tok_s": B * new / t_ar,
               "mlm_ar_tok_s": int(part.sum()) / t_l2r, "mlm_unmask_tok_s": n_masked / t_unmask,
               "mlm_ar_columns_timed": len(cols)}
        row["maria_over_ar"] = row["maria_tok_s"] / row["ar_generate_tok_s"]
        row["maria_over_mlm_ar"] = row["maria_tok_s"] / row["mlm_ar_tok_s"]
        # model FLOPs per masked token: AR reads every token once, the MLM reads the window once
        flops = (2 * params(bb.ar) * L + 2 * params(bb.mlm) * (L + 2)) * B / n_masked + 2 * head.proj.weight.numel()
        row["maria_tflops"] = flops * row["maria_tok_s"] / 1e12
        if device.startswith("cuda"):
            row["maria_fraction_of_peak"] = row["maria_tflops"] / PEAK_TFLOPS_BF16
        rows.append(row)
    at512 = [r for r in rows if r["length"] == 512]
    return {"benchmark": "decode", "config": asdict(cfg), "device": device, "dtype": str(dtype),
            "threads": torch.get_num_threads(), "mlm_params": params(bb.mlm), "ar_params": params(bb.ar), "results": rows,
            "targets": {"maria_over_ar_min": min(r["maria_over_ar"] for r in rows), "maria_over_ar_goal": 0.8,
                        "maria_over_mlm_ar_at_512": at512[0]["maria_over_mlm_ar"] if at512 else None, "maria_over_mlm_ar_goal": 10.0}}


def plot_decode(result: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["results"]
    L = [r["length"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("maria_tok_s", "MARIA (KV cache)"), ("ar_generate_tok_s", "AR generation (KV cache)"),
                       ("mlm_ar_tok_s", "MLM left-to-right"), ("mlm_unmask_tok_s", f"MLM iterative unmasking ({result['config']['unmask_steps']} steps)")):
        ax.plot(L, [r[key] for r in rows], marker="o", label=label)
    ax.set(xscale="log", yscale="log", xlabel="sequence length (tokens, 50% masked)", ylabel="tokens / s",
           title=f"Infilling throughput ({result['device']}, {result['config']['preset'] if not result['config']['mlm'] else 'custom'})")
    ax.set_xticks(L, [str(x) for x in L])
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def run_bench(cfg: BenchConfig) -> dict:
    out = Path(cfg.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    if cfg.what == "decode":
        result = bench_decode(cfg)
        plot_decode(result, out.with_suffix(".png"))
    elif cfg.what == "extract":
        from extract.bench import bench_extract

        result = bench_extract(cfg)
    elif cfg.what == "train":
        from train_head.bench import bench_train_cli

        result = bench_train_cli(cfg)
    else:
        from maria.anneal import bench_anneal

        result = bench_anneal(cfg)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result.get("targets", result), indent=2))
    print(f"wrote {out}")
    return result
