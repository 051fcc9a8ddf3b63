"""The denoiser adapter: any loaded model -> one interface ``eps(x, t, label=None)``.

References:
- docs/theory.md section 1: VP forward process ``x_t = a_t x_0 + b_t eps`` (a_t^2 + b_t^2 = 1);
  a score gives ``eps = -b_t s``.
- Salimans & Ho 2022 (v-prediction): ``v = a_t eps - b_t x_0``, hence
  ``eps = a_t v + b_t x_t`` (using a^2 + b^2 = 1).
- Karras et al. 2022 (EDM) / Song et al. 2021 (VE): ``x_ve = x_0 + sigma eps`` with
  ``sigma = b_t / a_t`` and ``x_ve = x_t / a_t``.

Interface: x (B, C, H, W) in the model's data range, t float (B,) in [0, 1] (the
sampler's unit time), label (B,) int64 or None; returns eps_hat (B, C, H, W).

What the adapter converts, each choice a setting (CLI flag in brackets):

- ``call_style`` [--call-style]: ``"x-t"`` = ``model(x, t[, label])``; ``"t-x"`` =
  ``model(t, x, label=label)`` (the paper's code); ``"diffusers"`` =
  ``model(sample, timestep, class_labels=label).sample``; or a Python callable
  ``f(module, x_in, time_in, label) -> output``.
- ``time_input`` [--time-input]: ``"unit"`` passes t; ``"index"`` passes the training-step
  index (float): ``t*T - 1`` for a discrete schedule (its index n sits at t = (n+1)/T),
  ``t*T`` for a continuous one (the paper's t = n/T); ``"sigma"`` passes
  ``sigma = b_t/a_t`` AND feeds ``x_t / a_t`` (the VE/EDM form of the same point).
- ``prediction`` [--prediction]: ``eps``; ``x0`` -> ``eps = (x_t - a x0) / b``;
  ``v`` -> ``eps = a v + b x_t``; ``score`` -> ``eps = -b s`` (``-sigma s`` with sigma input).
- ``schedule`` [--schedule], ``num_train_steps`` [--num-train-steps], ``data_range``
  [--data-range] (used to map [-1, 1] training images into the model's range for the
  sanity check and by callers via :meth:`Denoiser.to_model_range`).

Resolution order for each setting: explicit argument > sidecar > the model's own config
(diffusers, zoo) > detection (signature; a probe call) > default.  Defaults are written
into the result with the source "default" and listed in ``warnings``.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn

from ..console import text
from ..schedules import DiscreteSchedule, NoiseSchedule, get_schedule
from .loading import LoadedModel
from .settings import PREDICTIONS, TIME_INPUTS, ModelLoadError, flag, validate_setting

__all__ = [
    "Denoiser",
    "SanityReport",
    "make_denoiser",
    "sanity_check",
    "detect_call_style",
    "DEFAULTS",
    "ALTERNATIVE_FACTOR",
]

DEFAULTS: dict[str, Any] = {
    "time_input": "unit",
    "prediction": "eps",
    "schedule": "cosine-legacy",
    "num_train_steps": 1000,
    "data_range": (-1.0, 1.0),
}

#: a loaded model fails its sanity check when changing one setting would cut its
#: denoising error below this fraction of what it is (the setting is then likely wrong).
ALTERNATIVE_FACTOR = 0.5

_X_NAMES = {"x", "x_t", "xt", "x_noisy", "noisy", "sample", "samples", "img", "image", "images", "input", "inp", "z", "z_t"}
_T_NAMES = {"t", "time", "times", "timestep", "timesteps", "step", "steps", "sigma", "sigmas", "noise_level", "noise_labels", "s"}
_LABEL_NAMES = ("label", "labels", "y", "class_labels", "class_label", "cond", "c")


# ---------------------------------------------------------------------------- detection
def _arg_names(module: Any) -> Optional[list[str]]:
    """Positional argument names of ``module``'s call, or None when unknown."""
    if isinstance(module, torch.jit.ScriptModule):
        try:
            return [a.name for a in module.forward.schema.arguments][1:]
        except Exception:
            return None
    fn = module.forward if isinstance(module, nn.Module) else module
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    names = []
    for p in sig.parameters.values():
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            names.append(p.name)
        elif p.kind == p.VAR_POSITIONAL:
            return None
    return names


def _label_kw(module: Any) -> Optional[str]:
    names = _arg_names(module) or []
    for n in _LABEL_NAMES:
        if n in names:
            return n
    return None


def _is_diffusers(module: Any) -> bool:
    try:
        import diffusers
    except ImportError:
        return False
    return isinstance(module, diffusers.ModelMixin)


def detect_call_style(module: Any) -> tuple[Optional[str], str]:
    """Guess the call style from the module's type and argument names.

    Returns:
        (style or None, how it was decided / why not).
    """
    if _is_diffusers(module):
        return "diffusers", "diffusers model class"
    names = _arg_names(module)
    if names is None:
        return None, "the call signature cannot be read"
    if len(names) < 2:
        return None, f"the call takes {len(names)} positional argument(s) ({', '.join(names)})"
    a, b = names[0].lower(), names[1].lower()
    if a in _X_NAMES and b in _T_NAMES:
        return "x-t", f"argument names ({names[0]}, {names[1]})"
    if a in _T_NAMES and b in _X_NAMES:
        return "t-x", f"argument names ({names[0]}, {names[1]})"
    return None, f"argument names ({names[0]}, {names[1]}) do not say which is the image"


# ---------------------------------------------------------------------------- the denoiser
@dataclass(frozen=True)
class SanityReport:
    """The load-time check: one call on noisy training images at t, judged in the model's
    own output space against the trivial predictor there.

    ``space``: what the model predicts (eps, x0, v, score); ``trivial``: the trivial
    predictor it is compared with (``0``, or for x0 the better of 0 and the data mean);
    ``error_mse``: mean squared error of the model's output against the true target;
    ``trivial_mse``: that of the trivial predictor; ``ratio`` = error_mse / trivial_mse;
    ``passed``: finite, right shape, ratio < threshold, and no single-setting alternative
    does better than ``ALTERNATIVE_FACTOR * ratio``; ``alternatives``: ((setting, value,
    ratio), ...) for each alternative tried, each in its own output space.
    """

    t: float
    n_images: int
    space: str
    trivial: str
    error_mse: float
    trivial_mse: float
    ratio: float
    threshold: float
    passed: bool
    alternatives: tuple[tuple[str, str, float], ...] = ()

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["alternatives"] = [{"setting": n, "value": v, "ratio": r} for n, v, r in self.alternatives]
        return d


class Denoiser:
    """A model wrapped as ``eps(x, t, label=None)``; build with :func:`make_denoiser`.

    Attributes:
        module: the wrapped model.
        call_style, time_input, prediction: resolved settings (see module docstring).
        schedule: the :class:`NoiseSchedule` giving (a_t, b_t).
        num_train_steps: T for the index time input.
        data_range: (lo, hi) of the model's pixels.
        sources: {setting: where it came from}.
        warnings: settings that fell back to a default, with the flag to set them.
        sanity: the :class:`SanityReport`, or None when not run.
        source: the :class:`LoadedModel` it came from, or None.
    """

    def __init__(
        self,
        module: Any,
        *,
        call_style: Union[str, Callable],
        time_input: str,
        prediction: str,
        schedule: NoiseSchedule,
        num_train_steps: int,
        data_range: tuple[float, float],
        sources: Mapping[str, str],
        warnings: Sequence[str] = (),
        source: Optional[LoadedModel] = None,
    ):
        self.module = module
        self.call_style = call_style
        self.time_input = time_input
        self.prediction = prediction
        self.schedule = schedule
        self.num_train_steps = int(num_train_steps)
        self.data_range = (float(data_range[0]), float(data_range[1]))
        self.sources = dict(sources)
        self.warnings = tuple(warnings)
        self.sanity: Optional[SanityReport] = None
        self.source = source
        self._label_kw = _label_kw(module) if not callable(call_style) or isinstance(call_style, str) else None

    @property
    def where(self) -> str:
        return self.source.path if self.source is not None else type(self.module).__name__

    # -- conversions ---------------------------------------------------------------
    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        """The time value the model is fed for unit time t (B,) -> (B,)."""
        if self.time_input == "unit":
            return t
        if self.time_input == "index":
            T = self.num_train_steps
            if isinstance(self.schedule, DiscreteSchedule):
                # NB: index n of a discrete schedule sits at t = (n + 1) / T; fractional
                # indices between grid points are passed as they are (no rounding).
                return (t * T - 1).clamp(0, T - 1)
            return t * T  # the paper's t = n / T
        # NB: "sigma" is read as the VE/EDM form of the same point (x / a_t, sigma = b_t / a_t);
        # a model that takes VP x_t with a sigma label needs call_style as a callable.
        a, b = self.schedule.alpha_sigma(t.detach().to(torch.float64))
        return (b / a).to(t.dtype).to(t.device)                                 # sigma = b / a

    def to_model_range(self, images: torch.Tensor) -> torch.Tensor:
        """Map images in [-1, 1] (the project's convention) into the model's data range."""
        lo, hi = self.data_range
        return lo + (images + 1) * (hi - lo) / 2

    def call_args(self, x_in: torch.Tensor, time_in: torch.Tensor, label: Optional[torch.Tensor]
                  ) -> tuple[tuple, dict]:
        """The positional and keyword arguments the model is called with, by ``call_style``
        (the one dispatch: :meth:`output` and the tracer use it)."""
        style = self.call_style
        if style == "x-t":
            if label is None:
                return (x_in, time_in), {}
            return ((x_in, time_in), {self._label_kw: label}) if self._label_kw else ((x_in, time_in, label), {})
        if style == "t-x":
            return (time_in, x_in), ({} if label is None else {self._label_kw or "label": label})
        if style == "diffusers":
            # NB: a diffusers model returns a plain tuple with return_dict=False (what a tracer
            # wants); a model of another library called this way may not know the flag
            kw = {"return_dict": False} if _is_diffusers(self.module) else {}
            return (x_in, time_in), (kw if label is None else {"class_labels": label, **kw})
        raise ValueError(f"call_style {style!r} is a callable: it has no fixed arguments")

    def _call(self, x_in: torch.Tensor, time_in: torch.Tensor, label: Optional[torch.Tensor]) -> torch.Tensor:
        style = self.call_style
        if callable(style) and not isinstance(style, str):
            out = style(self.module, x_in, time_in, label)
        else:
            args, kwargs = self.call_args(x_in, time_in, label)
            out = self.module(*args, **kwargs)
        if hasattr(out, "sample") and not isinstance(out, torch.Tensor):
            out = out.sample
        elif isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
            out = out[0]
        if not isinstance(out, torch.Tensor):
            raise ModelLoadError(self.where, f"the model returned a {type(out).__name__}, not a tensor", f"check {flag('call_style')}")
        return out

    def _times(self, x: torch.Tensor, t) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """t as (B,), and a_t, b_t as (B, 1, 1, 1) in x's dtype and device."""
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])                                            # (B,)
        a, b = self.schedule.alpha_sigma(t.detach().to(torch.float64))
        a = a.to(x.dtype).to(x.device)[:, None, None, None]                     # (B, 1, 1, 1)
        b = b.to(x.dtype).to(x.device)[:, None, None, None]                     # (B, 1, 1, 1)
        return t, a, b

    def output(self, x: torch.Tensor, t: torch.Tensor, label: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The model's own prediction at x_t, in its own output space (``prediction``: eps,
        x0, v, or the score; with a sigma time input the VE form of the point is fed).

        Args, shapes: as :meth:`eps`.
        """
        t, a, _ = self._times(x, t)
        x_in = x / a if self.time_input == "sigma" else x                       # (B, C, H, W)
        out = self._call(x_in, self.model_time(t), label)                       # (B, C, H, W)
        if out.shape != x.shape:
            raise ModelLoadError(
                self.where, f"the model's output shape {tuple(out.shape)} differs from its input {tuple(x.shape)}",
                f"check {flag('call_style')} (is it a denoiser of these images?)",
            )
        return out

    def eps(self, x: torch.Tensor, t: torch.Tensor, label: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Predicted noise.

        Args:
            x: (B, C, H, W) noisy images x_t in the model's data range.
            t: (B,) float times in [0, 1] (a float is broadcast).
            label: (B,) int64 class labels, or None.

        Returns:
            eps_hat (B, C, H, W).
        """
        out = self.output(x, t, label)                                          # (B, C, H, W)
        _, a, b = self._times(x, t)
        if self.prediction == "eps":
            return out
        if self.prediction == "x0":
            # NB: divides by b_t, which vanishes at t = 0 (the sampler never calls there).
            return (x - a * out) / b
        if self.prediction == "v":
            return a * out + b * x
        # score
        if self.time_input == "sigma":
            return -(b / a) * out                                               # VE score wrt x / a
        return -b * out

    __call__ = eps

    def to_dict(self) -> dict:
        """Resolved settings and where each came from (JSON-safe)."""
        style = self.call_style if isinstance(self.call_style, str) else f"<callable {getattr(self.call_style, '__qualname__', '?')}>"
        return {
            "call_style": style,
            "time_input": self.time_input,
            "prediction": self.prediction,
            "schedule": self.schedule.to_dict() if hasattr(self.schedule, "to_dict") else str(self.schedule),
            "num_train_steps": self.num_train_steps,
            "data_range": list(self.data_range),
            "sources": dict(self.sources),
            "warnings": list(self.warnings),
            "sanity": self.sanity.to_dict() if self.sanity else None,
            "model": self.source.to_dict() if self.source is not None else None,
        }

    def __repr__(self) -> str:
        return (f"Denoiser(call_style={self.call_style!r}, time_input={self.time_input!r}, prediction={self.prediction!r}, "
                f"schedule={getattr(self.schedule, 'name', self.schedule)!r}, data_range={self.data_range})")

    def replace(self, **settings: Any) -> "Denoiser":
        """A copy with some settings changed (sources marked "argument"); no sanity check."""
        kw = dict(
            call_style=self.call_style, time_input=self.time_input, prediction=self.prediction, schedule=self.schedule,
            num_train_steps=self.num_train_steps, data_range=self.data_range,
        )
        for k, v in settings.items():
            v = validate_setting(k, v, flag(k))
            kw[k] = get_schedule(v) if k == "schedule" else v
        src = {**self.sources, **{k: "argument" for k in settings}}
        return Denoiser(self.module, **kw, sources=src, warnings=self.warnings, source=self.source)


# ---------------------------------------------------------------------------- sanity check
def _probe(module: Any, style: str, x: torch.Tensor, t: torch.Tensor) -> bool:
    """Does ``module`` accept (x, t) in this order and return x's shape?"""
    try:
        with torch.no_grad():
            den = Denoiser(module, call_style=style, time_input="unit", prediction="eps",
                           schedule=get_schedule("cosine-legacy"), num_train_steps=1000, data_range=(-1, 1), sources={})
            return den._call(x, t, None).shape == x.shape
    except Exception:
        return False


def _target(den: Denoiser, x0: torch.Tensor, eps: torch.Tensor, a: float, b: float
            ) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(true target, trivial prediction, its name) in the model's output space at x_t = a x0 + b eps.

    NB: the trivial predictor of eps, v and the score is 0 (their means); of x0 it is the
    better of 0 and the data's mean pixel, so a model in [0, 1] is not judged against 0."""
    if den.prediction == "eps":
        return eps, torch.zeros_like(eps), "0"
    if den.prediction == "v":
        v = a * eps - b * x0                                                    # Salimans & Ho 2022
        return v, torch.zeros_like(v), "0"
    if den.prediction == "score":
        s = -eps * (a / b) if den.time_input == "sigma" else -eps / b           # VE score wrt x/a, or VP
        return s, torch.zeros_like(s), "0"
    mean = torch.full_like(x0, float(x0.mean()))
    if float((x0 - mean).pow(2).mean()) < float(x0.pow(2).mean()):
        return x0, mean, "the data mean"
    return x0, torch.zeros_like(x0), "0"


@torch.no_grad()
def _error_ratio(den: Denoiser, x0: torch.Tensor, eps: torch.Tensor, t: float, labels: Optional[torch.Tensor] = None
                 ) -> tuple[torch.Tensor, float, float, str]:
    """(model output, its mse, the trivial predictor's mse, its name) in the model's output space."""
    a, b = (float(v) for v in den.schedule.alpha_sigma(t))
    x_t = a * x0 + b * eps                                                      # (N, C, H, W)
    out = den.output(x_t, torch.full((x0.shape[0],), t, dtype=x0.dtype, device=x0.device), labels)
    target, trivial, name = _target(den, x0, eps, a, b)
    err = float((out - target).pow(2).mean()) if torch.isfinite(out).all() else math.inf
    return out, err, float((trivial - target).pow(2).mean()), name


@torch.no_grad()
def sanity_check(
    den: Denoiser,
    images: torch.Tensor,
    *,
    labels: Optional[torch.Tensor] = None,
    t: float = 0.5,
    threshold: float = 0.8,
    seed: int = 0,
    diagnose: bool = True,
) -> SanityReport:
    """One call on noisy training images at t: finite, right shape, and far better than the
    trivial predictor in the model's own output space (an untrained model is not).

    Args:
        den: the denoiser.
        images: (N, C, H, W) clean training images in [-1, 1] (mapped to the model's range).
        labels: (N,) int64 class labels of ``images`` for a class-conditional model, else None.
        t: the time to test at.
        threshold: pass when the output's mse < threshold * the trivial predictor's (eps,
            v, score: 0; x0: the better of 0 and the data mean).
        seed: for the noise.
        diagnose: also try every single-setting alternative (prediction, time input, data
            range); fail when one does far better, and name it in the message.

    Returns:
        :class:`SanityReport` (also stored on ``den.sanity``).

    Raises:
        ModelLoadError: the model cannot be called on these images (a channel or size
            mismatch is named), non-finite output, wrong shape, no better than the trivial
            predictor, or one setting change does far better; the message names the likely
            wrong setting and its flag.
    """
    x0 = den.to_model_range(images)                                             # (N, C, H, W)
    g = torch.Generator().manual_seed(seed)
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64).to(x0.dtype).to(x0.device)
    try:
        out, err, zero, trivial = _error_ratio(den, x0, eps, t, labels)
    except ModelLoadError:
        raise
    except Exception as exc:   # the first call on the user's images: say what does not fit
        raise _call_failure(den, x0, t, exc, labels) from None
    if not torch.isfinite(out).all():
        bad = int((~torch.isfinite(out)).sum())
        raise ModelLoadError(
            den.where, f"the model's output has {bad} non-finite value(s) (NaN/inf) at t={t}",
            f"check {flag('data_range')} and {flag('time_input')} (or the weights are broken)",
        )
    ratio = err / zero if zero > 0 else math.inf
    alts: list[tuple[str, Any, float]] = []
    if diagnose:
        # Every single-setting alternative, evaluated on the same noisy images.
        alternatives = (
            [("prediction", p) for p in PREDICTIONS if p != den.prediction]
            + [("time_input", ti) for ti in TIME_INPUTS if ti != den.time_input]
            + [("data_range", r) for r in ((-1.0, 1.0), (0.0, 1.0)) if r != den.data_range]
        )
        for name, value in alternatives:
            try:
                alt = den.replace(**{name: value})
                _, e2, z2, _ = _error_ratio(alt, alt.to_model_range(images), eps, t, labels)
            except Exception:  # an alternative the model cannot run is simply no candidate
                continue
            alts.append((name, value, e2 / z2 if z2 > 0 else math.inf))
    best = min(alts, key=lambda a: a[2]) if alts else None
    passed = ratio < threshold and not (best is not None and best[2] < ALTERNATIVE_FACTOR * ratio)
    rep = SanityReport(t=t, n_images=int(x0.shape[0]), space=den.prediction, trivial=trivial, error_mse=err,
                       trivial_mse=zero, ratio=ratio, threshold=threshold, passed=passed,
                       alternatives=tuple((n, _show(v), r) for n, v, r in alts))
    den.sanity = rep
    if passed:
        return rep
    current = (f"{den.prediction} prediction, {den.time_input} time, "
               f"data range {den.data_range[0]:g},{den.data_range[1]:g}")
    versus = "predicting zero" if trivial == "0" else f"predicting {trivial}"
    if best is not None and best[2] < min(threshold, ALTERNATIVE_FACTOR * ratio):
        name, value, r2 = best
        hint = (f"with {flag(name)}={_show(value)} it would be {r2:.2f}x: "
                f"pass {flag(name)}={_show(value)} (now {_show(getattr(den, name))}, from {den.sources.get(name, '?')})")
    elif ratio >= threshold and (best is None or best[2] >= threshold):
        hint = ("no single setting does better, so the model looks untrained or is not a denoiser of this data: "
                "check the weights (an EMA entry: --state-dict-key) and --data, then "
                f"{flag('time_input')}, {flag('prediction')}, {flag('schedule')} and {flag('data_range')}")
    else:
        hint = f"check {flag('time_input')}, {flag('prediction')}, {flag('schedule')} and {flag('data_range')}"
    if ratio < threshold:
        problem = (f"sanity check failed: at t={t} the {den.prediction} error is {ratio:.2f}x that of {versus} "
                   f"with {current}, but another setting does much better")
    else:
        problem = (f"sanity check failed: at t={t} the {den.prediction} error is {ratio:.2f}x that of {versus} "
                   f"(needs < {threshold:g}x) with {current}")
    raise ModelLoadError(den.where, problem, hint)


def _call_failure(den: Denoiser, x0: torch.Tensor, t: float, exc: Exception,
                  labels: Optional[torch.Tensor] = None) -> ModelLoadError:
    """The one-line error for a model that cannot be called on the data's images: a missing
    class label, or a channel count or image size that another probe call accepts, is named;
    else the library's words."""
    N, C, H, W = x0.shape
    tt = torch.full((1,), t, dtype=x0.dtype)
    label = None if labels is None else labels[:1]

    def runs(c: int, h: int, w: int, lab: Optional[torch.Tensor] = label) -> bool:
        try:
            with torch.no_grad():
                den.output(torch.zeros((1, c, h, w), dtype=x0.dtype, device=x0.device), tt.to(x0.device), lab)
            return True
        except Exception:
            return False

    if labels is None and runs(C, H, W, torch.zeros(1, dtype=torch.long, device=x0.device)):
        return ModelLoadError(den.where, f"the model needs a class label and none was given "
                                         f"({type(exc).__name__}: {text(exc, 120)})",
                              "audit it as class-conditional: pass --conditional (labelled --data) or --label N")

    for c in (1, 3, 4, 2):
        if c != C and runs(c, H, W):
            return ModelLoadError(den.where, f"the model takes {c}-channel images, but the data has {C} "
                                             f"channel{'s' if C != 1 else ''} ({H}x{W})",
                                  f"pass --data with {c}-channel images (the model's own training data)")
    for h in sorted({32, 64, 28, 16, 128, 256} - {H}):
        if runs(C, h, h):
            return ModelLoadError(den.where, f"the model fails on {H}x{W} images but runs on {h}x{h} "
                                             f"({type(exc).__name__}: {text(exc, 160)})",
                                  f"pass --data at the model's image size (e.g. :size={h})")
    return ModelLoadError(den.where, f"calling the model on {N} images of {C}x{H}x{W} failed: {type(exc).__name__}: "
                                     f"{text(exc, 200)}",
                          f"check {flag('call_style')}, --data and --arch-kwargs")


def _show(value: Any) -> str:
    return ",".join(f"{v:g}" for v in value) if isinstance(value, tuple) else str(value)


# ---------------------------------------------------------------------------- factory
def make_denoiser(
    model: Union[LoadedModel, nn.Module, Callable],
    *,
    call_style: Union[str, Callable, None] = None,
    time_input: Optional[str] = None,
    prediction: Optional[str] = None,
    schedule: Union[str, NoiseSchedule, None] = None,
    num_train_steps: Optional[int] = None,
    data_range: Union[Sequence[float], str, None] = None,
    check_images: Optional[torch.Tensor] = None,
    check_labels: Optional[torch.Tensor] = None,
    check: bool = True,
    example_shape: Optional[tuple[int, int, int]] = None,
) -> Denoiser:
    """Wrap a model as a :class:`Denoiser`, resolving every setting.

    Args:
        model: a :class:`LoadedModel` (its settings and their sources are used), a module,
            or a callable.
        call_style, time_input, prediction, schedule, num_train_steps, data_range:
            overrides (see the module docstring); None = resolve.
        check_images: (N, C, H, W) clean training images in [-1, 1] for the sanity check
            (a few are enough); when None, only output shape and finiteness are checked
            on a random image of ``example_shape``.
        check_labels: (N,) class labels of ``check_images`` for a class-conditional model
            (the sanity check passes them to the model), else None.
        check: run the sanity check at all.
        example_shape: (C, H, W) for the probe call (default (1, 32, 32), or that of
            ``check_images``).

    Returns:
        :class:`Denoiser`.

    Raises:
        ModelLoadError: undetectable call style, inconsistent settings, or a failed sanity
            check (see :func:`sanity_check`).
    """
    loaded = model if isinstance(model, LoadedModel) else None
    module = loaded.module if loaded is not None else model
    where = loaded.path if loaded is not None else type(module).__name__
    settings: dict[str, Any] = dict(loaded.settings) if loaded else {}
    sources: dict[str, str] = dict(loaded.setting_sources) if loaded else {}
    given = dict(call_style=call_style, time_input=time_input, prediction=prediction, schedule=schedule,
                 num_train_steps=num_train_steps, data_range=data_range)
    for k, v in given.items():
        if v is not None:
            settings[k] = validate_setting(k, v, flag(k))
            sources[k] = "argument"
    warnings: list[str] = []

    if check_images is not None:
        if not isinstance(check_images, torch.Tensor) or check_images.ndim != 4:
            raise ModelLoadError(where, "check_images must be a tensor (N, C, H, W)")
        example_shape = tuple(check_images.shape[1:])
    shape = tuple(example_shape or (1, 32, 32))

    # call style: signature, then a probe in both orders
    if "call_style" not in settings:
        style, why = detect_call_style(module)
        if style is None:
            g = torch.Generator().manual_seed(0)
            x = torch.randn((2, *shape), generator=g)
            tt = torch.tensor([0.3, 0.7])
            ok = [s for s in ("x-t", "t-x") if _probe(module, s, x, tt)]
            if len(ok) != 1:
                raise ModelLoadError(
                    where,
                    f"cannot tell how to call the model: {why}, and a probe call "
                    + ("fails in both argument orders" if not ok else "works in both argument orders"),
                    f"pass {flag('call_style')} x-t, t-x or diffusers",
                )
            style, why = ok[0], f"{why}; a probe call works only as {ok[0]}"
        settings["call_style"] = style
        sources["call_style"] = f"detected ({why})"

    for k, v in DEFAULTS.items():
        if k not in settings:
            settings[k] = v
            sources[k] = "default"
            if not (k == "num_train_steps" and settings.get("time_input") != "index"):
                shown = ",".join(f"{x:g}" for x in v) if isinstance(v, tuple) else v
                warnings.append(f"{k} defaulted to {shown}: nothing in the model says; set {flag(k)} if wrong")

    sched = settings["schedule"]
    try:
        sched = get_schedule(sched)
    except Exception as exc:
        raise ModelLoadError(where, f"unknown schedule {settings['schedule']!r} ({exc})", f"fix {flag('schedule')}") from None
    T = settings["num_train_steps"]
    if isinstance(sched, DiscreteSchedule) and sched.num_train_steps != T:
        if sources.get("num_train_steps") in ("default",):
            T = sched.num_train_steps
        else:
            raise ModelLoadError(
                where, f"num_train_steps {T} disagrees with schedule {sched.name!r} ({sched.num_train_steps} steps)",
                f"fix {flag('num_train_steps')} or {flag('schedule')}",
            )
    if settings["time_input"] == "sigma" and settings["prediction"] == "v":
        raise ModelLoadError(where, "v prediction with a sigma (VE) time input is not supported", f"check {flag('prediction')} and {flag('time_input')}")

    den = Denoiser(
        module, call_style=settings["call_style"], time_input=settings["time_input"], prediction=settings["prediction"],
        schedule=sched, num_train_steps=T, data_range=settings["data_range"], sources=sources, warnings=warnings,
        source=loaded,
    )
    if check:
        if check_images is not None:
            sanity_check(den, check_images, labels=check_labels)
        else:
            g = torch.Generator().manual_seed(0)
            x = torch.randn((2, *shape), generator=g)
            with torch.no_grad():
                out = den.eps(x, torch.tensor([0.5, 0.5]))
            if not torch.isfinite(out).all():
                raise ModelLoadError(where, "the model's output has non-finite values (NaN/inf) at t=0.5",
                                     f"check {flag('data_range')} and {flag('time_input')}")
    return den
