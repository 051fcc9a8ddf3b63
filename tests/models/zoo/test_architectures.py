"""Shapes, fx traceability, parameter counts and receptive fields of the zoo networks."""

import pytest
import torch
import torch.fx as fx

from els_audit.models.zoo import AttentionUNet, PaperResNet, PaperUNet, count_parameters

CASES = [
    (PaperResNet, {}),
    (PaperResNet, {"padding_mode": "circular", "num_classes": 10}),
    (PaperUNet, {}),
    (PaperUNet, {"padding_mode": "circular", "num_classes": 10}),
    (AttentionUNet, {}),
    (AttentionUNet, {"num_classes": 10}),
]


@pytest.mark.parametrize("cls,kw", CASES, ids=lambda c: getattr(c, "__name__", str(c)))
def test_shape_trace_and_size(cls, kw):
    torch.manual_seed(0)
    m = cls(**kw).eval()
    x = torch.randn(2, 1, 16, 16)                                              # (B, C, H, W)
    t = torch.tensor([0.1, 0.9])                                               # (B,)
    label = torch.tensor([3, 7]) if kw.get("num_classes") else None
    with torch.no_grad():
        y = m(x, t, label)
        g = fx.symbolic_trace(m)
        y_fx = g(x, t, label)
    assert y.shape == x.shape
    assert torch.equal(y, y_fx)
    assert count_parameters(m) < 1_000_000
    if label is not None:  # the label changes the output
        with torch.no_grad():
            assert not torch.allclose(m(x, t, torch.tensor([4, 1])), y)


def test_paper_resnet_parameter_count_by_hand():
    # time MLP: 2 * (64*64 + 64) = 8320; up: 1*64*9 + 64 = 640;
    # 6 convs: 6 * (64*64*9 + 64) = 221568; 6 time projections: 6 * (64*64 + 64) = 24960;
    # down: 64*9 + 1 = 577.  Total 8320 + 640 + 221568 + 24960 + 577 = 256065.
    assert count_parameters(PaperResNet()) == 256065


def _grad_support(m, size, p):
    """Brute force: which input pixels move output pixel p (gradient != 0)."""
    x = torch.randn(1, 1, size, size, dtype=torch.float64, requires_grad=True)
    y = m(x, torch.tensor([0.5], dtype=torch.float64))
    y[0, 0, p[0], p[1]].backward()
    return (x.grad[0, 0] != 0).nonzero()


def test_paper_resnet_receptive_field_is_17px():
    # 8 convs of size 3 (up + 6 + down): 1 + 2*8 = 17 px, centred.
    torch.manual_seed(0)
    m = PaperResNet(width=8).double()
    nz = _grad_support(m, 33, (16, 16))
    assert nz[:, 0].min() == 8 and nz[:, 0].max() == 24
    assert nz[:, 1].min() == 8 and nz[:, 1].max() == 24
    # n_layers=2 -> 4 convs -> 9 px
    m2 = PaperResNet(width=8, n_layers=2).double()
    nz2 = _grad_support(m2, 33, (16, 16))
    assert nz2[:, 0].max() - nz2[:, 0].min() + 1 == 9


def test_circular_resnet_commutes_with_shifts_zero_padded_does_not():
    torch.manual_seed(0)
    x = torch.randn(1, 1, 16, 16, dtype=torch.float64)
    t = torch.tensor([0.3], dtype=torch.float64)
    circ = PaperResNet(width=8, padding_mode="circular").double()
    zero = PaperResNet(width=8).double()
    with torch.no_grad():
        for m, equivariant in ((circ, True), (zero, False)):
            a = m(torch.roll(x, (3, -5), (2, 3)), t)
            b = torch.roll(m(x, t), (3, -5), (2, 3))
            assert torch.allclose(a, b, atol=1e-10) == equivariant


def test_bad_settings_raise():
    with pytest.raises(ValueError, match="padding_mode"):
        PaperResNet(padding_mode="reflect")
    with pytest.raises(ValueError, match="time_dim must be even"):
        PaperUNet(time_dim=7)
    with pytest.raises(ValueError, match="channel_mults"):
        AttentionUNet(channel_mults=(1,))
