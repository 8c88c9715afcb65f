"""`maria bench shapes --preset paper`: the whole pipeline at a preset's real shapes, on this machine.

`paper` is ModernBERT-large + OLMo-1B (random weights, about 1.7B parameters, vocabulary 50,304). Each stage
runs in its own process, so its peak memory is its own:
    build    random backbones of the preset and one BPE tokenizer (trained on CPython's reference docs,
             pydoc_data), saved as Hugging Face folders; a corpus of --windows one-window documents
    extract  `maria extract` on an embedded Ray (--dtype; auto = float32 on a CPU), float16 features
    train    `maria train`: --steps head steps of --batch-size rows (1 means 256), validating on held-out blocks
    export   `maria export --dtype bfloat16`
    infill   load the checkpoint (bfloat16, as stored) and infill one short text
Per stage: wall time, peak RSS (the stage process's own, exact; and the largest process of its tree, sampled
every 0.2 s, which for extraction is Ray's backbone actor) against the bytes the stage must hold (the
backbones' weights; in train the head, its gradient and AdamW's two moments: goal peak <= 1.5x; also given
above the RSS the process had after its imports, which small presets are all about), and the store's bytes per
window token against the scale model (README: stored row = 2 (d_mlm + d_ar) + 28 bytes).
"""

from __future__ import annotations

import copy
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from pydoc_data.topics import topics  # CPython's own documentation text, shipped with every Python

import psutil
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from maria.modeling_maria import MariaModel, export
from maria.plots import bar_panels
from maria_bench.setup import PRESETS, random_models, resolve
from maria_extract.job import ExtractConfig, run_extract
from maria_storage import open_store
from maria_train_head.train import TrainConfig, run_train

STAGES = ("build", "extract", "train", "export", "infill")
RSS_GOAL = 1.5  # peak RSS at most this many times the bytes a stage must hold
MARK = "MARIA_STAGE_RESULT "  # a stage process prints its result as one line starting with this
EOT = "<|endoftext|>"


def weight_bytes(*modules: torch.nn.Module) -> int:
    """Bytes of the modules' parameters and buffers (a tied weight counted once)."""
    seen, total = set(), 0
    for m in modules:
        for t in [*m.parameters(), *m.buffers()]:
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total


def tokenizers(vocab_size: int = 8192) -> tuple[PreTrainedTokenizerFast, PreTrainedTokenizerFast]:
    """(AR, MLM) tokenizers sharing ids, the MLM's [CLS] [SEP] [MASK] [PAD] after them (as ModernBERT's after OLMo's)."""
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(
        list(topics.values()), trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    )
    ar = PreTrainedTokenizerFast(tokenizer_object=copy.deepcopy(core), bos_token=EOT, eos_token=EOT, pad_token=EOT)
    core.add_special_tokens(["[CLS]", "[SEP]", "[MASK]", "[PAD]"])
    core.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", core.token_to_id("[CLS]")), ("[SEP]", core.token_to_id("[SEP]"))]
    )
    mlm = PreTrainedTokenizerFast(tokenizer_object=core, cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]", pad_token="[PAD]")
    return ar, mlm


# ---- the stages (each runs in its own process: `python -m maria_bench.shapes STAGE SPEC.json`) ----------------


def stage_build(spec: dict) -> dict:
    work, T = Path(spec["work"]), spec["window_length"]
    ar_tok, mlm_tok = tokenizers(min(8192, PRESETS[spec["preset"]][4]))  # the models' vocabularies hold every token
    mlm, ar = random_models(spec["preset"], "cpu", torch.float32, spec["seed"])
    for name, model, tok in (("mlm", mlm, mlm_tok), ("ar", ar, ar_tok)):
        model.save_pretrained(work / name)
        tok.save_pretrained(work / name)
    ids = ar_tok("\n\n".join(topics.values()), add_special_tokens=False).input_ids  # one window per document
    docs = [ar_tok.decode(ids[i : i + T]) for i in range(0, len(ids) - T, T)][: spec["windows"]]
    (work / "corpus.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return {
        "mlm_params": sum(p.numel() for p in mlm.parameters()),
        "ar_params": sum(p.numel() for p in ar.parameters()),
        "weights_bytes_float32": weight_bytes(mlm, ar),
        "own_bytes": weight_bytes(mlm, ar),
        "documents": len(docs),
    }


def stage_extract(spec: dict) -> dict:
    work = Path(spec["work"])
    docs_per_block = max(1, spec["windows"] // 4)  # at least 4 blocks: the trainer holds one out for validation
    cfg = ExtractConfig(
        mlm=str(work / "mlm"),
        ar=str(work / "ar"),
        corpus=str(work / "corpus.jsonl"),
        store=str(work / "store"),
        window_length=spec["window_length"],
        docs_per_block=docs_per_block,
        batch_size=4,
        dtype=spec["dtype"],
        device=spec["device"],
        ray_temp_dir=str(work / "ray"),
    )
    t = time.perf_counter()
    summary = run_extract(cfg)
    seconds = time.perf_counter() - t
    store = open_store(cfg.store)
    stored = sum(p.stat().st_size for p in (work / "store" / "blocks").rglob("*") if p.is_file())
    row = 2 * store.feature_dim + 28  # the scale model's stored row, float16
    tokens, rows = summary["new_tokens"], summary["rows"]
    dtype = getattr(torch, spec["dtype"])
    own = int(spec["weights_bytes_float32"] * torch.finfo(dtype).bits / 32)
    return {
        "window_tokens": tokens,
        "rows": rows,
        "blocks": summary["blocks"],
        "job_seconds": seconds,
        "job_tok_s": tokens / seconds,
        "store_bytes_on_disk": stored,
        "store_bytes_per_window_token": stored / tokens,
        "store_bytes_per_row": stored / rows,
        "masked_fraction": rows / tokens,
        "scale_model_row_bytes": row,
        "scale_model_bytes_per_window_token": rows / tokens * row,
        "scale_model_bytes_per_token_at_half_masked": 0.5 * row,
        "store_over_scale_model": stored / (rows * row),
        "own_bytes": own,
        "own": f"both backbones' weights in {dtype}",
    }


def stage_train(spec: dict) -> dict:
    work = Path(spec["work"])
    store = open_store(str(work / "store"))
    t = time.perf_counter()
    summary = run_train(
        TrainConfig(
            store=str(work / "store"),
            out=str(work / "head"),
            max_steps=spec["steps"],
            batch_size=spec["batch_size"],
            eval_every=spec["steps"],
            warmup_steps=1,
            val_fraction=0.25,
            device=spec["device"],
        )
    )
    head = 4 * store.vocab_size * (store.feature_dim + 1)
    return {
        "seconds": time.perf_counter() - t,
        "steps": summary["steps"],
        "data_mode": summary["data_mode"],
        "init_val_loss": summary["init_val_loss"],
        "best_val_loss": summary["best_val_loss"],
        "head_bytes": head,
        "own_bytes": 4 * head,
        "own": "the float32 head, its gradient and AdamW's two moments",
    }


def stage_export(spec: dict) -> dict:
    work = Path(spec["work"])
    t = time.perf_counter()
    export(str(work / "mlm"), str(work / "ar"), str(work / "head"), str(work / "checkpoint"), dtype="bfloat16")
    stored = sum(p.stat().st_size for p in (work / "checkpoint").rglob("*.safetensors"))
    return {
        "seconds": time.perf_counter() - t,
        "checkpoint_safetensors_bytes": stored,
        "own_bytes": spec["weights_bytes_float32"],
        "own": "both backbones' float32 weights (export loads them in float32)",
    }


def stage_infill(spec: dict) -> dict:
    work = Path(spec["work"])
    t = time.perf_counter()
    model = MariaModel.from_pretrained(work / "checkpoint", device=spec["device"])
    loaded = time.perf_counter() - t
    text = "The {{2}} statement is used for {{4}} execution: it repeatedly tests the {{3}} and, if it is true, executes the first suite."
    t = time.perf_counter()
    out = model.infill_text([text], temperature=0)[0]
    return {
        "load_seconds": loaded,
        "infill_seconds": time.perf_counter() - t,
        "filled": out["filled"],
        "own_bytes": weight_bytes(model),
        "own": f"the checkpoint's weights as loaded ({model.proj.weight.dtype})",
    }


STAGE_FUNCS = {"build": stage_build, "extract": stage_extract, "train": stage_train, "export": stage_export, "infill": stage_infill}


# ---- the driver: one process per stage, memory sampled over its process tree -------------------------------


class TreeSampler(threading.Thread):
    """Largest RSS of any one process of `pid`'s tree, and of the tree's sum, sampled every 0.2 s."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.largest, self.total, self.largest_cmd, self.done = pid, 0, 0, "", threading.Event()

    def run(self):
        while not self.done.wait(0.2):
            try:
                root = psutil.Process(self.pid)
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                continue
            total = 0
            for p in procs:
                try:
                    rss = p.memory_info().rss
                    if rss > self.largest:
                        self.largest, self.largest_cmd = rss, " ".join(p.cmdline()[:3])[:120]
                    total += rss
                except psutil.Error:
                    pass
            self.total = max(self.total, total)


def run_stage(stage: str, spec: dict) -> dict:
    """Run one stage in a fresh process; its result, wall time and memory."""
    spec_file = Path(spec["work"]) / f"spec-{stage}.json"
    spec_file.write_text(json.dumps(spec))
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "maria_bench.shapes", stage, str(spec_file)], stdout=subprocess.PIPE, text=True)
    sampler = TreeSampler(proc.pid)
    sampler.start()
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if not line.startswith(MARK):
            sys.stdout.write(line)
    proc.wait()
    sampler.done.set()
    sampler.join()
    found = [json.loads(x[len(MARK) :]) for x in lines if x.startswith(MARK)]
    if proc.returncode or not found:
        raise RuntimeError(f"bench shapes: stage {stage} failed (exit {proc.returncode}); its output is above")
    r = found[-1]
    peak = max(r["peak_rss_bytes"], sampler.largest)
    return {
        **r,
        "wall_seconds": time.perf_counter() - t,
        "largest_process_peak_rss_bytes": sampler.largest,
        "largest_process": sampler.largest_cmd,
        "tree_peak_rss_bytes": sampler.total,
        "peak_over_own": peak / r["own_bytes"],
        "goal_met": peak <= RSS_GOAL * r["own_bytes"],
        "peak_above_imports_over_own": (peak - r["import_rss_bytes"]) / r["own_bytes"],
    }


def bench_shapes(cfg) -> dict:
    work = Path(cfg.workdir or tempfile.mkdtemp(prefix="maria-shapes-"))  # short: Ray's socket paths must fit 107 bytes
    work.mkdir(parents=True, exist_ok=True)
    device, dtype = resolve(cfg.device, cfg.dtype)  # auto: float32 on a CPU, bfloat16 on a GPU
    spec = {
        "preset": cfg.preset,
        "work": str(work),
        "windows": cfg.windows,
        "window_length": cfg.lengths[0],
        "steps": cfg.steps,
        "batch_size": cfg.batch_size if cfg.batch_size > 1 else 256,
        "dtype": str(dtype).removeprefix("torch."),
        "device": device,
        "seed": cfg.seed,
    }
    stages = {}
    try:
        for stage in STAGES:
            print(f"bench shapes: {stage} ({cfg.preset})", flush=True)
            stages[stage] = run_stage(stage, spec)
            if stage == "build":
                spec["weights_bytes_float32"] = stages["build"]["weights_bytes_float32"]
    finally:
        if cfg.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    hm, lm, ha, la, v = PRESETS[cfg.preset]
    x = stages["extract"]
    result = {
        "benchmark": "shapes",
        "preset": cfg.preset,
        "shapes": {"mlm_hidden": hm, "mlm_layers": lm, "ar_hidden": ha, "ar_layers": la, "vocab": v},
        "spec": {k: v for k, v in spec.items() if k != "work"},
        "cpus": os.cpu_count(),
        "memory_total_bytes": psutil.virtual_memory().total,
        "load_average": os.getloadavg(),
        "stages": stages,
        "targets": {
            "peak_rss_over_own_bytes": {s: round(r["peak_over_own"], 3) for s, r in stages.items()},
            "goal": RSS_GOAL,
            "goal_met": all(r["goal_met"] for s, r in stages.items() if s != "build"),
            "store_bytes_per_window_token": x["store_bytes_per_window_token"],
            "scale_model_bytes_per_window_token": x["scale_model_bytes_per_window_token"],
            "wall_seconds": {s: round(r["wall_seconds"], 1) for s, r in stages.items()},
        },
    }
    gb = 2**30
    bar_panels(
        Path(cfg.json).with_suffix(".png"),
        {
            "peak RSS (GiB)": {s: max(r["peak_rss_bytes"], r["largest_process_peak_rss_bytes"]) / gb for s, r in stages.items()},
            "bytes held (GiB)": {s: r["own_bytes"] / gb for s, r in stages.items()},
            "peak / held": {s: r["peak_over_own"] for s, r in stages.items()},
            "wall time (s)": {s: r["wall_seconds"] for s, r in stages.items()},
            "store bytes / token": {"measured": x["store_bytes_per_window_token"], "scale model": x["scale_model_bytes_per_window_token"]},
        },
        f"{cfg.preset} shapes on this machine ({os.cpu_count()} CPUs)",
    )
    return result


if __name__ == "__main__":  # one stage: python -m maria_bench.shapes STAGE SPEC.json
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    imports = psutil.Process().memory_info().rss  # torch, transformers, Ray's client: what any stage pays first
    out = STAGE_FUNCS[sys.argv[1]](json.loads(Path(sys.argv[2]).read_text()))
    out["import_rss_bytes"] = imports
    out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    print(MARK + json.dumps(out), flush=True)
