"""The model card (README.md) of a checkpoint: what it is, how to load it, its backbones with their
revisions, how the head was trained, and its evaluation. Built only from what the checkpoint
records (config.json, head.json) and, if given, a `maria eval --json` result."""

from __future__ import annotations

import math

from huggingface_hub import EvalResult, ModelCardData

INSTALL = "pip install maria-infill"  # the distribution; its import name is `maria`

ROLES = {"mlm": "masked LM", "ar": "causal LM"}


def _code(value) -> str:
    if isinstance(value, dict):
        value = ", ".join(f"{k}={v}" for k, v in value.items())
    return "-" if value in (None, "") else f"`{value}`"


def _num(x, fmt: str = ".4f") -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, fmt)


def backbone_rows(config: dict) -> list[str]:
    rows = ["| role | model | revision | in this checkpoint | fingerprint |", "|---|---|---|---|---|"]
    for kind in ("mlm", "ar"):
        ref = config.get(kind) or {}
        model = _code(ref.get("id")) if ref.get("id") else f"a local folder ({ref.get('architecture') or 'unknown class'})"
        where = f"copied into `{ref['path']}/`" if ref.get("path") else "referenced: loaded from the hub at this revision"
        rows.append(f"| {ROLES[kind]} | {model} | {_code(ref.get('revision'))} | {where} | {_code(ref.get('fingerprint'))} |")
    offset = config.get("mlm_offset") or 0
    rows += [
        "",
        "The masked LM predicts token i at position i - 1 (masked next-token prediction, `mlm_offset` -1)."
        if offset
        else "The masked LM predicts token i at position i (a classic masked LM, `mlm_offset` 0).",
    ]
    return rows


def training_rows(meta: dict) -> list[str]:
    """What `maria train` recorded in head.json; a head made by an init alone says so."""
    if "best_step" not in meta:
        return [f"This head was not trained: it is the `{meta.get('init', 'poe')}` initialisation (no training store)."]
    done = "finished" if meta.get("complete") else "did not finish"
    steps = f"{meta.get('steps')} of {meta.get('total_steps')} ({done}{', stopped early' if meta.get('stopped_early') else ''})"
    val = _code(meta.get("val_store")) if meta.get("val_store") else f"{len(meta.get('val_blocks') or [])} held-out blocks of the training store"
    rows = [
        "| | |",
        "|---|---|",
        f"| training store | {_code(meta.get('store'))} |",
        f"| validation | {val} |",
        f"| head init | {_code(meta.get('init'))} |",
        f"| steps | {steps} |",
        f"| best step (kept) | {meta.get('best_step')} |",
        f"| window length | {meta.get('window_length', '-')} |",
        f"| masking | {_code(meta.get('masking'))} |",
    ]
    return rows


def eval_rows(meta: dict, eval_results: dict | None) -> list[str]:
    rows = []
    if eval_results:
        rows += [
            f"`maria eval` on {_code(eval_results.get('store'))} ({eval_results.get('rows')} masked tokens):",
            "",
            "| model | NLL | perplexity |",
            "|---|---|---|",
        ]
        rows += [f"| {m['label']} | {_num(m['nll'])} | {_num(m['ppl'], '.2f')} |" for m in eval_results["models"].values()]
        rows.append("")
    if meta.get("best_val_loss") is not None:
        rows += ["Validation recorded by training (per masked token):", "", "| head | NLL | perplexity |", "|---|---|---|"]
        for label, loss in ((f"at init ({meta.get('init')})", meta.get("init_val_loss")), (f"trained (step {meta.get('best_step')})", meta["best_val_loss"])):
            rows.append(f"| {label} | {_num(loss)} | {_num(math.exp(loss) if loss is not None else None, '.2f')} |")
    return rows or ["No evaluation was recorded: run `maria eval` and export with `--eval RESULT.json` to include it."]


def card_license(licenses: dict) -> tuple[str, str]:
    """(the card's license field, a line saying where it comes from). A MARIA checkpoint carries both
    backbones' weights, so it is under both licenses: one when they agree, "other" (naming them) when not."""
    known = {k: v for k, v in licenses.items() if v}
    if known and len(set(known.values())) == 1 and len(known) == len(licenses):
        value = next(iter(known.values()))
        return value, f"License: `{value}`, the license of both backbones."
    named = ", ".join(f"{ROLES[k]}: `{v or 'not recorded'}`" for k, v in licenses.items())
    return "other", f"License: the backbones' own terms apply to their weights ({named}); check both before use."


def model_index(name: str, eval_results: dict | None) -> list[EvalResult] | None:
    """The `maria eval` table as model-index results: NLL and perplexity per masked token for each model."""
    if not eval_results:
        return None
    out = []
    for _key, m in eval_results["models"].items():
        for metric, value in (("perplexity", m["ppl"]), ("nll", m["nll"])):
            if value is not None and math.isfinite(value):
                out.append(
                    EvalResult(
                        task_type="fill-mask",
                        task_name="masked infilling",
                        dataset_type="maria-feature-store",
                        dataset_name=str(eval_results.get("store")),
                        metric_type=metric,
                        metric_value=round(float(value), 4),
                        metric_name=f"{m['label']} {metric} per masked token",
                    )
                )
    return out or None


def model_card(name: str, config: dict, head_meta: dict, eval_results: dict | None = None, licenses: dict | None = None) -> str:
    hub_ids = [config[k]["id"] for k in ("mlm", "ar") if (config.get(k) or {}).get("id")]
    license_value, license_line = card_license(licenses or {"mlm": None, "ar": None})
    data = ModelCardData(
        library_name="maria-infill",
        license=license_value,
        pipeline_tag="fill-mask",
        base_model=hub_ids or None,
        tags=["maria", "text-infilling", "fill-in-the-middle"],
        model_name=name,
        eval_results=model_index(name, eval_results),
    )
    params = config["vocab_size"] * (config["d_mlm"] + config["d_ar"] + 1)
    lines = [
        "---",
        data.to_yaml(),
        "---",
        "",
        f"# {name}: a MARIA infilling model",
        "",
        "MARIA fills masked spans of a text from both sides: a frozen masked LM and a frozen causal LM, fused by one "
        "trained linear head over their concatenated states (`logits = W [h_mlm ; h_ar] + b`, over the causal LM's "
        f"vocabulary). Head: {config['vocab_size']} x ({config['d_mlm']} + {config['d_ar']}) + bias = {params:,} parameters; "
        f"weights stored in {str(config.get('dtype') or 'float32').replace('torch.', '')}.",
        "",
        license_line,
        "",
        "## Use",
        "",
        f"Install the library that defines the model type: `{INSTALL}` (import name `maria`).",
        "",
        "```python",
        'import maria  # makes the "maria" model type known to transformers (no remote code)',
        "from transformers import AutoModel, AutoTokenizer",
        "",
        f'model = AutoModel.from_pretrained("{name}")  # this folder, or its hub id',
        'print(model.infill_text(["Paris is the {{2}} of France."])[0]["text"])  # {{N}}: N masked tokens',
        "```",
        "",
        f'or `maria infill --model {name} --text "Paris is the {{{{2}}}} of France."`',
        "",
        "## Backbones",
        "",
        *backbone_rows(config),
        "",
        "## Training",
        "",
        *training_rows(head_meta),
        "",
        "## Evaluation",
        "",
        *eval_rows(head_meta, eval_results),
        "",
    ]
    return "\n".join(lines)
