"""The trust policy: the one function every code reference goes through.

A *code reference* is text that names Python code to run: ``--arch``, a sidecar's
``arch``, a zoo config's ``arch``, a diffusers config's ``_class_name``, and anything that
later names code.  :func:`resolve_architecture` turns one into an :class:`ArchSpec`, and
nothing else in the package imports or calls code by name.  The rules:

1. **Who named it.**  ``origin="argument"`` is the user (``--arch``, or a Python caller's
   ``arch=``); every other origin is a *file* ("sidecar", "zoo config", "diffusers
   config"), which arrives with a download exactly as a pickle does.
2. **Registered architectures are always allowed.**  A name (or its ``module:Class``
   value) registered in the entry-point group ``els_audit.architectures`` is code the user
   installed and declared; the zoo registers its own classes there.
3. **Code named by a file needs ``--trust-model``**, unless rule 2 applies or a loader
   plugin vouches for the name by giving ``library=(package, BaseClass)``: the name is then
   only looked up as an attribute of that installed package (no other import) and must be a
   subclass of ``BaseClass`` (the diffusers loader: a diffusers model class).
4. **What may be called.**  The object must be an ``nn.Module`` subclass, found *before*
   anything is called.  Only the user (origin "argument") may also name a plain Python
   function defined in a ``.py`` file they name (a factory such as ``mine.py:net``); a
   function of an installed module (``subprocess:run``, ``pandas:read_pickle``) is never a
   model, and built-ins, other classes and other callables are refused for every origin.
5. **Keyword arguments are plain data** (``None``, bools, numbers, strings, and lists and
   string-keyed dicts of them).
6. **Where code is found.**  ``package.module:Name`` is imported with the current folder
   and the model's folder off ``sys.path`` (unless ``PYTHONPATH`` names them), so a ``.py``
   lying beside the model is never imported by accident.  A file path
   (``path/to/file.py:Name``) is run only when the user typed it, or, with
   ``--trust-model``, when a file names it (resolved against that file's folder).
"""

from __future__ import annotations

import importlib.util
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch.nn as nn

from .._safe_path import import_without_implicit_paths
from ..console import text
from ..registry import PluginError, Registry
from .settings import ModelLoadError

__all__ = ["ArchSpec", "ARCHITECTURES_GROUP", "REGISTERED_ARCHITECTURES", "resolve_architecture", "check_plain_data",
           "USER_ORIGIN"]

ARCHITECTURES_GROUP = "els_audit.architectures"
#: the origin of a reference the user typed (or a Python caller passed)
USER_ORIGIN = "argument"


def _check_module_class(name: str, obj: Any) -> None:
    if not (isinstance(obj, type) and issubclass(obj, nn.Module)):
        raise PluginError(f"architecture plugin {name!r} is a {_kind(obj)}, not a torch.nn.Module subclass")


#: architectures the user installed and declared (entry-point group ``els_audit.architectures``)
REGISTERED_ARCHITECTURES: Registry = Registry(ARCHITECTURES_GROUP, "architecture", check=_check_module_class)


@dataclass(frozen=True)
class ArchSpec:
    """Where the code that builds the module comes from.

    ``build(**kwargs) -> nn.Module``; ``name`` is what the report shows
    (``module:Class``); ``source`` says who named it ("argument", "sidecar", "zoo config",
    "diffusers config"); ``kwargs`` are plain data; ``check_on_meta``: the architecture and
    its arguments came from a file the user did not trust, so it must be checked against the
    weights on torch's meta device before it is built for real
    (:func:`els_audit.models.weights.own_state`).
    """

    build: Callable[..., Any]
    name: str
    source: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    check_on_meta: bool = False

    def to_dict(self) -> dict:
        return {"name": self.name, "source": self.source, "kwargs": dict(self.kwargs)}


def _kind(obj: Any) -> str:
    if isinstance(obj, type):
        return f"class ({obj.__module__}.{obj.__qualname__})"
    if inspect.isbuiltin(obj):
        return "built-in function"
    if inspect.isfunction(obj):
        return "function"
    if isinstance(obj, nn.Module):
        return f"{type(obj).__name__} instance"
    return type(obj).__name__


def check_plain_data(value: Any, where: Any, what: str = "arch_kwargs") -> None:
    """Refuse anything in ``value`` but None, bools, numbers, strings, lists and string-keyed dicts."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return
    if isinstance(value, (list, tuple)):
        for v in value:
            check_plain_data(v, where, what)
        return
    if isinstance(value, Mapping):
        for k, v in value.items():
            if not isinstance(k, str):
                raise ModelLoadError(where, f"{what} keys must be strings, got {type(k).__name__}", "fix the arguments")
            check_plain_data(v, where, what)
        return
    raise ModelLoadError(where, f"{what} may hold only plain data (numbers, strings, lists, dicts), "
                                f"not a {type(value).__name__}", "fix the arguments")


def _registered(ref: str) -> Optional[tuple[str, Any]]:
    """(name, class) when ``ref`` is a registered architecture's name or its ``module:Class`` value."""
    reg = REGISTERED_ARCHITECTURES
    if ref in reg:
        return ref, reg.get(ref)
    for name in reg.names():
        if reg.origin(name) == ref:
            return name, reg.get(name)
    return None


def _flag_hint(origin: str) -> str:
    return "fix --arch" if origin == USER_ORIGIN else f"fix the {origin}, or pass --arch yourself"


def _import_file(file: Path, ref: str, where: Any, origin: str) -> Any:
    if not file.is_file():
        raise ModelLoadError(where, f"architecture file {file} does not exist", _flag_hint(origin))
    modspec = importlib.util.spec_from_file_location(f"_els_arch_{file.stem}", file)
    module = importlib.util.module_from_spec(modspec)
    try:
        modspec.loader.exec_module(module)
    except Exception as exc:
        raise ModelLoadError(where, f"importing architecture file {file} failed: {type(exc).__name__}: {text(exc, 200)}",
                             _flag_hint(origin)) from exc
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # SystemExit and the like from the file's top level
        raise ModelLoadError(where, f"importing architecture file {file} stopped with {type(exc).__name__}",
                             _flag_hint(origin)) from None
    return module


def _import_module(mod_name: str, ref: str, where: Any, origin: str, hide: Sequence[str]) -> Any:
    try:
        return import_without_implicit_paths(mod_name, hide)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:
        local = Path(mod_name.split(".")[0] + ".py")
        hint = _flag_hint(origin)
        if isinstance(exc, ModuleNotFoundError) and local.is_file() and origin == USER_ORIGIN:
            hint = (f"{local} in the current folder is not imported by module name; "
                    f"pass --arch ./{local}:{ref.rpartition(':')[2]} to use that file")
        raise ModelLoadError(where, f"cannot import architecture module {mod_name!r}: {type(exc).__name__}: {text(exc, 200)}",
                             hint) from None


def _lookup(obj: Any, attr: str, ref: str, where: Any, origin: str) -> Any:
    for part in attr.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise ModelLoadError(where, f"{ref}: no attribute {attr!r}", _flag_hint(origin))
    return obj


def resolve_architecture(
    ref: Union[str, Callable[..., Any]],
    *,
    origin: str,
    where: Any,
    trust_model: bool = False,
    kwargs: Optional[Mapping[str, Any]] = None,
    base_dir: Optional[Path] = None,
    hide: Sequence[str] = (),
    library: Optional[tuple[Any, type]] = None,
) -> ArchSpec:
    """Resolve a code reference under the trust policy (module docstring), before calling anything.

    Args:
        ref: ``"pkg.module:Class"``, ``"path/to/file.py:Class"``, a registered architecture
            name, or (from a Python caller) a class or function.
        origin: who named it: ``"argument"`` (the user) or the file kind ("sidecar", ...).
        where: what error messages name (the file that held the reference, or the flag).
        trust_model: the user passed ``--trust-model`` (code named by files may be imported).
        kwargs: keyword arguments for the class; plain data only.
        base_dir: the folder a file-named ``.py`` path is relative to (the naming file's).
        hide: more folders kept off ``sys.path`` while importing (the model's folder).
        library: ``(package, BaseClass)``: the installed package a loader plugin vouches for;
            ``ref`` is then a class name looked up in it only, and must subclass ``BaseClass``.

    Returns:
        :class:`ArchSpec`.

    Raises:
        ModelLoadError: the reference is refused, cannot be found, or is not a module class.
    """
    kwargs = dict(kwargs or {})
    check_plain_data(kwargs, where)
    user = origin == USER_ORIGIN
    if not isinstance(ref, str):
        # a Python caller's own object is code they hold, not a reference to look up
        if not user or not callable(ref):
            raise ModelLoadError(where, f"an architecture must be a module:Class reference or, from Python, a "
                                        f"callable; got a {type(ref).__name__}", _flag_hint(origin))
        name = f"{getattr(ref, '__module__', '?')}:{getattr(ref, '__qualname__', type(ref).__name__)}"
        return ArchSpec(ref, name, origin, kwargs)
    ref = ref.strip()
    if not ref:
        raise ModelLoadError(where, "the architecture reference is empty", _flag_hint(origin))
    if library is not None:
        package, base = library
        obj = getattr(package, ref, None)
        if not (isinstance(obj, type) and issubclass(obj, base)):
            raise ModelLoadError(where, f"{ref!r} is not a {package.__name__} {base.__name__} class",
                                 "pass --format and --arch for another loader")
        return ArchSpec(obj, f"{package.__name__}:{ref}", origin, kwargs, check_on_meta=not user and not trust_model)
    reg = _registered(ref)
    if reg is not None:
        name, cls = reg
        return ArchSpec(cls, REGISTERED_ARCHITECTURES.origin(name), origin, kwargs,
                        check_on_meta=not user and not trust_model)
    if not user and not trust_model:
        raise ModelLoadError(
            where, f"the {origin} names code ({ref!r}) that is not a registered architecture; importing it could run "
                   f"anything that came with the download",
            "pass --trust-model if you trust the files, or pass --arch yourself")
    mod_name, sep, attr = ref.rpartition(":")
    if not sep or not mod_name or not attr:
        raise ModelLoadError(where, f"architecture {ref!r} is neither a registered architecture "
                                    f"({', '.join(REGISTERED_ARCHITECTURES.names())}) nor of the form module:Class",
                             _flag_hint(origin))
    if mod_name.endswith(".py"):
        file = Path(mod_name).expanduser()
        if not user and not file.is_absolute():
            file = (base_dir or Path.cwd()) / file
        module = _import_file(file, ref, where, origin)
    else:
        module = _import_module(mod_name, ref, where, origin, hide)
    obj = _lookup(module, attr, ref, where, origin)
    return _checked(obj, ref, origin, where, kwargs, module_name=getattr(module, "__name__", None),
                    from_file=mod_name.endswith(".py"))


def _checked(obj: Any, name: str, origin: str, where: Any, kwargs: dict, module_name: Optional[str],
             from_file: bool) -> ArchSpec:
    """Rule 4: a module class from anyone; a function defined in a file the user named, from the user only."""
    if isinstance(obj, type) and issubclass(obj, nn.Module):
        return ArchSpec(obj, name, origin, kwargs)
    if origin == USER_ORIGIN and from_file and inspect.isfunction(obj) and obj.__module__ == module_name:
        return ArchSpec(obj, name, origin, kwargs)
    allowed = ("a torch.nn.Module subclass (or a function defined in a .py file you name: path/to/file.py:func)"
               if origin == USER_ORIGIN else "a torch.nn.Module subclass")
    raise ModelLoadError(where, f"{name} is a {_kind(obj)}; an architecture must be {allowed}", _flag_hint(origin))


def call_architecture(arch: ArchSpec, where: Any) -> nn.Module:
    """Build ``arch`` (the one place user code is called by name); every exception, and
    ``SystemExit`` and the like, becomes a one-line :class:`ModelLoadError`."""
    try:
        module = arch.build(**dict(arch.kwargs))
    except KeyboardInterrupt:
        raise
    except Exception as exc:
        raise ModelLoadError(where, f"building architecture {arch.name} failed: {type(exc).__name__}: {text(exc, 200)}",
                             _flag_hint(arch.source)) from exc
    except BaseException as exc:
        raise ModelLoadError(where, f"building architecture {arch.name} stopped with {type(exc).__name__}"
                                    f"{'' if not exc.args else f' {exc.args[0]!r}'} instead of returning a model",
                             _flag_hint(arch.source)) from None
    if not isinstance(module, nn.Module):
        raise ModelLoadError(where, f"architecture {arch.name} returned a {type(module).__name__}, "
                                    f"not a torch.nn.Module", _flag_hint(arch.source))
    return module
