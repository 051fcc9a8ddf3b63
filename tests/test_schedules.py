import math

import pytest
import torch

from els_audit import SCHEDULES, get_schedule
from els_audit.schedules import NoiseSchedule


def test_cosine_legacy_matches_published_values():
    # docs/theory.md: a(1) = 0.0125, a(0.95) = 0.090, abar(0.5) = 0.506, abar(0.05) = 0.994
    s = get_schedule("cosine-legacy")
    a, b = s.alpha_sigma(torch.tensor([1.0, 0.95, 0.5, 0.05], dtype=torch.float64))
    assert a[0].item() == pytest.approx(0.0125, abs=5e-5)
    assert a[1].item() == pytest.approx(0.090, abs=5e-4)
    assert (a[2] ** 2).item() == pytest.approx(0.506, abs=5e-4)
    assert (a[3] ** 2).item() == pytest.approx(0.994, abs=5e-4)
    assert torch.allclose(a**2 + b**2, torch.ones(4, dtype=torch.float64))


def test_linear_matches_ddpm_products_at_integer_steps():
    s = get_schedule("linear")
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    for n in (0, 9, 499, 999):
        abar = torch.prod(1 - betas[: n + 1])            # index n sits at t = (n + 1)/1000
        a, _ = s.alpha_sigma(torch.tensor((n + 1) / 1000, dtype=torch.float64))
        assert (a**2).item() == pytest.approx(abar.item(), rel=1e-10)
    assert s.t_to_index(0.5).item() == 499
    assert s.index_to_t(499).item() == pytest.approx(0.5)
    assert s.alpha_sigma(0.0)[0].item() == 1.0


def test_improved_cosine_is_clipped_but_positive_at_one():
    s = get_schedule("cosine")
    a, b = s.alpha_sigma(torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64))
    f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    assert (a[1] ** 2).item() == pytest.approx(f(0.5) / f(0.0), rel=1e-9)
    assert 0 < a[2].item() < 1e-3 and b[2].item() < 1.0


def test_registry_lists_builtins_and_refuses_duplicates():
    assert {"cosine-legacy", "cosine", "linear"} <= set(SCHEDULES.names())
    assert SCHEDULES.origin("cosine-legacy").startswith("els_audit_plugins.schedules:")

    @SCHEDULES.register("test-constant")
    class Half(NoiseSchedule):
        name = "test-constant"

        def alpha_bar_f64(self, t):
            return torch.full_like(t, 0.5)

    try:
        assert get_schedule("test-constant").alpha_sigma(0.3)[0].item() == pytest.approx(math.sqrt(0.5))
        with pytest.raises(ValueError, match="registered twice"):
            SCHEDULES.register("test-constant")(Half)
    finally:
        SCHEDULES.unregister("test-constant")
    with pytest.raises(ValueError, match="unknown noise schedule 'nope'; known: cosine"):
        get_schedule("nope")


def test_t_outside_unit_interval_is_refused():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        get_schedule("cosine-legacy").alpha_sigma(1.2)
