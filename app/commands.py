"""`maria export`, `maria infill` and `maria generate`: thin wrappers over the model core."""
from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from maria.anneal import AnnealConfig, anneal
from maria.backbones import MLM_OFFSETS
from maria.device import resolve_device, resolve_dtype
from maria.io import atomic_write, guard_output_file, jsonl_with_keys
from maria.limits import check_fits
from maria.modeling_maria import MariaModel, export
from maria.text import parse_masked_text


@dataclass
class ExportConfig:
    mlm: str  # masked LM: hub id or local folder
    ar: str  # causal LM: hub id or local folder
    head: str  # head folder written by `maria train` (head.safetensors + head.json)
    out: str  # checkpoint folder to write (a new folder, or an older checkpoint with --overwrite)
    reference: bool = False  # store hub backbones as id + commit instead of copying them in (local folders are always copied)
    overwrite: bool = False  # replace an existing MARIA checkpoint at --out
    allow_unfinished: bool = False  # export a head whose training run did not finish
    trust_remote_code: bool = False  # allow model code from the hub (off unless asked)
    dtype: str = "float32"  # dtype of every stored weight (backbones and head): float32 | bfloat16 | float16
    eval: str | None = None  # a `maria eval --json` result, shown in the model card's evaluation table
    mlm_offset: int | None = None  # where the MLM predicts x[i]: 0 (classic MLM) or -1 (MNTP); unset: its config's prediction_offset, else 0 (as at extraction)


    def __post_init__(self):
        if self.mlm_offset not in (None, *MLM_OFFSETS):
            raise ValueError(f"--mlm-offset is {self.mlm_offset}; an MLM predicts x[i] at i (0, a classic MLM) or at i - 1 (-1, masked next-token prediction)")


def run_export(cfg: ExportConfig) -> Path:
    with tqdm(total=1, desc="export", unit="checkpoint") as bar:
        out = export(cfg.mlm, cfg.ar, cfg.head, cfg.out, reference=cfg.reference, overwrite=cfg.overwrite,
                     allow_unfinished=cfg.allow_unfinished, dtype=cfg.dtype, eval_json=cfg.eval,
                     trust_remote_code=cfg.trust_remote_code, mlm_offset=cfg.mlm_offset)
        bar.update(1)
    print(f"exported MARIA checkpoint to {out}")
    return out


@dataclass
class InfillConfig:
    model: str  # a MARIA checkpoint: the folder `maria export` wrote, or its hub id
    text: str | None = None  # text with masked spans written {{N}} (N tokens), e.g. "Paris is the {{2}} of France."
    jsonl: str | None = None  # input JSONL, one {"text": ...} per line (instead of --text)
    out: str | None = None  # output JSONL (default: print to stdout)
    overwrite: bool = False  # replace an --out file written by an earlier `maria infill`
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # sample from the k most likely tokens (0 = all)
    top_p: float = 1.0  # nucleus sampling mass (1 = off)
    seed: int | None = None  # sampling seed
    batch_size: int = 8  # windows decoded together
    device: str = "auto"  # auto (cuda if visible) | cpu | cuda
    dtype: str = "auto"  # auto (bfloat16 on GPU, float32 on CPU) | float32 | bfloat16 | float16

    def __post_init__(self):
        if (self.text is None) == (self.jsonl is None):
            raise ValueError("give exactly one of --text 'masked {{3}} text' or --jsonl FILE")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")


def read_texts(path: str) -> list[str]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"--jsonl {path} is not a file; pass a JSONL file with one {{\"text\": ...}} per line")
    texts = []
    for n, line in enumerate(p.read_text(encoding="utf-8", errors="strict").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            text = record["text"]
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"{path} line {n}: each line must be a JSON object with a \"text\" field") from None
        if not isinstance(text, str):
            raise ValueError(f"{path} line {n}: \"text\" must be a string")
        texts.append(text)
    if not texts:
        raise ValueError(f"{path} holds no texts; write one {{\"text\": ...}} object per line")
    return texts


def run_infill(cfg: InfillConfig) -> list[dict]:
    guard_output_file(cfg.out, cfg.overwrite, jsonl_with_keys("input", "output"), (cfg.jsonl,))
    texts = read_texts(cfg.jsonl) if cfg.jsonl else [cfg.text]
    device = resolve_device(cfg.device)
    model = MariaModel.from_pretrained(cfg.model, device=device, dtype=resolve_dtype(cfg.dtype, device))
    sampling = dict(temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, seed=cfg.seed)
    # every text is checked before the first is decoded: a bad line 900 must not cost 899 infills
    lengths = [len(parse_masked_text(t, model.bb.ar_tokenizer, model.bb.max_window())[0]) for t in texts]
    for i in range(0, len(texts), cfg.batch_size):
        check_fits(model.bb, len(lengths[i : i + cfg.batch_size]), max(lengths[i : i + cfg.batch_size]))
    results = []
    with tqdm(total=len(texts), desc="infill", unit="text", disable=len(texts) == 1) as bar:
        for i in range(0, len(texts), cfg.batch_size):
            results += model.infill_text(texts[i : i + cfg.batch_size], **sampling)
            bar.update(len(texts[i : i + cfg.batch_size]))
    records = [{"input": r["input"], "output": r["text"], "filled": r["filled"]} for r in results]
    lines = "".join(json.dumps(r) + "\n" for r in records)
    if cfg.out:
        atomic_write(cfg.out, lines)
    elif cfg.jsonl:
        sys.stdout.write(lines)
    else:
        print(records[0]["output"])
    return records


@dataclass(kw_only=True)
class GenerateConfig(AnnealConfig):
    model: str  # a MARIA checkpoint: the folder `maria export` wrote, or its hub id
    out: str | None = None  # JSONL of samples (default: print them)
    overwrite: bool = False  # replace an --out file written by an earlier `maria generate`
    device: str = "auto"  # auto (cuda if visible) | cpu | cuda
    dtype: str = "auto"  # auto (bfloat16 on GPU, float32 on CPU) | float32 | bfloat16 | float16


def run_generate(cfg: GenerateConfig) -> list[str]:
    guard_output_file(cfg.out, cfg.overwrite, jsonl_with_keys("text", "ar_ppl"))
    device = resolve_device(cfg.device)
    model = MariaModel.from_pretrained(cfg.model, device=device, dtype=resolve_dtype(cfg.dtype, device))
    check_fits(model.bb, cfg.chains, cfg.length + 1, "generate")
    bar = tqdm(total=cfg.steps, desc="anneal", unit="step")
    x, traj = anneal(model, cfg, on_step=lambda s, e: (bar.update(1), bar.set_postfix(ppl=f"{math.exp(e.mean()):.1f}")))
    bar.close()
    texts = [model.bb.ar_tokenizer.decode(row.tolist()) for row in x.cpu()]
    ppl = [math.exp(e) for e in traj[-1]["energy"]]
    if cfg.out:
        atomic_write(cfg.out, "".join(json.dumps({"text": t, "ar_ppl": p}) + "\n" for t, p in zip(texts, ppl)))
    else:
        for t, p in zip(texts, ppl):
            print(f"[AR ppl {p:.1f}] {t}")
    return texts
