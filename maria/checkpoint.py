"""The combined checkpoint's folder format (MariaConfig: maria/configuration_maria.py, MariaModel:
maria/modeling_maria.py).

    config.json            model_type "maria": sizes, start/mask ids, the MLM's offset, dtype, the two backbone references
    head.safetensors       the fusion head: proj.weight (V, d_mlm + d_ar), proj.bias (V,)  } maria/head.py's
    head.json              what training recorded (store, init, steps, validation loss)     } head format
    vocab_map.safetensors  mlm_to_ar (V_mlm,): the AR id of each MLM id, -1 where the AR lacks it
    tokenizer.json, tokenizer_config.json, ...  the AR's tokenizer (the target vocabulary)
    README.md              the model card (maria/card.py)
    checksums.json         the sha256 of every safetensors file (checked on load: a flipped byte is found)
    mlm/, ar/              each backbone as its own Hugging Face model folder (config, safetensors,
                           tokenizer); with --reference a hub backbone is only named (id + commit)
Every safetensors file carries {"format": "pt"}; its keys are MariaModel.state_dict() names (a
backbone folder's without its "mlm."/"ar." prefix, as a `subfolder` load expects).
References are portable: a copied backbone is named by its folder relative to the checkpoint and a
referenced hub backbone by id + commit. config.json (what loading reads) holds no path of the
exporting machine, so the folder can move; head.json and the card keep the training record as
provenance (e.g. the store's path as training saw it).
Loading reads safetensors only (never a pickle) and runs no remote code; every safetensors file is
checked first, so a truncated or garbled one is named in one line (CorruptCheckpointError).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from huggingface_hub import ModelCard, hf_hub_download, snapshot_download
from huggingface_hub.constants import is_offline_mode
from huggingface_hub.errors import EntryNotFoundError, HFValidationError
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from maria.backbones import BackboneError, Backbones, load_backbones
from maria.card import model_card
from maria.configuration_maria import FORMAT_VERSION, MariaConfig
from maria.device import resolve_device
from maria.head import FusionHead, HeadError, load_head, save_head
from maria.identity import IdentityMismatchError, check_same_backbones
from maria.io import CorruptDataError, atomic_dir, check_outside_inputs, file_sha256, guard_output, output_lock

CONFIG, HEAD, HEAD_META, VOCAB_MAP = "config.json", "head.safetensors", "head.json", "vocab_map.safetensors"
CHECKSUMS = "checksums.json"  # {"sha256": {relative path: digest}} of every safetensors file, checked on load
# what a hub snapshot may fetch: configs, safetensors, tokenizer files, the card. Never *.bin/*.pt (pickle)
SNAPSHOT_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken", "README.md"]
FIX = "re-run `maria export` to write the checkpoint again"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (wrong path, not a MARIA checkpoint); exit code 2."""


class CorruptCheckpointError(CheckpointError, CorruptDataError):
    """A checkpoint whose files are missing, truncated or garbled; exit code 3."""


def is_local(name: str | None) -> bool:
    return name is not None and Path(name).expanduser().exists()


def _commit(hub_id: str, revision: str | None) -> str | None:
    """The commit a hub id was loaded at (from the cache when offline), so a reference stays exact: the
    snapshot folder huggingface_hub resolves a revision to is named by its commit."""
    try:
        folder = snapshot_download(hub_id, revision=revision, local_files_only=is_offline_mode(), allow_patterns=["config.json"])
    except Exception:  # noqa: BLE001 -- best effort: keep what the user asked for
        return revision
    return Path(folder).name


def backbone_license(name: str | None) -> str | None:
    """The `license:` of a backbone's model card (its folder's README.md, or the hub card in the local cache)."""
    if not name:
        return None
    try:
        path = Path(name).expanduser() / "README.md" if is_local(name) else Path(hf_hub_download(name, "README.md", local_files_only=True))
        return ModelCard.load(path).data.to_dict().get("license")
    except Exception:  # noqa: BLE001 -- no card, or not cached: the card says the license was not recorded
        return None


def backbone_refs(bb: Backbones, reference: bool, dtype: torch.dtype) -> dict:
    """The config.json entries of both backbones; fingerprints of the weights as they are stored.
    With `reference`, a hub backbone is kept as id + commit; a local one is copied in all the same
    (an absolute path would break when the checkpoint moves to another machine)."""
    refs = {}
    for kind, model in (("mlm", bb.mlm), ("ar", bb.ar)):
        ident = bb.identity[kind]
        hub_id = None if ident.get("id") is None or is_local(ident["id"]) else ident["id"]
        ref = {
            "id": hub_id,
            "revision": _commit(hub_id, ident.get("revision")) if hub_id else None,
            "architecture": type(model).__name__,
            "fingerprint": bb.describe(dtype)[kind]["fingerprint"],
        }
        refs[kind] = ref if reference and hub_id else {"path": kind, **ref}
    return refs


def backbones_config(bb: Backbones, mlm_ref: dict, ar_ref: dict, architecture: str, **extra) -> MariaConfig:
    """The config.json of a model over these backbones, with the given backbone references."""
    return MariaConfig(
        d_mlm=bb.d_mlm,
        d_ar=bb.d_ar,
        vocab_size=bb.vocab_size,
        start_token_id=bb.start_id,
        mlm_mask_id=bb.mlm_mask_id,
        mlm_offset=bb.mlm_offset,
        mlm=mlm_ref,
        ar=ar_ref,
        tokenizer_fingerprint=bb.identity.get("tokenizer_fingerprint"),
        architectures=[architecture],
        **extra,
    )


def write_checkpoint(
    out: str | Path,
    bb: Backbones,
    head: FusionHead,
    head_meta: dict,
    dtype: torch.dtype,
    *,
    reference: bool = False,
    overwrite: bool = False,
    inputs: tuple = (),
    eval_results: dict | None = None,
    max_shard_size: int | str = "50GB",
    architecture: str = "MariaModel",
) -> Path:
    """Write the folder beside `out`, then swap it in. Refuses to replace anything that is not a
    MARIA checkpoint, or one of the command's inputs (maria/io.py guard_output), and writes while holding
    out's lock: two exports into one --out never share the folder they build."""
    check_outside_inputs(out, inputs, what="checkpoint folder")
    with output_lock(out, "checkpoint folder"):
        return _write_checkpoint(
            out,
            bb,
            head,
            head_meta,
            dtype,
            reference=reference,
            overwrite=overwrite,
            inputs=inputs,
            eval_results=eval_results,
            max_shard_size=max_shard_size,
            architecture=architecture,
        )


def _write_checkpoint(
    out,
    bb: Backbones,
    head: FusionHead,
    head_meta: dict,
    dtype: torch.dtype,
    *,
    reference: bool,
    overwrite: bool,
    inputs: tuple,
    eval_results: dict | None,
    max_shard_size,
    architecture: str,
) -> Path:
    out = guard_output(out, CONFIG, overwrite, inputs, what="checkpoint folder")
    if out.exists() and any(out.iterdir()):
        try:
            old_type = json.loads((out / CONFIG).read_text()).get("model_type")
        except (ValueError, AttributeError):
            old_type = None
        if old_type != "maria":
            raise CheckpointError(f"{out} holds a config.json that is not a MARIA checkpoint's; pick a new --out folder")
    refs = backbone_refs(bb, reference, dtype)
    config = backbones_config(bb, refs["mlm"], refs["ar"], architecture, dtype=dtype)
    with atomic_dir(out) as tmp:
        for kind, model, tok in (("mlm", bb.mlm, bb.mlm_tokenizer), ("ar", bb.ar, bb.ar_tokenizer)):
            if refs[kind].get("path"):
                model.save_pretrained(tmp / kind, max_shard_size=max_shard_size)
                tok.save_pretrained(tmp / kind)
        bb.ar_tokenizer.save_pretrained(tmp)  # at the root: AutoTokenizer.from_pretrained(checkpoint) works
        save_head(tmp, head, {**bb.describe(), **head_meta}, dtype=dtype)  # training's record of the identity wins
        save_file({"mlm_to_ar": bb.mlm_to_ar.contiguous()}, str(tmp / VOCAB_MAP), metadata={"format": "pt"})
        config.save_pretrained(tmp)
        (tmp / "README.md").write_text(
            model_card(
                out.name,
                config.to_dict(),
                json.loads((tmp / HEAD_META).read_text()),
                eval_results,
                {k: backbone_license(bb.identity[k].get("id")) for k in ("mlm", "ar")},
            )
        )
        write_checksums(tmp)
    return out


def write_checksums(d: Path) -> None:
    """A digest of every weights file: safetensors' header check finds truncation, this finds a flipped byte."""
    digests = {p.relative_to(d).as_posix(): file_sha256(p) for p in sorted(d.rglob("*.safetensors"))}
    (d / CHECKSUMS).write_text(json.dumps({"sha256": digests}, indent=1))


def check_checksums(d: Path) -> None:
    """Every weights file matches the digest export wrote (a checkpoint written before digests has none to check)."""
    if not (d / CHECKSUMS).is_file():
        return
    try:
        digests = json.loads((d / CHECKSUMS).read_text())["sha256"]
        items = sorted(digests.items())
    except (ValueError, KeyError, TypeError, AttributeError):
        raise CorruptCheckpointError(f"checkpoint file {CHECKSUMS} in {d} is damaged; {FIX}") from None
    for name, want in items:
        path = d / name
        if ".." in Path(name).parts or Path(name).is_absolute() or not path.is_file():
            raise CorruptCheckpointError(f"checkpoint {d} is missing {name} (listed in {CHECKSUMS}); {FIX}")
        if file_sha256(path) != want:
            raise CorruptCheckpointError(f"checkpoint file {name} in {d} is damaged (its sha256 does not match {CHECKSUMS}); {FIX}")


# ---- reading ---------------------------------------------------------------------------------
def locate(
    name_or_path: str | Path, revision: str | None = None, cache_dir: str | None = None, local_files_only: bool = False, token: str | bool | None = None
) -> Path:
    """A checkpoint folder, or the local snapshot of a hub id (downloaded unless offline)."""
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise CheckpointError(f"{p} is a file, not a MARIA checkpoint folder; pass the --out folder of `maria export`")
    name = str(name_or_path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name:
        raise CheckpointError(f"checkpoint folder {name} does not exist; pass the --out folder of `maria export` or a hub id")
    offline = local_files_only or is_offline_mode()
    try:
        return Path(snapshot_download(name, revision=revision, cache_dir=cache_dir, local_files_only=offline, token=token, allow_patterns=SNAPSHOT_PATTERNS))
    except (EntryNotFoundError, HFValidationError, OSError, ValueError) as e:  # hub errors are OSErrors
        hint = "it is not in the local Hugging Face cache and offline mode is on; download it first" if offline else "check the hub id, or pass a local folder"
        raise CheckpointError(f"no checkpoint folder or hub model {name!r}: {hint} ({type(e).__name__})") from None


def read_config(d: Path) -> MariaConfig:
    if not (d / CONFIG).is_file():
        raise CheckpointError(f"{d} is not a MARIA checkpoint (no config.json); pass the --out folder of `maria export`")
    try:
        raw = json.loads((d / CONFIG).read_text())
    except (ValueError, UnicodeDecodeError):
        raise CorruptCheckpointError(f"{d}/config.json is not valid JSON; {FIX}") from None
    if not isinstance(raw, dict) or raw.get("model_type") != "maria":
        found = raw.get("model_type") if isinstance(raw, dict) else None
        raise CheckpointError(f"{d} is not a MARIA checkpoint (config.json has model_type {found!r}); pass the --out folder of `maria export`")
    try:
        return check_config(MariaConfig.from_dict(raw), d)
    except (TypeError, ValueError, AttributeError) as e:
        raise CorruptCheckpointError(f"{d}/config.json is damaged ({str(e).splitlines()[0][:120]}); {FIX}") from None


def stored_dtype(d: Path) -> torch.dtype:
    """The dtype the weights were written in, as config.json on disk says. Not `config.dtype`: a caller's
    `from_pretrained(..., dtype=torch.bfloat16)` sets that on the config object before we see it, and the
    backbones' fingerprints are those of the stored weights."""
    try:
        raw = json.loads((d / CONFIG).read_text())
    except (OSError, ValueError):
        raise CorruptCheckpointError(f"{d}/config.json is not valid JSON; {FIX}") from None
    name = str(raw.get("dtype") or raw.get("torch_dtype") or "float32").replace("torch.", "")  # format 1 had none: float32
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise CorruptCheckpointError(f"{d}/config.json names an unknown dtype {name!r}; {FIX}")
    return dtype


def check_config(config: MariaConfig, d: Path) -> MariaConfig:
    if int(config.format_version or 1) > FORMAT_VERSION:
        raise CheckpointError(f"{d} was written by a newer maria (checkpoint format {config.format_version}); upgrade maria")
    for kind in ("mlm", "ar"):
        ref = getattr(config, kind)
        if not isinstance(ref, dict) or not (ref.get("path") or ref.get("id")):
            raise CorruptCheckpointError(f"{d}/config.json has no usable {kind!r} backbone reference; {FIX}")
        if ref.get("path"):  # a folder inside the checkpoint, never elsewhere: a config cannot point at /etc
            if Path(ref["path"]).is_absolute() or ".." in Path(ref["path"]).parts:
                raise CorruptCheckpointError(f"{d}/config.json points the {kind} backbone outside the checkpoint ({ref['path']!r}); {FIX}")
    return config


def check_file(path: Path, d: Path) -> None:
    """A safetensors file whose header and size agree (safe_open checks both), else one line naming it."""
    try:
        with safe_open(str(path), framework="pt"):
            pass
    except (SafetensorError, OSError) as e:
        reason = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise CorruptCheckpointError(f"checkpoint file {path.relative_to(d)} in {d} is damaged ({reason}); {FIX}") from None


def check_files(d: Path, config: MariaConfig) -> None:
    """Every file a load will read is there and every safetensors file is whole, before minutes of loading."""
    needed = [HEAD, HEAD_META, VOCAB_MAP]
    for kind in ("mlm", "ar"):
        folder = getattr(config, kind).get("path")
        if folder:
            needed.append(f"{folder}/config.json")
            if not (d / folder / "model.safetensors.index.json").is_file():
                needed.append(f"{folder}/model.safetensors")
    for name in needed:
        if not (d / name).is_file():
            raise CorruptCheckpointError(f"checkpoint {d} is missing {name}; {FIX}")
    for path in sorted(d.rglob("*.safetensors")):
        check_file(path, d)
    check_checksums(d)
    for path in sorted(d.rglob("*.json")):  # configs, tokenizers, shard indexes: else a parser's traceback later
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, OSError) as e:
            raise CorruptCheckpointError(f"checkpoint file {path.relative_to(d)} in {d} is damaged ({type(e).__name__}); {FIX}") from None


def load_checkpoint(
    d: Path, config: MariaConfig, dtype: str | torch.dtype | None = "auto", device: str = "cpu", trust_remote_code: bool = False
) -> tuple[Backbones, FusionHead, dict]:
    """(backbones, head, head metadata) of a checked folder. The backbones are loaded in the dtype they
    are stored in, their fingerprints checked against config.json, then everything is cast to `dtype`
    ("auto" = as stored) and moved to `device`."""
    device = resolve_device(str(device))
    stored = stored_dtype(d)
    want = stored if dtype in (None, "auto") else dtype if isinstance(dtype, torch.dtype) else getattr(torch, str(dtype).replace("torch.", ""), None)
    if not isinstance(want, torch.dtype) or not want.is_floating_point:
        raise CheckpointError(f"unknown dtype {dtype!r}; pass auto (as stored), float32, bfloat16 or float16")
    check_files(d, config)
    try:
        head, meta = load_head(d)
        stored_map = load_file(str(d / VOCAB_MAP))["mlm_to_ar"]
    except HeadError as e:  # its files parsed (checked above), so head.json or the shapes are wrong
        raise CorruptCheckpointError(f"checkpoint {d}: {str(e).rsplit(';', 1)[0]}; {FIX}") from None
    except KeyError:
        raise CorruptCheckpointError(f"checkpoint {d}: {VOCAB_MAP} holds no mlm_to_ar; {FIX}") from None
    refs = {k: getattr(config, k) for k in ("mlm", "ar")}
    src = {k: str(d / r["path"]) if r.get("path") else r["id"] for k, r in refs.items()}
    try:
        bb = load_backbones(
            src["mlm"],
            src["ar"],
            dtype=stored,
            check_parity=False,
            safetensors_only=True,
            trust_remote_code=trust_remote_code,
            mlm_offset=int(config.mlm_offset or 0),
            mlm_revision=None if refs["mlm"].get("path") else refs["mlm"].get("revision"),
            ar_revision=None if refs["ar"].get("path") else refs["ar"].get("revision"),
        )
    except BackboneError as e:  # e.g. a referenced hub backbone missing from the cache while offline
        raise CheckpointError(f"checkpoint {d}: {e}") from None
    except Exception as e:  # noqa: BLE001 -- its files were checked above: what is left is damage they do not show
        where = "a backbone folder" if any(r.get("path") for r in refs.values()) else "a backbone in the Hugging Face cache"
        raise CorruptCheckpointError(
            f"checkpoint {d}: {where} could not be read ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}); {FIX} (--debug shows the cause)"
        ) from e
    if not torch.equal(stored_map, bb.mlm_to_ar):
        raise CorruptCheckpointError(f"checkpoint {d}: vocab_map.safetensors does not match its backbones' tokenizers; {FIX}")
    try:
        check_same_backbones(config.to_dict(), bb.describe(stored), f"checkpoint {d}/config.json", "its backbones", FIX)
    except IdentityMismatchError as e:
        copied = all(r.get("path") for r in refs.values())
        raise (CorruptCheckpointError if copied else CheckpointError)(str(e)) from None
    for model in (bb.mlm, bb.ar, head):
        model.to(device=device, dtype=want)
    for k, r in refs.items():  # who they are (a hub id, or None for a local source), not where this copy sits
        hub_id = r.get("id") or r.get("source")  # format 1 named a copied backbone's origin "source"
        bb.identity[k].update({"id": None if hub_id is None or is_local(hub_id) else hub_id, "revision": r.get("revision")})
    return bb, head, meta


def read_eval(path: str | Path) -> dict:
    """A `maria eval --json` result, for the model card's evaluation table."""
    try:
        result = json.loads(Path(path).read_text())
        rows = {k: (str(v["label"]), float(v["nll"]), float(v["ppl"])) for k, v in result["models"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise ValueError(f"--eval {path}: not the JSON written by `maria eval --json`; pass that file") from None
    return {"store": result.get("store"), "rows": result.get("rows"), "models": {k: dict(zip(("label", "nll", "ppl"), v)) for k, v in rows.items()}}
