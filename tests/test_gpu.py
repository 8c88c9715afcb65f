"""GPU checks of the paths only a GPU takes: bfloat16 extraction on CUDA against float32 on the CPU, float8
features decoded on the GPU against the format's own table, the trainer's step under bf16 autocast, and a
bfloat16 checkpoint loaded onto CUDA. Skipped without a GPU (conftest.py); the device check runs them
(bench/device_check.sh). Imports nothing the lent image lacks (no zarr, Ray or datasets)."""

import numpy as np
import pytest
import torch

from maria.backbones import load_backbones
from maria.head import FusionHead, init_head
from maria.modeling_maria import MariaModel
from maria_extract.forward import block_features
from maria_train_head.step import decode_features, make_optimizer, train_step

pytestmark = pytest.mark.gpu
KINDS = ["modernbert-olmo", "bert-gpt2"]


def windows(bb, n: int = 6, T: int = 32, seed: int = 0):
    text = "Paris is the capital of France. Berlin is the capital of Germany. A cat sat on the mat by the door. " * 8
    stream = bb.ar_tokenizer(text, add_special_tokens=False).input_ids
    g = np.random.default_rng(seed)
    ids = np.stack([stream[3 * i : 3 * i + T] for i in range(n)])
    lengths = np.array([T, T, T - 5, T, 20, T])[:n]
    masks = g.random((2, n, T)) < g.uniform(0.1, 0.9, (2, n, 1))
    masks[:, :, 0] |= True
    return ids, lengths, masks


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_extraction_on_cuda_matches_float32_on_cpu(pairs, kind):
    """The actor's compute in bfloat16 on the GPU gives the float32 rows (same order, same targets) to bf16 precision."""
    ids, lengths, masks = windows(load_backbones(*pairs[kind]))
    ref = block_features(load_backbones(*pairs[kind]), ids, lengths, masks, 4, "cpu")
    got = block_features(load_backbones(*pairs[kind], dtype=torch.bfloat16, device="cuda"), ids, lengths, masks, 4, "cuda")
    for a, b in zip(ref[1:], got[1:]):
        np.testing.assert_array_equal(a, b)
    assert np.linalg.norm(got[0] - ref[0]) / np.linalg.norm(ref[0]) < 2e-2


def test_float8_decodes_on_cuda_as_the_stored_table():
    """torch's CUDA float8_e4m3fn -> float32 equals the store's documented 256-entry table (README recipe)."""
    c = np.arange(256)
    e, m = (c >> 3) & 15, c & 7
    table = (np.where(e == 0, m / 8 * 2.0**-6, (1 + m / 8) * 2.0 ** (e - 7)) * np.where(c & 128, -1, 1)).astype(np.float32)
    finite = (c & 0x7F) != 0x7F
    codes = torch.arange(256, dtype=torch.uint8).cuda()[None].repeat(3, 1)
    scales = torch.tensor([1.0, 0.5, 3.25], device="cuda")
    got = decode_features(codes, scales).cpu().numpy()
    np.testing.assert_array_equal(got[:, finite], table[finite][None] * scales.cpu().numpy()[:, None])


def test_train_step_under_bf16_autocast_learns():
    torch.manual_seed(0)
    head = FusionHead(16, 16, 50).cuda()
    cfg = type("Cfg", (), {"lr": 1e-2, "weight_decay": 0.0, "grad_clip": 1.0, "reg_to_init": 0.0})()
    opt = make_optimizer(head, cfg)
    f, t = torch.randn(256, 32, device="cuda"), torch.randint(0, 50, (256,), device="cuda")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16)
    first = float(train_step(head, opt, f, t, [], cfg, autocast).detach())
    for _ in range(30):
        last = float(train_step(head, opt, f, t, [], cfg, autocast).detach())
    assert last < 0.8 * first


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_checkpoint_loads_on_cuda_and_infills(pairs, kind, tmp_path):
    bb = load_backbones(*pairs[kind])
    model = MariaModel.from_parts(bb, init_head("poe", bb.expert_weights()))
    model.to(torch.bfloat16).save_pretrained(tmp_path / "ckpt")
    loaded = MariaModel.from_pretrained(tmp_path / "ckpt", device="cuda")
    assert loaded.proj.weight.dtype == torch.bfloat16 and loaded.proj.weight.is_cuda
    out = loaded.infill_text(["Paris is the {{2}} of France. Berlin is the {{3}} of Germany."])[0]
    assert out["text"].startswith("Paris is the") and len(out["filled"]) == 5
