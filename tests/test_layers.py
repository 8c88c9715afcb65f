"""The house has floors: the model core (maria/), the stages (storage/, extract/, train_head/), the
demo's defaults (defaults/), benchmarks (bench/) and the CLI (app/), each installed under a maria_* name.
Imports only go down; storage needs no torch/transformers/ray; train_head no ray; and the CLI maps
each verb to one function with typed, documented flags."""

import ast
import dataclasses
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from maria_app.cli import VERBS, main

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {
    "maria": "maria",
    "maria_storage": "storage",
    "maria_extract": "extract",
    "maria_train_head": "train_head",
    "maria_defaults": "defaults",
    "maria_bench": "bench",
    "maria_app": "app",
}  # import name -> room
PACKAGES = tuple(FOLDERS)
STAGES = {"maria", "maria_storage", "maria_extract", "maria_train_head"}
ALLOWED = {  # what each package may import from this project (itself aside)
    "maria": set(),
    "maria_storage": set(),
    "maria_train_head": {"maria", "maria_storage"},
    "maria_extract": {"maria", "maria_storage"},
    "maria_defaults": STAGES,
    "maria_bench": STAGES | {"maria_defaults"},
    "maria_app": STAGES | {"maria_defaults", "maria_bench"},
}


def project_imports(path: Path):
    """(module imported, line, at module top level?) for every import of a project package."""
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
        for name in names:
            if name.split(".")[0] in PACKAGES:
                yield name.split(".")[0], node.lineno, id(node) in top


@pytest.mark.parametrize("package", PACKAGES)
def test_imports_only_go_down_and_none_is_deferred(package):
    for path in sorted((ROOT / FOLDERS[package]).glob("*.py")):
        for target, line, at_top in project_imports(path):
            where = f"{path.relative_to(ROOT)}:{line}"
            assert target == package or target in ALLOWED[package], f"{where} imports {target}: up or sideways a floor"
            assert at_top, f"{where} imports {target} inside a function (a deferred import hides a cycle)"


# `import maria` imports transformers (it registers the model type, as HF-integrated libraries do); the
# trainer still loads no backbone weights and no Ray, and the store needs neither torch nor maria.
@pytest.mark.parametrize(
    "module,banned",
    [
        ("maria_storage", ("torch", "transformers", "ray", "maria")),
        ("maria_train_head.train", ("ray",)),
        ("maria_train_head.evaluate", ("ray",)),
        ("maria", ("ray",)),
    ],
)
def test_lower_floors_do_not_load_heavy_libraries(module, banned):
    code = f"import {module}, sys; print(','.join(m for m in {banned!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "", f"importing {module} loaded {out.stdout.strip()}"


@pytest.mark.parametrize("verb", VERBS)
def test_every_flag_has_help_and_no_test_hook_shows(verb, capsys):
    module, config_name, func, _ = VERBS[verb]
    config_cls = getattr(importlib.import_module(module), config_name)
    assert callable(getattr(importlib.import_module(module), func))
    with pytest.raises(SystemExit) as done:
        main([verb, "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    for f in dataclasses.fields(config_cls):
        flag = "--" + f.name.replace("_", "-")
        assert flag in text, f"{flag} missing from maria {verb} --help"
        after = text.split(flag, 1)[1].split("\n--", 1)[0]
        assert len(after.split()) > 2, f"{flag} of maria {verb} has no help text"
    assert "--fault" not in text and "test only" not in text.lower()


def test_version_print_config_yaml_types_and_both_spellings(tmp_path, capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("maria ")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("store: s\nout: o\nlr: 1e-1\nmax-steps: 7\nresume: true\n")
    assert main(["train", "--config", str(cfg), "--print-config", "--warmup_steps", "3"]) == 0
    printed = capsys.readouterr().out
    assert "lr: 0.1\n" in printed and "max_steps: 7\n" in printed and "warmup_steps: 3\n" in printed and "resume: true\n" in printed
    cfg.write_text("store: s\nout: null\n")
    assert main(["train", "--config", str(cfg)]) == 2
    assert "cannot be null" in capsys.readouterr().err
    cfg.write_text("store: [unclosed\n")
    assert main(["train", "--config", str(cfg)]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    assert main(["train", "--store", "s", "--out", "o", "--lr", "fast"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--lr" in err
