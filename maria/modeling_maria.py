"""MariaModel: MLM + AR + fusion head as a Hugging Face PreTrainedModel (config: maria/configuration_maria.py,
folder format: maria/checkpoint.py). `import maria` registers it with AutoConfig, AutoModel and
AutoModelForMaskedLM; no remote code, so config.json has no auto_map.

Module tree and state_dict names: `mlm.*`, `ar.*` (the backbones), `proj.weight`, `proj.bias` (the
fusion head's Linear, so head.safetensors' keys are the model's own names) and `mlm_to_ar`.
Two ways to mark what to fill: a boolean `infill_mask` beside AR ids (the AR's vocabulary has no mask
token), or `infill(input_ids, mask_token_id=...)`, where every position holding that id is masked.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from huggingface_hub import HfApi
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, AutoTokenizer, PreTrainedModel
from transformers.utils import ModelOutput

from maria.backbones import Backbones, assemble_backbones, load_backbones
from maria.checkpoint import CheckpointError, backbones_config, check_config, load_checkpoint, locate, read_config, read_eval, write_checkpoint
from maria.configuration_maria import MariaConfig
from maria.decode import Sampling, infill
from maria.features import aligned_features
from maria.head import FusionHead, HeadError, init_head, load_head
from maria.identity import backbone_identity, check_same_backbones
from maria.io import guard_output
from maria.text import parse_masked_text

# from_pretrained arguments that transformers' loaders pass along and that mean nothing here
_IGNORED = {"_from_auto", "adapter_kwargs", "code_revision", "force_download", "proxies", "low_cpu_mem_usage"}


@dataclass
class MariaOutput(ModelOutput):
    """Teacher-forced output: the head's logits at each masked position (row-major: window, position)."""

    loss: torch.Tensor | None = None  # mean NLL per masked token: the infilling NLL (METHOD.md)
    logits: torch.Tensor | None = None  # (N, vocab_size)
    rows: torch.Tensor | None = None  # (N,) window of each masked position
    positions: torch.Tensor | None = None  # (N,) its position in the window


def head_matches(bb: Backbones, record: dict) -> bool:
    """Whether a head's record names these backbones. The record was taken in the extraction's dtype
    (bfloat16 on a GPU by default); a float32 load reproduces a bf16/fp16 one exactly, so any matches."""
    want = backbone_identity(record)
    return any(backbone_identity(bb.describe(dt)) == want for dt in (None, torch.bfloat16, torch.float16))


class MariaModel(PreTrainedModel):
    """MLM + AR + head, ready to infill. Build it with from_pretrained (a checkpoint folder or hub id)
    or from_backbones (two backbones and a head folder from `maria train`)."""

    config_class = MariaConfig
    base_model_prefix = "maria"
    main_input_name = "input_ids"

    def __init__(self, config: MariaConfig, backbones: Backbones | None = None, head: FusionHead | None = None, head_meta: dict | None = None):
        super().__init__(config)
        if backbones is None or head is None:
            raise CheckpointError(
                "a MARIA model is two pretrained backbones and a head, not a config alone: use "
                "MariaModel.from_pretrained(checkpoint) or MariaModel.from_backbones(mlm, ar, head_dir)"
            )
        self.bb, self.head_meta = backbones, dict(head_meta or {})
        self.mlm, self.ar = backbones.mlm, backbones.ar
        self.proj = head.proj.to(backbones.device)
        self.register_buffer("mlm_to_ar", backbones.mlm_to_ar.clone())
        # the FusionHead that decoding uses, over this same `proj`: kept out of the module tree, so its
        # parameters are registered once, under the names head.safetensors uses
        self.__dict__["_head"] = FusionHead.around(self.proj, head.d_mlm)
        self.post_init()

    @property
    def head(self) -> FusionHead:
        return self.__dict__["_head"]

    def _init_weights(self, module):  # every weight comes from the backbones and the head: never re-initialise
        pass

    @classmethod
    def from_parts(cls, backbones: Backbones, head: FusionHead, head_meta: dict | None = None) -> "MariaModel":
        bb = backbones
        config = backbones_config(bb, dict(bb.identity["mlm"]), dict(bb.identity["ar"]), cls.__name__)
        return cls(config, bb, head, head_meta or {**bb.describe()})

    @classmethod
    def from_backbones(
        cls,
        mlm: str | torch.nn.Module,
        ar: str | torch.nn.Module,
        head_dir: str | None = None,
        init: str = "poe",
        allow_unfinished: bool = False,
        mlm_tokenizer=None,
        ar_tokenizer=None,
        **load_kw,
    ) -> "MariaModel":
        """Backbones plus a trained head folder (checked against them), or an initial head by name.
        `mlm` and `ar` are hub ids or folders, or models already loaded in Python (quantized, PEFT-wrapped,
        on any device; pass their tokenizers, else they are loaded from the models' name_or_path)."""
        if head_dir is not None:  # read the head first: a bad head fails before minutes of backbone loading
            head, meta = load_head(head_dir)
            if not meta.get("complete", False) and not allow_unfinished:
                raise HeadError(
                    f"head {head_dir} comes from a training run that did not finish; finish it with "
                    f"`maria train ... --resume`, or pass --allow-unfinished to use it as it is"
                )
        if isinstance(mlm, str) and isinstance(ar, str):
            bb = load_backbones(mlm, ar, **load_kw)
        else:
            bb = assemble_backbones(
                mlm,
                ar,
                mlm_tokenizer or AutoTokenizer.from_pretrained(mlm.name_or_path),
                ar_tokenizer or AutoTokenizer.from_pretrained(ar.name_or_path),
                check_parity=load_kw.get("check_parity", True),
                mlm_offset=load_kw.get("mlm_offset"),
            )
            mlm, ar = bb.identity["mlm"]["id"], bb.identity["ar"]["id"]
        if head_dir is None:
            head, meta = init_head(init, bb.expert_weights()), {**bb.describe(), "init": init}
        elif not head_matches(bb, meta):
            check_same_backbones(bb.describe(), meta, f"backbones {mlm} + {ar}", f"head {head_dir}", "use the head trained on features of these backbones")
        return cls.from_parts(bb, head, meta)

    # ---- infilling -----------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, infill_mask: torch.Tensor, lengths: torch.Tensor | None = None) -> MariaOutput:
        """Teacher-forced: the head's logits at the masked positions of right-padded AR-id windows
        given the true tokens (what training fits), and their mean NLL."""
        ids = torch.as_tensor(input_ids, dtype=torch.long, device=self.bb.device)
        mask = torch.as_tensor(infill_mask, dtype=torch.bool, device=ids.device)
        lengths = torch.full((ids.shape[0],), ids.shape[1], device=ids.device) if lengths is None else torch.as_tensor(lengths, device=ids.device)
        f = aligned_features(self.bb, ids, mask, lengths)
        logits = self.head(f.features)
        loss = F.cross_entropy(logits.float(), f.targets) if len(f.targets) else None
        return MariaOutput(loss=loss, logits=logits, rows=f.rows, positions=f.positions)

    def infill(self, input_ids, mask=None, lengths=None, *, mask_token_id: int | None = None, **sampling) -> torch.Tensor:
        """Fill masked positions of (B, T) right-padded AR-id windows; known tokens are kept. Mark them
        with a boolean `mask` of the same shape, or with `mask_token_id` (every position holding it)."""
        ids = torch.as_tensor(input_ids, dtype=torch.long)
        if (mask is None) == (mask_token_id is None):
            raise ValueError("pass exactly one of mask (a boolean tensor like input_ids) and mask_token_id")
        mask = ids == mask_token_id if mask is None else torch.as_tensor(mask, dtype=torch.bool)
        if mask.shape != ids.shape:
            raise ValueError(f"mask has shape {tuple(mask.shape)} but input_ids {tuple(ids.shape)}; give one flag per token")
        ids = ids.masked_fill(mask, 0)  # a masked position's id is never read; keep it a valid embedding index
        if ids.dim() == 1:
            return self.infill(ids[None], mask[None], None if lengths is None else torch.as_tensor([lengths]), **sampling)[0]
        if ids.numel() and (int(ids.max()) >= self.config.vocab_size or int(ids.min()) < 0):
            raise ValueError(f"input_ids hold ids outside the AR's vocabulary (0..{self.config.vocab_size - 1}) at known positions")
        return infill(self.bb, self.head, ids, mask, lengths=lengths, sampling=Sampling(**sampling)).cpu()

    def infill_text(self, texts: list[str], **sampling) -> list[dict]:
        """Infill texts whose masked spans are written {{N}}; returns ids and decoded text per input."""
        tok = self.bb.ar_tokenizer
        parsed = [parse_masked_text(t, tok, self.bb.max_window()) for t in texts]
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
            results.append(
                {"input": texts[r], "ids": filled, "mask": m, "text": tok.decode(filled), "filled": [tok.decode([t]) for t, mk in zip(filled, m) if mk]}
            )
        return results

    # ---- the checkpoint (maria/checkpoint.py) --------------------------------------------------
    def save_pretrained(
        self,
        save_directory: str | Path,
        is_main_process: bool = True,
        *,
        reference: bool = False,
        overwrite: bool = False,
        inputs: tuple = (),
        eval_results: dict | None = None,
        max_shard_size: int | str = "50GB",
        push_to_hub: bool = False,
        **kwargs,
    ) -> Path:
        """Write the checkpoint folder in the model's current dtype (cast it first to store less:
        `model.to(torch.bfloat16).save_pretrained(...)`). `reference` stores hub backbones as id + commit."""
        if kwargs.get("state_dict") is not None or kwargs.get("safe_serialization") is False or kwargs.get("variant"):
            raise CheckpointError("a MARIA checkpoint is written from the model itself, as safetensors, without variants")
        if not is_main_process:
            return Path(save_directory)
        out = write_checkpoint(
            save_directory,
            self.bb,
            self.head,
            self.head_meta,
            self.proj.weight.dtype,
            reference=reference,
            overwrite=overwrite,
            inputs=inputs,
            eval_results=eval_results,
            max_shard_size=max_shard_size,
            architecture=type(self).__name__,
        )
        if push_to_hub:
            self.push_to_hub(kwargs.get("repo_id") or out.name, token=kwargs.get("token"), reference=reference)
        return out

    def push_to_hub(
        self,
        repo_id: str,
        *,
        commit_message: str | None = None,
        commit_description: str | None = None,
        private: bool | None = None,
        token: bool | str | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        max_shard_size: int | str = "50GB",
        reference: bool = False,
        **_,
    ):
        """Upload the checkpoint folder as save_pretrained writes it. (transformers' own push_to_hub
        would replace the generated model card with a blank template.)"""
        api = HfApi(token=token)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as tmp:
            folder = self.save_pretrained(Path(tmp) / repo_id.split("/")[-1], reference=reference, max_shard_size=max_shard_size)
            return api.upload_folder(
                repo_id=repo_id,
                folder_path=str(folder),
                commit_message=commit_message or "Upload MARIA checkpoint",
                commit_description=commit_description,
                revision=revision,
                create_pr=create_pr,
            )

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | Path,
        *model_args,
        config: MariaConfig | None = None,
        device: str | torch.device | None = None,
        device_map=None,
        dtype: str | torch.dtype | None = "auto",
        revision: str | None = None,
        cache_dir: str | None = None,
        local_files_only: bool = False,
        token: str | bool | None = None,
        trust_remote_code: bool | None = False,
        **kwargs,
    ) -> "MariaModel":
        """A checkpoint folder or a hub id (from the local cache when offline). `dtype` ("auto" = as
        stored) and `device` (or a one-device `device_map`) apply to the backbones and the head alike."""
        dtype = kwargs.pop("torch_dtype", None) or dtype
        if kwargs.pop("use_safetensors", None) is False:
            raise CheckpointError("MARIA checkpoints are read from safetensors only (no pickle); drop use_safetensors=False")
        unknown = sorted(k for k, v in kwargs.items() if k not in _IGNORED and v not in (None, False, ""))
        if model_args or unknown or isinstance(device_map, dict):
            raise TypeError(f"MariaModel.from_pretrained does not take {model_args or unknown or 'a device_map dict'}")
        device = device if device is not None else (device_map if device_map is not None else "cpu")
        d = locate(pretrained_model_name_or_path, revision, cache_dir, local_files_only, token)
        config = check_config(config, d) if isinstance(config, MariaConfig) else read_config(d)
        bb, head, meta = load_checkpoint(d, config, dtype=dtype, device=str(device), trust_remote_code=bool(trust_remote_code))
        config.name_or_path = str(pretrained_model_name_or_path)
        return cls(config, bb, head, meta)


DTYPES = ("float32", "bfloat16", "float16")


def export(
    mlm: str,
    ar: str,
    head_dir: str,
    out: str,
    reference: bool = False,
    overwrite: bool = False,
    allow_unfinished: bool = False,
    dtype: str = "float32",
    eval_json: str | None = None,
    **load_kw,
) -> Path:
    """`maria export`: check the head against the backbones, then write one combined folder with
    every weight in `dtype`. The backbones are loaded in float32 whatever `dtype` is: the head's
    record of them is then matched exactly (head_matches), and the cast to `dtype` is the
    same rounding a load in `dtype` does."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown --dtype {dtype!r}; pass one of {', '.join(DTYPES)}")
    guard_output(out, "config.json", overwrite, (mlm, ar, head_dir), what="checkpoint folder")  # before minutes of loading
    eval_results = read_eval(eval_json) if eval_json else None
    load_kw.pop("dtype", None)
    model = MariaModel.from_backbones(mlm, ar, head_dir=head_dir, allow_unfinished=allow_unfinished, dtype=torch.float32, **load_kw)
    model.to(getattr(torch, dtype))
    return model.save_pretrained(out, reference=reference, overwrite=overwrite, inputs=(mlm, ar, head_dir), eval_results=eval_results)


def register() -> None:
    """Make model_type "maria" known to AutoConfig, AutoModel and AutoModelForMaskedLM (idempotent)."""
    AutoConfig.register("maria", MariaConfig, exist_ok=True)
    AutoModel.register(MariaConfig, MariaModel, exist_ok=True)
    AutoModelForMaskedLM.register(MariaConfig, MariaModel, exist_ok=True)
