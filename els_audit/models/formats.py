"""The loader plugin protocol: how a model format is recognised and read.

A format is a plugin of the entry-point group ``els_audit.loaders`` (first-party ones in
``plugins/loaders.py``): a :class:`ModelLoader` subclass that sniffs a path
(:meth:`ModelLoader.claim`, by content, never by executing anything) and loads it from a
:class:`LoadRequest` into a :class:`LoaderOutput`.  :func:`sniff_format` names the one
loader that claims a path; :func:`get_loader` returns a loader by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from ..registry import PluginError, Registry
from .settings import ModelLoadError
from .trust import ArchSpec

__all__ = ["ArchSpec", "LoadRequest", "LoaderOutput", "ModelLoader", "LOADERS", "get_loader", "sniff_format"]

PathLike = Union[str, Path]


# ---------------------------------------------------------------------------- loader protocol
@dataclass(frozen=True)
class LoadRequest:
    """What :func:`load_model` hands a loader.

    ``arch``: resolved architecture for weights-only formats, or None.
    ``trust_model``: the user allows code in the file to run.
    ``state_dict_key``: which entry of a checkpoint dict holds the weights.
    """

    arch: Optional[ArchSpec] = None
    trust_model: bool = False
    state_dict_key: Optional[str] = None


@dataclass(frozen=True)
class LoaderOutput:
    """What a loader returns.

    ``module``: the model; ``weights_file``: the file hashed as the model's SHA-256;
    ``extra_files``: other files read (configs), hashed too; ``hints``: adapter settings
    found in the files (e.g. a diffusers scheduler config), as {name: value};
    ``ran_code``: whether loading executed code from the file (trusted formats);
    ``notes``: things done to the input the report should mention.
    """

    module: Any
    weights_file: Path
    extra_files: tuple[Path, ...] = ()
    hints: Mapping[str, Any] = field(default_factory=dict)
    ran_code: bool = False
    notes: tuple[str, ...] = ()


class ModelLoader:
    """Base class of model loader plugins.

    Subclasses set ``name`` (the entry-point name), ``safe`` (True when loading runs no
    code from the file), ``description`` (what the format is, for messages) and
    ``needs_arch`` (weights only: needs an architecture), and implement:

    - ``claim(path) -> bool``: sniff by content, cheaply, without running anything;
    - ``load(path, request) -> LoaderOutput``;
    - ``save(module, path, *, example_inputs=None) -> Path``: write ``module`` in this
      format (used by the contract test's round trip; ``example_inputs`` is a tuple of
      example arguments, needed by tracing formats).
    """

    name: str = "?"
    safe: bool = True
    needs_arch: bool = False
    description: str = "?"

    def claim(self, path: Path) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    def load(self, path: Path, request: LoadRequest) -> LoaderOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def save(self, module: Any, path: PathLike, *, example_inputs: Optional[tuple] = None) -> Path:  # pragma: no cover
        raise NotImplementedError

    def refuse_untrusted(self, path: Path, what: str) -> None:
        """Raise the standard refusal for a format that can run code."""
        raise ModelLoadError(
            path,
            f"this is {what}; loading it can run arbitrary code on this machine, so it is refused",
            "pass --trust-model if you trust its origin, or export the weights as safetensors "
            "or a state dict (torch.save(model.state_dict(), ...)) and pass --arch module:Class",
        )


LOADERS: Registry = Registry("els_audit.loaders", "model loader")


def get_loader(name: str, where: PathLike = "--format") -> ModelLoader:
    try:
        obj = LOADERS.get(name)
    except PluginError as exc:
        raise ModelLoadError(where, str(exc), "fix --format") from None
    inst = obj() if isinstance(obj, type) else obj
    if not getattr(inst, "name", None) or inst.name == "?":
        inst.name = name
    return inst


def sniff_format(path: PathLike) -> str:
    """Name of the one loader that claims ``path``.

    Raises:
        ModelLoadError: no loader or several loaders claim it.
    """
    p = Path(path)
    claims = []
    for name in LOADERS.names():
        loader = get_loader(name)
        try:
            ok = bool(loader.claim(p))
        except ModelLoadError:
            raise
        except Exception:  # a sniffer that chokes on the file does not claim it
            ok = False
        if ok:
            claims.append(name)
    if len(claims) == 1:
        return claims[0]
    if len(claims) > 1:
        raise ModelLoadError(p, f"ambiguous format: claimed by {', '.join(claims)}", "pass --format NAME to choose")
    problem = _diagnose_unclaimed(p)
    if "truncated or corrupt" in problem or "empty" in problem:
        fix = "re-download or re-export the file"
    else:
        fix = f"pass --format NAME (one of {', '.join(LOADERS.names())}) if you know it"
    raise ModelLoadError(p, problem, fix)


def _diagnose_unclaimed(p: Path) -> str:
    """Why no loader claimed ``p``, as precisely as the bytes allow."""
    if p.is_dir():
        return "is a directory that no loader recognises (a diffusers model directory holds config.json and diffusion_pytorch_model.safetensors)"
    size = p.stat().st_size
    if size == 0:
        return "is empty (0 bytes)"
    with open(p, "rb") as f:
        head = f.read(16)
    if head[:2] == b"PK":
        return f"looks like a zip archive (torch.save / TorchScript / .pt2) but is truncated or corrupt ({size} bytes)"
    if p.suffix == ".safetensors" or (len(head) >= 9 and head[8:9] == b"{"):
        return f"looks like a safetensors file but its header is truncated or corrupt ({size} bytes)"
    if head[:1] == b"\x80":
        return "is a legacy (non-zip) pickle that no loader recognises"
    return f"unknown model format (first bytes {head[:8]!r})"
