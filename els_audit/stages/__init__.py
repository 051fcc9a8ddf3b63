"""The audit's stages, each a function with a typed result; :mod:`els_audit.audit` composes them.

1. :func:`load_inputs` (:mod:`.inputs`): model, data, adapter, labels -> :class:`Inputs`;
2. :func:`run_probes` (:mod:`.probes`): trace, receptive field, verdict, field probe, ERF,
   shift tests -> :class:`Probes`;
3. :func:`choose_machine` (:mod:`.machine`): the machine the verdict calls for ->
   :class:`MachineChoice`.

:class:`Clock` (:mod:`.clock`) times each stage and reports progress lines.
"""

from .clock import Clock, ProgressFn
from .inputs import Inputs, check_scales_fit, data_spec, label_effect, load_inputs
from .machine import MachineChoice, choose_machine
from .probes import FIELD_PROBE_PIXELS, Probes, frozen, run_probes

__all__ = ["Clock", "ProgressFn", "Inputs", "load_inputs", "label_effect", "check_scales_fit", "data_spec",
           "Probes", "run_probes", "frozen", "FIELD_PROBE_PIXELS", "MachineChoice", "choose_machine"]
