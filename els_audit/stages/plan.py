"""Stage 3 of an audit: the plan.  Before any heavy work, measure this machine's engine with a
short probe, predict each remaining stage's cost, and choose the most faithful settings that
fit the budget (:mod:`els_audit.planning`); the settings the user gave are kept."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch

from ..config import PLANNED
from ..machines.supports import erf_supports
from ..planning import Plan, Settings, Throughput, make_plan, predict_costs, probe_throughput
from .clock import Clock
from .inputs import Inputs
from .machine import choose_machine, ray_integration, scale_candidates
from .probes import Probes

#: the most dictionary images the cost probe uses, and the time it may take: 5 % of the
#: budget, but at least 15 s (a bbELS dictionary's fixed costs take seconds even on a few
#: images, and a probe that stops at 8 images mispredicted a 2-minute audit by 2x), and
#: never more than a fifth of the budget
PROBE_IMAGES = 400


def probe_seconds(budget: float) -> float:
    """About how long the cost probe may take within ``budget`` seconds."""
    return min(max(0.05 * budget, 15.0), 0.2 * budget)


#: the share of the ideal speed-up the Ray shards were measured to reach, the smallest seen,
#: so that a plan with --ray errs on the safe side: 2 one-CPU actors on this 2-core machine
#: (the driver, its network and Ray's own processes on the same cores) gave 1.3x on the
#: calibration and 1.5x on the prediction of the README's audit at 500 images (many short
#: calls), and 1.95x on one CIFAR-10 evaluation at 5,000 images (bench/README.md)
RAY_EFFICIENCY = 0.65


def ray_workers(cfg, clock: Clock) -> float:
    """How many times this process's engine the machines will run at: 1 in this process; with
    ``--ray``, the cluster's CPUs over this process's torch threads times
    :data:`RAY_EFFICIENCY` (the report's predicted against measured seconds show how well)."""
    if cfg.ray is None:
        return 1.0
    resources = ray_integration().connect(cfg.ray)
    ideal = float(resources.get("CPU", 1.0)) / torch.get_num_threads()
    workers = max(1.0, RAY_EFFICIENCY * ideal)
    clock.say(f"plan: the machines will run on Ray ({resources.get('CPU', 0):g} CPUs): predicted at {workers:.2g}x "
              "this process's engine")
    return workers


def plan_audit(cfg, clock: Clock, inp: Inputs, probes: Probes) -> tuple[Plan, Any]:
    """(the :class:`Plan`, ``cfg`` with the planned settings filled in).

    ``probes`` must hold the ERF on the finest grid the plan may choose (20 steps unless
    ``cfg.steps`` is given)."""
    given = {k: getattr(cfg, k) for k in PLANNED}
    n_full = len(inp.full)
    spent = clock.elapsed()
    fine = probes.predicted                           # per step of the fine grid, index 0 = least noise
    # NB: a conditional query meets only its class's images: the cost scales with that share
    label, share = None, 1.0
    if inp.conditional:
        label = inp.label if inp.label is not None else inp.classes[0]
        counts = inp.full.label_counts()
        share = counts[label] / n_full if inp.label is not None else 1.0 / len(inp.classes)
    tp: Optional[Throughput] = None
    # NB: calibration seeds cost nothing when the scales are given or the ERF's (no calibration)
    calibrates = cfg.scales in ("auto", "calibrate")
    open_costly = [k for k, v in given.items() if v is None and (k != "calibration_seeds" or calibrates)]
    if cfg.budget is not None and open_costly:
        kind = choose_machine(probes.structure, cfg.machine, cfg.dictionary).kind
        cands = scale_candidates(cfg, inp.shape, fine)[0] if cfg.scales in ("auto", "calibrate") else None
        clock.say(f"plan: probing this machine's engine ({kind}, up to {min(PROBE_IMAGES, n_full)} images, "
                  f"about {probe_seconds(cfg.budget):.0f}s) ...")
        tp = probe_throughput(kind, inp.train_images, inp.full.labels if inp.conditional else None,
                              schedule=inp.den.schedule, dictionary=cfg.dictionary, predicted=fine,
                              candidates=cands, eps_fn=inp.eps_fn, n_probe=PROBE_IMAGES, seed=cfg.data_seed,
                              label=label, target_seconds=probe_seconds(cfg.budget),
                              device="cpu" if cfg.ray is not None else str(inp.device))  # Ray shards: CPUs

    workers = ray_workers(cfg, clock) if tp is not None else 1.0

    window_of = None
    if cfg.support == "erf-area" and probes.erf is not None and probes.erf.x0_maps is not None:
        widened = erf_supports(probes.erf, "erf-area")             # the fine grid: every plan's times are on it
        window_of = lambda t, k: widened.window(t, k)[0]  # noqa: E731

    def cost(s: Settings):
        return predict_costs(tp, s, shape=inp.shape, predicted_fine=fine, scales_mode=cfg.scales,
                             spread=cfg.spread, n_train=n_full, share=share, workers=workers,
                             support=cfg.support, window_of=window_of)

    plan = make_plan(budget=cfg.budget, given=given, n_full=n_full, spent=spent, cost=cost, probe=tp,
                     seed_cap=10_000 - cfg.seed_offset)
    if tp is not None:
        clock.timings["plan"] = tp.seconds
    if plan.predicted is not None:
        clock.planned.update(calibrate=plan.predicted.calibrate, predict=plan.predicted.predict)
    for line in plan.lines():
        clock.say(line)
    s = plan.settings
    resolved = dataclasses.replace(cfg, data_limit=plan.data_limit, steps=s.steps,
                                   calibration_seeds=s.calibration_seeds, seeds=s.seeds)
    return plan, resolved
