"""`maria infill --jsonl`: batches group texts by masked count (the server's helper) yet the output
keeps the input order and equals each text decoded alone; an interrupted run continues when the
same command is re-run, without redoing or duplicating a line; a run with other settings is never
mixed in; a text without a {{N}} span is refused as the server refuses it."""

import json
from pathlib import Path

import pytest

from maria import MariaModel
from maria.decode import batches_by_masked_count
from maria_app.cli import main
from maria_app.commands import InfillConfig, partial_file

TEXTS = [
    "Paris is the {{2}} of France.",
    "A {{2}} sat on the {{}} by the door.",
    "It was {{8}}, and 3.14159 is pi!",
    "The quick brown {{3}} over the lazy dog.",
    "Numbers like {{1}} appear in text.",
    "Rome is in {{6}}.",
    "Masked language models read {{4}} sides; autoregressive models read only the {{2}}.",
    "{{5}} the capital of Germany.",
    "Infilling: fill in the {{2}} between a past and a future.",
    "A cat {{1}} on the mat.",
]


@pytest.fixture(scope="module")
def ckpt(pairs, tmp_path_factory):
    return str(MariaModel.from_backbones(*pairs["modernbert-olmo"]).save_pretrained(tmp_path_factory.mktemp("ckpt") / "m"))


@pytest.fixture(scope="module")
def alone(ckpt):
    model = MariaModel.from_pretrained(ckpt)
    return [model.infill_text([t])[0]["text"] for t in TEXTS]


@pytest.fixture
def inp(tmp_path) -> Path:
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" + ("\n" if i == 3 else "") for i, t in enumerate(TEXTS)))
    return path


def command(ckpt, inp, out, *more):
    return ["infill", "--model", ckpt, "--jsonl", str(inp), "--out", str(out), "--batch-size", "3", "--group-lines", "4", *more]


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_batches_group_windows_by_masked_count():
    assert batches_by_masked_count([5, 1, 3, 1, 5, 2], 2) == [[1, 3], [5, 2], [0, 4]]
    assert batches_by_masked_count([2, 2, 2], 2, lengths=[9, 3, 5]) == [[1, 2], [0]]


def test_grouped_batches_keep_input_order_and_equal_each_text_alone(ckpt, inp, alone, tmp_path, monkeypatch):
    seen = []
    real = MariaModel.infill_text
    monkeypatch.setattr(MariaModel, "infill_text", lambda self, texts, **kw: seen.append(list(texts)) or real(self, texts, **kw))
    assert main(command(ckpt, inp, tmp_path / "out.jsonl")) == 0
    got = records(tmp_path / "out.jsonl")
    assert [r["input"] for r in got] == TEXTS and [r["output"] for r in got] == alone
    assert got[1]["spans"] and len(got[1]["spans"]) == 2 and "".join(got[1]["spans"]) == "".join(got[1]["filled"])
    # the first group of 4 lines has masked counts 2, 3, 8, 3: in input order the 8 would share a batch
    # with the 2 (batches [0 1 2] [3]); grouped, the 2 and 3s go together and the 8 alone
    assert seen[1] == [TEXTS[2]] and sorted(seen[0]) == sorted([TEXTS[0], TEXTS[1], TEXTS[3]])
    assert not list(tmp_path.glob(".*.partial"))


def test_an_interrupted_run_resumes_without_redoing_or_duplicating(ckpt, inp, tmp_path, monkeypatch):
    assert main(command(ckpt, inp, tmp_path / "ref.jsonl")) == 0
    out, calls, real = tmp_path / "out.jsonl", [], MariaModel.infill_text

    def interrupted(self, texts, **kw):
        calls.append(list(texts))
        if len(calls) == 3:  # the first group (4 lines: 2 batches) is written, the second is cut short
            raise KeyboardInterrupt
        return real(self, texts, **kw)

    monkeypatch.setattr(MariaModel, "infill_text", interrupted)
    assert main(command(ckpt, inp, out)) == 130
    assert not out.exists()
    [partial] = tmp_path.glob(".out.jsonl.*.partial")
    assert [r["input"] for r in records(partial)] == TEXTS[:4]
    calls.clear()
    monkeypatch.setattr(MariaModel, "infill_text", lambda self, texts, **kw: calls.append(list(texts)) or real(self, texts, **kw))
    assert main(command(ckpt, inp, out)) == 0  # the same command again
    assert sorted(sum(calls, [])) == sorted(TEXTS[4:])  # nothing written is decoded again
    assert out.read_text() == (tmp_path / "ref.jsonl").read_text() and not partial.exists()


def test_a_cut_line_is_redone_and_other_runs_are_never_mixed_in(ckpt, inp, tmp_path, capsys):
    assert main(command(ckpt, inp, tmp_path / "ref.jsonl")) == 0
    ref = (tmp_path / "ref.jsonl").read_text()
    cfg = InfillConfig(model=ckpt, jsonl=str(inp), out=str(tmp_path / "out.jsonl"), batch_size=3, group_lines=4)
    partial = partial_file(cfg, TEXTS)
    lines = ref.splitlines(keepends=True)
    partial.write_text("".join(lines[:5]) + lines[5][:17])  # a crash cut line 6
    assert main(command(ckpt, inp, tmp_path / "out.jsonl")) == 0
    assert (tmp_path / "out.jsonl").read_text() == ref
    other = partial_file(InfillConfig(**{**cfg.__dict__, "out": str(tmp_path / "b.jsonl"), "temperature": 0.5}), TEXTS)
    other.write_text(lines[0])
    assert main(command(ckpt, inp, tmp_path / "b.jsonl")) == 2
    assert "interrupted `maria infill` with other input or settings" in capsys.readouterr().err
    assert main(command(ckpt, inp, tmp_path / "b.jsonl", "--overwrite")) == 0
    assert (tmp_path / "b.jsonl").read_text() == ref and not other.exists()
    partial_file(InfillConfig(**{**cfg.__dict__, "out": str(tmp_path / "c.jsonl")}), TEXTS).write_text(lines[1])  # not line 1's result
    assert main(command(ckpt, inp, tmp_path / "c.jsonl")) == 3
    assert "is not the result of input line 1" in capsys.readouterr().err


def test_stdout_gets_lines_in_input_order(ckpt, inp, alone, capsys):
    assert main(["infill", "--model", ckpt, "--jsonl", str(inp), "--batch-size", "4"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert [r["output"] for r in lines] == alone


def test_text_without_a_masked_span_is_refused_naming_the_line(ckpt, tmp_path, capsys):
    assert main(["infill", "--model", ckpt, "--text", "Paris is the capital of France."]) == 2
    assert "has no masked span; mark what to fill as {{N}}" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a {{2}} b"}\n\n{"text": "no span"}\n')
    assert main(["infill", "--model", ckpt, "--jsonl", str(bad), "--out", str(tmp_path / "o.jsonl")]) == 2
    assert f"{bad} line 3: text 'no span' has no masked span" in capsys.readouterr().err
    assert not list(tmp_path.glob("*o.jsonl*"))
