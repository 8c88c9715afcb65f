"""The full MARIA model (MLM + AR + fusion head) and its combined checkpoint folder.

A checkpoint folder, like a Hugging Face one:
    config.json          model_type "maria", sizes, start/mask ids, backbone references and fingerprints
    head.safetensors     weight (V, d_mlm + d_ar), bias (V,)
    vocab_map.safetensors mlm_to_ar (V_mlm,)
    tokenizer/           the AR's tokenizer (the target vocabulary)
    mlm/, ar/            both backbones (unless exported with --reference: then id + revision)
Only safetensors are ever loaded (use_safetensors=True for the backbones too): no pickle.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from maria.backbones import Backbones, BackboneError, load_backbones
from maria.decode import Sampling, infill
from maria.head import FusionHead

FORMAT_VERSION = 1
MASK_SPAN = re.compile(r"\{\{(\d*)\}\}")  # "{{5}}" = five masked tokens; "{{}}" = one


class CheckpointError(ValueError):
    """A head or checkpoint folder that cannot be used; the message names the fix."""


def parse_masked_text(text: str, tokenizer) -> tuple[list[int], list[bool]]:
    """Token ids and mask of a text whose masked spans are written {{N}} (N tokens)."""
    if text.count("{{") != text.count("}}") or len(MASK_SPAN.findall(text)) != text.count("{{"):
        raise ValueError(f"bad mask syntax in {text[:60]!r}: write each masked span as {{{{N}}}} with N a number of tokens, e.g. 'Paris is the {{{{2}}}} of France'")
    ids, mask, pos = [], [], 0
    for m in MASK_SPAN.finditer(text):
        piece = tokenizer(text[pos : m.start()], add_special_tokens=False).input_ids
        n = int(m.group(1) or 1)
        if n == 0:
            raise ValueError("a masked span {{0}} has no tokens; write {{N}} with N >= 1")
        ids += piece + [0] * n
        mask += [False] * len(piece) + [True] * n
        pos = m.end()
    piece = tokenizer(text[pos:], add_special_tokens=False).input_ids
    return ids + piece, mask + [False] * len(piece)


def read_head(head_dir: str | Path) -> tuple[FusionHead, dict]:
    """A trained head folder (train_head/): head.safetensors + head.json (what it was trained on)."""
    d = Path(head_dir)
    if not (d / "head.safetensors").exists() or not (d / "head.json").exists():
        raise CheckpointError(f"{d} is not a head folder (needs head.safetensors and head.json); pass the --out of `maria train`")
    meta = json.loads((d / "head.json").read_text())
    tensors = load_file(str(d / "head.safetensors"))
    head = FusionHead(meta["d_mlm"], meta["d_ar"], meta["vocab_size"])
    head.load_state_dict({"proj.weight": tensors["weight"], "proj.bias": tensors["bias"]})
    return head, meta


def check_head_matches(meta: dict, bb: Backbones, what: str) -> None:
    """Refuse a head trained on features of other backbones (fingerprints, split, vocabulary)."""
    want = {"d_mlm": bb.d_mlm, "d_ar": bb.d_ar, "vocab_size": bb.vocab_size,
            "mlm": bb.identity["mlm"]["fingerprint"], "ar": bb.identity["ar"]["fingerprint"]}
    have = {"d_mlm": meta.get("d_mlm"), "d_ar": meta.get("d_ar"), "vocab_size": meta.get("vocab_size"),
            "mlm": (meta.get("mlm") or {}).get("fingerprint"), "ar": (meta.get("ar") or {}).get("fingerprint")}
    for k in want:
        if have[k] != want[k]:
            raise CheckpointError(f"{what} was made for other backbones ({k}: {have[k]} vs {want[k]}); use the head trained on features of these backbones")


class MariaModel(torch.nn.Module):
    """MLM + AR + head, ready to infill."""

    def __init__(self, backbones: Backbones, head: FusionHead):
        super().__init__()
        self.bb, self.head = backbones, head.to(backbones.device)

    @classmethod
    def from_backbones(cls, mlm: str, ar: str, head_dir: str | None = None, init: str = "poe", **load_kw) -> "MariaModel":
        bb = load_backbones(mlm, ar, **load_kw)
        if head_dir is not None:
            head, meta = read_head(head_dir)
            check_head_matches(meta, bb, f"head {head_dir}")
        elif init == "poe":
            e = bb.expert_weights()
            head = FusionHead.from_experts(e["W1"], e["b1"], e["W2"], e["b2"])
        elif init == "ar-only":
            e = bb.expert_weights()
            head = FusionHead.from_experts(e["W1"], e["b1"], e["W2"], e["b2"], mlm_scale=0.0, ar_scale=1.0)
        else:
            head = FusionHead.random(bb.d_mlm, bb.d_ar, bb.vocab_size)
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
        parsed = [parse_masked_text(t, tok) for t in texts]
        T = max(len(p[0]) for p in parsed)
        ids = torch.zeros(len(texts), T, dtype=torch.long)
        mask = torch.zeros(len(texts), T, dtype=torch.bool)
        for r, (i, m) in enumerate(parsed):
            ids[r, : len(i)], mask[r, : len(m)] = torch.tensor(i), torch.tensor(m)
        lengths = torch.tensor([len(p[0]) for p in parsed])
        out = self.infill(ids, mask, lengths, **sampling)
        results = []
        for r, (i, m) in enumerate(parsed):
            filled = out[r, : len(i)].tolist()
            results.append({"input": texts[r], "ids": filled, "mask": m, "text": tok.decode(filled),
                            "filled": [tok.decode([t]) for t, mk in zip(filled, m) if mk]})
        return results

    # ---- the combined checkpoint -------------------------------------------------------------
    def save_pretrained(self, out: str | Path, reference: bool = False) -> Path:
        """Write the combined checkpoint folder (see the module docstring) atomically."""
        out = Path(out)
        tmp = out.with_name(out.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        bb = self.bb
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
        save_file({"weight": self.head.proj.weight.detach().cpu().contiguous(), "bias": self.head.proj.bias.detach().cpu().contiguous()}, str(tmp / "head.safetensors"))
        save_file({"mlm_to_ar": bb.mlm_to_ar.contiguous()}, str(tmp / "vocab_map.safetensors"))
        config = {"model_type": "maria", "format_version": FORMAT_VERSION, "d_mlm": bb.d_mlm, "d_ar": bb.d_ar,
                  "vocab_size": bb.vocab_size, "start_token_id": bb.start_id, "mlm_mask_token_id": bb.mlm_mask_id,
                  "mlm": refs["mlm"], "ar": refs["ar"], "tokenizer_fingerprint": bb.identity["tokenizer_fingerprint"]}
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
        return out

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str = "cpu", dtype: str | torch.dtype = torch.float32) -> "MariaModel":
        d = Path(path)
        if not (d / "config.json").exists():
            raise CheckpointError(f"{d} is not a MARIA checkpoint (no config.json); pass the --out of `maria export`")
        config = json.loads((d / "config.json").read_text())
        if config.get("model_type") != "maria":
            raise CheckpointError(f"{d}/config.json is not a MARIA checkpoint (model_type {config.get('model_type')!r})")
        for f in ("head.safetensors", "vocab_map.safetensors"):
            if not (d / f).exists():
                raise CheckpointError(f"checkpoint {d} is missing {f}; re-run `maria export`")
        src = {k: str(d / config[k]["path"]) if "path" in config[k] else config[k]["id"] for k in ("mlm", "ar")}
        try:
            bb = load_backbones(src["mlm"], src["ar"], dtype=dtype, device=device, check_parity=False,
                                mlm_revision=config["mlm"].get("revision") if "path" not in config["mlm"] else None,
                                ar_revision=config["ar"].get("revision") if "path" not in config["ar"] else None)
        except BackboneError as e:
            raise CheckpointError(f"checkpoint {d}: {e}") from None
        stored_map = load_file(str(d / "vocab_map.safetensors"))["mlm_to_ar"]
        if not torch.equal(stored_map, bb.mlm_to_ar):
            raise CheckpointError(f"checkpoint {d}: its vocabulary map does not match its backbones' tokenizers; re-run `maria export`")
        for k in ("mlm", "ar"):
            if config[k]["fingerprint"] != bb.identity[k]["fingerprint"]:
                raise CheckpointError(f"checkpoint {d}: the {k.upper()} weights differ from those it was exported with; re-run `maria export`")
            bb.identity[k].update({"id": config[k].get("source", config[k].get("id")), "revision": config[k].get("revision")})
        t = load_file(str(d / "head.safetensors"))
        head = FusionHead(config["d_mlm"], config["d_ar"], config["vocab_size"])
        head.load_state_dict({"proj.weight": t["weight"], "proj.bias": t["bias"]})
        return cls(bb, head)


def export(mlm: str, ar: str, head_dir: str, out: str, reference: bool = False, **load_kw) -> Path:
    """`maria export`: check the head against the backbones, then write one combined folder."""
    return MariaModel.from_backbones(mlm, ar, head_dir=head_dir, **load_kw).save_pretrained(out, reference=reference)
