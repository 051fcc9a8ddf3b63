"""The theoretical receptive field of a traced network (see :mod:`.engine`).

Importing this package registers every receptive-field rule in :data:`RF_RULES`.
"""

from __future__ import annotations

from . import contract, rules  # noqa: F401 - registers the rules
from .effects import Effect, Flow, GlobalMix, RFAnnotation, SpatialInfo
from .engine import boundary_modes, receptive_field
from .layout import RuleContext
from .maps import AxisOp, PeriodicMap, Unsupported
from .result import AxisField, GlobalPath, ReceptiveFieldResult, UnsupportedOp
from .table import RF_RULES, rf_rule

__all__ = ["AxisOp", "PeriodicMap", "SpatialInfo", "Flow", "GlobalMix", "Effect", "RFAnnotation", "AxisField",
           "GlobalPath", "UnsupportedOp", "ReceptiveFieldResult", "Unsupported", "RuleContext", "RF_RULES",
           "rf_rule", "receptive_field", "boundary_modes"]
