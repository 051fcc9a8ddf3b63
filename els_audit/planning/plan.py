"""The plan: the most faithful settings whose predicted cost fits the audit's time budget.

Fidelity is raised in a fixed order, each setting as far as the budget allows before the
next is touched (the order of what matters most to the answer):

1. the dictionary: the whole training set, else the largest seeded subset that fits;
2. steps: 20 (the paper's grid), else 10;
3. calibration seeds: 8, 4 or 2;
4. evaluation seeds: 100, 64, 32, 16 or 8.

A setting the user gave is never changed.  Without a budget the plan is full fidelity.
The cost of each candidate setting is :func:`els_audit.planning.cost.predict_costs` on
what the probe measured; the plan keeps a reserve for writing the outputs and fits the
predicted seconds with a margin (:data:`MARGIN`) against the probe's noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence

from .cost import Settings, StageCost, Throughput

__all__ = ["Plan", "make_plan", "LADDER", "MIN_DICTIONARY", "reserve_seconds"]

#: the values each setting may take, least faithful first (the top is full fidelity)
LADDER = {"steps": (10, 20), "calibration_seeds": (2, 4, 8), "seeds": (8, 16, 32, 64, 100)}
#: the smallest dictionary a plan cuts to (fewer images make the machine a caricature)
MIN_DICTIONARY = 100
#: the stages the plan predicts, in the order they run (names as in the audit's timings)
STAGES = ("calibrate", "predict", "novelty")


#: the predicted stage seconds are taken this much larger when fitting them in the budget:
#: the probe's own noise on a shared machine (measured runs came within about 10 %)
MARGIN = 1.1


def reserve_seconds(budget: float) -> float:
    """Seconds kept back for writing the report and the summary (5 % of the budget + 3 s)."""
    return 0.05 * budget + 3.0


@dataclass(frozen=True)
class Plan:
    """The settings an audit runs with, and why.

    Attributes:
        budget: seconds the whole audit may take (``None``: no limit).
        settings: what was chosen (``n_dictionary`` images, steps, seeds).
        planned: the settings the plan chose (the others were given).
        cuts: one line per setting below full fidelity, with the reason.
        predicted: seconds per stage still to run (``None`` when nothing was probed).
        spent: seconds the audit had run when the plan was made (load and probes).
        probe: what the cost probe measured (``None`` when it did not run).
        fits: whether the predicted total fits the budget.
        n_full: images in the training set.
    """

    budget: Optional[float]
    settings: Settings
    planned: tuple[str, ...]
    cuts: tuple[str, ...]
    predicted: Optional[StageCost]
    spent: float
    probe: Optional[Throughput]
    fits: bool
    n_full: int

    @property
    def data_limit(self) -> int:
        """The config's ``data_limit`` for the chosen dictionary (0 = the whole set)."""
        n = self.settings.n_dictionary
        return 0 if n >= self.n_full else n

    def predicted_total(self) -> Optional[float]:
        """Predicted seconds of the whole audit (what ran before + probe + stages)."""
        if self.predicted is None:
            return None
        return self.spent + (self.probe.seconds if self.probe else 0.0) + self.predicted.total

    def lines(self) -> list[str]:
        """The plan as printed before the heavy work: settings, then one line per stage."""
        s = self.settings
        head = (f"plan: dictionary {s.n_dictionary} of {self.n_full} images, {s.steps} steps, "
                f"{s.calibration_seeds} calibration seeds, {s.seeds} seeds")
        if self.budget is not None:
            head += f" (budget {self.budget:.0f}s)"
        out = [head]
        if self.predicted is not None:
            for name in STAGES:
                out.append(f"  {name}: predicted {getattr(self.predicted, name):.1f}s")
            out.append(f"  whole audit: predicted {self.predicted_total():.1f}s"
                       + ("" if self.fits else " -- over the budget even at the least faithful settings"))
        out.extend(f"  cut: {c}" for c in self.cuts)
        return out

    def to_dict(self, timings: Optional[Mapping[str, float]] = None) -> dict:
        """JSON: the plan, and per stage the predicted against the measured seconds."""
        timings = dict(timings or {})
        stages = {}
        for name in STAGES:
            pred = None if self.predicted is None else round(getattr(self.predicted, name), 2)
            meas = timings.get(name)
            stages[name] = {"predicted_s": pred, "measured_s": None if meas is None else round(float(meas), 2),
                            "ratio": (round(float(meas) / pred, 3) if meas is not None and pred else None)}
        return {
            "budget_s": self.budget,
            "settings": self.settings.to_dict(),
            "n_full": self.n_full,
            "planned": list(self.planned),
            "given": [k for k in ("data_limit", "steps", "calibration_seeds", "seeds") if k not in self.planned],
            "cuts": list(self.cuts),
            "fits": self.fits,
            "spent_before_plan_s": round(self.spent, 2),
            "predicted_total_s": None if self.predicted is None else round(self.predicted_total(), 2),
            "stages": stages,
            "probe": None if self.probe is None else self.probe.to_dict(),
        }


def make_plan(*, budget: Optional[float], given: Mapping[str, Optional[int]], n_full: int, spent: float,
              cost: Callable[[Settings], StageCost], probe: Optional[Throughput],
              seed_cap: int = 10_000) -> Plan:
    """Choose the settings.

    Args:
        budget: seconds for the whole audit, or ``None`` (full fidelity).
        given: ``data_limit`` (0 = whole set), ``steps``, ``calibration_seeds``, ``seeds``
            as the user gave them (``None`` = the plan chooses).
        n_full: images in the training set.
        spent: seconds already spent (load and probes).
        cost: predicted stage seconds at given settings (from the probe).
        probe: the probe's measurements (``None`` when there was nothing to choose or no
            budget); its own seconds count as spent.
        seed_cap: the most evaluation seeds allowed (seeds stay below 10000).
    Returns:
        :class:`Plan`.
    """
    planned = tuple(k for k in ("data_limit", "steps", "calibration_seeds", "seeds") if given.get(k) is None)
    ladder = {k: tuple(v for v in vals if k != "seeds" or v <= seed_cap) or (seed_cap,)
              for k, vals in LADDER.items()}

    def fixed_n() -> Optional[int]:
        lim = given.get("data_limit")
        return None if lim is None else (n_full if lim == 0 else min(int(lim), n_full))

    def pick(name: str, top: bool) -> int:
        v = given.get(name)
        return int(v) if v is not None else ladder[name][-1 if top else 0]

    if budget is None or probe is None:
        s = Settings(fixed_n() or n_full, pick("steps", True), pick("calibration_seeds", True), pick("seeds", True))
        pred = None if probe is None else cost(s)
        return Plan(budget, s, planned, _cuts(s, n_full, ladder, planned, budget), pred, spent, probe,
                    True, n_full)
    room = (budget - spent - probe.seconds - reserve_seconds(budget)) / MARGIN
    s = Settings(fixed_n() or n_full, pick("steps", False), pick("calibration_seeds", False), pick("seeds", False))
    if fixed_n() is None:
        s = _largest_dictionary(s, n_full, room, cost)
    for name in ("steps", "calibration_seeds", "seeds"):
        if name not in planned:
            continue
        for v in ladder[name][1:]:
            trial = Settings(**{**s.to_dict(), name: v})
            if cost(trial).total > room:
                break
            s = trial
    pred = cost(s)
    return Plan(budget, s, planned, _cuts(s, n_full, ladder, planned, budget), pred, spent, probe,
                pred.total <= room, n_full)


def _largest_dictionary(s: Settings, n_full: int, room: float, cost: Callable[[Settings], StageCost]) -> Settings:
    """``s`` with the whole set if it fits, else the largest subset that does (the cost is
    affine in the dictionary size), never below :data:`MIN_DICTIONARY` images."""
    whole = Settings(n_full, s.steps, s.calibration_seeds, s.seeds)
    if cost(whole).total <= room:
        return whole
    lo = min(MIN_DICTIONARY, n_full)
    c_lo = cost(Settings(lo, s.steps, s.calibration_seeds, s.seeds)).total
    slope = (cost(whole).total - c_lo) / max(1, n_full - lo)
    n = lo if slope <= 0 else lo + int(math.floor((room - c_lo) / slope))
    n = max(lo, min(n_full, n))
    if n > 100:
        n -= n % 10                         # a round number: the plan is an estimate anyway
    return Settings(n, s.steps, s.calibration_seeds, s.seeds)


def _cuts(s: Settings, n_full: int, ladder: Mapping[str, Sequence[int]], planned: Sequence[str],
          budget: Optional[float]) -> tuple[str, ...]:
    """What is below full fidelity, in words (given settings say so; planned ones name the budget)."""
    why_budget = f"to fit the {budget:.0f}s budget" if budget is not None else ""
    out = []

    def why(name: str) -> str:
        return why_budget if name in planned else "as given"

    if s.n_dictionary < n_full:
        out.append(f"dictionary {s.n_dictionary} of {n_full} training images ({why('data_limit')})")
    for name, label in (("steps", "steps"), ("calibration_seeds", "calibration seeds"), ("seeds", "seeds")):
        top = ladder[name][-1]
        v = getattr(s, name)
        if v < top:
            out.append(f"{label} {v} of {top} ({why(name)})")
    return tuple(out)
