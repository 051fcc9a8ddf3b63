"""The architecture probes: trace a denoiser, measure its receptive fields and where it
breaks translation equivariance.

Stages (each a module; results are plain dataclasses that serialise to JSON):

1. :mod:`.trace`: the network as an annotated FX graph (symbolic trace, else ``torch.export``),
   each node canonicalised by the op table in :mod:`.ops` into one of the declared kinds
   (:mod:`.kinds`);
2. :mod:`.rf`: the theoretical receptive field, exact per phase, with the global paths;
3. :mod:`.structure`: the structural equivariance verdict and its breakers (:mod:`.breakers`);
4. numerical probes on noisy inputs (:mod:`.inputs`): the effective receptive field per noise
   level (:mod:`.erf`), measured equivariance (:mod:`.measured`) and the gradient-support
   check of the theoretical field (:mod:`.gradient_probe`).
"""

from __future__ import annotations

from .breakers import EQ_RULES, Breaker, eq_rule
from .erf import ERFResult, effective_receptive_field, erf_side
from .gradient_probe import ProbeResult, probe_receptive_field, probe_receptive_fields
from .graph import to_networkx
from .kinds import OP_KINDS
from .measured import MeasuredEquivarianceResult, equivariance_measured
from .ops import OP_TABLE, OpInfo, register_op
from .rf import RF_RULES, ReceptiveFieldResult, boundary_modes, receptive_field, rf_rule
from .structure import VERDICTS, StructuralEquivarianceResult, equivariance_structure
from .trace import TraceError, TraceResult, trace_model

__all__ = [
    "trace_model", "TraceResult", "TraceError", "OpInfo", "OP_TABLE", "register_op", "OP_KINDS",
    "receptive_field", "ReceptiveFieldResult", "RF_RULES", "rf_rule", "boundary_modes",
    "equivariance_structure", "StructuralEquivarianceResult", "Breaker", "EQ_RULES", "eq_rule", "VERDICTS",
    "equivariance_measured", "MeasuredEquivarianceResult",
    "effective_receptive_field", "ERFResult", "erf_side",
    "probe_receptive_field", "probe_receptive_fields", "ProbeResult", "to_networkx",
]
