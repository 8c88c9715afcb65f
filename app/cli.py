"""`maria <verb>`: each verb maps to one plain function taking one dataclass config.

The parser is tyro: every config field becomes a typed flag (--window-length or --window_length),
its `# comment` in the dataclass is its help, and `--config FILE.yaml` supplies the same fields
(read as flags, so YAML values are typed like command-line ones; flags given after it win).
`--print-config` prints the resolved config as YAML and exits.

Exit codes (the one rule for every verb): 0 success; 2 bad usage or bad input (a one-line
message naming the input and the fix); 3 corrupt data (a damaged store block or checkpoint);
75 a transient failure of the infrastructure (a lost Ray node): re-running the same command resumes;
130 interrupted (Ctrl-C or SIGTERM). `--debug` (or MARIA_DEBUG=1) shows the traceback instead of the one line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import importlib
import io
import logging
import math
import os
import re
import signal
import sys
import threading
import typing
from importlib.metadata import PackageNotFoundError, version

import tyro
import yaml

from maria_app.supervise import EXIT_TRANSIENT, in_child, supervise

# verb: (module, config class, function, one-line description)
VERBS = {
    "extract": ("maria_extract.job", "ExtractConfig", "run_extract", "run both backbones over a masked corpus on Ray into a Zarr feature store"),
    "verify": ("maria_storage.verify_cli", "VerifyConfig", "run_verify", "check every block of a feature store; non-zero exit naming what is wrong"),
    "train": ("maria_train_head.train", "TrainConfig", "run_train", "fit the fusion head from a feature store (no backbone needed)"),
    "eval": ("maria_train_head.evaluate", "EvalConfig", "run_eval", "per-masked-token NLL/perplexity: trained head, PoE init, AR-only, MLM-only"),
    "export": ("maria_app.commands", "ExportConfig", "run_export", "write one combined checkpoint folder (backbones + head + vocabulary map)"),
    "infill": ("maria_app.commands", "InfillConfig", "run_infill", "fill {{N}} masked spans of a text (or a JSONL file) with a MARIA checkpoint"),
    "serve": (
        "maria_app.serve",
        "ServeConfig",
        "run_serve",
        "serve infilling over HTTP (POST /infill, GET /healthz) on Ray Serve, batching concurrent requests",
    ),
    "generate": ("maria_app.commands", "GenerateConfig", "run_generate", "unconditional generation by simulated annealing"),
    "pretrain-mlm": ("maria_defaults.pretrain_mlm", "PretrainMLMConfig", "pretrain_mlm", "train the small default MLM with the AR's tokenizer"),
    "demo": ("maria_app.demo", "DemoConfig", "run_demo", "the whole mission on one machine: defaults, extract, train, eval, export, infill, generate"),
    "bench": (
        "maria_bench.run",
        "BenchConfig",
        "run_bench",
        "benchmarks (decode | extract | train | anneal | quality | serve | fp8 | shapes) with JSON and PNG output",
    ),
}
EXIT_USAGE, EXIT_CORRUPT, EXIT_INTERRUPTED = 2, 3, 130
SUPERVISED = ("extract",)  # verbs whose Ray driver runs in a child process when run as a command (app/supervise.py)


class UsageError(ValueError):
    """Bad flags or YAML (exit code 2)."""


def package_version() -> str:
    try:
        return version("maria-infill")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _is_corrupt(e: BaseException) -> bool:
    """Damaged data (a store block, a store's metadata, a checkpoint file): every such error class of
    the project is named Corrupt*, whichever floor defines it (storage cannot import maria)."""
    return any(cls.__name__.startswith("Corrupt") for cls in type(e).__mro__)


def exit_code(e: BaseException) -> int:
    """Corrupt* classes: 3; Transient* classes (the infrastructure failed, a re-run resumes): 75; else 2."""
    if _is_corrupt(e):
        return EXIT_CORRUPT
    transient = isinstance(e, (ConnectionError, TimeoutError)) or any(cls.__name__.startswith("Transient") for cls in type(e).__mro__)
    return EXIT_TRANSIENT if transient else EXIT_USAGE


def rerun_hint(verb: str, argv: list[str]) -> str:
    """What to run after an interruption: a command that works as written."""
    if verb == "train" and "--resume" not in argv:
        return "re-run the same command with --resume to continue from its last checkpoint"
    if verb in ("train", "extract"):
        return "re-run the same command to continue where it stopped"
    return "re-run the same command"


def _terminated(signum, frame):
    """SIGTERM (a scheduler or `kill` stopping the job) is handled like Ctrl-C: cleanup runs, exit 130."""
    raise KeyboardInterrupt


def one_line(e: BaseException) -> str | None:
    """The user-facing line of a deliberate error (ours, a bad input, a full disk); None for a bug."""
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return f"no space left on device ({e.filename or 'output'}): free space or pick another --out, then re-run the same command (committed work is kept)"
    if isinstance(e, (ConnectionError, TimeoutError)):  # a network failure mid-run (the first contact names its URL)
        what = " ".join(str(e).split())[:200] or type(e).__name__
        return f"lost the connection to a server ({type(e).__name__}: {what}); re-run the same command to resume"
    ours = type(e).__module__.split(".")[0].startswith("maria")  # maria and the maria_* rooms
    if ours or isinstance(e, (ValueError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        text = " ".join(str(e).split()) if str(e) else type(e).__name__
        return text[:600]
    return None


def yaml_to_flags(path: str, config_cls) -> list[str]:
    """A YAML config becomes the flags it stands for, so tyro types its values exactly as on the
    command line (YAML 1.1 reads `1e-1` as a string; here it is the float 0.1)."""
    try:
        with open(path, encoding="utf-8") as f:
            loaded = yaml.safe_load(f)
    except OSError as e:
        raise UsageError(f"--config {path}: cannot read it ({e.strerror}); pass an existing YAML file") from None
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        raise UsageError(f"--config {path}: not valid YAML{f' (line {where.line + 1})' if where else ''}; fix the syntax") from None
    if loaded is None:
        return []
    if not isinstance(loaded, dict):
        raise UsageError(f"--config {path}: expected a mapping of field: value, got {type(loaded).__name__}")
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    hints = typing.get_type_hints(config_cls)
    flags = []
    for key, value in loaded.items():
        name = str(key).replace("-", "_")
        if name not in fields:
            raise UsageError(f"--config {path}: unknown field {key!r}; valid fields are {', '.join(sorted(fields))}")
        flag = "--" + name.replace("_", "-")
        if value is None and type(None) not in typing.get_args(hints[name]):
            raise UsageError(f"--config {path}: field {key!r} cannot be null; give it a value or leave it out")
        problem = yaml_type_problem(value, hints[name])
        if problem:
            raise UsageError(f"--config {path}: field {key!r} {problem}")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, list):
            flags += [flag] + [str(v) for v in value]
        elif isinstance(value, dict):
            raise UsageError(f"--config {path}: field {key!r} must be a single value or a list, not a mapping")
        else:
            flags += [flag, "None" if value is None else str(value)]
    return flags


def yaml_type_problem(value, hint) -> str | None:
    """What is wrong with a YAML value for a field of type `hint` (tyro's own error would name neither the file
    nor the field: a list for a number reads as "Unrecognized options: 2"), or None."""
    if value is None:
        return None
    if typing.get_origin(hint) is typing.Literal:  # a choice: say which are allowed
        choices = typing.get_args(hint)
        return None if value in choices else f"must be one of {', '.join(map(str, choices))}, not {value!r}"
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    base = args[0] if args and typing.get_origin(hint) is not list else hint
    if typing.get_origin(base) is list:
        items, base = (value if isinstance(value, list) else [value]), typing.get_args(base)[0]
    elif isinstance(value, list):
        return f"takes one value, not a list ({value!r}); write it as a single value"
    else:
        items = [value]
    for v in items:
        if base is bool and not isinstance(v, bool):
            return f"must be true or false, not {v!r}"
        if base in (int, float) and (isinstance(v, bool) or isinstance(v, (list, dict))):
            return f"must be a number, not {v!r}"
        if base is int and not isinstance(v, int):
            try:
                int(str(v))
            except ValueError:
                return f"must be a whole number, not {v!r}"
        if base is float and not isinstance(v, (int, float)):
            try:
                float(str(v))
            except ValueError:
                return f"must be a number, not {v!r}"
        if base is str and isinstance(v, (bool, list, dict)):
            return f"must be text, not {v!r}" + (" (quote it: 'true')" if isinstance(v, bool) else "")
    return None


BOX = "─━═-+|│┃╭╮╰╯┌┐└┘"  # tyro draws its report with rich: unicode boxes on a terminal, ASCII ones elsewhere


def _tyro_message(text: str) -> str:
    """tyro prints a boxed report (title, then sections split by rules); make it one line."""
    sides = "|│┃╭╮╰╯┌┐└┘+"  # a box's edges; a leading "-" may be a flag's, so it is only a rule when alone
    rows = [ln.strip().strip(sides).strip() for ln in text.splitlines()]
    raw = [ln.strip() for ln in text.splitlines() if ln.strip()]
    title = raw[0].strip(BOX + " ").strip() if raw else "bad arguments"
    sections, current = [], []
    for _line, row in zip(raw[1:], rows[1:]):
        if not row.strip(BOX + " "):  # a rule (or the box's bottom edge)
            sections.append(current)
            current = []
        else:
            current.append(row)
    first = next((sec for sec in sections + [current] if sec), [])  # without a terminal a rule follows the title
    if title == "Required options":
        flags = [ln.split()[0] for ln in first[1:] if ln.startswith("--")]
        return f"missing required option(s): {', '.join(flags)}"
    message = " ".join(first) or title
    message = re.sub(r"^Error parsing [A-Z]\w*Config: ", "", message)
    hint = next((sec[1].split()[0] for sec in sections if sec and sec[0].startswith("Perhaps you meant") and len(sec) > 1), None)
    return message + (f" (did you mean {hint}?)" if hint else "")


def parse(verb: str, argv: list[str]):
    """(config, print_config) from flags and YAML; UsageError with one line on anything wrong."""
    module_name, config_name, _, desc = VERBS[verb]
    config_cls = getattr(importlib.import_module(module_name), config_name)
    print_config = "--print-config" in argv or "--print_config" in argv
    argv = [a for a in argv if a not in ("--print-config", "--print_config")]
    expanded = []
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            expanded += yaml_to_flags(arg.split("=", 1)[1], config_cls)
        elif arg == "--config":
            if i + 1 >= len(argv):
                raise UsageError("--config needs a YAML file path")
            expanded += yaml_to_flags(argv[i + 1], config_cls)
        elif i and argv[i - 1] == "--config":
            continue
        else:
            expanded.append(arg)
    err, columns = io.StringIO(), os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "200"  # tyro wraps its error report at the terminal width: keep messages on one row
    try:
        with contextlib.redirect_stderr(err):
            config = tyro.cli(config_cls, args=expanded, prog=f"maria {verb}", description=desc + ". Also: --config FILE.yaml, --print-config, --debug.")
    except SystemExit as e:
        if e.code in (0, None):
            sys.stdout.write(err.getvalue())
            raise
        raise UsageError(_tyro_message(err.getvalue())) from None
    finally:
        os.environ.pop("COLUMNS") if columns is None else os.environ.update(COLUMNS=columns)
    for f in dataclasses.fields(config):  # nan/inf pass every `x > 0` check the configs make
        value = getattr(config, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise UsageError(f"--{f.name.replace('_', '-')} is {value}; pass a finite number")
    return config, print_config


def usage() -> str:
    lines = ["usage: maria <verb> [options]   (maria <verb> --help for its options; maria --version)", "", "verbs:"]
    lines += [f"  {verb:<13} {desc}" for verb, (*_, desc) in VERBS.items()]
    lines += ["", "exit codes: 0 ok, 2 bad usage or input, 3 corrupt data, 75 transient failure (re-run to resume), 130 interrupted; --debug shows tracebacks"]
    return "\n".join(lines)


class _StdoutHandler(logging.StreamHandler):
    """Writes the library's log lines to whatever sys.stdout is at the time (a test's capture included)."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, _):
        pass


def show_logs() -> None:
    """The stage functions log (a notebook chooses what to see); the CLI shows their INFO lines on stdout."""
    logger = logging.getLogger("maria")
    if not any(isinstance(h, _StdoutHandler) for h in logger.handlers):
        logger.addHandler(_StdoutHandler())
        logger.setLevel(logging.INFO)
        logger.propagate = False


def main(argv: list[str] | None = None, **stage_kwargs) -> int:
    """The `maria` command (argv None: the process's arguments); main([...]) from Python runs in-process.
    `stage_kwargs` go to the verb's function beside its config: what tests inject (extraction's fault
    hooks, training's stop_after), never a user flag."""
    command = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    show_logs()
    if argv[:1] in (["--version"], ["-V"]):
        print(f"maria {package_version()}")
        return 0
    if argv[:1] in (["-h"], ["--help"]):
        print(usage())
        return 0
    if not argv or argv[0] not in VERBS:
        print(usage(), file=sys.stderr)
        what = f"unknown verb {argv[0]!r}" if argv else "no verb given"
        print(f"maria: error: {what}; pick one of {', '.join(VERBS)}", file=sys.stderr)
        return EXIT_USAGE
    verb, argv = argv[0], argv[1:]
    if command and verb in SUPERVISED and not in_child():
        return supervise(verb, argv)
    debug = "--debug" in argv or os.environ.get("MARIA_DEBUG") not in (None, "", "0")
    argv = [a for a in argv if a != "--debug"]
    if verb == "bench" and argv and not argv[0].startswith("-"):
        argv = ["--what", argv[0]] + argv[1:]  # `maria bench decode ...`
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminated) if main_thread else None
    try:
        config, print_config = parse(verb, argv)
        if print_config:
            print(yaml.safe_dump(dataclasses.asdict(config), sort_keys=False), end="")
            return 0
        module_name, _, func_name, _ = VERBS[verb]
        getattr(importlib.import_module(module_name), func_name)(config, **stage_kwargs)
    except KeyboardInterrupt:
        print(f"maria {verb}: interrupted; {rerun_hint(verb, argv)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except SystemExit:
        raise
    except Exception as e:  # noqa: BLE001 -- deliberate errors become one line; bugs keep their traceback
        msg = one_line(e)
        if msg is None or debug:
            raise
        print(f"maria {verb}: error: {msg}", file=sys.stderr)
        return exit_code(e)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
