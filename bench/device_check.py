"""The prepared device check: what a session lent a GPU runs, in one call (bench/device_check.sh), one JSON + PNG back.

    python -m maria_bench.device_check --out DIR [--tests]       # on the GPU: the paper preset in bfloat16
    python -m maria_bench.device_check --out DIR --dry-run       # on a CPU: the tiny preset, seconds (CI runs it)
    python -m maria_bench.device_check --plot DIR/device_check.json   # the PNG, where the image had no matplotlib

Imports only what the lent image has (torch, transformers, numpy, tqdm; matplotlib when present): never Ray, zarr
or datasets, so the extraction actor's compute is timed without Ray and the trainer's step without a store.
Steps, on random backbones of --preset in --dtype (random weights cost the same FLOPs as trained ones):
  tests    (--tests) the GPU-marked tests (pytest -m gpu), their summary line and exit code
  extract  the backbone actor's compute (extract/forward.py) over --windows windows of --window-length tokens,
           one mask each at a rate ~ U(0, 1), --extract-batch windows per forward: window tokens/s, model
           TFLOP/s and the fraction of the GPU's dense bf16 peak
  decode   MARIA infilling against plain KV-cached AR generation and HF generate() at each --batch-sizes,
           windows of --decode-length tokens, 50% masked (bench/decode.py's cells): medians of --repeats;
           goal MARIA / AR >= 0.8 at every batch size
  train    the trainer's head step (train_head/step.py) on --train-rows in-memory feature rows on the device,
           gathered by a shuffled index per batch as in its RAM mode, stored as float16, bfloat16 and float8
           (decoded per batch), against the bare step on a batch already decoded: rows/s
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import inspect
import itertools
import json
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import transformers

from maria.head import FusionHead
from maria.plots import bar_panels
from maria_bench.decode import GOAL, decode_rows
from maria_bench.setup import BenchConfig, params, peak_tflops, poe_head, random_backbones, resolve
from maria_extract.forward import block_features
from maria_train_head.step import decode_features, make_optimizer, train_step

GPU_TESTS = ("tests/test_decode.py", "tests/test_gpu.py")  # the files holding GPU-marked tests; none imports zarr or Ray
STEP = {"lr": 3e-4, "weight_decay": 0.0, "grad_clip": 1.0, "reg_to_init": 1e-3}  # TrainConfig's defaults (a test checks they agree)


@dataclass
class DeviceCheckConfig:
    out: str = "results/device"  # folder for device_check.json and device_check.png
    preset: str = "paper"  # random backbones: paper (ModernBERT-large + OLMo-1B shapes) | smollm | small | tiny
    device: str = "auto"  # auto | cuda | cpu
    dtype: str = "auto"  # auto (bfloat16 on a GPU, float32 on a CPU) | bfloat16 | float16 | float32
    windows: int = 256  # extract: windows through the actor's compute
    window_length: int = 512  # extract: tokens per window
    extract_batch: int = 32  # extract: windows per forward (the extraction's --batch-size)
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8, 32, 64])  # decode: windows infilled together
    decode_length: int = 256  # decode: tokens per window
    repeats: int = 3  # decode and train: timed runs per figure (medians)
    train_rows: int = 65536  # train: feature rows held on the device
    train_steps: int = 30  # train: timed steps per figure
    train_batch: int = 1024  # train: rows per step (the trainer's default)
    seed: int = 0  # backbones, windows, masks
    tests: bool = False  # run the GPU-marked tests first
    dry_run: bool = False  # the CPU rehearsal: tiny preset, small sizes (CI runs it so this file cannot rot)


DRY_RUN = {
    "preset": "tiny",
    "device": "cpu",
    "dtype": "bfloat16",
    "windows": 6,
    "window_length": 32,
    "extract_batch": 4,
    "batch_sizes": [1, 3],
    "decode_length": 16,
    "repeats": 1,
    "train_rows": 512,
    "train_steps": 2,
    "train_batch": 64,
}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def env(device: str) -> dict:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": device,
        "cpus": os.cpu_count(),
        "peak_bf16_tflops": peak_tflops(device),
    }
    if device.startswith("cuda"):
        p = torch.cuda.get_device_properties(torch.device(device))
        info.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), cuda=torch.version.cuda)
    return info


def run_tests() -> dict:
    """The GPU-marked tests in a child pytest; on a CPU every one of them is skipped. Plugins other than
    pytest-timeout are not loaded: whatever an image's other packages register must not break the check."""
    timeout = ["-p", "pytest_timeout"] if importlib.util.find_spec("pytest_timeout") else []
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *timeout, "-m", "gpu", "-rs", *GPU_TESTS]
    t = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False, env={**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"})
    except subprocess.TimeoutExpired as e:
        return {"command": " ".join(cmd), "returncode": None, "summary": "timed out after 300 s", "tail": str(e.stdout)[-3000:]}
    text = done.stdout + done.stderr
    lines = [ln for ln in text.splitlines() if re.search(r"\b(passed|failed|skipped|error|deselected|no tests ran)\b", ln)]
    return {
        "command": " ".join(cmd),
        "returncode": done.returncode,
        "summary": lines[-1].strip("= ") if lines else None,
        "seconds": time.perf_counter() - t,
        "tail": text[-3000:],
    }


def non_embedding_params(model: torch.nn.Module) -> int:
    """Parameters a forward cut at the output projection multiplies with: all but the two embeddings."""
    inp, out = model.get_input_embeddings().weight, model.get_output_embeddings()
    skip = inp.numel() + (out.weight.numel() if out.weight.data_ptr() != inp.data_ptr() else 0)
    return params(model) - skip - (out.bias.numel() if getattr(out, "bias", None) is not None else 0)


def check_extract(bb, cfg: DeviceCheckConfig, device: str) -> dict:
    g = torch.Generator().manual_seed(cfg.seed)
    W, T, V = cfg.windows, cfg.window_length, bb.vocab_size
    ids = torch.randint(2, V, (W, T), generator=g).numpy()
    lengths = torch.full((W,), T).numpy()
    masks = (torch.rand(1, W, T, generator=g) < torch.rand(1, W, 1, generator=g)).numpy()  # rate ~ U(0, 1) per window
    n = min(W, cfg.extract_batch)
    block_features(bb, ids[:n], lengths[:n], masks[:, :n], cfg.extract_batch, device)  # warm-up: kernels, allocator
    runs = []
    for _ in range(cfg.repeats):
        sync(device)
        t = time.perf_counter()
        f, *_ = block_features(bb, ids, lengths, masks, cfg.extract_batch, device)
        sync(device)
        runs.append(time.perf_counter() - t)
    seconds = sorted(runs)[len(runs) // 2]
    c_ar, c_mlm = bb.ar.config, bb.mlm.config
    attention = 4 * T * (c_ar.num_hidden_layers * c_ar.hidden_size / 2 + c_mlm.num_hidden_layers * c_mlm.hidden_size)  # causal: half
    flops_per_token = 2 * (non_embedding_params(bb.ar) + non_embedding_params(bb.mlm)) + attention  # K = 1
    tflops = flops_per_token * W * T / seconds / 1e12
    peak = peak_tflops(device)
    return {
        "windows": W,
        "window_length": T,
        "rows": len(f),
        "seconds_median": seconds,
        "seconds_runs": runs,
        "window_tok_s": W * T / seconds,
        "rows_per_s": len(f) / seconds,
        "gflop_per_token": flops_per_token / 1e9,
        "tflops": tflops,
        "fraction_of_peak": tflops / peak if peak else None,
    }


def check_decode(bb, head, cfg: DeviceCheckConfig, device: str) -> dict:
    bcfg = BenchConfig(
        what="decode",
        preset=cfg.preset,
        lengths=[cfg.decode_length],
        batch_sizes=cfg.batch_sizes,
        repeats=cfg.repeats,
        mask_rate=0.5,
        unmask_steps=0,
        mlm_ar_columns=1,
        device=device,
        seed=cfg.seed,
    )
    rows = decode_rows(bb, head, bcfg, device)
    ratios = {r["batch_size"]: r["maria_over_ar_generate"]["median"] for r in rows}
    return {"length": cfg.decode_length, "results": rows, "maria_over_ar": ratios, "goal": GOAL, "goal_met": all(x >= GOAL for x in ratios.values())}


def fp8_encode(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows -> (e4m3fn codes as uint8, per-row scales), as storage/float8.py encodes them (test data only)."""
    scales = (x.abs().amax(1) / 448).clamp_min(torch.finfo(torch.float32).tiny)
    return (x / scales[:, None]).clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8), scales


def train_batches(stored: tuple, targets: torch.Tensor, B: int, perm: torch.Tensor | None):
    """Endless batches as the trainer's RAM mode makes them: a shuffled index, gather, decode on the device.
    perm=None: the bare step, one batch decoded once and fed again and again."""
    codes, scales = stored
    if perm is None:
        fixed = decode_features(codes[:B], None if scales is None else scales[:B]), targets[:B]
        while True:
            yield fixed
    for i in itertools.count():
        start = (i * B) % (len(perm) // B * B)  # whole batches of each epoch, then the next epoch (one order)
        idx = perm[start : start + B]
        yield decode_features(codes[idx], None if scales is None else scales[idx]), targets[idx]


def check_train(bb, cfg: DeviceCheckConfig, device: str) -> dict:
    g = torch.Generator(device=device).manual_seed(cfg.seed)
    N, B, D, V = cfg.train_rows, cfg.train_batch, bb.d_mlm + bb.d_ar, bb.vocab_size
    if N < B:
        raise ValueError(f"--train-rows {N} is less than one batch (--train-batch {B})")
    x = torch.randn(N, D, device=device, generator=g)
    targets = torch.randint(0, V, (N,), device=device, generator=g)
    stored = {"float16": (x.half(), None), "bfloat16": (x.bfloat16(), None), "float8": fp8_encode(x)}
    del x
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda"))
    step_cfg = argparse.Namespace(**STEP)
    out = {"rows": N, "batch": B, "feature_dim": D, "vocab_size": V}
    for name in ("bare step", *stored):
        head = FusionHead(bb.d_mlm, bb.d_ar, V).to(device)
        opt, init = make_optimizer(head, step_cfg), [p.detach().clone() for p in head.parameters()]
        perm = None if name == "bare step" else torch.randperm(N, device=device, generator=g)
        batches = train_batches(stored.get(name, stored["float16"]), targets, B, perm)
        train_step(head, opt, *next(batches), init, step_cfg, autocast)  # warm-up: kernels, AdamW state
        runs = []
        for _ in range(cfg.repeats):
            sync(device)
            t = time.perf_counter()
            for _ in range(cfg.train_steps):
                train_step(head, opt, *next(batches), init, step_cfg, autocast)
            sync(device)
            runs.append(B * cfg.train_steps / (time.perf_counter() - t))
        out[name] = {"rows_per_s_median": sorted(runs)[len(runs) // 2], "rows_per_s_runs": runs}
        del head, opt, init
    return out


def plot(result: dict, png: Path) -> None:
    d, t, x = result.get("decode", {}), result.get("train", {}), result.get("extract", {})
    rows = d.get("results", [])
    panels = {
        "extraction window tok/s": {"MARIA features": x.get("window_tok_s")},
        "extraction fraction of peak": {"MARIA features": x.get("fraction_of_peak")},
        "decode MARIA / AR gen (goal 0.8)": {f"batch {r['batch_size']}": r["maria_over_ar_generate"]["median"] for r in rows},
        "decode tok/s, MARIA": {f"batch {r['batch_size']}": r["maria_tok_s"]["median"] for r in rows},
        "decode tok/s, AR gen": {f"batch {r['batch_size']}": r["ar_generate_tok_s"]["median"] for r in rows},
        "head training rows/s": {k: v["rows_per_s_median"] for k, v in t.items() if isinstance(v, dict)},
    }
    e = result["env"]
    bar_panels(png, panels, f"device check: {e.get('gpu', e['device'])}, {result['config']['preset']} preset, {result['dtype']}")


def device_check(cfg: DeviceCheckConfig) -> dict:
    if cfg.dry_run:
        cfg = DeviceCheckConfig(**{**asdict(cfg), **DRY_RUN})
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    device, dtype = resolve(cfg.device, cfg.dtype)
    result = {"benchmark": "device_check", "config": asdict(cfg), "dtype": str(dtype).removeprefix("torch."), "env": env(device)}
    result["tests"] = run_tests() if cfg.tests else None
    t = time.perf_counter()
    bb = random_backbones(cfg.preset, device, dtype, cfg.seed)
    head = poe_head(bb).to(device=device, dtype=dtype)
    result["build_seconds"] = time.perf_counter() - t
    result["params"] = {"mlm": params(bb.mlm), "ar": params(bb.ar), "head": params(head)}
    for name, fn in (
        ("extract", lambda: check_extract(bb, cfg, device)),
        ("decode", lambda: check_decode(bb, head, cfg, device)),
        ("train", lambda: check_train(bb, cfg, device)),
    ):
        t = time.perf_counter()
        try:
            result[name] = fn()
        except Exception as e:  # noqa: BLE001 -- one failing step must not cost the others' numbers
            result[name] = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
        result[name]["step_seconds"] = time.perf_counter() - t
        (out / "device_check.json").write_text(json.dumps(result, indent=2))  # partial results survive a timeout
    if device.startswith("cuda"):
        result["max_memory_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
    result["targets"] = {
        "extract_fraction_of_peak": result["extract"].get("fraction_of_peak"),
        "decode_maria_over_ar": result["decode"].get("maria_over_ar"),
        "decode_goal_met": result["decode"].get("goal_met"),
        "tests": (result["tests"] or {}).get("summary"),
        "errors": [k for k in ("extract", "decode", "train") if "error" in result[k]],
    }
    (out / "device_check.json").write_text(json.dumps(result, indent=2))
    try:
        plot(result, out / "device_check.png")
    except ImportError:
        print(
            f"matplotlib is not installed: render the PNG elsewhere with `python -m maria_bench.device_check --plot {out / 'device_check.json'}`",
            file=sys.stderr,
        )
    return result


def parse(argv: list[str]) -> tuple[DeviceCheckConfig, str | None]:
    """argparse over DeviceCheckConfig, each field's comment its help (tyro is not on the lent image);
    --plot JSON renders the PNG beside a device_check.json and exits."""
    p = argparse.ArgumentParser(prog="python -m maria_bench.device_check", description=__doc__.split("\n\n")[0])
    comments = dict(re.findall(r"^\s+(\w+): .*?#\s*(.+)$", inspect.getsource(DeviceCheckConfig), re.MULTILINE))
    for f in dataclasses.fields(DeviceCheckConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        flag, text = "--" + f.name.replace("_", "-"), f"{comments[f.name]} (default: {default})"
        if isinstance(default, bool):
            p.add_argument(flag, action="store_true", help=text)
        elif isinstance(default, list):
            p.add_argument(flag, type=int, nargs="+", default=default, help=text)
        else:
            p.add_argument(flag, type=type(default), default=default, help=text)
    p.add_argument("--plot", help="render the PNG beside this device_check.json, and exit")
    args = vars(p.parse_args(argv))
    return DeviceCheckConfig(**{k: v for k, v in args.items() if k != "plot"}), args["plot"]


def main(argv: list[str] | None = None) -> int:
    cfg, plot_json = parse(sys.argv[1:] if argv is None else argv)
    if plot_json:
        plot(json.loads(Path(plot_json).read_text()), Path(plot_json).with_suffix(".png"))
        return 0
    result = device_check(cfg)
    print(json.dumps(result["targets"], indent=2))
    print(f"wrote {Path(cfg.out) / 'device_check.json'}")
    return 1 if result["targets"]["errors"] or (result["tests"] and result["tests"]["returncode"] not in (0, 5)) else 0


if __name__ == "__main__":
    sys.exit(main())
