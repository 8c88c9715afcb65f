"""The demo's last stages on tiny backbones: the infilling examples and both prompt sets for MARIA and
each expert alone, annealed samples, and the goals it reports (the full `make demo` needs the
SmolLM2 AR and the Wikipedia sample: the lead runs it)."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from maria.modeling_maria import MariaModel
from maria_app.demo import NATURAL_PROMPTS, RIGHT_CONTEXT_PROMPTS, DemoConfig, anneal_samples, goals, infill_examples


@pytest.fixture(scope="module")
def model(pairs):
    return MariaModel.from_backbones(*pairs["bert-gpt2"], mlm_offset=-1)  # an MNTP MLM, as the demo's


def test_examples_prompts_annealing_and_goals(model, tmp_path):
    from tiny import CORPUS

    val = tmp_path / "val.parquet"
    pq.write_table(pa.table({"text": CORPUS[:3]}), val)
    cfg = DemoConfig(examples=2, anneal_steps=3, anneal_chains=2)
    examples, prompts = infill_examples(model, val, cfg)
    assert len(examples) == 2 and all({"masked", "maria", "ar_only", "mlm_only"} <= set(e) for e in examples)
    assert set(prompts) == {"natural", "right_context"}
    for name, n in (("natural", len(NATURAL_PROMPTS)), ("right_context", len(RIGHT_CONTEXT_PROMPTS))):
        assert set(prompts[name]) == {"maria", "ar_only", "mlm_only"} and all(len(rows) == n for rows in prompts[name].values())
    annealed = anneal_samples(model, cfg)
    assert len(annealed["samples"]) == 2 and annealed["proposals"] == 6 and 0 <= annealed["accepted"] <= 6
    assert min(annealed["energy_end"]) == annealed["energy_end"][annealed["best"]]
    table = {"models": {"trained": {"nll": 3.0}, "ar_only": {"nll": 3.15}}}
    got = goals(table, prompts, annealed)
    assert got[0]["met"] is True and got[0]["value"] == 0.15
    maria_right = sum(r["ok"] for r in prompts["right_context"]["maria"])
    ar_right = sum(r["ok"] for r in prompts["right_context"]["ar_only"])
    assert got[2]["value"] == f"MARIA {maria_right}, AR {ar_right}" and got[2]["met"] == (maria_right > ar_right)
    assert got[3]["met"] == (annealed["accepted"] > 0)
    assert goals({"models": {"trained": {"nll": 3.1}, "ar_only": {"nll": 3.15}}}, prompts, annealed)[0]["met"] is False


def test_demo_config_refuses_bad_values():
    with pytest.raises(ValueError, match="unknown --mlm-objective 'bert'"):
        DemoConfig(mlm_objective="bert")
    with pytest.raises(ValueError, match="--train-steps must be >= 1"):
        DemoConfig(train_steps=0)
