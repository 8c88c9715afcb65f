"""MariaConfig: the config.json of a combined MARIA checkpoint (the model is maria/modeling_maria.py).

A MARIA model has no architecture of its own to configure: it is two pretrained backbones and one
linear head. So the config records sizes, the two special ids decoding needs, and a reference to
each backbone (a folder inside the checkpoint, or a hub id + commit) with the fingerprint of its
weights as stored, which loading checks.
"""

from __future__ import annotations

from transformers import PretrainedConfig

FORMAT_VERSION = 2  # 2: tokenizer at the root, portable references, dtype, model card (1 is still read)


class MariaConfig(PretrainedConfig):
    """config.json of a MARIA checkpoint. `mlm` / `ar` reference the backbones:
    {"path": "mlm", ...} for a folder inside the checkpoint, else {"id": hub id, "revision": commit};
    both carry "fingerprint" (maria/backbones.py) of the weights as stored, in `dtype`."""

    model_type = "maria"
    format_version: int = FORMAT_VERSION
    d_mlm: int = 0  # width of the MLM's feature (the input of its output projection)
    d_ar: int = 0  # width of the AR's feature
    vocab_size: int = 0  # the AR's vocabulary: the head's output
    start_token_id: int | None = None  # fed to the AR before the window (its BOS, else EOS)
    mlm_mask_id: int | None = None  # the MLM's own mask token id (not an AR id)
    mlm_offset: int = 0  # where the MLM predicts x[i]: at i (0, classic MLM) or at i - 1 (-1, masked next-token prediction)
    mlm: dict | None = None  # backbone references (see above)
    ar: dict | None = None
    tokenizer_fingerprint: str | None = None  # digest of the shared vocabulary
