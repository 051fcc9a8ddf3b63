"""Load a user's model file, safely, into an ``nn.Module`` with provenance.

Formats are plugins (entry-point group ``els_audit.loaders``; first-party ones in
``plugins/loaders.py``; the protocol is :mod:`.formats`).  Each loader sniffs a path
(:meth:`ModelLoader.claim`, by content, never by executing anything) and loads it.  :func:`load_model` picks the one loader that
claims the path (none or several is an error naming ``--format``), resolves where the
architecture comes from for weights-only formats, and records format, SHA-256, parameter
count and dtype.

Trust rules (what may run code on the user's machine):

- safetensors, diffusers directories and state dicts read with
  ``torch.load(weights_only=True)`` run no code from the file.  Formats that can
  (whole pickled modules, ``torch.export`` ``.pt2`` archives, TorchScript) are refused
  unless ``trust_model=True`` (CLI ``--trust-model``).
- The architecture for a weights-only file comes from, in this order:
  1. ``arch=`` (CLI ``--arch module:callable``, or a callable from Python): the user's
     say-so; a ``path/to/file.py:callable`` is accepted here.
  2. a sidecar ``MODEL.els.toml`` lying next to the model file (see
     :mod:`els_audit.models.sidecar`).  A sidecar counts as the user's say-so because it is only
     ever looked for beside the model, never elsewhere.  It may name an architecture in
     :mod:`els_audit.models.zoo` or an importable ``package.module:callable`` (code already
     installed on the user's Python path); a sidecar naming a ``.py`` file is refused
     without ``trust_model=True``, since such a file can arrive in the same download as
     the weights.
  3. a zoo config ``config.json`` (``"format": "els-audit-zoo"``) next to the weights,
     which may only name an architecture in :mod:`els_audit.models.zoo` (package code, trusted).

Spec strings ``zoo:NAME`` load the bundled model ``NAME`` (see :mod:`els_audit.models.zoo`).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Mapping, Optional, Union

import torch
import torch.nn as nn

from ..hashing import file_sha256
from .formats import LOADERS, ArchSpec, LoaderOutput, LoadRequest, ModelLoader, get_loader, sniff_format
from .settings import SETTING_NAMES, ModelLoadError, flag, validate_setting
from .sidecar import find_sidecar, read_sidecar
from .zoo.architectures import ARCHITECTURES
from .zoo.catalog import ZOO_CONFIG_FORMAT, zoo_model_path

__all__ = [
    "ModelLoadError",
    "ModelLoader",
    "LoadRequest",
    "LoaderOutput",
    "LoadedModel",
    "ArchSpec",
    "LOADERS",
    "load_model",
    "sniff_format",
    "resolve_arch",
    "build_from_state_dict",
    "file_sha256",
    "describe_dtype",
]

PathLike = Union[str, Path]

# ---------------------------------------------------------------------------- hashing / dtype
def describe_dtype(module: Any) -> str:
    """The parameters' dtype ("float32"), "mixed(float16,float32)", or "none"."""
    params = list(_parameters(module))
    kinds = sorted({str(p.dtype).replace("torch.", "") for p in params})
    if not kinds:
        return "none"
    return kinds[0] if len(kinds) == 1 else f"mixed({','.join(kinds)})"


def _parameters(module: Any):
    if isinstance(module, nn.Module) or hasattr(module, "parameters"):
        try:
            return list(module.parameters())
        except Exception:  # a foreign object whose parameters() misbehaves has none we can count
            return []
    return []


def resolve_arch(
    spec: Union[str, Callable[..., Any]],
    *,
    source: str,
    kwargs: Optional[Mapping[str, Any]] = None,
    allow_files: bool = True,
    where: PathLike = "--arch",
) -> ArchSpec:
    """Turn ``module:callable`` (or a callable, or a zoo class name) into an :class:`ArchSpec`.

    Args:
        spec: ``"pkg.module:callable"``, ``"path/to/file.py:callable"`` (only when
            ``allow_files``), a bare class name of :mod:`els_audit.models.zoo` (``"PaperResNet"``),
            or a Python callable.
        source: who named it, for the record.
        kwargs: keyword arguments for the callable.
        allow_files: accept a ``.py`` file path.
        where: what to name in error messages (the model file or the flag).

    Returns:
        :class:`ArchSpec`.
    """
    kwargs = dict(kwargs or {})
    if callable(spec) and not isinstance(spec, str):
        name = f"{getattr(spec, '__module__', '?')}:{getattr(spec, '__qualname__', repr(spec))}"
        return ArchSpec(spec, name, source, kwargs)
    if not isinstance(spec, str) or not spec.strip():
        raise ModelLoadError(where, f"architecture must be 'module:callable', got {spec!r}", "fix --arch")
    spec = spec.strip()
    zoo = ARCHITECTURES
    if spec in zoo:
        return ArchSpec(zoo[spec], f"els_audit.models.zoo:{spec}", source, kwargs)
    mod_name, sep, attr = spec.rpartition(":")
    if not sep or not mod_name or not attr:
        raise ModelLoadError(where, f"architecture {spec!r} is not of the form module:callable", "fix --arch")
    if mod_name.endswith(".py"):
        if not allow_files:
            raise ModelLoadError(
                where,
                f"the sidecar names the Python file {mod_name!r} as architecture, which could have come with the download",
                "pass --trust-model to run it, or pass --arch yourself",
            )
        file = Path(mod_name)
        if not file.is_file():
            raise ModelLoadError(where, f"architecture file {mod_name} does not exist", "fix --arch")
        modspec = importlib.util.spec_from_file_location(f"_els_arch_{file.stem}", file)
        module = importlib.util.module_from_spec(modspec)
        try:
            modspec.loader.exec_module(module)
        except Exception as exc:
            raise ModelLoadError(where, f"importing architecture file {mod_name} failed: {type(exc).__name__}: {exc}", "fix --arch") from exc
    else:
        try:
            module = importlib.import_module(mod_name)
        except Exception as exc:
            raise ModelLoadError(
                where, f"cannot import architecture module {mod_name!r}: {type(exc).__name__}: {exc}", "fix --arch or your PYTHONPATH"
            ) from exc
    obj = module
    for part in attr.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise ModelLoadError(where, f"module {mod_name!r} has no attribute {attr!r}", "fix --arch")
    if not callable(obj):
        raise ModelLoadError(where, f"{spec} is not callable", "fix --arch")
    return ArchSpec(obj, spec, source, kwargs)


def build_from_state_dict(state: Mapping[str, torch.Tensor], arch: ArchSpec, path: PathLike) -> nn.Module:
    """Build ``arch`` and load ``state`` into it strictly; mismatches are one-line errors.

    Args:
        state: parameter name -> tensor.
        arch: the architecture.
        path: the model file, for messages.

    Returns:
        the module in eval mode.
    """
    try:
        module = arch.build(**dict(arch.kwargs))
    except Exception as exc:
        raise ModelLoadError(path, f"building architecture {arch.name} failed: {type(exc).__name__}: {exc}", "fix --arch") from exc
    if not isinstance(module, nn.Module):
        raise ModelLoadError(path, f"architecture {arch.name} returned a {type(module).__name__}, not a torch.nn.Module", "fix --arch")
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} (file {list(state[k].shape)}, model {list(own[k].shape)})"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s) e.g. {', '.join(missing[:3])}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s) e.g. {', '.join(unexpected[:3])}")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatch(es) e.g. {'; '.join(shapes[:2])}")
        raise ModelLoadError(
            path, f"the weights do not fit architecture {arch.name}: {', '.join(parts)}", "check --arch and its arguments"
        )
    module.load_state_dict(dict(state), strict=True)
    return module.eval()


# ---------------------------------------------------------------------------- result
@dataclass(frozen=True)
class LoadedModel:
    """A loaded model and where it came from.

    Attributes:
        module: the model (an ``nn.Module`` or a loaded program), in eval mode.
        format: the loader's name ("safetensors", "diffusers", ...).
        path: the model path as given, resolved.
        sha256: SHA-256 of the weights file.
        n_params: number of parameters.
        dtype: parameters' dtype ("float32", or "mixed(...)").
        trust_model: whether the user passed trust.
        ran_code: whether loading executed code from the file.
        arch: the architecture used for a weights-only format, else None.
        files: every file read, as ((path, sha256), ...).
        settings: adapter settings resolved so far (override > sidecar > file), {name: value}.
        setting_sources: {name: "argument" | "sidecar" | "diffusers config" | "zoo config"}.
        sidecar: the sidecar file read, or None.
        notes: remarks for the report.
    """

    module: Any
    format: str
    path: str
    sha256: str
    n_params: int
    dtype: str
    trust_model: bool = False
    ran_code: bool = False
    arch: Optional[ArchSpec] = None
    files: tuple[tuple[str, str], ...] = ()
    settings: Mapping[str, Any] = field(default_factory=dict)
    setting_sources: Mapping[str, str] = field(default_factory=dict)
    sidecar: Optional[str] = None
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        """JSON-safe summary (without the module)."""
        settings = {}
        for k, v in self.settings.items():
            if hasattr(v, "to_dict"):
                v = v.to_dict()
            elif callable(v):
                v = f"<callable {getattr(v, '__qualname__', type(v).__name__)}>"
            elif isinstance(v, tuple):
                v = list(v)
            settings[k] = v
        return {
            "format": self.format,
            "path": self.path,
            "sha256": self.sha256,
            "n_params": self.n_params,
            "dtype": self.dtype,
            "trust_model": self.trust_model,
            "ran_code": self.ran_code,
            "arch": self.arch.to_dict() if self.arch else None,
            "files": [{"path": p, "sha256": h} for p, h in self.files],
            "settings": settings,
            "setting_sources": dict(self.setting_sources),
            "sidecar": self.sidecar,
            "notes": list(self.notes),
        }


# ---------------------------------------------------------------------------- entry point
def _zoo_config_beside(p: Path) -> Optional[tuple[Path, dict]]:
    cfg = p.parent / "config.json" if p.is_file() else None
    if cfg is None or not cfg.is_file():
        return None
    try:
        data = json.loads(cfg.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("format") != ZOO_CONFIG_FORMAT:
        return None
    return cfg, data


def load_model(
    path: Union[PathLike, str],
    *,
    arch: Union[str, Callable[..., Any], None] = None,
    arch_kwargs: Optional[Mapping[str, Any]] = None,
    trust_model: bool = False,
    format: Optional[str] = None,
    state_dict_key: Optional[str] = None,
    use_sidecar: bool = True,
    **overrides: Any,
) -> LoadedModel:
    """Load a model file (or ``zoo:NAME``) safely.

    Args:
        path: a model file or directory, or ``"zoo:NAME"`` for a bundled model.
        arch: architecture for weights-only formats: ``"module:callable"``,
            ``"file.py:callable"``, a zoo class name, or a callable returning an ``nn.Module``.
        arch_kwargs: keyword arguments for ``arch``.
        trust_model: allow formats that run code when loaded (pickled modules, TorchScript,
            ``.pt2``).
        format: force a loader by name instead of sniffing.
        state_dict_key: the entry of a checkpoint dict that holds the weights.
        use_sidecar: read ``MODEL.els.toml`` next to the model when present.
        **overrides: adapter settings (``call_style``, ``time_input``, ``prediction``,
            ``schedule``, ``num_train_steps``, ``data_range``); None values are ignored.

    Returns:
        :class:`LoadedModel`.

    Raises:
        ModelLoadError: missing file, unknown/ambiguous/corrupt format, refused untrusted
            format, missing or mismatching architecture, bad settings.
    """
    spec = str(path)
    if spec.startswith("zoo:"):
        p = zoo_model_path(spec[4:])
    else:
        p = Path(path).expanduser()
    if not p.exists():
        raise ModelLoadError(p, "no such file or directory", "check the model path (or use zoo:NAME for a bundled model)")
    p = p.resolve()

    for k in overrides:
        if k not in SETTING_NAMES:
            raise ModelLoadError(p, f"unknown setting {k!r}; known: {', '.join(SETTING_NAMES)}")
    settings: dict[str, Any] = {}
    sources: dict[str, str] = {}
    files: list[tuple[str, str]] = []
    notes: list[str] = []

    # 1. sidecar next to the model
    side = None
    if use_sidecar:
        sp = find_sidecar(p)
        if sp is not None:
            side = read_sidecar(sp)
            files.append((str(sp), side.sha256))

    # 2. format
    fmt = format if format is not None else (side.values.get("format") if side else None)
    loader = get_loader(fmt, p) if fmt else get_loader(sniff_format(p), p)
    if fmt and not loader.claim(p):
        notes.append(f"format {loader.name} was forced although the file does not look like it")

    # 3. architecture (weights-only formats)
    arch_spec = None
    zoo_cfg = _zoo_config_beside(p)
    if loader.needs_arch:
        kw = dict(arch_kwargs or {})
        if arch is not None:
            arch_spec = resolve_arch(arch, source="argument", kwargs=kw, allow_files=True)
        elif side is not None and "arch" in side.values:
            kw = {**dict(side.values.get("arch_kwargs", {})), **kw}
            arch_spec = resolve_arch(
                side.values["arch"], source="sidecar", kwargs=kw, allow_files=trust_model, where=side.path
            )
        elif zoo_cfg is not None:
            cfg_path, cfg = zoo_cfg
            name = cfg.get("arch")
            if name not in ARCHITECTURES:
                raise ModelLoadError(
                    cfg_path, f"zoo config names architecture {name!r}, which is not part of els_audit.models.zoo", "pass --arch module:callable"
                )
            kw = {**dict(cfg.get("arch_kwargs", {})), **kw}
            arch_spec = resolve_arch(name, source="zoo config", kwargs=kw)
        elif p.is_file() and (p.parent / "config.json").is_file() and '"_class_name"' in (p.parent / "config.json").read_text(errors="replace"):
            raise ModelLoadError(
                p, "this weights file is part of a diffusers model directory", f"pass the directory {p.parent} instead"
            )
        else:
            raise ModelLoadError(
                p,
                f"{loader.description} holds weights only, and nothing says which architecture they belong to",
                f"pass --arch module:callable, or put a sidecar {p.stem}.els.toml with arch = \"module:callable\" next to it",
            )
    elif arch is not None:
        notes.append(f"--arch ignored: format {loader.name} carries its own architecture")

    if zoo_cfg is not None and loader.needs_arch:
        cfg_path, cfg = zoo_cfg
        files.append((str(cfg_path), file_sha256(cfg_path)))
        for k in SETTING_NAMES:
            if cfg.get(k) is not None:
                settings[k] = validate_setting(k, cfg[k], str(cfg_path))
                sources[k] = "zoo config"

    key = state_dict_key if state_dict_key is not None else (side.values.get("state_dict_key") if side else None)
    request = LoadRequest(arch=arch_spec, trust_model=bool(trust_model), state_dict_key=key)
    out = loader.load(p, request)

    # 4. settings: file hints < zoo config < sidecar < explicit overrides
    for k, v in out.hints.items():
        if k in SETTING_NAMES and v is not None and k not in settings:
            settings[k] = validate_setting(k, v, str(p))
            sources[k] = f"{loader.name} config"
    if side is not None:
        for k in SETTING_NAMES:
            if k in side.values:
                settings[k] = validate_setting(k, side.values[k], side.path)
                sources[k] = "sidecar"
    for k, v in overrides.items():
        if v is not None:
            settings[k] = validate_setting(k, v, flag(k))
            sources[k] = "argument"

    for f in out.extra_files:
        files.append((str(f), file_sha256(f)))
    weights_hash = file_sha256(out.weights_file)
    files.insert(0, (str(out.weights_file), weights_hash))
    module = out.module
    return LoadedModel(
        module=module,
        format=loader.name,
        path=str(p),
        sha256=weights_hash,
        n_params=sum(t.numel() for t in _parameters(module)),
        dtype=describe_dtype(module),
        trust_model=bool(trust_model),
        ran_code=out.ran_code,
        arch=arch_spec,
        files=tuple(files),
        settings=MappingProxyType(settings),
        setting_sources=MappingProxyType(sources),
        sidecar=side.path if side else None,
        notes=tuple(notes) + tuple(out.notes),
    )
