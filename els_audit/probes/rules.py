"""One rule-table class for the three tables of the probes.

- the canonical op table (:data:`els_audit.probes.ops.OP_TABLE`): op target -> canonicaliser;
- the receptive-field rules (:data:`els_audit.probes.rf.RF_RULES`): op kind -> rule;
- the equivariance rules (:data:`els_audit.probes.breakers.EQ_RULES`): op kind -> rule.

A key registered twice is refused.  A table keyed by op kind is built with the declared
vocabulary (:data:`els_audit.probes.kinds.OP_KINDS`), so a misspelt kind fails when the rule
is registered (at import), not later as "no rule, partial".
"""

from __future__ import annotations

from typing import Any, Callable, Collection, Iterator, Optional


class RuleTable:
    """key -> rule, each key at most once.

    Args:
        what: what the rules are for, used in messages (``"receptive-field"``).
        allowed: the keys that may be registered (``None``: any hashable key).
        describe: how a key is named in messages.
    """

    def __init__(self, what: str, *, allowed: Optional[Collection[Any]] = None,
                 describe: Callable[[Any], str] = repr):
        self.what = what
        self._allowed = None if allowed is None else frozenset(allowed)
        self._describe = describe
        self._rules: dict[Any, Callable] = {}

    def register(self, *keys: Any) -> Callable[[Callable], Callable]:
        """Decorator registering ``fn`` for every key; refuses a key already taken or not allowed."""
        if not keys:
            raise ValueError(f"registering a {self.what} rule needs at least one key")
        for k in keys:
            if self._allowed is not None and k not in self._allowed:
                raise ValueError(f"{self.what} rule for {self._describe(k)}: not a declared op kind "
                                 f"(see els_audit.probes.kinds.OP_KINDS)")

        def deco(fn: Callable) -> Callable:
            for k in keys:
                if k in self._rules:
                    raise ValueError(f"{self.what} rule for {self._describe(k)} already registered "
                                     f"({self._rules[k].__qualname__}); refusing {fn.__qualname__}")
            for k in keys:
                self._rules[k] = fn
            return fn

        return deco

    def get(self, key: Any) -> Optional[Callable]:
        try:
            return self._rules.get(key)
        except TypeError:  # an unhashable key has no rule
            return None

    def keys(self) -> list[str]:
        """The registered keys, named and sorted."""
        return sorted(self._describe(k) for k in self._rules)

    def __contains__(self, key: Any) -> bool:
        return self.get(key) is not None

    def __iter__(self) -> Iterator[Any]:
        return iter(list(self._rules))
