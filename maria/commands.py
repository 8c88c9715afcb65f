"""`maria export` and `maria infill`: thin wrappers over maria.model."""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass
class ExportConfig:
    mlm: str  # masked LM: hub id or local folder
    ar: str  # causal LM: hub id or local folder
    head: str  # head folder written by `maria train` (head.safetensors + head.json)
    out: str  # checkpoint folder to write
    reference: bool = False  # store the backbones as id + revision instead of copying them in
    trust_remote_code: bool = False  # allow model code from the hub (off unless asked)


def run_export(cfg: ExportConfig) -> Path:
    from maria.model import export

    out = export(cfg.mlm, cfg.ar, cfg.head, cfg.out, reference=cfg.reference, trust_remote_code=cfg.trust_remote_code)
    print(f"exported MARIA checkpoint to {out}")
    return out


@dataclass
class InfillConfig:
    model: str  # a MARIA checkpoint folder (from `maria export`)
    text: str | None = None  # text with masked spans written {{N}} (N tokens), e.g. "Paris is the {{2}} of France."
    jsonl: str | None = None  # input JSONL, one {"text": ...} per line (instead of --text)
    out: str | None = None  # output JSONL (default: print to stdout)
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # sample from the k most likely tokens (0 = all)
    top_p: float = 1.0  # nucleus sampling mass (1 = off)
    seed: int | None = None  # sampling seed
    batch_size: int = 8  # windows decoded together
    device: str = "cpu"  # cpu or cuda

    def __post_init__(self):
        if (self.text is None) == (self.jsonl is None):
            raise ValueError("give exactly one of --text 'masked {{3}} text' or --jsonl FILE")


def run_infill(cfg: InfillConfig) -> list[dict]:
    from maria.model import MariaModel

    if cfg.jsonl:
        lines = [ln for ln in Path(cfg.jsonl).read_text().splitlines() if ln.strip()]
        try:
            texts = [json.loads(ln)["text"] for ln in lines]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{cfg.jsonl}: each line must be a JSON object with a \"text\" field ({type(e).__name__})") from None
    else:
        texts = [cfg.text]
    model = MariaModel.from_pretrained(cfg.model, device=cfg.device)
    sampling = dict(temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, seed=cfg.seed)
    results = []
    for i in range(0, len(texts), cfg.batch_size):
        results += model.infill_text(texts[i : i + cfg.batch_size], **sampling)
    records = [{"input": r["input"], "output": r["text"], "filled": r["filled"]} for r in results]
    if cfg.out:
        tmp = Path(cfg.out + ".partial")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
        tmp.replace(cfg.out)
    elif cfg.jsonl:
        sys.stdout.write("".join(json.dumps(r) + "\n" for r in records))
    else:
        print(records[0]["output"])
    return records
