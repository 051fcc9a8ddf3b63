"""Plugin registries backed by entry points.

Every pluggable family (noise schedules, data sets, model loaders) is a :class:`Registry`
bound to one entry-point group.  First-party plugins in ``plugins/`` (installed as the
package ``els_audit_plugins``) are declared in ``pyproject.toml`` under the same groups a
third party uses, so they are found the same way (the pluggy/pytest convention).

A plugin may also be registered in code with the :meth:`Registry.register` decorator, for
tests and notebooks.  Registering a name twice is refused.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any, Callable, Generic, Iterator, Optional, TypeVar

__all__ = ["Registry", "PluginError"]

T = TypeVar("T")


class PluginError(ValueError):
    """A plugin could not be found or loaded."""


class Registry(Generic[T]):
    """Name -> plugin object, filled lazily from the entry-point group ``group``.

    Args:
        group: entry-point group, e.g. ``"els_audit.schedules"``.
        what: human noun used in error messages, e.g. ``"noise schedule"``.
        check: ``check(name, obj)`` raises :class:`PluginError` when ``obj`` is not what the
            group expects (e.g. not a subclass of the family's base class); run on every
            plugin as it is registered or loaded.
    """

    def __init__(self, group: str, what: str, check: Optional[Callable[[str, Any], None]] = None):
        self.group = group
        self.what = what
        self._check = check
        self._items: dict[str, T] = {}
        self._origin: dict[str, str] = {}
        self._loaded = False

    # -- registration -------------------------------------------------------------
    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: register ``obj`` under ``name``; refuses a name already taken."""

        def deco(obj: T) -> T:
            self._add(name, obj, origin=f"{getattr(obj, '__module__', '?')}:{getattr(obj, '__qualname__', obj)!s}")
            return obj

        return deco

    def _add(self, name: str, obj: T, origin: str) -> None:
        if name in self._items:
            raise PluginError(
                f"{self.what} {name!r} is registered twice: by {self._origin[name]} and by {origin}"
            )
        if self._check is not None:
            self._check(name, obj)
        self._items[name] = obj
        self._origin[name] = origin

    def _load_entry_points(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        seen: set[tuple[str, str]] = set()
        for ep in entry_points(group=self.group):
            # The same distribution can appear twice on sys.path (editable + site); skip
            # exact repeats, refuse genuine clashes.
            if (ep.name, ep.value) in seen:
                continue
            seen.add((ep.name, ep.value))
            if ep.name in self._items and self._origin.get(ep.name) == ep.value:
                continue
            try:
                obj = ep.load()
            except Exception as exc:  # a broken third-party plugin must name itself
                raise PluginError(
                    f"could not load {self.what} plugin {ep.name!r} ({ep.value}): {exc}"
                ) from exc
            self._add(ep.name, obj, origin=ep.value)

    # -- lookup -------------------------------------------------------------------
    def get(self, name: str) -> T:
        self._load_entry_points()
        try:
            return self._items[name]
        except KeyError:
            known = ", ".join(sorted(self._items)) or "none installed"
            raise PluginError(f"unknown {self.what} {name!r}; known: {known}") from None

    def names(self) -> list[str]:
        self._load_entry_points()
        return sorted(self._items)

    def origin(self, name: str) -> str:
        self.get(name)
        return self._origin[name]

    def __contains__(self, name: object) -> bool:
        self._load_entry_points()
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def unregister(self, name: str) -> Any:
        """Remove a plugin (tests only)."""
        self._origin.pop(name, None)
        return self._items.pop(name)
