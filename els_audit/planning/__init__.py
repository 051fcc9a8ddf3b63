"""Planning an audit within a time budget: the cost model (:mod:`.cost`: a short probe of
this machine's engine, and the predicted seconds of each stage) and the plan (:mod:`.plan`:
the most faithful settings that fit)."""

from .cost import PROBE_ANCHORS, Settings, StageCost, Throughput, grid_scales, predict_costs, probe_throughput
from .plan import LADDER, MIN_DICTIONARY, Plan, make_plan, reserve_seconds

__all__ = ["Throughput", "StageCost", "Settings", "probe_throughput", "predict_costs", "grid_scales",
           "PROBE_ANCHORS", "Plan", "make_plan", "LADDER", "MIN_DICTIONARY", "reserve_seconds"]
