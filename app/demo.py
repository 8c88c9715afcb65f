"""`maria demo` (`make demo`): the whole mission on one machine, offline, with the defaults.

defaults -> extract (train + validation stores, embedded Ray) -> train head -> eval table ->
export -> infilling examples -> annealed samples -> the goals. Every stage is cached or
resumable, so a re-run reuses what is done. The sizes are fields of one config: the same command
scales up on a GPU (bigger --train-docs, --mlm-steps, --train-steps; --device cuda).

Budget (decision): `make demo` must finish within 25 minutes on a quiet 2-core CPU. An older demo
took 22.6 min there (an 8-minute MLM, 16 articles): extraction ~450 tok/s (the AR dominates), a
512-row head step ~2 s plus ~20 s per validation, evaluation ~3 ms per masked token. The head used
fewer rows than its articles give (60 steps x 512 rows = 31k of ~140k), so the demo extracts 12
articles, not 18 (~100 s less), and spends that on twice the head steps at three times the
learning rate (120 steps, 61k rows): a head that moves from its init. The MLM is trained with
masked next-token prediction (MNTP), which keeps the AR's alignment (defaults/pretrain_mlm.py).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pyarrow.parquet as pq
import torch

from maria.anneal import AnnealConfig, anneal
from maria.device import Device, resolve_device
from maria.head import init_head
from maria.modeling_maria import MariaModel
from maria_app.commands import ExportConfig, run_export
from maria_defaults.corpus_wiki import prepare_wiki_corpus
from maria_defaults.defaults import convert_gguf_ar, default_cache_dir
from maria_defaults.pretrain_mlm import OBJECTIVES, PretrainMLMConfig, demo_mlm_dir, pretrain_mlm
from maria_extract.job import ExtractConfig, run_extract
from maria_train_head.evaluate import EvalConfig, run_eval
from maria_train_head.train import TrainConfig, run_train


@dataclass
class DemoConfig:
    workdir: str = "runs/demo"  # stores, head, checkpoint, tables and plots go here
    cache: str | None = None  # built defaults (AR, MLM, corpus); default $MARIA_CACHE or ~/.cache/maria
    mlm: str | None = None  # use this MLM folder instead of pre-training the default one
    ar: str | None = None  # use this AR folder instead of the converted SmolLM2-135M
    mlm_steps: int = 400  # training steps of the default MLM (cached after the first run; steps, not minutes, so every machine trains the same MLM)
    mlm_objective: str = "mntp"  # the default MLM's objective: mntp (token i predicted at i - 1, keeps the AR's alignment) | mlm (at i)
    mlm_layers: int = 4  # blocks of the default MLM, copied from the AR's first blocks (each costs ~1/4 more per MLM step)
    window_length: int = 128  # tokens per window
    train_docs: int | None = 12  # training articles used (~6k tokens each; None: all 95), 2 per store block; the MLM never sees them
    select_fraction: float = 0.12  # training blocks held out to pick the best step (the validation articles stay untouched until eval)
    masks_per_window: int = 2  # K masks per training window (one AR pass serves all K)
    val_docs: int | None = None  # validation articles used (None: all 10; an eval of the 49k-vocabulary head costs ~3 ms per masked token on 2 cores)
    val_rate: float = 0.5  # validation masking rate (fixed, token mode)
    train_steps: int = 120  # head training steps (a 49k x 1152 head step of 512 rows costs ~2 s on 2 cores)
    eval_every: int = 60  # validate on the held-out training blocks every N steps (~20 s each); the best head (step 0 included) is kept
    batch_size: int = 512  # masked tokens per head step
    lr: float = 3e-4  # head learning rate (peak; warm-up then cosine)
    init: Literal["mix", "poe", "random", "ar-only"] = "mix"  # head init: mix (expert scales fitted on the cache; for a weak MLM) | poe (the paper's) | random
    examples: int = 4  # validation sentences printed with one masked span of 1-5 words (MARIA vs each expert alone)
    anneal_steps: int = 8  # simulated-annealing steps of the generated samples
    anneal_chains: int = 4  # samples annealed together (one batch); the demo prints the one the AR likes best
    device: Device = "auto"  # auto | cpu | cuda
    seed: int = 0  # masks, training order, sampling

    def __post_init__(self):
        if self.mlm_objective not in OBJECTIVES:
            raise ValueError(f"unknown --mlm-objective {self.mlm_objective!r}; use mntp or mlm")
        for name in ("mlm_steps", "mlm_layers", "train_steps", "eval_every", "batch_size", "anneal_chains"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")


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


# Prompts whose answer the left context does not give and the right context does (SmolLM2 alone, greedy,
# answers none of them: tests/test_text.py). MARIA reads both sides; the goal is more of these than the AR.
RIGHT_CONTEXT_PROMPTS: list[tuple[str, list[set[str]]]] = [
    ("Berlin is the capital and largest city of {{1}}.", [{"germany"}]),
    ("{{1}} is the capital of France.", [{"paris"}]),
    ("The {{1}} barked at the mailman all morning.", [{"dog"}]),
    ("In 1969, {{1}} Armstrong walked on the Moon.", [{"neil"}]),
    ("The {{1}} Ocean is the largest ocean on Earth.", [{"pacific"}]),
    ("The {{1}} of the United States lives in the White House.", [{"president"}]),
    ("A {{1}} has eight legs and spins webs.", [{"spider"}]),
    ("The {{1}} rises in the east and sets in the west.", [{"sun"}]),
    ("The {{1}} River flows through Egypt into the Mediterranean Sea.", [{"nile"}]),
    ("{{1}} is the largest country in South America.", [{"brazil"}]),
    ("Madrid is the capital of {{1}}, a country in southern Europe.", [{"spain"}]),
    ("Mount {{1}} is the highest mountain on Earth.", [{"everest"}]),
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


def mlm_snapshots(steps: int) -> list[int]:
    """Steps at which the demo's MLM is also saved (out/step-N), so `maria bench quality` draws its curve
    from the demo's own pre-training run: 1/16, 1/8, 1/4 and 1/2 of the budget."""
    return sorted({max(1, steps // d) for d in (16, 8, 4, 2)} - {steps})


def prepare_defaults(cfg: DemoConfig) -> tuple[str, str, Path, Path]:
    """(mlm, ar, train corpus, val corpus), building and caching what is missing."""
    cache = Path(cfg.cache) if cfg.cache else default_cache_dir()
    train, val = prepare_wiki_corpus(cache / "wiki")
    ar = cfg.ar or str(convert_gguf_ar(cache))
    mlm = cfg.mlm
    if mlm is None:
        out = demo_mlm_dir(cache, cfg.mlm_objective)
        # the head trains on the first train_docs articles: the MLM never sees them, so its features there are
        # those of new text, as on the validation articles (an MLM that memorised them would be over-trusted)
        metrics = pretrain_mlm(
            PretrainMLMConfig(
                tokenizer_from=ar,
                corpus=str(train),
                val_corpus=str(val),
                out=str(out),
                steps=cfg.mlm_steps,
                objective=cfg.mlm_objective,
                num_layers=cfg.mlm_layers,
                skip_docs=cfg.train_docs or 0,
                seed=cfg.seed,
                device=resolve_device(cfg.device),
                snapshots=mlm_snapshots(cfg.mlm_steps),
            )
        )
        print(f"default MLM ({cfg.mlm_objective}): held-out masked-token accuracy at 50% masking = {100 * metrics['accuracy']:.1f}%")
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
    tag = (
        f"-{cfg.mlm_objective}{cfg.mlm_steps}x{cfg.mlm_layers}"
        if cfg.mlm is None and cfg.ar is None
        else "-b" + hashlib.sha256(f"{mlm}|{ar}".encode()).hexdigest()[:8]
    )
    train_store = work / "stores" / f"train-w{cfg.window_length}-d{cfg.train_docs or 'all'}-k{cfg.masks_per_window}-s{cfg.seed}{tag}"
    val_store = work / "stores" / f"val-w{cfg.window_length}-d{cfg.val_docs or 'all'}-r{cfg.val_rate}-s{cfg.seed}{tag}"
    head_dir = work / f"head-{train_store.name[6:]}-h{cfg.select_fraction}-{cfg.init}-{cfg.train_steps}x{cfg.batch_size}-lr{cfg.lr:g}"
    common = dict(mlm=mlm, ar=ar, window_length=cfg.window_length, seed=cfg.seed, device=device, docs_per_block=2, ray_temp_dir=str(work / "ray"))
    run_extract(ExtractConfig(corpus=str(train_corpus), store=str(train_store), max_docs=cfg.train_docs, masks_per_window=cfg.masks_per_window, **common))
    run_extract(ExtractConfig(corpus=str(val_corpus), store=str(val_store), max_docs=cfg.val_docs, mask_rate=cfg.val_rate, **common))
    timings["extract"] = time.perf_counter() - t

    t = _stage("3/7 train the fusion head (no backbone loaded)")
    run_train(
        TrainConfig(
            store=str(train_store),
            val_fraction=cfg.select_fraction,
            out=str(head_dir),
            init=cfg.init,
            max_steps=cfg.train_steps,
            batch_size=cfg.batch_size,
            lr=cfg.lr,
            seed=cfg.seed,
            eval_every=cfg.eval_every,
            warmup_steps=min(10, cfg.train_steps // 5),
            device=device,
            resume=True,
        )
    )
    timings["train"] = time.perf_counter() - t

    t = _stage("4/7 evaluate on the validation articles")
    table = run_eval(
        EvalConfig(store=str(val_store), head=str(head_dir), json=str(work / "eval.json"), markdown=str(work / "eval.md"), device=device, overwrite=True)
    )
    timings["eval"] = time.perf_counter() - t

    t = _stage("5/7 export one combined checkpoint")
    ckpt = run_export(ExportConfig(mlm=mlm, ar=ar, head=str(head_dir), out=str(work / "checkpoint"), overwrite=True))
    timings["export"] = time.perf_counter() - t

    t = _stage("6/7 infill: word spans of validation sentences and natural prompts, MARIA / AR-only / MLM-only")
    model = MariaModel.from_pretrained(ckpt, device=device)
    examples, prompts = infill_examples(model, val_corpus, cfg)
    timings["infill"] = time.perf_counter() - t

    t = _stage("7/7 samples by simulated annealing")
    annealed = anneal_samples(model, cfg)
    timings["generate"] = time.perf_counter() - t

    summary = {"eval": table, "examples": examples, "natural_prompts": prompts, "annealing": annealed, "seconds": timings}
    summary["goals"] = goals(table, prompts, annealed)
    (work / "demo.json").write_text(json.dumps(summary, indent=2, default=str))
    print("\n=== goals ===\n" + "\n".join(f"{'met    ' if g['met'] else 'NOT met'}  {g['goal']}: {g['value']}" for g in summary["goals"]))
    print(f"\ndemo done in {sum(timings.values()):.0f} s; results in {work}/ (eval.md, demo.json, checkpoint/)")
    return summary


def anneal_samples(model, cfg: DemoConfig) -> dict:
    """cfg.anneal_chains samples annealed together; prints the one with the lowest AR NLL and how many proposals were accepted."""
    x, traj = anneal(model, AnnealConfig(steps=cfg.anneal_steps, chains=cfg.anneal_chains, length=48, seed=cfg.seed))
    energy = torch.tensor(traj[-1]["energy"])
    best = int(energy.argmin())
    samples = [model.bb.ar_tokenizer.decode(row.tolist()) for row in x]
    accepted = sum(step["accepted"] for step in traj)
    print(
        f"[{cfg.anneal_steps} steps x {cfg.anneal_chains} chains, {accepted} of {cfg.anneal_steps * cfg.anneal_chains} proposals accepted; "
        f"mean AR NLL {sum(traj[0]['energy']) / len(energy):.2f} -> {energy.mean():.2f}] {samples[best]}"
    )
    return {
        "samples": samples,
        "best": best,
        "accepted": accepted,
        "proposals": cfg.anneal_steps * cfg.anneal_chains,
        "energy_start": traj[0]["energy"],
        "energy_end": traj[-1]["energy"],
    }


def goals(table: dict, prompts: dict, annealed: dict) -> list[dict]:
    """Issue 22's goals, checked on this run: the gain over the AR alone on the validation articles, the
    natural prompts, the prompts that need the right context, and annealing that accepts proposals."""
    models = table["models"]
    gain = models["ar_only"]["nll"] - models["trained"]["nll"]
    count = {k: {p: sum(r["ok"] for r in rows) for p, rows in v.items()} for k, v in prompts.items()}
    n_nat, n_right = len(NATURAL_PROMPTS), len(RIGHT_CONTEXT_PROMPTS)
    return [
        {"goal": "MARIA >= 0.1 nats per masked token below the AR alone (validation articles)", "value": round(gain, 4), "met": gain >= 0.1},
        {
            "goal": f"natural prompts: MARIA >= 14 of {n_nat}",
            "value": f"MARIA {count['natural']['maria']}, AR {count['natural']['ar_only']}",
            "met": count["natural"]["maria"] >= 14,
        },
        {
            "goal": f"right-context prompts: MARIA more than the AR alone (of {n_right})",
            "value": f"MARIA {count['right_context']['maria']}, AR {count['right_context']['ar_only']}",
            "met": count["right_context"]["maria"] > count["right_context"]["ar_only"],
        },
        {"goal": "annealing accepts proposals", "value": f"{annealed['accepted']} of {annealed['proposals']}", "met": annealed["accepted"] > 0},
    ]


def masked_span_text(ids: list[int], tok, g: torch.Generator, max_words: int = 5) -> str:
    """The sentence with one span of 1..max_words whole words written {{N}} (N tokens, its leading space included)."""
    starts = [i for i in range(4, len(ids) - 2) if tok.convert_ids_to_tokens(ids[i]).startswith("Ġ")]  # word starts
    if not starts:
        return tok.decode(ids[:-1]) + " {{1}}"
    k = int(torch.randint(len(starts), (1,), generator=g))
    words = int(torch.randint(1, max_words + 1, (1,), generator=g))
    end = starts[k + words] if k + words < len(starts) else len(ids)
    return f"{tok.decode(ids[: starts[k]])} {{{{{end - starts[k]}}}}}{tok.decode(ids[end:])}"


def infill_examples(model, val_corpus: Path, cfg: DemoConfig) -> tuple[list[dict], dict]:
    """Spans of 1-5 words in real validation sentences, and the two prompt sets: MARIA vs each expert alone (greedy).
    Returns (examples, {prompt set: {model: rows}})."""
    tok, experts = model.bb.ar_tokenizer, model.bb.expert_weights()
    others = {
        "ar_only": MariaModel.from_parts(model.bb, init_head("ar-only", experts)),
        "mlm_only": MariaModel.from_parts(model.bb, init_head("mix", experts, scales=(1.0, 0.0))),
    }
    texts = pq.read_table(val_corpus).column("text").to_pylist()
    g = torch.Generator().manual_seed(cfg.seed)
    masked = [masked_span_text(tok(t, add_special_tokens=False).input_ids[:48], tok, g) for t in texts[: cfg.examples]]
    answers = {"maria": model.infill_text(masked, temperature=0), **{k: m.infill_text(masked, temperature=0) for k, m in others.items()}}
    out = []
    for r, text in enumerate(masked):
        ex = {"masked": text, **{k: span_texts(v[r], tok) for k, v in answers.items()}}
        print(f"{text!r}\n" + "".join(f"    {k:>8}: {ex[k]}\n" for k in answers))
        out.append(ex)
    prompts = {}
    for name, prompt_set in (("natural", NATURAL_PROMPTS), ("right_context", RIGHT_CONTEXT_PROMPTS)):
        prompts[name] = {"maria": check_prompts(model, prompt_set), **{k: check_prompts(m, prompt_set) for k, m in others.items()}}
        for k, rows in prompts[name].items():
            print(
                f"{name.replace('_', '-')} prompts answered ({k}): {sum(r['ok'] for r in rows)}/{len(rows)}"
                + "".join(f"\n    {r['prompt']!r} -> {r['spans']}" for r in rows if not r["ok"])
            )
    return out, prompts
