"""Simulated annealing's proposals: one contiguous span (or scattered positions), never position 0
without a start token, and a run that keeps every sample's energy consistent with the AR."""

import torch

from maria.anneal import AnnealConfig, anneal, ar_nll, remask
from maria.modeling_maria import MariaModel


def test_remask_span_and_scattered():
    g = torch.Generator().manual_seed(0)
    for keep_first in (False, True):
        m = remask(AnnealConfig(chains=8, length=20, span=True), 5, keep_first, g)
        assert (m.sum(1) == 5).all()
        first = m.float().argmax(1)
        assert all(m[r, first[r] : first[r] + 5].all() for r in range(8))  # contiguous
        s = remask(AnnealConfig(chains=8, length=20, span=False), 5, keep_first, g)
        assert (s.sum(1) == 5).all()
        if keep_first:
            assert not m[:, 0].any() and not s[:, 0].any()


def test_anneal_energy_matches_the_ar(pairs):
    model = MariaModel.from_backbones(*pairs["modernbert-olmo"], init="poe")
    x, traj = anneal(model, AnnealConfig(steps=4, length=12, chains=3, seed=0))
    assert x.shape == (3, 12) and len(traj) == 5
    torch.testing.assert_close(ar_nll(model.bb, x), torch.tensor(traj[-1]["energy"]), atol=1e-4, rtol=1e-4)
