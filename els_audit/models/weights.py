"""Weights into an architecture: which entry of a checkpoint, which key prefix, and a strict load.

Real checkpoints are rarely a bare ``model.state_dict()``:

- a training checkpoint is a dict with ``model``, ``ema``, ``optimizer``, ``step`` ...
  entries.  :func:`checkpoint_entry` takes the entry the user names (``--state-dict-key``);
  otherwise the one dict of tensors whose keys fit the architecture; when several fit, the
  EMA weights (an entry whose name contains ``ema``), which are what a sampler uses, and
  says so;
- the keys carry a prefix from a wrapper: ``module.`` (DataParallel/DDP), ``model.``
  (a Lightning module holding the net), ``ema_model.``/``online_model.`` (an EMA wrapper
  holding two copies).  :func:`fit_state_dict` strips the one prefix under which the keys
  are exactly the architecture's, preferring an EMA copy when two fit, and says so.

Every choice made is returned as a note for the report; nothing is guessed silently.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Union

import torch
import torch.nn as nn
from torch.nn.modules.module import (register_module_buffer_registration_hook,
                                     register_module_parameter_registration_hook)

from ..console import text
from .settings import ModelLoadError
from .trust import ArchSpec, call_architecture

__all__ = ["build_from_state_dict", "load_into", "own_state", "fit_state_dict", "fitting_prefixes", "checkpoint_entry", "is_tensor_dict"]

Where = Union[str, Any]


def is_tensor_dict(obj: Any) -> bool:
    """A non-empty mapping of string keys to tensors (what ``state_dict()`` returns)."""
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _is_ema(name: str) -> bool:
    return "ema" in name.lower()


#: more prefixes than this fitting at once is ambiguous anyway (and each is checked against every key)
_MAX_FITTING = 8


def _cuts(key: str, longest: int) -> list[int]:
    """Where a wrapper's prefix may end in ``key``: 0, and after each dot, but only where what is
    left is no longer than the longest key of the architecture (a 1 MB key costs no more)."""
    first = len(key) - longest
    cuts = [0] if first <= 0 else []
    dot = key.find(".", max(first - 1, 0))
    while dot >= 0:
        cuts.append(dot + 1)
        dot = key.find(".", dot + 1)
    return cuts


def fitting_prefixes(state: Mapping[str, Any], own: Mapping[str, Any]) -> list[str]:
    """Every prefix ``p`` such that the keys of ``state`` starting with ``p``, with ``p``
    removed, are exactly the keys of ``own`` ("" first when it fits).

    A prefix is what a wrapper adds: "" or whole dotted components ("module.", "model.ema.").
    The cost is linear in the file's keys and their length, whatever the file holds: each key
    is cut only where the rest could be one of ``own``'s keys, and more than
    :data:`_MAX_FITTING` candidate prefixes are returned unchecked (they are ambiguous)."""
    if not own:
        return [""] if not state else []
    longest = max(len(a) for a in own)
    hits: dict[str, int] = {}
    for k in state:
        for cut in _cuts(k, longest):
            if k[cut:] in own:
                hits[k[:cut]] = hits.get(k[:cut], 0) + 1
    # NB: the keys of a dict are distinct, so as many stripped keys as ``own`` has means every
    # one of ``own``'s keys is there; "exactly" also needs no other key under that prefix
    full = sorted((p for p, n in hits.items() if n == len(own)), key=lambda p: (p != "", p))
    if len(full) > _MAX_FITTING:
        return full
    return [p for p in full if sum(1 for k in state if k.startswith(p)) == len(own)]


def _mismatch(state: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor], arch_name: str,
              where: Where) -> ModelLoadError:
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} (file {list(state[k].shape)}, model {list(own[k].shape)})"
              for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s) e.g. {', '.join(text(k, 60) for k in missing[:3])}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s) e.g. {', '.join(text(k, 60) for k in unexpected[:3])}")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatch(es) e.g. {'; '.join(shapes[:2])}")
    return ModelLoadError(where, f"the weights do not fit architecture {arch_name}: {', '.join(parts)}",
                          "check --arch and its arguments (--arch-kwargs)")


def fit_state_dict(state: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor], arch_name: str,
                   where: Where) -> tuple[dict, tuple[str, ...]]:
    """``state`` with the one fitting key prefix removed (see the module docstring).

    Args:
        state: the file's tensors by key.
        own: the architecture's ``state_dict()``.
        arch_name: for messages.
        where: the file, for messages.

    Returns:
        (the state with ``own``'s keys, notes saying what was done).

    Raises:
        ModelLoadError: no prefix makes the keys fit, several non-EMA ones do, or shapes differ.
    """
    prefixes = fitting_prefixes(state, own)
    notes: list[str] = []
    if not prefixes:
        raise _mismatch(state, own, arch_name, where)
    if "" in prefixes:
        prefix = ""
    elif len(prefixes) == 1:
        prefix = prefixes[0]
    else:
        ema = [p for p in prefixes if _is_ema(p)]
        if len(ema) != 1:
            raise ModelLoadError(where, f"the file holds several copies of the weights (key prefixes "
                                        f"{', '.join(repr(p) for p in prefixes)})",
                                 "save the copy you want on its own (a state_dict() of that module)")
        prefix = ema[0]
        notes.append(f"took the EMA copy of the weights (key prefix {prefix!r}) of "
                     f"{len(prefixes)} copies ({', '.join(repr(p) for p in prefixes)}): samplers use EMA weights")
    fitted = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if prefix:
        others = len(state) - len(fitted)
        notes.append(f"removed the key prefix {prefix!r} from the weights so that they fit {arch_name}"
                     + (f"; {others} other entries were not used" if others else ""))
    bad = [k for k in own if tuple(fitted[k].shape) != tuple(own[k].shape)]
    if bad:
        raise _mismatch(fitted, own, arch_name, where)
    return fitted, tuple(notes)


def checkpoint_entry(obj: Mapping[str, Any], own: Mapping[str, torch.Tensor], key: Optional[str],
                     where: Where) -> tuple[Mapping[str, torch.Tensor], tuple[str, ...]]:
    """The weights inside a training checkpoint dict (see the module docstring).

    Args:
        obj: the checkpoint (a dict that is not itself a dict of tensors).
        own: the architecture's ``state_dict()``, to tell which entries fit it.
        key: the entry the user named (``--state-dict-key``), or None.
        where: the file, for messages.

    Returns:
        (the entry's tensors, notes).

    Raises:
        ModelLoadError: the named entry is missing or holds no weights; no entry or several
            non-EMA entries hold weights that fit.
    """
    names = text(", ".join(map(str, list(obj)[:20])), 200) + (", ..." if len(obj) > 20 else "")
    if key is not None:
        if key not in obj or not is_tensor_dict(obj[key]):
            raise ModelLoadError(where, f"checkpoint entry {key!r} is missing or not a dict of tensors (entries: {names})",
                                 "fix --state-dict-key")
        return obj[key], ()
    weights = [k for k, v in obj.items() if is_tensor_dict(v)]
    if not weights:
        raise ModelLoadError(where, f"checkpoint dict with entries {names}: none holds a dict of tensors",
                             "re-save model.state_dict(), or pass --format for another loader")
    fit = [k for k in weights if fitting_prefixes(obj[k], own)] or weights
    if len(fit) == 1:
        chosen, why = fit[0], ("the only entry holding weights" if len(weights) == 1 else
                               f"the only one of {', '.join(weights)} that fits the architecture")
    else:
        ema = [k for k in fit if _is_ema(str(k))]
        if len(ema) != 1:
            raise ModelLoadError(where, f"checkpoint dict with entries {names}: several hold weights ({', '.join(fit)})",
                                 "pass --state-dict-key NAME")
        chosen = ema[0]
        why = f"EMA weights, which samplers use, of {', '.join(fit)}; pass --state-dict-key to take another"
    return obj[chosen], (f"weights taken from checkpoint entry {chosen!r} ({why})",)


def load_into(module: nn.Module, state: Mapping[str, torch.Tensor], arch_name: str, where: Where) -> tuple[str, ...]:
    """Load ``state`` into ``module`` strictly (after :func:`fit_state_dict`) and put it in eval
    mode; returns the notes on what was done to the keys."""
    fitted, notes = fit_state_dict(state, module.state_dict(), arch_name, where)
    module.load_state_dict(fitted, strict=True)
    module.eval()
    return notes


class _TooManyTensors(Exception):
    """Raised inside a meta build that registers more tensors than any fitting file could hold."""


def own_state(arch: ArchSpec, where: Where, n_file: Optional[int] = None) -> Optional[dict]:
    """The architecture's ``state_dict()`` (names and shapes) without allocating it.

    It is built on torch's ``meta`` device, so that a file whose weights cannot fit is refused
    before a constructor asked for a 30 GB model allocates it; and a build that registers
    more than ``4 n_file + 1000`` parameters and buffers (a file of ``n_file`` tensors cannot
    fit that) is stopped as it goes, so a sidecar asking for 300,000 layers costs no minutes.

    Returns:
        the names and shapes, or None when the architecture cannot be built on ``meta`` and
        ``arch.check_on_meta`` is off (the user's own ``--arch``, or ``--trust-model``: the
        real build then decides).

    Raises:
        ModelLoadError: the build registers too many tensors, or (``check_on_meta``) it
            cannot be built on ``meta`` at all.
    """
    limit = None if n_file is None else 4 * n_file + 1000
    count = [0]

    def registered(module, name, value):
        if value is not None:
            count[0] += 1
            if limit is not None and count[0] > limit:
                raise _TooManyTensors()

    hooks = [register_module_parameter_registration_hook(registered),
             register_module_buffer_registration_hook(registered)]
    try:
        with torch.device("meta"):
            return call_architecture(arch, where).state_dict()
    except ModelLoadError as exc:
        if isinstance(exc.__cause__, _TooManyTensors):
            raise ModelLoadError(where, f"architecture {arch.name} with these arguments registers more than {limit} "
                                        f"tensors; the file's {n_file} cannot fit it",
                                 "check --arch and its arguments (--arch-kwargs)") from None
        if arch.check_on_meta:
            raise ModelLoadError(where, f"{arch.name} cannot be checked against the file before it is allocated "
                                        f"(building it on torch's meta device failed: {exc.problem}); the size of "
                                        f"an architecture a downloaded file names is checked that way",
                                 "pass --arch yourself, or --trust-model if you trust the files") from None
        return None
    finally:
        for h in hooks:
            h.remove()


def build_from_state_dict(state: Mapping[str, torch.Tensor], arch: ArchSpec, path: Where) -> tuple[nn.Module, tuple[str, ...]]:
    """Build ``arch`` and :func:`load_into` it (the keys are checked on ``meta`` first).

    Returns:
        (the module in eval mode, notes on what was done to the keys).
    """
    shapes = own_state(arch, path, len(state))
    if shapes is not None:
        fit_state_dict(state, shapes, arch.name, path)             # raises before any allocation
    module = call_architecture(arch, path)
    return module, load_into(module, state, arch.name, path)
