import pytest
import torch

from els_audit import ddim_sample, get_schedule, initial_noise, time_grid
from els_audit.machines import build_machine, scale_schedule_eps


def test_ddim_with_exact_eps_of_a_point_mass_lands_on_it():
    # Data = a single image x*: then x_t = a x* + b eps exactly, the true eps is
    # (x - a x*)/b, and each DDIM step maps x_t to a_{t'} x* + b_{t'} eps, so the last
    # step (a = 1, b = 0) returns x* up to rounding.
    sched = get_schedule("cosine-legacy")
    xstar = torch.linspace(-1, 1, 12, dtype=torch.float64).reshape(1, 1, 3, 4)

    def eps(x, t, label):
        a, b = sched.alpha_sigma(t)
        return (x - a[:, None, None, None] * xstar) / b[:, None, None, None]

    res = ddim_sample(eps, initial_noise([0, 1], (1, 3, 4), dtype=torch.float64), steps=7, capture=True)
    assert torch.allclose(res.x0, xstar.expand(2, 1, 3, 4), atol=1e-12)
    assert res.xs.shape == (8, 2, 1, 3, 4) and res.eps.shape == (7, 2, 1, 3, 4)
    assert res.times == tuple(time_grid(7))


def test_grid_and_noise_are_deterministic_per_seed():
    assert time_grid(4) == [1.0, 0.75, 0.5, 0.25, 0.0]
    a = initial_noise([5, 6], (1, 4, 4))
    b = initial_noise([6], (1, 4, 4))
    assert torch.equal(a[1], b[0])
    with pytest.raises(ValueError):
        time_grid(0)


def test_is_machine_sampling_memorises_a_training_image():
    # The ideal score's reverse process ends on a training image (memorisation).
    g = torch.Generator().manual_seed(0)
    imgs = torch.rand(5, 1, 6, 6, generator=g, dtype=torch.float64) * 2 - 1
    m = build_machine("IS", imgs)
    out = ddim_sample(m.eps, initial_noise([0, 1, 2], (1, 6, 6), dtype=torch.float64), steps=20).x0
    d = torch.cdist(out.reshape(3, -1), imgs.reshape(5, -1)).min(1).values
    assert torch.all(d < 1e-3)


def test_scale_schedule_uses_scale_i_minus_1_at_t_i():
    imgs = torch.rand(3, 1, 5, 5, dtype=torch.float64) * 2 - 1
    m = build_machine("ELS", imgs)
    used = []
    orig = m.eps
    m.eps = lambda x, t, label=None, k=None: (used.append(k), orig(x, t, label=label, k=k))[1]
    eps = scale_schedule_eps(m, [3, 5, 7, 9], 4)
    ddim_sample(eps, initial_noise([0], (1, 5, 5), dtype=torch.float64), steps=4)
    assert used == [9, 7, 5, 3]   # t = 1, 0.75, 0.5, 0.25
    with pytest.raises(ValueError, match="one scale per step"):
        scale_schedule_eps(m, [3, 5], 4)
