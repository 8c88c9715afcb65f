"""`maria export`, `maria infill` and `maria generate`: thin wrappers over the model core, and the
checks and records that `maria infill` and `maria serve` (app/serve.py) share."""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from tqdm import tqdm

from maria.anneal import AnnealConfig, anneal
from maria.backbones import MLM_OFFSETS
from maria.decode import Sampling, batches_by_masked_count
from maria.device import Device, DType, resolve_device, resolve_dtype
from maria.features import check_mask
from maria.io import CorruptDataError, OutputExistsError, atomic_write, guard_output_file, jsonl_with_keys
from maria.limits import check_fits
from maria.modeling_maria import MariaModel, export
from maria.text import MASK_SPAN, parse_masked_text


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
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # dtype of every stored weight (backbones and head): float32 | bfloat16 | float16
    eval: str | None = None  # a `maria eval --json` result, shown in the model card's evaluation table
    mlm_offset: int | None = None  # where the MLM predicts x[i]: 0 (classic MLM) or -1 (MNTP); unset: its config's prediction_offset, else 0 (as at extraction)

    def __post_init__(self):
        if self.mlm_offset not in (None, *MLM_OFFSETS):
            raise ValueError(f"--mlm-offset is {self.mlm_offset}; an MLM predicts x[i] at i (0, a classic MLM) or at i - 1 (-1, masked next-token prediction)")


def run_export(cfg: ExportConfig) -> Path:
    with tqdm(total=1, desc="export", unit="checkpoint") as bar:
        out = export(
            cfg.mlm,
            cfg.ar,
            cfg.head,
            cfg.out,
            reference=cfg.reference,
            overwrite=cfg.overwrite,
            allow_unfinished=cfg.allow_unfinished,
            dtype=cfg.dtype,
            eval_json=cfg.eval,
            trust_remote_code=cfg.trust_remote_code,
            mlm_offset=cfg.mlm_offset,
        )
        bar.update(1)
    print(f"exported MARIA checkpoint to {out}")
    return out


@dataclass
class InfillConfig:
    model: str  # a MARIA checkpoint: the folder `maria export` wrote, or its hub id
    text: str | None = None  # text with masked spans written {{N}} (N tokens), e.g. "Paris is the {{2}} of France."
    jsonl: str | None = None  # input JSONL, one {"text": ...} per line (instead of --text)
    out: str | None = None  # output JSONL (default: print to stdout); an interrupted run continues when the same command is re-run
    overwrite: bool = False  # replace an --out file written by an earlier `maria infill` (and drop an interrupted run with other settings)
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # sample from the k most likely tokens (0 = all)
    top_p: float = 1.0  # nucleus sampling mass (1 = off)
    seed: int | None = None  # sampling seed
    batch_size: int = 8  # windows decoded together
    device: Device = "auto"  # auto (cuda if visible) | cpu | cuda
    dtype: DType = "auto"  # auto (bfloat16 on GPU, float32 on CPU) | float32 | bfloat16 | float16
    group_lines: int = (
        256  # --jsonl: lines sorted by masked count into batches together, then written in input order (an interrupt re-decodes at most this many)
    )
    device: str = "auto"  # auto (cuda if visible) | cpu | cuda
    dtype: str = "auto"  # auto (bfloat16 on GPU, float32 on CPU) | float32 | bfloat16 | float16

    def __post_init__(self):
        if (self.text is None) == (self.jsonl is None):
            raise ValueError("give exactly one of --text 'masked {{3}} text' or --jsonl FILE")
        if self.batch_size < 1 or self.group_lines < 1:
            raise ValueError(f"--batch-size and --group-lines must be >= 1, got {self.batch_size} and {self.group_lines}")


# ---- what the CLI and the server (app/serve.py) share, so both refuse a bad input with the same line ----
EXAMPLE = '{"text": "Paris is the {{2}} of France."}'


def record_text(record, where: str, many: bool = False) -> str | list[str]:
    """The "text" of one JSON record (a JSONL line, a request body): a string, or with `many` a list of them."""
    text = record.get("text") if isinstance(record, dict) else None
    if isinstance(text, str) or (many and isinstance(text, list) and text and all(isinstance(t, str) for t in text)):
        return text
    what = "a string or a non-empty list of strings" if many else "a string"
    raise ValueError(f'{where}: must be a JSON object with a "text" field ({what}), e.g. {EXAMPLE}')


def checked_sampling(temperature=0.0, top_k=0, top_p=1.0, seed=None, where: str | None = None) -> dict:
    """Sampling arguments checked before any work (decode.Sampling's own line); `where` also checks
    JSON types (a request body: "0.5" or true is not a number)."""
    if where is not None:
        for name, value, kind in (
            ("temperature", temperature, (int, float)),
            ("top_p", top_p, (int, float)),
            ("top_k", top_k, (int,)),
            ("seed", seed, (int, type(None))),
        ):
            if isinstance(value, bool) or not isinstance(value, kind):
                want = "a number" if float in kind else "an integer" + (" or null" if name == "seed" else "")
                raise ValueError(f'{where}: "{name}" must be {want}, got {value!r}')
    Sampling(temperature=float(temperature), top_k=top_k, top_p=float(top_p), seed=seed)
    return {"temperature": float(temperature), "top_k": top_k, "top_p": float(top_p), "seed": seed}


def check_text(model: MariaModel, text: str) -> tuple[int, int]:
    """(tokens, masked tokens) of one {{N}} text, or one line saying what is wrong with it."""
    ids, mask = parse_masked_text(text, model.bb.ar_tokenizer, model.bb.max_window())
    if not any(mask):
        raise ValueError(f"text {text[:40]!r} has no masked span; mark what to fill as {{{{N}}}} (N tokens), e.g. 'Paris is the {{{{2}}}} of France.'")
    check_mask(model.bb, torch.tensor([mask]))  # position 0 needs a start token
    return len(ids), sum(mask)


def infill_records(model: MariaModel, texts: list[str], sampling: dict) -> list[dict]:
    """Decode texts together; one record per text: the filled text, each filled token, each {{N}} span's text."""
    tok = model.bb.ar_tokenizer
    records = []
    for text, r in zip(texts, model.infill_text(texts, **sampling)):
        filled, spans, at = [t for t, m in zip(r["ids"], r["mask"]) if m], [], 0
        for span in MASK_SPAN.finditer(text):
            n = int(span.group(1) or 1)
            spans.append(tok.decode(filled[at : at + n]))
            at += n
        records.append({"input": text, "output": r["text"], "filled": r["filled"], "spans": spans})
    return records


# ---- `maria infill` --------------------------------------------------------------------------
def read_texts(path: str) -> tuple[list[str], list[int]]:
    """The texts of a JSONL file and the line number of each (blank lines are skipped)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f'--jsonl {path} is not a file; pass a JSONL file with one {{"text": ...}} per line')
    texts, line_numbers = [], []
    for n, line in enumerate(p.read_text(encoding="utf-8", errors="strict").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        texts.append(record_text(record, f"{path} line {n}"))
        line_numbers.append(n)
    if not texts:
        raise ValueError(f'{path} holds no texts; write one {{"text": ...}} object per line')
    return texts, line_numbers


def partial_file(cfg: InfillConfig, texts: list[str]) -> Path:
    """Where a run appends its lines until done: beside --out, named by a digest of everything that
    decides the output (input, model, sampling, batching), so only the same command resumes it."""
    out = Path(cfg.out).expanduser()
    model = str(Path(cfg.model).expanduser().resolve()) if Path(cfg.model).expanduser().exists() else cfg.model
    digest = hashlib.sha256(
        json.dumps([model, cfg.temperature, cfg.top_k, cfg.top_p, cfg.seed, cfg.batch_size, cfg.group_lines, cfg.device, cfg.dtype]).encode()
    )
    for text in texts:
        digest.update(b"\0" + text.encode())
    return out.with_name(f".{out.name}.{digest.hexdigest()[:12]}.partial")


def resume(partial: Path, texts: list[str], overwrite: bool) -> list[dict]:
    """The records an interrupted run of the same command wrote (a line cut by a crash is dropped).
    An interrupted run with other settings is refused, or dropped with --overwrite."""
    mine = re.compile(re.escape(partial.name.rsplit(".", 2)[0]) + r"\.[0-9a-f]{12}\.partial")
    others = [p for p in partial.parent.glob(glob.escape(partial.name.rsplit(".", 2)[0]) + ".*.partial") if mine.fullmatch(p.name) and p != partial]
    if others and not overwrite:
        raise OutputExistsError(
            f"{others[0]} holds an interrupted `maria infill` with other input or settings; re-run that command to finish it, or pass --overwrite to discard it"
        )
    for p in others:
        p.unlink()
    if not partial.exists():
        return []
    data = partial.read_bytes()
    whole = data[: data.rfind(b"\n") + 1]
    records = []
    for n, line in enumerate(whole.decode("utf-8", errors="replace").splitlines()):
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict) or n >= len(texts) or record.get("input") != texts[n]:
            raise CorruptDataError(f"{partial} line {n + 1} is not the result of input line {n + 1}; delete {partial} to start over")
        records.append(record)
    if len(whole) < len(data):
        os.truncate(partial, len(whole))
    return records


def run_infill(cfg: InfillConfig) -> list[dict]:
    guard_output_file(cfg.out, cfg.overwrite, jsonl_with_keys("input", "output"), (cfg.jsonl,))
    texts, line_numbers = read_texts(cfg.jsonl) if cfg.jsonl else ([cfg.text], [])
    sampling = checked_sampling(cfg.temperature, cfg.top_k, cfg.top_p, cfg.seed)
    partial = partial_file(cfg, texts) if cfg.out else None
    records = resume(partial, texts, cfg.overwrite) if partial else []
    device = resolve_device(cfg.device)
    model = MariaModel.from_pretrained(cfg.model, device=device, dtype=resolve_dtype(cfg.dtype, device))
    # every text and batch is checked before the first is decoded: a bad line 900 must not cost 899 infills
    sizes = []
    for n, text in enumerate(texts):
        try:
            sizes.append(check_text(model, text))
        except ValueError as e:
            raise type(e)(f"{cfg.jsonl} line {line_numbers[n]}: {e}" if cfg.jsonl else str(e)) from None
    plan = []  # (lines of a group not yet written, its batches: similar masked counts together)
    for start in range(0, len(texts), cfg.group_lines):
        todo = list(range(max(start, len(records)), min(start + cfg.group_lines, len(texts))))
        if not todo:
            continue
        batches = [[todo[j] for j in b] for b in batches_by_masked_count([sizes[i][1] for i in todo], cfg.batch_size, [sizes[i][0] for i in todo])]
        for b in batches:
            check_fits(model.bb, len(b), max(sizes[i][0] for i in b))
        plan.append((todo, batches))
    with tqdm(total=len(texts), initial=len(records), desc="infill", unit="text", disable=len(texts) == 1) as bar:
        for todo, batches in plan:
            done = {}
            for b in batches:
                done.update(zip(b, infill_records(model, [texts[i] for i in b], sampling)))
                bar.update(len(b))
            group = [done[i] for i in todo]
            records += group
            lines = "".join(json.dumps(r) + "\n" for r in group)
            if partial:
                append_lines(partial, lines)
            elif cfg.jsonl:
                sys.stdout.write(lines)
                sys.stdout.flush()
    if partial:
        os.replace(partial, Path(cfg.out).expanduser())
    elif not cfg.jsonl:
        print(records[0]["output"])
    return records


def append_lines(path: Path, text: str) -> None:
    """Append whole lines in one write(2) to an O_APPEND descriptor, so a killed run leaves whole lines
    (a crash of the machine may cut the last one: `resume` drops it). The file is created by the first
    append: a run refused before any result leaves nothing behind."""
    data = memoryview(text.encode())
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        while data:
            data = data[os.write(fd, data) :]
    finally:
        os.close(fd)


@dataclass(kw_only=True)
class GenerateConfig(AnnealConfig):
    model: str  # a MARIA checkpoint: the folder `maria export` wrote, or its hub id
    out: str | None = None  # JSONL of samples (default: print them)
    overwrite: bool = False  # replace an --out file written by an earlier `maria generate`
    device: Device = "auto"  # auto (cuda if visible) | cpu | cuda
    dtype: DType = "auto"  # auto (bfloat16 on GPU, float32 on CPU) | float32 | bfloat16 | float16


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
