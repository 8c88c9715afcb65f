"""The full MARIA model (MLM + AR + fusion head) and its combined checkpoint folder.

A checkpoint folder, like a Hugging Face one:
    config.json          model_type "maria", sizes, start/mask ids, backbone references and fingerprints
    head.safetensors     the fusion head (maria/head.py's format), head.json beside it
    vocab_map.safetensors mlm_to_ar (V_mlm,)
    tokenizer/           the AR's tokenizer (the target vocabulary)
    mlm/, ar/            both backbones (unless exported with --reference: then id + revision)
Only safetensors are ever loaded (use_safetensors=True for the backbones too): no pickle.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from maria.backbones import Backbones, BackboneError, load_backbones
from maria.decode import Sampling, infill
from maria.head import FusionHead, HeadError, init_head, load_head, save_head
from maria.identity import check_same_backbones
from maria.io import atomic_dir, guard_output
from maria.text import parse_masked_text

FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A head or checkpoint folder that cannot be used; the message names the fix."""


def max_window(bb: Backbones) -> int | None:
    """Longest window both backbones can read (the MLM also reads its special tokens)."""
    limits = []
    for model, extra in ((bb.mlm, len(bb.mlm_prefix) + len(bb.mlm_suffix)), (bb.ar, 1)):
        limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
        if limit is not None:
            limits.append(limit - extra)
    return min(limits) if limits else None


class MariaModel(torch.nn.Module):
    """MLM + AR + head, ready to infill."""

    def __init__(self, backbones: Backbones, head: FusionHead):
        super().__init__()
        self.bb, self.head = backbones, head.to(backbones.device)

    @classmethod
    def from_backbones(cls, mlm: str, ar: str, head_dir: str | None = None, init: str = "poe",
                       allow_unfinished: bool = False, **load_kw) -> "MariaModel":
        """Backbones plus a trained head folder (checked against them), or an initial head by name."""
        if head_dir is not None:  # read the head first: a bad head fails before minutes of backbone loading
            head, meta = load_head(head_dir)
            if not meta.get("complete", False) and not allow_unfinished:
                raise HeadError(f"head {head_dir} comes from a training run that did not finish; finish it with "
                                f"`maria train ... --resume`, or pass --allow-unfinished to use it as it is")
        bb = load_backbones(mlm, ar, **load_kw)
        if head_dir is not None:
            check_same_backbones(bb.describe(), meta, f"backbones {mlm} + {ar}", f"head {head_dir}",
                                 "use the head trained on features of these backbones")
        else:
            head = init_head(init, bb.expert_weights())
        return cls(bb, head)

    def infill(self, ids, mask, lengths=None, **sampling) -> torch.Tensor:
        """Fill masked positions of (B, T) right-padded AR-id windows; known tokens are kept."""
        ids = torch.as_tensor(ids, dtype=torch.long)
        mask = torch.as_tensor(mask, dtype=torch.bool)
        if ids.dim() == 1:
            return self.infill(ids[None], mask[None], None if lengths is None else torch.as_tensor([lengths]), **sampling)[0]
        return infill(self.bb, self.head, ids, mask, lengths=lengths, sampling=Sampling(**sampling)).cpu()

    def infill_text(self, texts: list[str], **sampling) -> list[dict]:
        """Infill texts whose masked spans are written {{N}}; returns ids and decoded text per input."""
        tok = self.bb.ar_tokenizer
        parsed = [parse_masked_text(t, tok, max_window(self.bb)) for t in texts]
        T = max(len(p[0]) for p in parsed)
        ids = torch.zeros(len(texts), T, dtype=torch.long)
        mask = torch.zeros(len(texts), T, dtype=torch.bool)
        for r, (i, m) in enumerate(parsed):
            ids[r, : len(i)], mask[r, : len(m)] = torch.tensor(i, dtype=torch.long), torch.tensor(m, dtype=torch.bool)
        lengths = torch.tensor([len(p[0]) for p in parsed])
        out = self.infill(ids, mask, lengths, **sampling)
        results = []
        for r, (i, m) in enumerate(parsed):
            filled = out[r, : len(i)].tolist()
            results.append({"input": texts[r], "ids": filled, "mask": m, "text": tok.decode(filled),
                            "filled": [tok.decode([t]) for t, mk in zip(filled, m) if mk]})
        return results

    # ---- the combined checkpoint -------------------------------------------------------------
    def save_pretrained(self, out: str | Path, reference: bool = False, overwrite: bool = False, inputs: tuple = ()) -> Path:
        """Write the combined checkpoint folder (see the module docstring): built beside `out`, then
        swapped in. Refuses to replace anything that is not a MARIA checkpoint, or an input."""
        out = guard_output(out, "config.json", overwrite, inputs, what="checkpoint folder")
        if out.exists() and json.loads((out / "config.json").read_text()).get("model_type") != "maria":
            raise CheckpointError(f"{out} holds a config.json that is not a MARIA checkpoint's; pick a new --out folder")
        bb = self.bb
        with atomic_dir(out) as tmp:
            refs = {}
            for kind, model, tok in (("mlm", bb.mlm, bb.mlm_tokenizer), ("ar", bb.ar, bb.ar_tokenizer)):
                ident = bb.identity[kind]
                if reference:
                    refs[kind] = {"id": ident["id"], "revision": ident["revision"], "fingerprint": ident["fingerprint"]}
                else:
                    model.save_pretrained(tmp / kind, safe_serialization=True)
                    tok.save_pretrained(tmp / kind)
                    refs[kind] = {"path": kind, "source": ident["id"], "revision": ident["revision"], "fingerprint": ident["fingerprint"]}
            bb.ar_tokenizer.save_pretrained(tmp / "tokenizer")
            save_head(tmp, self.head, {**bb.describe(), "complete": True})
            save_file({"mlm_to_ar": bb.mlm_to_ar.contiguous()}, str(tmp / "vocab_map.safetensors"), metadata={"format": "pt"})
            config = {"model_type": "maria", "format_version": FORMAT_VERSION, "d_mlm": bb.d_mlm, "d_ar": bb.d_ar,
                      "vocab_size": bb.vocab_size, "start_token_id": bb.start_id, "mlm_mask_token_id": bb.mlm_mask_id,
                      "mlm": refs["mlm"], "ar": refs["ar"], "tokenizer_fingerprint": bb.identity["tokenizer_fingerprint"]}
            (tmp / "config.json").write_text(json.dumps(config, indent=2))
        return out

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str = "cpu", dtype: str | torch.dtype = torch.float32) -> "MariaModel":
        d = Path(path)
        if not (d / "config.json").is_file():
            raise CheckpointError(f"{d} is not a MARIA checkpoint (no config.json); pass the --out of `maria export`")
        try:
            config = json.loads((d / "config.json").read_text())
        except ValueError:
            raise CheckpointError(f"{d}/config.json is not valid JSON; re-run `maria export`") from None
        if not isinstance(config, dict) or config.get("model_type") != "maria":
            raise CheckpointError(f"{d}/config.json is not a MARIA checkpoint's (model_type {config.get('model_type') if isinstance(config, dict) else None!r})")
        for f in ("head.safetensors", "head.json", "vocab_map.safetensors"):
            if not (d / f).is_file():
                raise CheckpointError(f"checkpoint {d} is missing {f}; re-run `maria export`")
        try:
            head, _ = load_head(d)
            stored_map = load_file(str(d / "vocab_map.safetensors"))["mlm_to_ar"]
            src = {k: str(d / config[k]["path"]) if "path" in config[k] else config[k]["id"] for k in ("mlm", "ar")}
            revision = {k: None if "path" in config[k] else config[k].get("revision") for k in ("mlm", "ar")}
            bb = load_backbones(src["mlm"], src["ar"], dtype=dtype, device=device, check_parity=False,
                                mlm_revision=revision["mlm"], ar_revision=revision["ar"])
        except (BackboneError, HeadError) as e:
            raise CheckpointError(f"checkpoint {d}: {e}") from None
        except Exception as e:  # noqa: BLE001 -- a damaged file: one line naming it, not a traceback
            raise CheckpointError(f"checkpoint {d} is damaged ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}); re-run `maria export`") from None
        if not torch.equal(stored_map, bb.mlm_to_ar):
            raise CheckpointError(f"checkpoint {d}: its vocabulary map does not match its backbones' tokenizers; re-run `maria export`")
        check_same_backbones(config, bb.describe(), f"checkpoint {d}", "its backbone folders", "re-run `maria export`")
        for k in ("mlm", "ar"):
            bb.identity[k].update({"id": config[k].get("source", config[k].get("id")), "revision": config[k].get("revision")})
        return cls(bb, head)


def export(mlm: str, ar: str, head_dir: str, out: str, reference: bool = False, overwrite: bool = False,
           allow_unfinished: bool = False, **load_kw) -> Path:
    """`maria export`: check the head against the backbones, then write one combined folder."""
    guard_output(out, "config.json", overwrite, (mlm, ar, head_dir), what="checkpoint folder")  # before minutes of loading
    model = MariaModel.from_backbones(mlm, ar, head_dir=head_dir, allow_unfinished=allow_unfinished, **load_kw)
    return model.save_pretrained(out, reference=reference, overwrite=overwrite, inputs=(mlm, ar, head_dir))
