"""`maria <verb>`: each verb maps to one plain function taking one dataclass config.

Modules are imported only for the verb being run, so `maria verify` does not import torch.
Every error MARIA raises on purpose is a ValueError (or OSError from the disk) with a message
naming the fix; the CLI prints it on one line and exits non-zero.
"""
from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys

# verb: (module, config class, function, one-line description)
VERBS = {
    "extract": ("extract.job", "ExtractConfig", "run_extract", "run both backbones over a masked corpus on Ray into a Zarr feature store"),
    "verify": ("storage.verify_cli", "VerifyConfig", "run_verify", "check every block of a feature store; non-zero exit naming what is wrong"),
    "train": ("train_head.train", "TrainConfig", "run_train", "fit the fusion head from a feature store (no backbone needed)"),
    "eval": ("train_head.evaluate", "EvalConfig", "run_eval", "per-masked-token NLL/perplexity: trained head, PoE init, AR-only, MLM-only"),
    "export": ("maria.commands", "ExportConfig", "run_export", "write one combined checkpoint folder (backbones + head + vocabulary map)"),
    "infill": ("maria.commands", "InfillConfig", "run_infill", "fill {{N}} masked spans of a text (or a JSONL file) with a MARIA checkpoint"),
    "generate": ("maria.anneal", "GenerateConfig", "run_generate", "unconditional generation by simulated annealing"),
    "pretrain-mlm": ("maria.pretrain_mlm", "PretrainMLMConfig", "pretrain_mlm", "train the small default MLM with the AR's tokenizer"),
    "demo": ("maria.demo", "DemoConfig", "run_demo", "the whole mission on one machine: defaults, extract, train, eval, export, infill, generate"),
    "bench": ("maria.bench", "BenchConfig", "run_bench", "benchmarks (decode | extract | train | anneal) with JSON and PNG output"),
}


def _friendly(e: BaseException) -> str | None:
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return f"no space left on device ({e.filename or 'output'}): free space or pick another --out, then re-run the same command (committed work is kept)"
    ours = type(e).__module__.split(".")[0] in ("maria", "extract", "storage", "train_head")
    if ours or isinstance(e, (ValueError, FileNotFoundError, PermissionError)):
        return str(e).splitlines()[0] if str(e) else type(e).__name__
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in VERBS:
        print("usage: maria <verb> [options]   (maria <verb> --help for its options)\n\nverbs:")
        for verb, (*_, desc) in VERBS.items():
            print(f"  {verb:<13} {desc}")
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    verb = argv.pop(0)
    if verb == "bench" and argv and not argv[0].startswith("-"):
        argv = ["--what", argv[0]] + argv[1:]  # `maria bench decode ...`
    module_name, config_name, func_name, desc = VERBS[verb]
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from maria.config import add_dataclass_args, build_config, cpu_threads

    if os.environ.get("MARIA_TORCH_THREADS"):
        import torch

        torch.set_num_threads(cpu_threads())

    module = importlib.import_module(module_name)
    config_cls = getattr(module, config_name)
    parser = argparse.ArgumentParser(prog=f"maria {verb}", description=desc)
    add_dataclass_args(parser, config_cls)
    args = parser.parse_args(argv)
    try:
        config = build_config(config_cls, args)
        getattr(module, func_name)(config)
    except KeyboardInterrupt:
        print(f"maria {verb}: interrupted; re-run the same command to continue", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 -- turn deliberate errors into one line, re-raise bugs
        msg = _friendly(e)
        if msg is None or os.environ.get("MARIA_DEBUG"):
            raise
        print(f"maria {verb}: error: {msg}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
