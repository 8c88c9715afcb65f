"""The whole mission in miniature: embedded Ray -> Zarr -> train -> eval -> export -> load -> infill -> generate."""
import json

import pytest
import torch

from maria_extract.job import run_extract
from extract_fixtures import config

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(400)]


def test_end_to_end(ray_local, pairs, corpus, tmp_path, capsys):
    from maria.anneal import AnnealConfig, anneal
    from maria_app.cli import main
    from maria.modeling_maria import MariaModel
    from maria_train_head.evaluate import EvalConfig, compare_inits_plot, run_eval
    from maria_train_head.train import TrainConfig, run_train

    run_extract(config(pairs, corpus, tmp_path / "train"))
    run_extract(config(pairs, corpus, tmp_path / "val", mask_rate=0.5, masks_per_window=1, seed=1))
    runs = {}
    for init in ("poe", "random"):
        runs[init] = run_train(TrainConfig(store=str(tmp_path / "train"), val_store=str(tmp_path / "val"), out=str(tmp_path / f"head-{init}"),
                                           init=init, max_steps=30, batch_size=128, lr=3e-3, eval_every=10, warmup_steps=3, device="cpu"))
    assert runs["poe"]["best_val_loss"] < runs["poe"]["init_val_loss"]  # training helped on held-out windows
    compare_inits_plot({k: str(tmp_path / f"head-{k}" / "metrics.jsonl") for k in runs}, str(tmp_path / "poe_vs_random.png"))
    assert (tmp_path / "poe_vs_random.png").stat().st_size > 0
    table = run_eval(EvalConfig(store=str(tmp_path / "val"), head=str(tmp_path / "head-poe"), json=str(tmp_path / "eval.json")))
    assert set(table["models"]) == {"trained", "poe_init", "ar_only", "mlm_only"}
    assert table["models"]["trained"]["nll"] < table["models"]["poe_init"]["nll"]

    mlm, ar = pairs["modernbert-olmo"]
    assert main(["export", "--mlm", mlm, "--ar", ar, "--head", str(tmp_path / "head-poe"), "--out", str(tmp_path / "ckpt")]) == 0
    loaded = MariaModel.from_pretrained(tmp_path / "ckpt")
    direct = MariaModel.from_backbones(mlm, ar, head_dir=str(tmp_path / "head-poe"))
    texts = ["Paris is the {{2}} of France. Berlin is the {{3}} of Germany.", "A cat sat on the {{2}}, and the dog {{}} by the door."]
    assert loaded.infill_text(texts) == direct.infill_text(texts)
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    assert main(["infill", "--model", str(tmp_path / "ckpt"), "--jsonl", str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "out.jsonl")]) == 0
    records = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["output"] for r in records] == [r["text"] for r in loaded.infill_text(texts)]
    x, traj = anneal(loaded, AnnealConfig(steps=3, length=12, chains=2, seed=0))
    assert x.shape == (2, 12) and len(traj) == 4
    assert torch.isfinite(torch.tensor(traj[-1]["energy"])).all()


def test_the_readmes_python_pipeline_runs_as_written(ray_local, pairs, corpus, tmp_path, monkeypatch):
    """The README's notebook block, executed as written: only its backbones, corpus and window change."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "run_extract(" in b)
    mlm, ar = pairs["modernbert-olmo"]
    line = next(x for x in block.splitlines() if x.startswith("MLM, AR, CORPUS, WINDOW = "))
    block = block.replace(line, f"MLM, AR, CORPUS, WINDOW = {mlm!r}, {ar!r}, {str(corpus)!r}, 24")
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(block, "README.md", "exec"), scope)
    assert scope["extracted"]["rows"] > 0 and scope["trained"]["best_val_loss"] <= scope["trained"]["init_val_loss"]
    assert set(scope["table"]["models"]) == {"trained", "poe_init", "ar_only", "mlm_only"}
    assert (tmp_path / "runs" / "maria" / "config.json").exists()
