"""First-party model loaders (entry-point group ``els_audit.loaders``).

Safe formats (no code from the file runs): ``diffusers`` directories (safetensors weights
only), ``safetensors`` files, ``state-dict`` (``torch.load(weights_only=True)``).
Formats that run code or unpickle arbitrary objects, refused without ``trust_model``:
``pickled-module`` (``torch.save(model)``), ``torch-export`` (``.pt2``; its loader falls
back to full unpickling), ``torchscript``.

Sniffing reads bytes only: the safetensors header, the zip directory of a torch archive
(TorchScript holds ``code/``, a ``.pt2`` holds ``archive_format``), and the pickle's global
references (``torch.serialization.get_unsafe_globals_in_checkpoint``, which parses the
opcodes without executing them) to tell a state dict from a pickled module.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import struct
import warnings
import zipfile
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch

from els_audit.models.capture import capture_library_output
from els_audit.models.formats import ArchSpec, LoaderOutput, LoadRequest, ModelLoader
from els_audit.console import text
from els_audit.models.settings import MAX_TRAIN_STEPS, ModelLoadError
from els_audit.models.trust import call_architecture, resolve_architecture
from els_audit.models.weights import (build_from_state_dict, checkpoint_entry, fit_state_dict, is_tensor_dict,
                                      load_into, own_state)

__all__ = [
    "DiffusersDirLoader",
    "SafetensorsLoader",
    "StateDictLoader",
    "PickledModuleLoader",
    "TorchExportLoader",
    "TorchScriptLoader",
    "torch_archive_kind",
    "diffusers_schedule_hints",
]

# the pickled magic number at the start of a legacy (pre-zip) torch.save file
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"


def torch_archive_kind(path: Path) -> Optional[str]:
    """"torchscript", "torch-export", "torch-save", "legacy-torch-save", or None.

    Reads the zip directory only (or the first bytes for the legacy format).
    """
    path = Path(path)
    if not path.is_file():
        return None
    with open(path, "rb") as f:
        head = f.read(len(_LEGACY_MAGIC))
    if head == _LEGACY_MAGIC:
        return "legacy-torch-save"
    if head[:2] != b"PK":
        return None
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return None
    rel = [n.split("/", 1)[1] if "/" in n else n for n in names]
    if "archive_format" in rel or any(r.startswith("models/") and r.endswith(".json") for r in rel):
        return "torch-export"
    if any(r.startswith("code/") for r in rel) or "constants.pkl" in rel:
        return "torchscript"
    if "data.pkl" in rel:
        return "torch-save"
    return None


def _unsafe_globals(path: Path) -> list[str]:
    """Globals the pickle references beyond what ``weights_only`` allows (no execution)."""
    return list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))


def _corrupt(path: Path, what: str, exc: Union[BaseException, str]) -> ModelLoadError:
    """The one-line error for a file its reader could not parse; ``exc`` is the reader's
    exception, or the line it logged about the cause."""
    detail = text(str(exc).splitlines()[0] if text(exc) else type(exc).__name__, 160)
    return ModelLoadError(path, f"truncated or corrupt {what} ({detail})", "re-download or re-export the file")


def _require_arch(path: Path, request: LoadRequest, what: str) -> ArchSpec:
    if request.arch is None:  # load_model resolves it first; a direct caller may not have
        raise ModelLoadError(path, f"{what} holds weights only and no architecture was given", "pass --arch module:Class")
    return request.arch


# ----------------------------------------------------------------------------- safetensors
class SafetensorsLoader(ModelLoader):
    """A ``.safetensors`` file of weights, plus an architecture (``--arch``, sidecar, zoo)."""

    name = "safetensors"
    safe = True
    needs_arch = True
    description = "a safetensors file"

    def claim(self, path: Path) -> bool:
        if not path.is_file():
            return False
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(9)
        if len(head) < 9:
            return False
        (n,) = struct.unpack("<Q", head[:8])
        return head[8:9] == b"{" and 8 + n <= size

    def load(self, path: Path, request: LoadRequest) -> LoaderOutput:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        arch = _require_arch(path, request, self.description)
        try:
            state = load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise _corrupt(path, "safetensors file", exc) from None
        module, notes = build_from_state_dict(state, arch, path)
        return LoaderOutput(module=module, weights_file=path, notes=notes)

    def save(self, module: Any, path, *, example_inputs=None) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        save_file({k: v.detach().contiguous().clone() for k, v in module.state_dict().items()}, str(path))
        return path


# ----------------------------------------------------------------------------- state dict
class StateDictLoader(ModelLoader):
    """A state dict (or a checkpoint dict holding one) saved with ``torch.save``.

    Read with ``torch.load(weights_only=True)``: only tensors and plain containers can
    come out, no code runs.  A checkpoint dict with one tensor-dict entry uses it; with
    several, ``state_dict_key`` must choose.  A ``module.`` prefix on every key (from
    ``DataParallel``) is removed, and the report says so.
    """

    name = "state-dict"
    safe = True
    needs_arch = True
    description = "a state dict (torch.save(model.state_dict()))"

    def claim(self, path: Path) -> bool:
        kind = torch_archive_kind(path)
        if kind == "legacy-torch-save":
            return True
        return kind == "torch-save" and not _unsafe_globals(path)

    def load(self, path: Path, request: LoadRequest) -> LoaderOutput:
        arch = _require_arch(path, request, self.description)
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise ModelLoadError(
                path,
                "the file holds Python objects other than tensors (a whole pickled module or custom classes), "
                f"which weights-only loading refuses ({str(exc).splitlines()[0][:120]})",
                ("pass --format pickled-module to unpickle it as a whole module" if request.trust_model else
                 "pass --trust-model --format pickled-module if you trust it") + ", or re-save model.state_dict()",
            ) from None
        except (RuntimeError, OSError, EOFError, ValueError, zipfile.BadZipFile) as exc:
            raise _corrupt(path, "torch.save archive", exc) from None
        if is_tensor_dict(obj):
            if request.state_dict_key is not None:
                raise ModelLoadError(path, f"--state-dict-key {request.state_dict_key!r} was given, but the file is a "
                                           f"plain state dict, not a checkpoint with entries", "drop --state-dict-key")
            module, notes = build_from_state_dict(obj, arch, path)
            return LoaderOutput(module=module, weights_file=path, notes=notes)
        if not isinstance(obj, Mapping):
            raise ModelLoadError(path, f"holds a {type(obj).__name__}, not a state dict", "pass --format to choose another loader")
        n_file = max((len(v) for v in obj.values() if is_tensor_dict(v)), default=0)
        shapes = own_state(arch, path, n_file)                         # names and shapes, nothing allocated
        module = call_architecture(arch, path) if shapes is None else None
        shapes = module.state_dict() if module is not None else shapes
        state, picked = checkpoint_entry(obj, shapes, request.state_dict_key, path)
        fit_state_dict(state, shapes, arch.name, path)                # a misfit is refused before the build
        module = module if module is not None else call_architecture(arch, path)
        notes = load_into(module, state, arch.name, path)
        return LoaderOutput(module=module, weights_file=path, notes=picked + notes)

    def save(self, module: Any, path, *, example_inputs=None) -> Path:
        path = Path(path)
        torch.save(module.state_dict(), str(path))
        return path


# ----------------------------------------------------------------------------- pickled module
class PickledModuleLoader(ModelLoader):
    """A whole module pickled with ``torch.save(model)``: unpickling runs code."""

    name = "pickled-module"
    safe = False
    needs_arch = False
    description = "a whole pickled Python object (torch.save(model))"

    def claim(self, path: Path) -> bool:
        return torch_archive_kind(path) == "torch-save" and bool(_unsafe_globals(path))

    def load(self, path: Path, request: LoadRequest) -> LoaderOutput:
        if not request.trust_model:
            try:
                refs = _unsafe_globals(path)
            except Exception:
                refs = []
            shown = ", ".join(refs[:3]) + (f" and {len(refs) - 3} more" if len(refs) > 3 else "")
            self.refuse_untrusted(path, f"{self.description} referencing {shown}" if shown else self.description)
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=False)
        except (RuntimeError, OSError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError) as exc:
            raise _corrupt(path, "torch.save archive", exc) from None
        except (AttributeError, ModuleNotFoundError, ImportError) as exc:
            raise ModelLoadError(
                path, f"unpickling needs code that is not importable here ({exc})", "install the package that defines the model, or export a state dict and pass --arch"
            ) from None
        if not isinstance(obj, torch.nn.Module):
            raise ModelLoadError(
                path, f"holds a {type(obj).__name__}, not a torch.nn.Module", "save the model itself, or its state dict and pass --arch"
            )
        return LoaderOutput(module=obj.eval(), weights_file=path, ran_code=True)

    def save(self, module: Any, path, *, example_inputs=None) -> Path:
        path = Path(path)
        torch.save(module, str(path))
        return path


# ----------------------------------------------------------------------------- torchscript
class TorchScriptLoader(ModelLoader):
    """A TorchScript archive (``torch.jit.save``): its code runs when loaded and called."""

    name = "torchscript"
    safe = False
    needs_arch = False
    description = "a TorchScript archive (torch.jit.save)"

    def claim(self, path: Path) -> bool:
        return torch_archive_kind(path) == "torchscript"

    def load(self, path: Path, request: LoadRequest) -> LoaderOutput:
        if not request.trust_model:
            self.refuse_untrusted(path, self.description)
        try:
            with warnings.catch_warnings():  # TorchScript is deprecated; users still bring it
                warnings.simplefilter("ignore", DeprecationWarning)
                module = torch.jit.load(str(path), map_location="cpu")
        except (RuntimeError, OSError, ValueError) as exc:
            raise _corrupt(path, "TorchScript archive", exc) from None
        return LoaderOutput(module=module.eval(), weights_file=path, ran_code=True)

    def save(self, module: Any, path, *, example_inputs=None) -> Path:
        path = Path(path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            scripted = torch.jit.trace(module, example_inputs) if example_inputs is not None else torch.jit.script(module)
            torch.jit.save(scripted, str(path))
        return path


# ----------------------------------------------------------------------------- torch.export
class TorchExportLoader(ModelLoader):
    """A ``torch.export`` archive (``.pt2``): its loader may fall back to full unpickling."""

    name = "torch-export"
    safe = False
    needs_arch = False
    description = "a torch.export archive (.pt2)"

    def claim(self, path: Path) -> bool:
        return torch_archive_kind(path) == "torch-export"

    def load(self, path: Path, request: LoadRequest) -> LoaderOutput:
        if not request.trust_model:
            self.refuse_untrusted(path, self.description)
        with capture_library_output() as said:   # torch logs a whole traceback before it gives up
            try:
                program = torch.export.load(str(path))
            except Exception as exc:  # the pt2 reader raises many types for a bad archive
                raise _corrupt(path, "torch.export archive", said[-1] if said else exc) from None
        return LoaderOutput(module=program.module(), weights_file=path, ran_code=True)

    def save(self, module: Any, path, *, example_inputs=None) -> Path:
        """Export with a dynamic batch dimension on every tensor input (``example_inputs`` required)."""
        if example_inputs is None:
            raise ValueError("torch-export save needs example_inputs, e.g. (x, t)")
        path = Path(path)
        batch = torch.export.Dim("batch", min=1, max=4096)
        shapes = tuple({0: batch} if isinstance(a, torch.Tensor) and a.ndim > 0 else None for a in example_inputs)
        program = torch.export.export(module, tuple(example_inputs), dynamic_shapes=shapes)
        torch.export.save(program, str(path))
        return path


# ----------------------------------------------------------------------------- diffusers
_DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"


def _diffusers_model_dir(path: Path) -> Optional[Path]:
    """The folder with config.json + weights: ``path`` itself or its ``unet/`` (pipeline)."""
    if not path.is_dir():
        return None
    for d in (path, path / "unet"):
        cfg = d / "config.json"
        if cfg.is_file() and (any(d.glob("diffusion_pytorch_model*.safetensors")) or any(d.glob("diffusion_pytorch_model*.bin"))):
            return d
    return None


def diffusers_schedule_hints(sched_cfg: Mapping[str, Any], where: Path) -> dict:
    """Adapter settings from a diffusers ``scheduler_config.json``.

    Returns ``{"prediction", "num_train_steps", "schedule"}`` where found.
    """
    from els_audit.schedules import DiscreteSchedule
    from els_audit_plugins.schedules import ImprovedCosineSchedule, LinearDDPMSchedule

    if not isinstance(sched_cfg, Mapping):
        raise ModelLoadError(where, f"the scheduler config is a {type(sched_cfg).__name__}, not a JSON object",
                             "fix the file, or pass --schedule and --num-train-steps")

    def number(key: str, default: float, lo: float, hi: float, integer: bool = False) -> float:
        v = sched_cfg.get(key, default)
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and (not integer or float(v).is_integer())
        if not ok or not (lo <= v <= hi):
            raise ModelLoadError(where, f"scheduler {key} must be a{'n integer' if integer else ' number'} from {lo:g} "
                                        f"to {hi:g}, got {text(v, 40)}", "fix the file, or pass --schedule NAME")
        return int(v) if integer else float(v)

    hints: dict[str, Any] = {}
    # NB: 100,000 steps bound the schedule's tables (a config asking for 1e9 allocated 8 GB)
    T = number("num_train_timesteps", 1000, 1, MAX_TRAIN_STEPS, integer=True)
    hints["num_train_steps"] = T
    if sched_cfg.get("prediction_type") is not None:
        if not isinstance(sched_cfg["prediction_type"], str):
            raise ModelLoadError(where, "scheduler prediction_type must be a string", "fix the file, or pass --prediction")
        hints["prediction"] = sched_cfg["prediction_type"]
    bs, be = number("beta_start", 1e-4, 0.0, 1.0), number("beta_end", 0.02, 0.0, 1.0)
    trained = sched_cfg.get("trained_betas")
    if trained is not None and not (isinstance(trained, list) and 0 < len(trained) <= MAX_TRAIN_STEPS and all(
            isinstance(b, (int, float)) and not isinstance(b, bool) and 0 < b < 1 for b in trained)):
        raise ModelLoadError(where, "scheduler trained_betas must be a list of numbers in (0, 1)",
                             "fix the file, or pass --schedule NAME")
    kind = sched_cfg.get("beta_schedule", "linear")
    if trained:
        hints["schedule"] = DiscreteSchedule(torch.tensor(trained, dtype=torch.float64), "trained-betas")
    elif kind == "linear":
        hints["schedule"] = LinearDDPMSchedule(T, bs, be)
    elif kind == "scaled_linear":
        betas = torch.linspace(bs**0.5, be**0.5, T, dtype=torch.float64) ** 2
        hints["schedule"] = DiscreteSchedule(betas, "scaled_linear")
    elif kind == "squaredcos_cap_v2":
        hints["schedule"] = ImprovedCosineSchedule(T)
    else:
        raise ModelLoadError(where, f"scheduler beta_schedule {text(kind, 40)!r} is not supported", "pass --schedule NAME")
    return hints


class DiffusersDirLoader(ModelLoader):
    """A diffusers model directory (``config.json`` + ``diffusion_pytorch_model.safetensors``).

    The class named by ``_class_name`` must be a diffusers model class (package code); the
    weights are read with safetensors only.  ``scheduler_config.json`` beside the model,
    or in ``../scheduler/`` (pipeline layout), gives prediction type, betas and number of
    training steps.  Needs the optional dependency ``diffusers``.
    """

    name = "diffusers"
    safe = True
    needs_arch = False
    description = "a diffusers model directory"

    def claim(self, path: Path) -> bool:
        return _diffusers_model_dir(Path(path)) is not None

    def load(self, path: Path, request: LoadRequest) -> LoaderOutput:
        d = _diffusers_model_dir(path)
        cfg_path = d / "config.json"
        weights = d / _DIFFUSERS_WEIGHTS
        if not weights.is_file():
            raise ModelLoadError(
                path, f"no {_DIFFUSERS_WEIGHTS} (only pickled .bin weights, which are not read)",
                "re-save with save_pretrained(..., safe_serialization=True)",
            )
        try:
            import diffusers
        except ImportError:
            raise ModelLoadError(path, "loading a diffusers directory needs the diffusers package", "pip install 'els-audit[diffusers]'") from None
        try:
            cfg = json.loads(cfg_path.read_text())
        except (OSError, ValueError, RecursionError) as exc:
            raise _corrupt(cfg_path, "config.json", exc) from None
        if not isinstance(cfg, dict):
            raise _corrupt(cfg_path, "config.json", ValueError("not a JSON object"))
        # the config names a class; this loader vouches only for diffusers' own model classes
        cls = resolve_architecture(str(cfg.get("_class_name")), origin="diffusers config", where=cfg_path,
                                   library=(diffusers, diffusers.ModelMixin))
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(weights), device="cpu")
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise _corrupt(weights, "safetensors file", exc) from None
        if not callable(getattr(cls.build, "from_config", None)):
            raise ModelLoadError(cfg_path, f"{cls.name} cannot be built from a config (a base class, not a model)",
                                 "fix _class_name")
        arch = dataclasses.replace(cls, build=cls.build.from_config, kwargs={"config": cfg})
        module, notes = build_from_state_dict(state, arch, weights)
        hints: dict[str, Any] = {"call_style": "diffusers", "time_input": "index"}
        extra = [cfg_path]
        for sc in (d / "scheduler_config.json", d.parent / "scheduler" / "scheduler_config.json"):
            if sc.is_file():
                try:
                    sched_cfg = json.loads(sc.read_text())
                except (OSError, ValueError, RecursionError) as exc:
                    raise _corrupt(sc, "scheduler_config.json", exc) from None
                hints.update(diffusers_schedule_hints(sched_cfg, sc))
                extra.append(sc)
                break
        return LoaderOutput(module=module, weights_file=weights, extra_files=tuple(extra), hints=hints, notes=notes)

    def save(self, module: Any, path, *, example_inputs=None) -> Path:
        path = Path(path)
        module.save_pretrained(str(path), safe_serialization=True)
        return path
