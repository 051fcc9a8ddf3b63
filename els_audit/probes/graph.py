"""The networkx view of a traced graph: reads the ``els_`` annotations, computes nothing.

References: ``torch/fx/passes/graph_drawer.py`` (the drawer only reads ``node.meta``).

Every FX node becomes a networkx node (keyed by the FX node name) with attributes:

``op`` (FX op), ``kind``, ``target``, ``module_path``, ``kernel``, ``stride``, ``dilation``,
``padding``, ``padding_mode``, ``groups`` (``None`` where not applicable),
``in_shapes`` (list), ``out_shape``, ``image_dependent``, ``on_path``, and when the
receptive-field / equivariance passes have run: ``layout`` (e.g. ``".,.,H,W"``),
``field`` (axis -> size at this node), ``scale`` (axis -> image px per position),
``global`` (a global op is upstream), ``breakers`` (list of breaker kinds at this node).
Edges go from each input node to its user, with ``data=True`` when the input is a data
operand (not only a shape source).
"""

from __future__ import annotations

from typing import Union

import networkx as nx
import torch.fx as fx

from ..serialize import json_safe
from .meta import META_IMAGE, META_ON_PATH, META_OP, META_SHAPE
from .trace import TraceResult

__all__ = ["to_networkx", "NODE_ATTRS"]

#: Structural attributes copied from ``OpInfo.params`` when present.
NODE_ATTRS = ("kernel", "stride", "dilation", "padding", "padding_mode", "groups")


def to_networkx(trace: Union[TraceResult, fx.GraphModule]) -> nx.DiGraph:
    """Build the ``DiGraph`` view of a traced (and possibly analysed) graph.

    Args:
        trace: a :class:`~els_audit.probes.TraceResult` or its ``graph_module``.

    Returns:
        ``networkx.DiGraph`` with the attributes listed in the module docstring.
    """
    gm = trace.graph_module if isinstance(trace, TraceResult) else trace
    g = nx.DiGraph()
    for node in gm.graph.nodes:
        op = node.meta.get(META_OP)
        params = dict(op.params) if op is not None else {}
        attrs = {
            "op": node.op,
            "kind": op.kind if op is not None else None,
            "target": op.target if op is not None else str(node.target),
            "module_path": op.module_path if op is not None else "",
            "in_shapes": [json_safe(a.meta.get(META_SHAPE)) for a in node.all_input_nodes],
            "out_shape": json_safe(node.meta.get(META_SHAPE)),
            "image_dependent": bool(node.meta.get(META_IMAGE, False)),
            "on_path": bool(node.meta.get(META_ON_PATH, False)),
        }
        for k in NODE_ATTRS:
            attrs[k] = json_safe(params.get(k))
        rf = node.meta.get("els_rf")
        if rf is not None:
            attrs.update(rf.summary())
        eq = node.meta.get("els_eq")
        if eq:
            attrs["breakers"] = [b.kind for b in eq]
        g.add_node(node.name, **attrs)
    for node in gm.graph.nodes:
        op = node.meta.get(META_OP)
        data = set(op.operands) if op is not None else set()
        for a in node.all_input_nodes:
            g.add_edge(a.name, node.name, data=a.name in data or (op is not None and op.kind == "unknown"))
    return g
