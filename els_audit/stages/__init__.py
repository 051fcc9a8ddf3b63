"""The audit's stages, each a function with a typed result; :mod:`els_audit.audit` composes them.

1. :func:`load_inputs` (:mod:`.inputs`): model, data, adapter, labels -> :class:`Inputs`;
2. :func:`run_probes` (:mod:`.probes`): trace, receptive field, verdict, field probe, ERF,
   shift tests -> :class:`Probes`;
3. :func:`plan_audit` (:mod:`.plan`): a short probe of the engine, each stage's predicted
   cost, and the most faithful settings that fit the budget -> :class:`~els_audit.planning.Plan`;
   :func:`settle_inputs` then fixes the dictionary and the seeds' labels;
4. :func:`fit_machine` (:mod:`.machine`): the machine the verdict calls for
   (:func:`choose_machine`), built over the dictionary, and its scales -> :class:`FittedMachine`;
5. :func:`run_prediction` (:mod:`.outcome`): network, machine and IS from the same seeds;
6. :func:`run_novelty` (:mod:`.outcome`): copy test, mosaic, locality map -> :class:`Novelty`;
   :func:`published_match`: the closest published number.

:class:`Clock` (:mod:`.clock`) times each stage and reports progress lines.
"""

from .clock import Clock, ProgressFn
from .inputs import Inputs, check_scales_fit, data_spec, label_effect, load_inputs, settle_inputs
from .machine import FittedMachine, MachineChoice, choose_machine, fit_machine
from .plan import plan_audit
from .outcome import Novelty, published_match, run_novelty, run_prediction
from .probes import FIELD_PROBE_PIXELS, Probes, frozen, run_probes

__all__ = ["Clock", "ProgressFn", "Inputs", "load_inputs", "label_effect", "check_scales_fit", "data_spec",
           "Probes", "run_probes", "frozen", "FIELD_PROBE_PIXELS", "MachineChoice", "choose_machine",
           "FittedMachine", "fit_machine", "run_prediction", "Novelty", "run_novelty", "published_match",
           "settle_inputs", "plan_audit"]
