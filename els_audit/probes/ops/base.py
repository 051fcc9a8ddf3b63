"""The canonical op table: what every graph node is, whatever form the model wrote it in.

References: fvcore ``nn/jit_handles.py`` and ``torch.utils.flop_counter``: a table maps every op to a
handler; an op without one is reported, never assumed harmless.

The table (:data:`OP_TABLE`) maps torch.nn module classes, functions, aten overload packets and
``"Tensor.<method>"`` strings to a canonicaliser ``rule(ctx) -> (kind, params, operands)``.
Register more with :func:`register_op`; a target registered twice is refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from ..meta import META_SHAPE, META_VALUE
from ...serialize import json_safe
from ..rules import RuleTable


class _MissingOp:
    """Stands in for an aten op this torch build lacks: registrable, never matched."""

    def __init__(self, name: str):
        self.__name__ = name

    def __repr__(self) -> str:
        return f"aten.{self.__name__} (absent in this torch build)"


class _SafeAten:
    def __getattr__(self, name: str) -> Any:
        try:
            return getattr(torch.ops.aten, name)
        except (AttributeError, RuntimeError):
            return _MissingOp(name)


aten = _SafeAten()


# Kinds that carry no data (shape queries, asserts, guards): never image-dependent.
META_KIND = "meta"


# ----------------------------------------------------------------------------------------
# Canonical op records
# ----------------------------------------------------------------------------------------
def target_name(target: Any) -> str:
    """A readable qualified name for an FX node target (class, function, aten op, method)."""
    if isinstance(target, str):
        return target
    if isinstance(target, torch._ops.OpOverload):
        return f"aten.{target.__name__}" if target.namespace == "aten" else str(target)
    if isinstance(target, torch._ops.OpOverloadPacket):
        return f"aten.{target.__name__}"
    if isinstance(target, type):
        return f"{target.__module__}.{target.__qualname__}"
    mod = getattr(target, "__module__", None) or ""
    name = getattr(target, "__qualname__", None) or getattr(target, "__name__", None) or repr(target)
    if "boolean_dispatch" in name:
        name = getattr(target, "__name__", name)
    return f"{mod}.{name}" if mod else name


def first_line(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {msg[0] if msg else ''}"[:300]


def _json_default(x: Any) -> Any:
    """How an op parameter that is no plain value is written: a dtype by name, a graph node
    by its name, anything else by its repr."""
    if isinstance(x, (torch.dtype, fx.Node)):
        return str(x)
    return repr(x)


@dataclass(frozen=True)
class OpInfo:
    """The canonical description of one graph node.

    Attributes:
        kind: canonical op kind (``"conv"``, ``"pool"``, ``"pointwise"``, ``"norm"``,
            ``"einsum"``, ``"attention"``, ...; ``"unknown"`` when no table entry matched;
            ``"meta"`` for nodes without data, e.g. ``x.shape``).
        target: qualified name of the op (module class, function, aten op or method).
        module_path: dotted path of the owning submodule (``""`` at the root / unknown).
        params: kind-specific parameters (JSON-safe): kernel, stride, dilation, padding
            (per spatial dim, ``[before, after]``), padding_mode, groups, ...
        operands: names of the data operand nodes in canonical order (e.g. for a conv
            ``(input, weight[, bias])``; shape-only arguments are not operands).
        note: why the op is ``unknown`` (no rule, or the rule failed), else ``""``.
    """

    kind: str
    target: str
    module_path: str = ""
    params: Mapping[str, Any] = field(default_factory=dict)
    operands: tuple[str, ...] = ()
    note: str = ""

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "target": self.target,
            "module_path": self.module_path,
            "params": json_safe(dict(self.params), _json_default),
            "operands": list(self.operands),
            "note": self.note,
        }


Canonicaliser = Callable[["OpContext"], tuple]


#: The canonical op table: nn.Module classes, callables, aten overload packets and
#: ``"Tensor.<method>"`` strings -> canonicaliser (see :func:`register_op`).
OP_TABLE = RuleTable("canonical", describe=lambda t: f"op {target_name(t)}")
register_op = OP_TABLE.register


#: torch op tag -> canonicaliser, for aten ops no table entry names (``torch.Tag.pointwise``:
#: every elementwise aten op, whatever its name).  See :func:`register_tag`.
_TAG_RULES: dict[Any, Canonicaliser] = {}


def register_tag(tag: Any) -> Callable[[Canonicaliser], Canonicaliser]:
    """Decorator: ``fn`` canonicalises every aten op carrying ``tag`` that has no rule of its own."""
    def deco(fn: Canonicaliser) -> Canonicaliser:
        if tag in _TAG_RULES:
            raise ValueError(f"tag {tag} already has a canonical rule ({_TAG_RULES[tag].__qualname__})")
        _TAG_RULES[tag] = fn
        return fn

    return deco


def lookup_rule(node: fx.Node, gm: fx.GraphModule) -> Optional[Canonicaliser]:
    """The canonicaliser of a graph node: by module class (a subclass that keeps its
    parent's forward behaves like the parent), method name, function or aten op."""
    if node.op == "call_module":
        cls = type(gm.get_submodule(node.target))
        for base in cls.__mro__:
            rule = OP_TABLE.get(base)
            if rule is not None and (base is cls or getattr(cls, "forward", None) is getattr(base, "forward", None)):
                return rule
        return None
    if node.op == "call_method":
        return rule_for_target(f"Tensor.{node.target}")
    if node.op == "call_function":
        return rule_for_target(node.target)
    return None


def rule_for_target(target: Any) -> Optional[Canonicaliser]:
    """The canonicaliser of a function, aten op or ``"Tensor.<method>"``.

    An aten op without an entry falls back on its tags (:func:`register_tag`).  An in-place variant (``aten.leaky_relu_``, ``Tensor.clamp_``) without a rule of its own
    gets its out-of-place op's rule: it computes the same values into its first argument,
    whose schema it shares.
    """
    rule = OP_TABLE.get(target)
    if rule is None and isinstance(target, torch._ops.OpOverload):
        rule = OP_TABLE.get(target.overloadpacket)
    if rule is not None:
        return rule
    name = _inplace_base(target)
    if name is not None and isinstance(target, str):
        return OP_TABLE.get(name)
    if name is not None and target.namespace == "aten":
        base = getattr(torch.ops.aten, name, None)
        rule = OP_TABLE.get(base) if base is not None else None
        if rule is not None:
            return rule
    if isinstance(target, torch._ops.OpOverload):
        return next((fn for tag, fn in _TAG_RULES.items() if tag in target.tags), None)
    return None


def _inplace_base(target: Any) -> Optional[str]:
    """``"leaky_relu"`` for ``aten.leaky_relu_`` (an op or packet) or ``"Tensor.clamp"`` for
    ``"Tensor.clamp_"``; ``None`` for anything that is not an in-place variant."""
    if isinstance(target, str):
        return target[:-1] if target.startswith("Tensor.") and target.endswith("_") and not target.endswith("__") else None
    if isinstance(target, torch._ops.OpOverload):
        target = target.overloadpacket
    if isinstance(target, torch._ops.OpOverloadPacket):
        name = target.__name__
        return name[:-1] if name.endswith("_") and not name.endswith("__") and len(name) > 1 else None
    return None


class OpContext:
    """What a canonicaliser sees: the node, its module, argument binding and values."""

    def __init__(self, node: fx.Node, gm: fx.GraphModule):
        self.node = node
        self.gm = gm
        self.module = gm.get_submodule(node.target) if node.op == "call_module" else None

    # -- values ------------------------------------------------------------------
    @staticmethod
    def is_tensor(x: Any) -> bool:
        return isinstance(x, fx.Node) and isinstance(x.meta.get(META_SHAPE), tuple) and (
            len(x.meta[META_SHAPE]) == 0 or isinstance(x.meta[META_SHAPE][0], int)
        )

    def value(self, x: Any) -> Any:
        """Concrete value of an argument: non-tensor nodes are replaced by their recorded
        value, tensor nodes are returned as nodes; containers are resolved recursively."""
        if isinstance(x, fx.Node):
            if self.is_tensor(x):
                return x
            return x.meta.get(META_VALUE)
        if isinstance(x, (list, tuple)):
            return type(x)(self.value(v) for v in x) if not isinstance(x, torch.Size) else tuple(x)
        if isinstance(x, dict):
            return {k: self.value(v) for k, v in x.items()}
        if isinstance(x, slice):  # x[:, 1:x.shape[2] - 1]: bounds computed in the graph
            return slice(self.value(x.start), self.value(x.stop), self.value(x.step))
        return x

    def shape(self, x: Any) -> Optional[tuple]:
        return x.meta.get(META_SHAPE) if isinstance(x, fx.Node) else None

    @property
    def out_shape(self) -> Any:
        return self.node.meta.get(META_SHAPE)

    # -- binding -----------------------------------------------------------------
    def bind(self, names: Sequence[str], defaults: Optional[Mapping[str, Any]] = None, skip_self: bool = False) -> dict:
        """Bind positional/keyword args to ``names`` (values resolved with :meth:`value`)."""
        out = dict(defaults or {})
        args = list(self.node.args)
        for name, a in zip(names, args):
            out[name] = a
        out.update(self.node.kwargs)
        return {k: self.value(v) for k, v in out.items()}

    def bind_schema(self) -> dict:
        """Bind an aten node's arguments by its schema (defaults filled in)."""
        schema = self.node.target._schema
        names = [a.name for a in schema.arguments]
        defaults = {a.name: a.default_value for a in schema.arguments if a.has_default_value()}
        return self.bind(names, defaults)

    def tensor_args(self) -> list[fx.Node]:
        """Every tensor node among the args/kwargs, in order (duplicates kept once)."""
        seen: list[fx.Node] = []
        for a in pytree.tree_leaves((list(self.node.args), dict(self.node.kwargs))):
            if self.is_tensor(a) and a not in seen:
                seen.append(a)
        return seen
