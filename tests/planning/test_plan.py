"""The plan: the ladder's order, given settings kept, the largest dictionary that fits."""

import pytest

from els_audit.planning import LADDER, MIN_DICTIONARY, Settings, StageCost, make_plan, reserve_seconds
from els_audit.planning.plan import MARGIN
from els_audit.planning.cost import Throughput

ALL_PLANNED = dict(data_limit=None, steps=None, calibration_seeds=None, seeds=None)


def _probe(seconds=1.0):
    z = (0.0, 0.0, 0.0, 0.0)
    return Throughput(kind="ELS", dictionary="periodic", n_probe=10, n_small=2, anchors=(0.1, 0.35, 0.65, 0.95), sweep_unit=z,
                      sweep_fixed=z, single_unit=z, single_fixed=z, diag_unit=0.0, diag_fixed=0.0, tree_unit=0.0,
                      tree_fixed=0.0, dict_unit=0.0, dict_fixed=0.0, is_unit=0.0, net_unit=0.0, nn_unit=0.0,
                      seconds=seconds, device="cpu")


def linear_cost(per_image_step_seed=1e-3, per_cal=2e-3):
    """A hand-checkable cost: calibration n*T*c, prediction n*T*s, novelty 0."""
    def cost(s: Settings) -> StageCost:
        return StageCost(per_cal * s.n_dictionary * s.steps * s.calibration_seeds,
                         per_image_step_seed * s.n_dictionary * s.steps * s.seeds, 0.0)
    return cost


def brute_force(budget, spent, probe_s, n_full, cost):
    """The plan by exhaustive search over the ladder in its priority order."""
    room = (budget - spent - probe_s - reserve_seconds(budget)) / MARGIN
    best_n = max([n for n in range(min(MIN_DICTIONARY, n_full), n_full + 1)
                  if cost(Settings(n, 10, 2, 8)).total <= room] or [min(MIN_DICTIONARY, n_full)])
    steps = max([v for v in LADDER["steps"] if cost(Settings(best_n, v, 2, 8)).total <= room] or [10])
    cal = max([v for v in LADDER["calibration_seeds"] if cost(Settings(best_n, steps, v, 8)).total <= room] or [2])
    seeds = max([v for v in LADDER["seeds"] if cost(Settings(best_n, steps, cal, v)).total <= room] or [8])
    return best_n, steps, cal, seeds


@pytest.mark.parametrize("budget", [60.0, 120.0, 300.0, 600.0, 3000.0, 30000.0])
def test_the_plan_raises_fidelity_in_order_data_steps_calibration_seeds(budget):
    cost = linear_cost()
    plan = make_plan(budget=budget, given=ALL_PLANNED, n_full=2000, spent=5.0, cost=cost, probe=_probe(2.0))
    n, steps, cal, seeds = brute_force(budget, 5.0, 2.0, 2000, cost)
    s = plan.settings
    # the affine solve may round the dictionary down to a multiple of 10; never above what fits
    assert s.n_dictionary <= n and n - s.n_dictionary < 10
    if s.n_dictionary == n:
        assert (s.steps, s.calibration_seeds, s.seeds) == (steps, cal, seeds)
    assert plan.fits == (cost(s).total * MARGIN <= budget - 7.0 - reserve_seconds(budget))


def test_whole_set_first_then_steps():
    # the whole set fits at 10 steps but not at 20: the data wins, steps stay at 10
    room = (600.0 - reserve_seconds(600.0)) / MARGIN
    per = room / (1000 * 10 * 8) * 0.9                       # 10 steps x 8 seeds fill 90 % of the room
    plan = make_plan(budget=600.0, given=ALL_PLANNED, n_full=1000, spent=0.0,
                     cost=linear_cost(per_image_step_seed=per, per_cal=0.0), probe=_probe(0.0))
    assert plan.settings == Settings(1000, 10, 8, 8)     # calibration seeds are free here: raised to 8
    assert plan.data_limit == 0 and plan.fits
    assert plan.cuts == ("steps 10 of 20 (to fit the 600s budget)", "seeds 8 of 100 (to fit the 600s budget)")


def test_given_settings_are_never_changed():
    given = dict(data_limit=50, steps=4, calibration_seeds=None, seeds=3)
    plan = make_plan(budget=1.0, given=given, n_full=1000, spent=100.0, cost=linear_cost(), probe=_probe())
    assert (plan.settings.n_dictionary, plan.settings.steps, plan.settings.seeds) == (50, 4, 3)
    assert plan.planned == ("calibration_seeds",) and not plan.fits
    assert "dictionary 50 of 1000 training images (as given)" in plan.cuts
    assert plan.data_limit == 50


def test_no_budget_is_full_fidelity():
    plan = make_plan(budget=None, given=ALL_PLANNED, n_full=777, spent=3.0, cost=linear_cost(), probe=None)
    assert plan.settings == Settings(777, 20, 8, 100) and plan.cuts == () and plan.predicted is None
    assert plan.to_dict()["stages"]["predict"] == {"predicted_s": None, "measured_s": None, "ratio": None}


def test_a_budget_too_small_keeps_the_least_faithful_settings_and_says_so():
    plan = make_plan(budget=10.0, given=ALL_PLANNED, n_full=5000, spent=9.0, cost=linear_cost(), probe=_probe())
    assert plan.settings == Settings(MIN_DICTIONARY, 10, 2, 8) and not plan.fits
    assert any("over the budget" in line for line in plan.lines())


def test_seeds_stay_below_the_calibration_seeds():
    plan = make_plan(budget=None, given=ALL_PLANNED, n_full=100, spent=0.0, cost=linear_cost(), probe=None,
                     seed_cap=40)
    assert plan.settings.seeds == 32


def test_the_summary_compares_predicted_and_measured_per_stage():
    plan = make_plan(budget=600.0, given=ALL_PLANNED, n_full=300, spent=1.0, cost=linear_cost(), probe=_probe())
    d = plan.to_dict({"calibrate": 3.0, "predict": 10.0})
    pred = d["stages"]["predict"]["predicted_s"]
    assert d["stages"]["predict"]["ratio"] == pytest.approx(10.0 / pred, rel=1e-2)
    assert d["stages"]["novelty"]["measured_s"] is None
    assert d["predicted_total_s"] == pytest.approx(1.0 + 1.0 + plan.predicted.total, abs=0.01)
