"""The adapter settings a model needs, in one place, and the error every model-side step raises.

The names and vocabularies here are what :mod:`.loading`, :mod:`.sidecar`, :mod:`.adapter`,
the zoo catalogue and the command line's choice lists all read, so a setting is spelled
once: ``call_style`` (``x-t`` | ``t-x`` | ``diffusers``), ``time_input`` (``unit`` |
``index`` | ``sigma``), ``prediction`` (``eps`` | ``x0`` | ``v`` | ``score``),
``schedule``, ``num_train_steps`` and ``data_range``.  The CLI flag of a setting is ``--``
plus its name with ``_`` -> ``-`` (:func:`flag`).
"""

from __future__ import annotations

import math
from typing import Any, Optional

__all__ = [
    "ModelLoadError",
    "CALL_STYLES",
    "TIME_INPUTS",
    "PREDICTIONS",
    "PREDICTION_ALIASES",
    "SETTING_NAMES",
    "MAX_TRAIN_STEPS",
    "flag",
    "validate_setting",
]

CALL_STYLES = ("x-t", "t-x", "diffusers")
TIME_INPUTS = ("unit", "index", "sigma")
PREDICTIONS = ("eps", "x0", "v", "score")
#: diffusers' names for the predictions (``prediction_type`` of a scheduler config).
PREDICTION_ALIASES = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}
#: the most training steps a model's schedule may have (its tables are allocated from it)
MAX_TRAIN_STEPS = 100_000
#: settings the adapter resolves (CLI flag = ``--`` + name with ``_`` -> ``-``).
SETTING_NAMES = ("call_style", "time_input", "prediction", "schedule", "num_train_steps", "data_range")


class ModelLoadError(ValueError):
    """A model could not be loaded or adapted; the message is one line naming the file,
    the problem and the flag that may fix it."""

    def __init__(self, path: Any, problem: str, fix: Optional[str] = None):
        self.path = str(path)
        self.problem = problem
        self.fix = fix
        msg = f"{self.path}: {problem}" + (f"; {fix}" if fix else "")
        super().__init__(" ".join(msg.split()))  # one line, always


def flag(name: str) -> str:
    """CLI flag spelling of a setting name."""
    return "--" + name.replace("_", "-")


def validate_setting(name: str, value: Any, where: str) -> Any:
    """Check and normalise one adapter setting; ``where`` names its origin for messages.

    Raises:
        ModelLoadError: the value is not allowed.
    """
    if value is None:
        return None
    if name == "call_style":
        if callable(value) or value in CALL_STYLES:
            return value
        raise ModelLoadError(where, f"call_style {value!r} is not one of {', '.join(CALL_STYLES)}", f"fix {flag(name)}")
    if name == "time_input":
        if value in TIME_INPUTS:
            return value
        raise ModelLoadError(where, f"time_input {value!r} is not one of {', '.join(TIME_INPUTS)}", f"fix {flag(name)}")
    if name == "prediction":
        value = PREDICTION_ALIASES.get(value, value)
        if value in PREDICTIONS:
            return value
        raise ModelLoadError(where, f"prediction {value!r} is not one of {', '.join(PREDICTIONS)}", f"fix {flag(name)}")
    if name == "schedule":
        if isinstance(value, str) or hasattr(value, "alpha_sigma"):
            return value
        raise ModelLoadError(where, f"schedule must be a schedule name, got {value!r}", f"fix {flag(name)}")
    if name == "num_train_steps":
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_TRAIN_STEPS:
            raise ModelLoadError(where, f"num_train_steps must be an integer from 1 to {MAX_TRAIN_STEPS}, got {value!r}",
                                 f"fix {flag(name)}")
        return value
    if name == "data_range":
        if isinstance(value, str):
            value = value.split(",")
        try:
            lo, hi = (float(v) for v in value)
        except (TypeError, ValueError):
            raise ModelLoadError(where, f"data_range must be two numbers LO,HI, got {value!r}", f"fix {flag(name)}") from None
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise ModelLoadError(where, f"data_range needs finite LO < HI, got {lo},{hi}", f"fix {flag(name)}")
        return (lo, hi)
    raise ModelLoadError(where, f"unknown setting {name!r}; known: {', '.join(SETTING_NAMES)}")
