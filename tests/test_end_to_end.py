"""The whole mission in miniature, as the README's notebook block writes it (executed as written, only
its backbones, corpus and window swapped for the tiny ones): embedded Ray -> Zarr -> train -> eval ->
export -> load -> infill; then the CLI's export and JSONL infill, a random-init head, and generation."""

import json
import re
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(400)]
README = Path(__file__).resolve().parents[1] / "README.md"


def readme_pipeline() -> str:
    return next(b for b in re.findall(r"```python\n(.*?)```", README.read_text(), re.S) if "run_extract(" in b)


def test_end_to_end(ray_local, pairs, corpus, tmp_path, monkeypatch):
    from maria.anneal import AnnealConfig, anneal
    from maria.modeling_maria import MariaModel
    from maria_app.cli import main
    from maria_train_head.evaluate import compare_inits_plot
    from maria_train_head.train import TrainConfig, run_train

    mlm, ar = pairs["modernbert-olmo"]
    block = readme_pipeline()
    line = next(x for x in block.splitlines() if x.startswith("MLM, AR, CORPUS, WINDOW = "))
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(block.replace(line, f"MLM, AR, CORPUS, WINDOW = {mlm!r}, {ar!r}, {str(corpus)!r}, 24"), "README.md", "exec"), scope)
    trained, table = scope["trained"], scope["table"]
    assert scope["extracted"]["rows"] > 0 and trained["best_val_loss"] < trained["init_val_loss"]  # training helped on held-out windows
    assert set(table["models"]) == {"trained", "poe_init", "ar_only", "mlm_only"}
    assert table["models"]["trained"]["nll"] < table["models"]["poe_init"]["nll"]

    random = run_train(TrainConfig(store="stores/train", val_store="stores/val", out="runs/head-random", init="random", max_steps=50))
    assert random["best_val_loss"] > trained["best_val_loss"]  # the paper's Figure 2, in miniature (same settings, other init)
    compare_inits_plot({"poe": "runs/head/metrics.jsonl", "random": "runs/head-random/metrics.jsonl"}, "poe_vs_random.png")
    assert (tmp_path / "poe_vs_random.png").stat().st_size > 0

    assert main(["export", "--mlm", mlm, "--ar", ar, "--head", "runs/head", "--out", "runs/ckpt"]) == 0
    loaded, notebook = MariaModel.from_pretrained(tmp_path / "runs" / "ckpt"), scope["model"]
    direct = MariaModel.from_backbones(mlm, ar, head_dir="runs/head")
    texts = ["Paris is the {{2}} of France. Berlin is the {{3}} of Germany.", "A cat sat on the {{2}}, and the dog {{}} by the door."]
    assert loaded.infill_text(texts) == direct.infill_text(texts) == notebook.infill_text(texts)
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    assert main(["infill", "--model", "runs/ckpt", "--jsonl", "in.jsonl", "--out", "out.jsonl"]) == 0
    records = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["output"] for r in records] == [r["text"] for r in loaded.infill_text(texts)]
    x, traj = anneal(loaded, AnnealConfig(steps=3, length=12, chains=2, seed=0))
    assert x.shape == (2, 12) and len(traj) == 4
    assert torch.isfinite(torch.tensor(traj[-1]["energy"])).all()
