"""Load a user's model file, safely, into an ``nn.Module`` with provenance.

Formats are plugins (entry-point group ``els_audit.loaders``; first-party ones in
``plugins/loaders.py``; the protocol is :mod:`.formats`).  :func:`load_model` picks the
one loader that claims the path (none or several is an error naming ``--format``), finds
the architecture for weights-only formats, resolves the adapter settings the files state,
and records format, SHA-256, parameter count and dtype.

What may run code (the security model; README "Security model"):

- safetensors files, diffusers directories and state dicts read with
  ``torch.load(weights_only=True)`` run no code from the file.  Formats that can (whole
  pickled modules, ``torch.export`` ``.pt2`` archives, TorchScript) are refused unless
  ``trust_model=True`` (CLI ``--trust-model``).
- Every code reference goes through :func:`els_audit.models.trust.resolve_architecture`.
  The architecture of a weights-only file comes from, in this order:
  1. ``arch=`` (CLI ``--arch``): the user's say-so (a module class, or a function of the
     user's own module or ``file.py``);
  2. a sidecar ``MODEL.els.toml`` beside the model (:mod:`.sidecar`);
  3. a zoo config ``config.json`` (``"format": "els-audit-zoo"``) beside the weights.
  A sidecar or config arrives with the download, so what it names must be a registered
  architecture (entry-point group ``els_audit.architectures``) unless the user passes
  ``trust_model=True``.
- What libraries warn or log while reading is captured into the notes (or the one-line
  error), never printed (:mod:`.capture`).

Spec strings ``zoo:NAME`` load the bundled model ``NAME`` (see :mod:`els_audit.models.zoo`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Mapping, Optional, Union

import torch.nn as nn

from ..data import DataSpecError, spec_reads_path
from ..hashing import file_sha256
from ..paths import display_path
from .capture import capture_library_output, summarise
from .formats import LOADERS, ArchSpec, LoaderOutput, LoadRequest, ModelLoader, get_loader, sniff_format
from .settings import SETTING_NAMES, ModelLoadError, flag, validate_setting
from .sidecar import Sidecar, find_sidecar, read_sidecar
from .trust import USER_ORIGIN, resolve_architecture
from .weights import build_from_state_dict
from .zoo.catalog import WEIGHTS_DIR, ZOO_CONFIG_FORMAT, zoo_model_path

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
    "build_from_state_dict",
    "file_sha256",
    "describe_dtype",
]

PathLike = Union[str, Path]


# ---------------------------------------------------------------------------- dtype
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


# ---------------------------------------------------------------------------- result
@dataclass(frozen=True)
class LoadedModel:
    """A loaded model and where it came from.

    Attributes:
        module: the model (an ``nn.Module`` or a loaded program), in eval mode.
        format: the loader's name ("safetensors", "diffusers", ...).
        path: the model path as the user typed it (``zoo:NAME`` for a bundled model).
        sha256: SHA-256 of the weights file.
        n_params: number of parameters.
        dtype: parameters' dtype ("float32", or "mixed(...)").
        trust_model: whether the user passed trust.
        ran_code: whether loading executed code from the file.
        arch: the architecture used for a weights-only format, else None.
        files: every file read, as ((path, sha256), ...), paths as
            :func:`els_audit.paths.display_path` writes them.
        settings: adapter settings resolved so far (override > sidecar > file), {name: value}.
        setting_sources: {name: "argument" | "sidecar" | "diffusers config" | "zoo config"}.
        sidecar: the sidecar file read (displayed), or None.
        notes: remarks for the report (what was done to the input, what libraries warned).
        data_hint: the training data spec the model's own zoo config names, or None.
        data_hint_source: where that spec came from ("zoo config <path>").
        data_hint_trusted: whether the hint may be followed without the user naming the data:
            a bundled zoo model's, a named data set (``mnist5k``), or ``trust_model``.  A
            downloaded config may not choose which of the user's files are read (and then
            embedded in a report that travels).
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
    data_hint: Optional[str] = None
    data_hint_source: Optional[str] = None
    data_hint_trusted: bool = False

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
@dataclass(frozen=True)
class _ZooConfig:
    path: Path
    values: Mapping[str, Any]


def _zoo_config_beside(p: Path) -> Optional[_ZooConfig]:
    cfg = p.parent / "config.json" if p.is_file() else None
    if cfg is None or not cfg.is_file():
        return None
    try:
        data = json.loads(cfg.read_text())
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(data, dict) or data.get("format") != ZOO_CONFIG_FORMAT:
        return None
    return _ZooConfig(cfg, data)


def _locate(path: Union[PathLike, str]) -> tuple[str, Path, Path]:
    """(what the user typed, that path with ``~`` expanded, the resolved path to read).

    NB: files that describe the model (a sidecar, a zoo config) are looked for beside the
    path as given, not beside a link's target (a Hugging Face cache links snapshots to blobs)."""
    typed = str(path)
    p = zoo_model_path(typed[4:]) if typed.startswith("zoo:") else Path(typed).expanduser()
    if not p.exists():
        raise ModelLoadError(typed, "no such file or directory", "check the model path (or use zoo:NAME for a bundled model)")
    if not (p.is_file() or p.is_dir()):     # a FIFO or a device would block the readers forever
        raise ModelLoadError(typed, "is not a regular file or folder (a pipe, socket or device)", "give the model file")
    return typed, p, p.resolve()


def _pick_loader(p: Path, typed: str, forced: Optional[str], forced_by: str) -> tuple[ModelLoader, list[str]]:
    """The loader for ``p``: the one forced (by ``--format`` or the sidecar), else the one that claims it."""
    if not forced:
        return get_loader(sniff_format(p), typed), []
    loader = get_loader(forced, forced_by)
    if loader.claim(p):
        return loader, []
    return loader, [f"format {loader.name} was forced ({forced_by}) although the file does not look like it"]


def _contradiction(p: Path, loader: ModelLoader, forced_by: str) -> str:
    """What the file looks like, when a forced format failed on it ("" when nothing claims it)."""
    try:
        actual = get_loader(sniff_format(p))
    except ModelLoadError:
        return ""
    if actual.name == loader.name:
        return ""
    return f"{forced_by} forces format {loader.name!r}, but the file is {actual.description} (format {actual.name!r})"


def _reads_path(spec: str) -> bool:
    try:
        return spec_reads_path(spec)
    except DataSpecError:
        return True


def _amended(exc: ModelLoadError, said: list[str]) -> ModelLoadError:
    """``exc`` with what libraries said while it happened (captured, never printed)."""
    if not said:
        return exc
    return ModelLoadError(exc.path, f"{exc.problem} (libraries said: {summarise(said)})", exc.fix)


def _architecture(loader: ModelLoader, p: Path, typed: str, arch: Any, arch_kwargs: Optional[Mapping[str, Any]],
                  side: Optional[Sidecar], zoo_cfg: Optional[_ZooConfig], trust_model: bool,
                  notes: list[str]) -> Optional[ArchSpec]:
    """The architecture of a weights-only format, from ``--arch``, the sidecar or the zoo config."""
    if not loader.needs_arch:
        if arch is not None:
            notes.append(f"--arch ignored: format {loader.name} carries its own architecture")
        return None
    kw = dict(arch_kwargs or {})
    folder = p if p.is_dir() else p.parent
    hide = [str(folder), str(folder.resolve())]           # never import from the model's folder (or a link's)
    if arch is not None:
        return resolve_architecture(arch, origin=USER_ORIGIN, where="--arch", trust_model=trust_model,
                                    kwargs=kw, hide=hide)
    if side is not None and "arch" in side.values:
        return resolve_architecture(side.values["arch"], origin="sidecar", where=side.path, trust_model=trust_model,
                                    kwargs={**dict(side.values.get("arch_kwargs", {})), **kw},
                                    base_dir=Path(side.path).parent, hide=hide)
    if zoo_cfg is not None:
        name, cfg_kw = zoo_cfg.values.get("arch"), zoo_cfg.values.get("arch_kwargs", {})
        if not isinstance(name, str) or not isinstance(cfg_kw, dict):
            raise ModelLoadError(zoo_cfg.path, "the zoo config needs \"arch\" (a string) and \"arch_kwargs\" (an object)",
                                 "fix the config, or pass --arch module:Class")
        return resolve_architecture(name, origin="zoo config", where=zoo_cfg.path, trust_model=trust_model,
                                    kwargs={**cfg_kw, **kw},
                                    base_dir=zoo_cfg.path.parent, hide=hide)
    cfg = p.parent / "config.json"
    if p.is_file() and cfg.is_file() and '"_class_name"' in cfg.read_text(errors="replace"):
        raise ModelLoadError(typed, "this weights file is part of a diffusers model directory",
                             f"pass the directory {display_path(p.parent, typed)} instead")
    raise ModelLoadError(
        typed, f"{loader.description} holds weights only, and nothing says which architecture they belong to",
        f"pass --arch module:Class, or put a sidecar {p.stem}.els.toml naming a registered architecture "
        f"(arch = \"Name\") next to it")


def _settings(out: LoaderOutput, loader: ModelLoader, typed: str, zoo_cfg: Optional[_ZooConfig],
              side: Optional[Sidecar], overrides: Mapping[str, Any]) -> tuple[dict, dict]:
    """Adapter settings and their sources: file hints < zoo config < sidecar < explicit overrides."""
    settings: dict[str, Any] = {}
    sources: dict[str, str] = {}
    layers = [(out.hints, f"{loader.name} config", typed)]
    if zoo_cfg is not None and loader.needs_arch:
        layers.append((zoo_cfg.values, "zoo config", str(zoo_cfg.path)))
    if side is not None:
        layers.append((side.values, "sidecar", side.path))
    for values, source, where in layers:
        for k in SETTING_NAMES:
            if values.get(k) is not None:
                settings[k] = validate_setting(k, values[k], where)
                sources[k] = source
    for k, v in overrides.items():
        if v is not None:
            settings[k] = validate_setting(k, v, flag(k))
            sources[k] = "argument"
    return settings, sources


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
        arch: architecture for weights-only formats: ``"module:Class"``, ``"file.py:Class"``,
            a registered architecture name, or (from Python) a callable returning an ``nn.Module``.
        arch_kwargs: keyword arguments for ``arch`` (plain data).
        trust_model: allow formats that run code when loaded (pickled modules, TorchScript,
            ``.pt2``), and code named by a sidecar or config that is not registered.
        format: force a loader by name instead of sniffing.
        state_dict_key: the entry of a checkpoint dict that holds the weights.
        use_sidecar: read ``MODEL.els.toml`` next to the model when present.
        **overrides: adapter settings (``call_style``, ``time_input``, ``prediction``,
            ``schedule``, ``num_train_steps``, ``data_range``); None values are ignored.

    Returns:
        :class:`LoadedModel`.

    Raises:
        ModelLoadError: missing file, unknown/ambiguous/corrupt format, refused untrusted
            format or code reference, missing or mismatching architecture, bad settings.
    """
    typed, given, p = _locate(path)
    for k in overrides:
        if k not in SETTING_NAMES:
            raise ModelLoadError(typed, f"unknown setting {k!r}; known: {', '.join(SETTING_NAMES)}")
    found = find_sidecar(given) if use_sidecar else None
    side = read_sidecar(found) if found is not None else None
    forced_by = "--format" if format is not None else f"the sidecar {display_path(side.path, typed)}" if side else ""
    fmt = format if format is not None else (side.values.get("format") if side else None)
    zoo_cfg = _zoo_config_beside(given)
    key = state_dict_key if state_dict_key is not None else (side.values.get("state_dict_key") if side else None)
    with capture_library_output() as said:
        try:
            loader, notes = _pick_loader(p, typed, fmt, forced_by)
        except ModelLoadError as exc:
            raise _amended(exc, said) from None
        try:
            arch_spec = _architecture(loader, given, typed, arch, arch_kwargs, side, zoo_cfg, trust_model, notes)
            out = loader.load(p, LoadRequest(arch=arch_spec, trust_model=bool(trust_model), state_dict_key=key))
        except ModelLoadError as exc:
            wrong = _contradiction(p, loader, forced_by) if fmt else ""
            if wrong:   # the forced format is the problem, not the file
                raise ModelLoadError(typed, wrong, "drop the forced format, or force the right one") from None
            raise _amended(exc, said) from None
    settings, sources = _settings(out, loader, typed, zoo_cfg, side, overrides)
    if said:
        notes.append(f"while loading, libraries said: {summarise(said)}")

    read = [out.weights_file, *([zoo_cfg.path] if zoo_cfg is not None and loader.needs_arch else []), *out.extra_files]
    files = [(display_path(f, typed), file_sha256(f)) for f in read]
    if side is not None:
        files.insert(1, (display_path(side.path, typed), side.sha256))
    data_hint = zoo_cfg.values.get("data") if zoo_cfg is not None else None
    data_hint = data_hint if isinstance(data_hint, str) and data_hint.strip() else None
    return LoadedModel(
        module=out.module,
        format=loader.name,
        path=typed,
        sha256=files[0][1],
        n_params=sum(t.numel() for t in _parameters(out.module)),
        dtype=describe_dtype(out.module),
        trust_model=bool(trust_model),
        ran_code=out.ran_code,
        arch=arch_spec,
        files=tuple(files),
        settings=MappingProxyType(settings),
        setting_sources=MappingProxyType(sources),
        sidecar=display_path(side.path, typed) if side else None,
        notes=tuple(notes) + tuple(out.notes),
        data_hint=data_hint,
        data_hint_source=f"zoo config {display_path(zoo_cfg.path, typed)}" if zoo_cfg is not None else None,
        data_hint_trusted=data_hint is not None and (trust_model or WEIGHTS_DIR in zoo_cfg.path.parents
                                                     or not _reads_path(data_hint)),
    )
