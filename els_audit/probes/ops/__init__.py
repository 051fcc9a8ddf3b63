"""The canonical op table and its canonicalisers, one module per family of ops.

Importing this package registers every canonicaliser in :data:`OP_TABLE`.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from types import MappingProxyType

from ..kinds import OP_KINDS
from ..meta import META_SHAPE
from . import contract, elementwise, layout, spatial  # noqa: F401 - registers the canonicalisers
from .base import META_KIND, OP_TABLE, OpContext, OpInfo, aten, first_line, lookup_rule, register_op, target_name
from .layout import NO_DATA_FNS, NO_DATA_METHODS

__all__ = ["OP_TABLE", "OpContext", "OpInfo", "register_op", "target_name", "canonicalise", "operand_nodes",
           "no_data", "module_path", "first_line", "aten", "META_KIND"]


def module_path(node: fx.Node) -> str:
    """Dotted path of the submodule that owns ``node`` (``""`` at the root or unknown)."""
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    if stack:
        last = list(stack.values())[-1]
        path = last[0] if isinstance(last, tuple) else str(last)
        # torch.export writes e.g. "L['self'].down.0" in some versions.
        return path.replace("L['self'].", "").replace("L['self']", "")
    return ""


def no_data(node: fx.Node) -> bool:
    """Targets whose result carries no data of their tensor arguments (shape only)."""
    t = node.target
    if node.op == "call_method":
        return f"Tensor.{t}" in NO_DATA_METHODS
    if node.op == "call_function":
        try:
            if t in NO_DATA_FNS:
                return True
        except TypeError:
            return False
        return isinstance(t, torch._ops.OpOverload) and t.overloadpacket in NO_DATA_FNS
    return False


def operand_nodes(node: fx.Node, info: OpInfo) -> list[fx.Node]:
    """The data operands of ``node`` (every input for an unknown op)."""
    if info.kind == "unknown":
        return [a for a in node.all_input_nodes]
    names = set(info.operands)
    return [a for a in node.all_input_nodes if a.name in names]


def canonicalise(node: fx.Node, gm: fx.GraphModule) -> OpInfo:
    """The :class:`OpInfo` of a call node (``unknown``, with the reason, when no rule fits)."""
    path = module_path(node)
    if node.op == "call_module":
        tname = target_name(type(gm.get_submodule(node.target)))
    elif node.op == "call_method":
        tname = f"Tensor.{node.target}"
    else:
        tname = target_name(node.target)
    if node.meta.get(META_SHAPE) is None:
        # No tensor comes out: shape arithmetic, asserts, guards.  No data flows on.
        return OpInfo(META_KIND, tname, path)
    rule = lookup_rule(node, gm)
    if rule is None:
        return OpInfo("unknown", tname, path, note="no canonical rule for this op")
    ctx = OpContext(node, gm)
    try:
        kind, params, operands = rule(ctx)
    except Exception as exc:  # noqa: BLE001 - an odd call pattern: reported, never dropped
        return OpInfo("unknown", tname, path, note=f"canonical rule failed on node {node.name}: {first_line(exc)}")
    if kind not in OP_KINDS:  # a canonicaliser bug, never a model's fault
        raise AssertionError(f"canonicaliser {rule.__qualname__} returned undeclared op kind {kind!r}")
    names = tuple(o.name for o in operands if isinstance(o, fx.Node))
    return OpInfo(kind, tname, path, params=MappingProxyType(dict(params)), operands=names)
