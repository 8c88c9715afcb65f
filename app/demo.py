"""`maria demo` (`make demo`): the whole mission on one machine, offline, with the defaults.

defaults -> extract (train + validation stores, embedded Ray) -> train head -> eval table ->
export -> infilling examples -> one annealed sample. Every stage is cached or resumable, so a
re-run reuses what is done. The sizes are fields of one config: the same command scales up
on a GPU (bigger --train-docs, --mlm-steps, --train-steps; --device cuda).
"""
from __future__ import annotations

from typing import Literal
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import torch

from maria_app.commands import ExportConfig, run_export
from maria_defaults.corpus_wiki import prepare_wiki_corpus
from maria_defaults.defaults import convert_gguf_ar, default_cache_dir
from maria_defaults.pretrain_mlm import PretrainMLMConfig, pretrain_mlm
from maria_extract.job import ExtractConfig, run_extract
from maria.anneal import AnnealConfig, anneal
from maria.device import Device, resolve_device
from maria.head import init_head
from maria.modeling_maria import MariaModel
from maria_train_head.evaluate import EvalConfig, run_eval
from maria_train_head.train import TrainConfig, run_train


@dataclass
class DemoConfig:
    workdir: str = "runs/demo"  # stores, head, checkpoint, tables and plots go here
    cache: str | None = None  # built defaults (AR, MLM, corpus); default $MARIA_CACHE or ~/.cache/maria
    mlm: str | None = None  # use this MLM folder instead of pre-training the default one
    ar: str | None = None  # use this AR folder instead of the converted SmolLM2-135M
    mlm_steps: int = 400  # training steps of the default MLM (cached after the first run; steps, not minutes, so every machine trains the same MLM)
    window_length: int = 128  # tokens per window
    train_docs: int | None = 18  # training articles used (~6k tokens each; None: all 95), 2 per store block
    select_fraction: float = 0.12  # training blocks held out to pick the best step (the validation articles stay untouched until eval)
    masks_per_window: int = 2  # K masks per training window (one AR pass serves all K)
    val_docs: int | None = None  # validation articles used (None: all 10; an eval of the 49k-vocabulary head costs ~3 ms per masked token on 2 cores)
    val_rate: float = 0.5  # validation masking rate (fixed, token mode)
    train_steps: int = 60  # head training steps (a 49k x 1152 head step costs ~2-4 s on 2 cores)
    eval_every: int = 20  # validate on the held-out training blocks every N steps; the best head (step 0 included) is kept
    batch_size: int = 512  # masked tokens per head step
    lr: float = 1e-4  # head learning rate
    init: Literal["mix", "poe", "random", "ar-only"] = "mix"  # head init: mix (expert scales fitted on the cache; METHOD.md's advice for a weak MLM) | poe (the paper's) | random
    examples: int = 4  # validation sentences printed with one masked span of 1-5 words (MARIA vs each expert alone)
    anneal_steps: int = 8  # simulated-annealing steps of the generated sample
    device: Device = "auto"  # auto | cpu | cuda
    seed: int = 0  # masks, training order, sampling


# Natural prompts where the AR alone (left context only, greedy) already answers sensibly: MARIA,
# which also sees the right context, must answer them too (tests/test_text.py, and the demo prints
# them). One masked token per span: SmolLM2 writes each of these answers as one token, with its space.
NATURAL_PROMPTS: list[tuple[str, list[set[str]]]] = [
    ("The capital of France is {{1}}.", [{"paris"}]),
    ("Albert Einstein was a German-born {{1}} who developed the theory of {{1}}.", [{"physicist"}, {"relativity"}]),
    ("William Shakespeare wrote the play Romeo and {{1}}.", [{"juliet"}]),
    ("Water freezes at zero degrees {{1}}.", [{"celsius"}]),
    ("Once upon a {{1}}, there lived a king.", [{"time"}]),
    ("The Eiffel Tower is in {{1}}.", [{"paris"}]),
    ("Barack Obama was the 44th President of the United {{1}}.", [{"states"}]),
    ("The Statue of Liberty is in New {{1}}.", [{"york"}]),
    ("Leonardo da Vinci painted the Mona {{1}}.", [{"lisa"}]),
    ("The Earth revolves around the {{1}}.", [{"sun"}]),
    ("Good morning, how are {{1}} today?", [{"you"}]),
    ("The chemical symbol for gold is {{1}}.", [{"au"}]),
    ("Neil Armstrong was the first person to walk on the {{1}}.", [{"moon"}]),
    ("She opened the door and walked into the {{1}}.", [{"room", "house", "kitchen", "hall", "office", "bedroom", "garden"}]),
    ("The Mississippi River flows into the Gulf of {{1}}.", [{"mexico"}]),
]


def span_texts(result: dict, tokenizer) -> list[str]:
    """The text written into each masked span (contiguous masked runs) of one infill_text result."""
    spans, run = [], []
    for tok_id, masked in zip(result["ids"] + [None], result["mask"] + [False]):
        if masked:
            run.append(tok_id)
        elif run:
            spans.append(tokenizer.decode(run))
            run = []
    return spans


def check_prompts(model, prompts=NATURAL_PROMPTS) -> list[dict]:
    """Greedy answers to the natural prompts; ok when every span's text is one of its accepted answers."""
    results = model.infill_text([text for text, _ in prompts], temperature=0)
    rows = []
    for (text, accepted), result in zip(prompts, results):
        spans = span_texts(result, model.bb.ar_tokenizer)
        ok = len(spans) == len(accepted) and all(s.strip().lower() in a for s, a in zip(spans, accepted))
        rows.append({"prompt": text, "spans": spans, "ok": ok})
    return rows


def _stage(name: str):
    print(f"\n=== {name} ===", flush=True)
    return time.perf_counter()


def prepare_defaults(cfg: DemoConfig) -> tuple[str, str, Path, Path]:
    """(mlm, ar, train corpus, val corpus), building and caching what is missing."""
    cache = Path(cfg.cache) if cfg.cache else default_cache_dir()
    train, val = prepare_wiki_corpus(cache / "wiki")
    ar = cfg.ar or str(convert_gguf_ar(cache))
    mlm = cfg.mlm
    if mlm is None:
        out = cache / "mlm-smollm2-init"
        # the head trains on the first train_docs articles: the MLM never sees them, so its features there are
        # those of new text, as on the validation articles (an MLM that memorised them would be over-trusted)
        metrics = pretrain_mlm(PretrainMLMConfig(tokenizer_from=ar, corpus=str(train), val_corpus=str(val), out=str(out),
                                                 steps=cfg.mlm_steps, skip_docs=cfg.train_docs or 0, seed=cfg.seed,
                                                 device=resolve_device(cfg.device)))
        print(f"default MLM: held-out masked-token accuracy at 50% masking = {100 * metrics['accuracy']:.1f}%")
        mlm = str(out)
    return mlm, ar, Path(train), Path(val)


def run_demo(cfg: DemoConfig) -> dict:
    work = Path(cfg.workdir)
    work.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    timings = {}
    t = _stage("1/7 defaults: corpus, AR, MLM")
    mlm, ar, train_corpus, val_corpus = prepare_defaults(cfg)
    timings["defaults"] = time.perf_counter() - t

    t = _stage("2/7 extract: train and validation feature stores (embedded Ray)")
    # store and head folders are named by their sizes (and by --mlm/--ar when given), so changing a flag never
    # collides with an older store
    tag = "" if cfg.mlm is None and cfg.ar is None else "-b" + hashlib.sha256(f"{mlm}|{ar}".encode()).hexdigest()[:8]
    train_store = work / "stores" / f"train-w{cfg.window_length}-d{cfg.train_docs or 'all'}-k{cfg.masks_per_window}-s{cfg.seed}{tag}"
    val_store = work / "stores" / f"val-w{cfg.window_length}-d{cfg.val_docs or 'all'}-r{cfg.val_rate}-s{cfg.seed}{tag}"
    head_dir = work / f"head-{train_store.name[6:]}-h{cfg.select_fraction}-{cfg.init}-{cfg.train_steps}x{cfg.batch_size}"
    common = dict(mlm=mlm, ar=ar, window_length=cfg.window_length, seed=cfg.seed, device=device, docs_per_block=2,
                  ray_temp_dir=str(work / "ray"))
    run_extract(ExtractConfig(corpus=str(train_corpus), store=str(train_store), max_docs=cfg.train_docs,
                              masks_per_window=cfg.masks_per_window, **common))
    run_extract(ExtractConfig(corpus=str(val_corpus), store=str(val_store), max_docs=cfg.val_docs,
                              mask_rate=cfg.val_rate, **common))
    timings["extract"] = time.perf_counter() - t

    t = _stage("3/7 train the fusion head (no backbone loaded)")
    run_train(TrainConfig(store=str(train_store), val_fraction=cfg.select_fraction, out=str(head_dir),
                          init=cfg.init, max_steps=cfg.train_steps, batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed,
                          eval_every=cfg.eval_every, warmup_steps=min(10, cfg.train_steps // 5),
                          device=device, resume=True))
    timings["train"] = time.perf_counter() - t

    t = _stage("4/7 evaluate on the validation articles")
    table = run_eval(EvalConfig(store=str(val_store), head=str(head_dir), json=str(work / "eval.json"),
                                markdown=str(work / "eval.md"), device=device, overwrite=True))
    timings["eval"] = time.perf_counter() - t

    t = _stage("5/7 export one combined checkpoint")
    ckpt = run_export(ExportConfig(mlm=mlm, ar=ar, head=str(head_dir), out=str(work / "checkpoint"), overwrite=True))
    timings["export"] = time.perf_counter() - t

    t = _stage("6/7 infill: word spans of validation sentences and natural prompts, MARIA / AR-only / MLM-only")
    model = MariaModel.from_pretrained(ckpt, device=device)
    examples = infill_examples(model, val_corpus, cfg)
    timings["infill"] = time.perf_counter() - t

    t = _stage("7/7 one sample by simulated annealing")
    x, traj = anneal(model, AnnealConfig(steps=cfg.anneal_steps, chains=1, length=48, seed=cfg.seed))
    sample = model.bb.ar_tokenizer.decode(x[0].tolist())
    accepted = sum(step["accepted"] for step in traj)
    print(f"[{cfg.anneal_steps} steps, {accepted} proposals accepted, AR NLL {traj[0]['energy'][0]:.2f} -> {traj[-1]['energy'][0]:.2f}] {sample}")
    timings["generate"] = time.perf_counter() - t

    summary = {"eval": table, "examples": examples, "annealed_sample": sample, "seconds": timings}
    (work / "demo.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"\ndemo done in {sum(timings.values()):.0f} s; results in {work}/ (eval.md, demo.json, checkpoint/)")
    return summary


def masked_span_text(ids: list[int], tok, g: torch.Generator, max_words: int = 5) -> str:
    """The sentence with one span of 1..max_words whole words written {{N}} (N tokens, its leading space included)."""
    starts = [i for i in range(4, len(ids) - 2) if tok.convert_ids_to_tokens(ids[i]).startswith("Ġ")]  # word starts
    if not starts:
        return tok.decode(ids[:-1]) + " {{1}}"
    k = int(torch.randint(len(starts), (1,), generator=g))
    words = int(torch.randint(1, max_words + 1, (1,), generator=g))
    end = starts[k + words] if k + words < len(starts) else len(ids)
    return f"{tok.decode(ids[: starts[k]])} {{{{{end - starts[k]}}}}}{tok.decode(ids[end:])}"


def infill_examples(model, val_corpus: Path, cfg: DemoConfig) -> list[dict]:
    """Spans of 1-5 words in real validation sentences, and the natural prompts: MARIA vs each expert alone (greedy)."""
    tok, experts = model.bb.ar_tokenizer, model.bb.expert_weights()
    others = {"ar_only": MariaModel.from_parts(model.bb, init_head("ar-only", experts)),
              "mlm_only": MariaModel.from_parts(model.bb, init_head("mix", experts, scales=(1.0, 0.0)))}
    texts = pq.read_table(val_corpus).column("text").to_pylist()
    g = torch.Generator().manual_seed(cfg.seed)
    masked = [masked_span_text(tok(t, add_special_tokens=False).input_ids[:48], tok, g) for t in texts[: cfg.examples]]
    answers = {"maria": model.infill_text(masked, temperature=0),
               **{k: m.infill_text(masked, temperature=0) for k, m in others.items()}}
    out = []
    for r, text in enumerate(masked):
        ex = {"masked": text, **{k: span_texts(v[r], tok) for k, v in answers.items()}}
        print(f"{text!r}\n" + "".join(f"    {k:>8}: {ex[k]}\n" for k in answers))
        out.append(ex)
    checks = {"maria": check_prompts(model), **{k: check_prompts(m) for k, m in others.items()}}
    for k, rows in checks.items():
        print(f"natural prompts answered ({k}): {sum(r['ok'] for r in rows)}/{len(rows)}"
              + "".join(f"\n    {r['prompt']!r} -> {r['spans']}" for r in rows if not r["ok"]))
    return out + [{"natural_prompts": checks}]
