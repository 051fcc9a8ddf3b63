"""The gradient probe folds the theoretical field by the network's boundary conditions, so
that it agrees with the gradient support at edges and corners, and says so when not."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from els_audit.probes import probe_receptive_field, receptive_field, trace_model
from els_audit.probes.gradient_probe import fold


def test_fold_by_hand():
    # [-2, 2] on 8 cells
    assert np.nonzero(fold(-2, 2, 8, frozenset()))[0].tolist() == [0, 1, 2]
    assert np.nonzero(fold(-2, 2, 8, frozenset({"zeros"})))[0].tolist() == [0, 1, 2]
    assert np.nonzero(fold(-2, 2, 8, frozenset({"circular"})))[0].tolist() == [0, 1, 2, 6, 7]
    assert np.nonzero(fold(-3, 1, 8, frozenset({"reflect"})))[0].tolist() == [0, 1, 2, 3]
    assert np.nonzero(fold(6, 9, 8, frozenset({"replicate"})))[0].tolist() == [6, 7]


def _stack(mode, layers=4):
    return nn.Sequential(*[nn.Conv2d(1, 1, 3, padding=1, padding_mode=mode) for _ in range(layers)])


class _Net(nn.Module):
    def __init__(self, mode):
        super().__init__()
        self.body = _stack(mode)

    def forward(self, x, t):
        return self.body(x)


@pytest.mark.parametrize("mode", ["zeros", "circular", "reflect", "replicate"])
@pytest.mark.parametrize("pixel", [(0, 0), (8, 0), (8, 8), (15, 15)])
def test_probe_agrees_with_the_support_at_every_pixel(mode, pixel):
    torch.manual_seed(0)
    tr = trace_model(_Net(mode).eval(), (torch.randn(2, 1, 16, 16), torch.rand(2)))
    rf = receptive_field(tr)
    pr = probe_receptive_field(tr, rf, pixel=pixel, n_inputs=2)
    assert pr.inside, pr
    assert pr.fill == 1.0, pr
    if mode == "circular" and pixel == (0, 0):
        assert pr.boundaries == ("circular",)
        assert pr.predicted == {"H": (0, 15), "W": (0, 15)}  # wraps: 12..15 and 0..4


def test_a_wrong_field_is_reported_not_hidden():
    class Flip(nn.Module):  # torch.flip has no rule: the field is global, the probe inside
        def forward(self, x, t):
            return torch.flip(x, dims=(-1,))

    tr = trace_model(Flip().eval(), (torch.randn(2, 1, 8, 8), torch.rand(2)))
    rf = receptive_field(tr)
    assert rf.partial
    assert probe_receptive_field(tr, rf, pixel=(0, 0)).inside
