"""Stage 1 of the architecture probes: trace a denoiser into an FX graph, with shapes.

References:
- torch.fx ``symbolic_trace`` / ``Tracer`` (leaf modules, ``concrete_args``) and
  ``torch/fx/passes/shape_prop.py`` (:class:`ShapeProp`): shapes on every node.
- ``torch.export.export`` (non-strict): the fall-back for forwards that symbolic tracing
  cannot follow (tensor-dependent Python, ``len(proxy.shape)``, ...).  Its training IR is
  at the level of ``aten.conv2d`` / ``aten.linear`` / ``aten.group_norm``.
- fvcore ``nn/jit_handles.py`` and ``torch.utils.flop_counter``: a table maps every op to a
  handler; an op without one is reported, never assumed harmless.

What this module adds to the graph (``node.meta`` keys, all under the ``els_`` namespace;
later stages and the networkx view only read them):

``els_op``     :class:`OpInfo` -- canonical op kind, parameters, data operands.
``els_shape``  output shape (tuple), a tuple of shapes for multi-output ops, or ``None``.
``els_value``  concrete value of non-tensor nodes (``x.shape``, sizes, dtypes).
``els_vary``   per dim of a tensor output: does the value vary along that dim (from the
               example run; used to tell a learned position embedding from a broadcast
               time embedding).
``els_image``  ``True`` when the node's value depends on the image input (through data
               operands; shape queries such as ``x.shape`` do not count).
``els_on_path`` ``True`` when the node lies on a path from the image to the analysed output.

The canonical op table (:data:`OP_TABLE`) maps torch.nn module classes, functions, aten
overload packets and ``Tensor`` methods to a canonicaliser that returns
``(kind, params, operands)``.  Register more with :func:`register_op`; a target registered
twice is refused.
"""


from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping, Optional, Sequence, Union

import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils import _pytree as pytree
from torch.fx.passes.shape_prop import ShapeProp

from .meta import META_IMAGE, META_ON_PATH, META_OP, META_SELECT, META_SHAPE, META_VALUE, META_VARY
from .ops import OpContext, OpInfo, canonicalise, first_line, no_data, operand_nodes

__all__ = ["TraceResult", "TraceError", "trace_model"]

# Tensors up to this many elements get an exact ``els_vary`` record; bigger ones are
# recorded as varying along every dim.  NB: conservative (a big constant buffer would be
# flagged as position-dependent), never optimistic.
_VARY_MAX_NUMEL = 1 << 24


class TraceError(ValueError):
    """The model could not be traced (both tracers failed) or the inputs are unusable."""


# ----------------------------------------------------------------------------------------
# Tracing
# ----------------------------------------------------------------------------------------
class _LeafTracer(fx.Tracer):
    def __init__(self, extra_leaves: tuple[type, ...] = ()):
        super().__init__()
        self._extra = tuple(extra_leaves)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if self._extra and isinstance(m, self._extra):
            return True
        return super().is_leaf_module(m, qualname)


class _Recorder(ShapeProp):
    """ShapeProp that also records non-tensor values and, per dim, whether tensors vary;
    keeps the graph's return value (to check the trace against eager execution)."""

    returned: Any = None

    def __init__(self, gm: fx.GraphModule, image_ph: Optional[fx.Node]):
        super().__init__(gm)
        self.image_ph = image_ph
        self._skip_vary = _maybe_image_dependent(gm, image_ph)

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        _record(n, result, vary=n not in self._skip_vary)
        if n.op == "call_function" and n.target is getattr and isinstance(n.args[0], fx.Node):
            # ``h.max(1).values``: which output of the multi-output op this attribute is.
            src = self.env.get(n.args[0])
            if isinstance(src, tuple):
                n.meta[META_SELECT] = next((k for k, v in enumerate(src) if v is result), None)
        if n.op == "output":
            self.returned = result
        return result


def _maybe_image_dependent(gm: fx.GraphModule, image_ph: Optional[fx.Node]) -> set:
    """Structural superset of the image-dependent nodes (through every edge except into
    shape-only ops).  Per-dim variation (``els_vary``) is only needed -- and only recorded --
    for the others: it is the expensive part of the recording."""
    if image_ph is None:
        return set()
    dep = {image_ph}
    for n in gm.graph.nodes:
        if n is image_ph or n.op in ("placeholder", "get_attr", "output") or no_data(n):
            continue
        if any(a in dep for a in n.all_input_nodes):
            dep.add(n)
    return dep


def _shape_of(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return tuple(int(s) for s in v.shape)
    if isinstance(v, (list, tuple)) and v and all(isinstance(x, torch.Tensor) or x is None for x in v) and any(
        isinstance(x, torch.Tensor) for x in v
    ):
        return tuple(_shape_of(x) for x in v)
    return None


def _plain_value(v: Any) -> Any:
    if isinstance(v, torch.Size):
        return tuple(int(s) for s in v)
    if isinstance(v, (list, tuple)):
        return type(v)(_plain_value(x) for x in v) if not isinstance(v, torch.Size) else tuple(v)
    if isinstance(v, (int, float, bool, str, type(None), torch.dtype, torch.device, slice)):
        return v
    if isinstance(v, torch.SymInt):
        return int(v)
    return repr(v)


def _vary(t: torch.Tensor) -> tuple[bool, ...]:
    if t.numel() > _VARY_MAX_NUMEL or t.numel() == 0:
        return tuple(s > 1 for s in t.shape)
    out = []
    with torch.no_grad():
        for d, s in enumerate(t.shape):
            if s <= 1:
                out.append(False)
            else:
                first = t.narrow(d, 0, 1)
                out.append(bool((t != first).any().item()))
    return tuple(out)


def _record(n: fx.Node, result: Any, vary: bool = True) -> None:
    shape = _shape_of(result)
    n.meta[META_SHAPE] = shape
    if isinstance(result, torch.Tensor) and vary:
        n.meta[META_VARY] = _vary(result)
    elif shape is None:
        n.meta[META_VALUE] = _plain_value(result)


@dataclass(frozen=True)
class TraceResult:
    """A traced denoiser: the graph, with shapes and ``els_`` annotations on every node.

    Attributes:
        graph_module: the :class:`torch.fx.GraphModule` (annotated in ``node.meta``).
        tracer: ``"torch.fx.symbolic_trace"`` or ``"torch.export"``.
        tracer_reason: why that tracer (e.g. the error symbolic tracing stopped on).
        image_node: name of the placeholder holding the image x (B, C, *spatial).
        image_arg: name of the ``forward`` parameter that takes the image.
        output_node: name of the node analysed as the network's eps output.
        input_shape / output_shape: shapes of those two nodes.
        concrete_args: non-tensor arguments fixed during tracing (name -> repr).
        spatial_axes: names given to the image's spatial dims (``("H", "W")`` for 2-d).
        unknown_ops: ``(node, target)`` of ops on the image->output path with no table entry.
        op_counts: canonical kind -> number of nodes on the image->output path.
        verified_max_abs_diff: max |graph(x) - module(x)| on the example inputs (the trace
            is checked against eager execution), ``None`` when outputs were not comparable.
        training_mode: the module was in training mode (dropout / batch statistics active).
        output_abs_max: max |analysed output| on the example inputs (0: the output is
            identically zero, e.g. a zero-initialised output layer; the numerical probes
            then measure nothing).
        example_args / example_kwargs: the inputs used (kept for numerical probes).
    """

    graph_module: fx.GraphModule
    tracer: str
    tracer_reason: str
    image_node: str
    image_arg: str
    output_node: str
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    concrete_args: Mapping[str, str]
    spatial_axes: tuple[str, ...]
    unknown_ops: tuple[tuple[str, str], ...]
    op_counts: Mapping[str, int]
    verified_max_abs_diff: Optional[float]
    training_mode: bool
    output_abs_max: Optional[float] = None
    example_args: tuple = field(repr=False, default=())
    example_kwargs: Mapping[str, Any] = field(repr=False, default_factory=dict)
    forward_signature: Optional[inspect.Signature] = field(repr=False, default=None)

    @property
    def graph(self) -> fx.Graph:
        return self.graph_module.graph

    def node(self, name: str) -> fx.Node:
        """The graph node called ``name``."""
        for n in self.graph.nodes:
            if n.name == name:
                return n
        raise KeyError(f"no node named {name!r} in the traced graph")

    def nodes_on_path(self) -> list[fx.Node]:
        """Nodes on a data path from the image to the analysed output, in graph order."""
        return [n for n in self.graph.nodes if n.meta.get(META_ON_PATH)]

    def run(self, *args, **kwargs) -> torch.Tensor:
        """Run the traced graph and return the analysed output tensor."""
        return _run_to_output(self.graph_module, self.tracer, self.forward_signature, self.output_node, args, kwargs)

    def to_dict(self) -> dict:
        return {
            "tracer": self.tracer,
            "tracer_reason": self.tracer_reason,
            "image_node": self.image_node,
            "image_arg": self.image_arg,
            "output_node": self.output_node,
            "input_shape": list(self.input_shape),
            "output_shape": list(self.output_shape),
            "concrete_args": dict(self.concrete_args),
            "spatial_axes": list(self.spatial_axes),
            "n_nodes": len(self.graph.nodes),
            "n_nodes_on_path": len(self.nodes_on_path()),
            "unknown_ops": [list(u) for u in self.unknown_ops],
            "op_counts": dict(self.op_counts),
            "verified_max_abs_diff": self.verified_max_abs_diff,
            "training_mode": self.training_mode,
            "output_abs_max": self.output_abs_max,
        }


_AXIS_NAMES = {1: ("L",), 2: ("H", "W"), 3: ("D", "H", "W")}


def _flat_inputs(sig: inspect.Signature, args: tuple, kwargs: dict) -> tuple[list[str], list[Any], dict]:
    """Bind example inputs; returns (param names in order, values in order, concrete args)."""
    try:
        bound = sig.bind(*args, **kwargs)
    except TypeError as exc:
        raise TraceError(f"example inputs do not match forward{sig}: {exc}; pass example_args/example_kwargs that forward accepts") from None
    bound.apply_defaults()
    names, values, concrete = [], [], {}
    for name, p in sig.parameters.items():
        v = bound.arguments.get(name, p.default)
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            if v:
                raise TraceError(f"forward takes *{name}; pass every input by name so it can be traced")
            continue
        names.append(name)
        values.append(v)
        if not isinstance(v, torch.Tensor):
            concrete[name] = v
    return names, values, concrete


def _find_image_placeholder(gm: fx.GraphModule, tracer: str, names: list[str], img_name: str,
                            args: tuple, kwargs: Mapping, image: torch.Tensor) -> Optional[fx.Node]:
    """fx keeps one placeholder per ``forward`` parameter; export names its placeholders
    after the parameters (flattened input leaves otherwise)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if tracer != "torch.export":
        i = names.index(img_name)
        return placeholders[i] if i < len(placeholders) else None
    ph = next((p for p in placeholders if p.target == img_name), None)
    if ph is None:
        leaves = pytree.tree_leaves((tuple(args), dict(kwargs)))
        idx = next((i for i, v in enumerate(leaves) if v is image), None)
        ph = placeholders[idx] if idx is not None and idx < len(placeholders) else None
    return ph


def _graph_inputs(gm: fx.GraphModule, tracer: str, sig: inspect.Signature, args: tuple, kwargs: Mapping) -> list:
    """Values for the graph's placeholders, in order.

    fx keeps one placeholder per ``forward`` parameter (concrete ones included); export
    keeps one per flattened input leaf, named after the parameter where it can.
    """
    names, values, _ = _flat_inputs(sig, tuple(args), dict(kwargs))
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if tracer == "torch.export":
        by_name = dict(zip(names, values))
        if all(p.target in by_name for p in placeholders):
            values = [by_name[p.target] for p in placeholders]
        else:
            values = pytree.tree_leaves((tuple(args), dict(kwargs)))
    if len(values) != len(placeholders):
        raise TraceError(
            f"the traced graph has {len(placeholders)} inputs but {len(values)} values were given; "
            "call it with the same arguments as the example"
        )
    return values


def _run_to_output(gm: fx.GraphModule, tracer: str, sig: inspect.Signature, output_node: str,
                   args: tuple, kwargs: Mapping) -> torch.Tensor:
    """Run the graph with an Interpreter and return the value of node ``output_node``."""

    class _Grab(fx.Interpreter):
        grabbed: Any = None

        def run_node(self, n):
            r = super().run_node(n)
            if n.name == output_node:
                self.grabbed = r
            return r

    interp = _Grab(gm)
    interp.run(*_graph_inputs(gm, tracer, sig, args, kwargs))
    return interp.grabbed


def trace_model(
    module: nn.Module,
    example_args: tuple,
    example_kwargs: Optional[Mapping[str, Any]] = None,
    *,
    leaf_modules: Sequence[type] = (),
    image_arg: Union[int, str, None] = None,
    output_index: Optional[int] = None,
    tracer: str = "auto",
) -> TraceResult:
    """Trace ``module`` into an annotated FX graph (symbolic trace, else ``torch.export``).

    Non-tensor arguments (``label=None``, flags, ints) are passed to the tracer as concrete
    arguments, so Python control flow on them is resolved.  Where symbolic tracing fails
    (tensor-dependent Python, unsupported builtins), ``torch.export`` (non-strict) is tried;
    the result says which tracer was used and why.  Shapes of every node come from
    ShapeProp on the example inputs, and the traced graph is checked against eager
    execution on them.

    Args:
        module: the denoiser (an ``nn.Module``; put it in ``eval()`` mode first).
        example_args: positional example inputs, e.g. ``(x [B,C,H,W], t [B])``.  Use B >= 2
            so that batch and channel dims are not confused with broadcast dims.
        example_kwargs: keyword example inputs, e.g. ``{"return_dict": False}``.
        leaf_modules: extra module classes to keep opaque (``call_module`` nodes); they
            need a rule in :data:`OP_TABLE`, or they are reported as unknown ops.
        image_arg: position or name of the image argument; default: the first tensor
            argument with at least 3 dims.
        output_index: which tensor leaf of the output is eps (default: the first with the
            image's shape, else the first image-dependent tensor).
        tracer: ``"auto"``, ``"fx"`` or ``"export"``.

    Returns:
        :class:`TraceResult`.

    Raises:
        TraceError: inputs that do not fit ``forward``, no image argument, or both tracers
            failing (the message carries both errors).
    """
    if not isinstance(module, nn.Module):
        raise TraceError(f"trace_model needs an nn.Module, got {type(module).__name__}; wrap your callable in a module")
    if not isinstance(example_args, tuple):
        raise TraceError(f"example_args must be a tuple of inputs, got {type(example_args).__name__}; use (x, t)")
    if tracer not in ("auto", "fx", "export"):
        raise TraceError(f"tracer must be 'auto', 'fx' or 'export', got {tracer!r}")
    kwargs = dict(example_kwargs or {})
    sig = inspect.signature(module.forward)
    names, values, concrete = _flat_inputs(sig, example_args, kwargs)
    img_name = _image_name(sig, names, values, image_arg)
    image = values[names.index(img_name)]
    inputs = _Inputs(sig, names, values, concrete, example_args, kwargs, img_name, image)
    gm, rec, used, reason = _trace(module, inputs, tuple(leaf_modules), tracer)
    image_ph = rec.image_ph
    if image_ph is None:
        raise TraceError(f"the image argument {img_name!r} is not a graph input after tracing")
    _annotate(gm, image_ph)
    eps_node, leaves = _pick_output(gm, image, output_index)
    counts, unknown = _mark_path(gm, eps_node)
    diff, out_max = _verify(module, example_args, kwargs, rec.returned, leaves.index(eps_node))
    return TraceResult(
        graph_module=gm,
        tracer=used,
        tracer_reason=reason,
        image_node=image_ph.name,
        image_arg=img_name,
        output_node=eps_node.name,
        input_shape=tuple(image.shape),
        output_shape=tuple(eps_node.meta[META_SHAPE]),
        concrete_args=MappingProxyType({k: repr(v) for k, v in concrete.items()}),
        spatial_axes=_AXIS_NAMES[image.dim() - 2],
        unknown_ops=tuple(unknown),
        op_counts=MappingProxyType(dict(sorted(counts.items()))),
        verified_max_abs_diff=diff,
        training_mode=bool(module.training),
        output_abs_max=out_max,
        example_args=tuple(example_args),
        example_kwargs=MappingProxyType(kwargs),
        forward_signature=sig,
    )


@dataclass(frozen=True)
class _Inputs:
    """The example inputs, bound to ``forward``'s parameters."""

    sig: inspect.Signature
    names: list
    values: list
    concrete: dict
    args: tuple
    kwargs: dict
    img_name: str
    image: torch.Tensor


def _image_name(sig: inspect.Signature, names: list[str], values: list, image_arg: Union[int, str, None]) -> str:
    """Which ``forward`` parameter takes the image (B, C, *spatial)."""
    if image_arg is None:
        img_name = next((nm for nm, v in zip(names, values) if isinstance(v, torch.Tensor) and v.dim() >= 3), None)
        if img_name is None:
            raise TraceError("no tensor argument with >= 3 dims (B, C, *spatial) among the example inputs; pass image_arg=")
    elif isinstance(image_arg, int):
        if not 0 <= image_arg < len(names):
            raise TraceError(f"image_arg={image_arg} but forward has {len(names)} arguments")
        img_name = names[image_arg]
    else:
        if image_arg not in names:
            raise TraceError(f"image_arg={image_arg!r} is not an argument of forward{sig}")
        img_name = image_arg
    image = values[names.index(img_name)]
    if not isinstance(image, torch.Tensor) or image.dim() < 3 or image.dim() > 5:
        raise TraceError(f"the image argument {img_name!r} must be a tensor (B, C, *spatial) with 1-3 spatial dims")
    return img_name


def _trace(module: nn.Module, inp: _Inputs, leaves: tuple, tracer: str) -> tuple[fx.GraphModule, "_Recorder", str, str]:
    """(graph, its recorder after the shape run, tracer used, why): symbolic tracing first,
    ``torch.export`` (non-strict) where it fails."""
    fx_error: Optional[str] = None
    if tracer in ("auto", "fx"):
        try:
            tr = _LeafTracer(leaves)
            graph = tr.trace(module, concrete_args=inp.concrete or None)
            gm = fx.GraphModule(tr.root, graph, type(module).__name__)
            used = "torch.fx.symbolic_trace"
            rec = _record_run(gm, used, inp, inp.values)
            return gm, rec, used, "symbolic tracing succeeded" + (
                f" with concrete args {sorted(inp.concrete)}" if inp.concrete else "")
        except Exception as exc:  # noqa: BLE001 - any tracing failure falls back
            fx_error = first_line(exc)
            if tracer == "fx":
                raise TraceError(f"symbolic tracing failed: {fx_error}; try tracer='export'") from exc
    try:
        ep = torch.export.export(module, tuple(inp.args), inp.kwargs or None, strict=False)
        gm = ep.module()
        used = "torch.export"
        rec = _record_run(gm, used, inp, _graph_inputs(gm, used, inp.sig, inp.args, inp.kwargs))
    except Exception as exc:  # noqa: BLE001
        raise TraceError(
            f"could not trace {type(module).__name__}: symbolic tracing: {fx_error or 'not tried'}; "
            f"torch.export: {first_line(exc)}. Register the failing submodule as a leaf "
            "(leaf_modules=...) or simplify its forward"
        ) from exc
    return gm, rec, used, (f"symbolic tracing failed ({fx_error}); used torch.export" if fx_error
                           else "torch.export requested")


def _record_run(gm: fx.GraphModule, used: str, inp: _Inputs, values: list) -> "_Recorder":
    rec = _Recorder(gm, _find_image_placeholder(gm, used, inp.names, inp.img_name, inp.args, inp.kwargs, inp.image))
    with torch.no_grad():
        rec.propagate(*values)
    return rec


def _annotate(gm: fx.GraphModule, image_ph: fx.Node) -> None:
    """Canonical ops and image dependence on every node, in topological order."""
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            node.meta[META_OP] = OpInfo("image" if node is image_ph else "input", node.name)
            node.meta[META_IMAGE] = node is image_ph
            continue
        if node.op == "get_attr":
            node.meta[META_OP] = OpInfo("param", str(node.target), module_path=str(node.target).rsplit(".", 1)[0] if "." in str(node.target) else "")
            node.meta[META_IMAGE] = False
            continue
        if node.op == "output":
            node.meta[META_OP] = OpInfo("output", "output")
            node.meta[META_IMAGE] = False
            continue
        info = canonicalise(node, gm)
        node.meta[META_OP] = info
        node.meta[META_IMAGE] = any(gm_node.meta.get(META_IMAGE, False) for gm_node in operand_nodes(node, info))


def _pick_output(gm: fx.GraphModule, image: torch.Tensor, output_index: Optional[int]) -> tuple[fx.Node, list]:
    """(the analysed output node, the graph's tensor output leaves)."""
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    leaves = [x for x in pytree.tree_leaves(out_node.args[0]) if isinstance(x, fx.Node) and OpContext.is_tensor(x)]
    img_leaves = [x for x in leaves if x.meta.get(META_IMAGE)]
    if not img_leaves:
        raise TraceError("no output of the model depends on the image input; is image_arg right?")
    if output_index is not None:
        if not 0 <= output_index < len(leaves):
            raise TraceError(f"output_index={output_index} but the model returns {len(leaves)} tensors")
        return leaves[output_index], leaves
    return next((x for x in img_leaves if x.meta[META_SHAPE] == tuple(image.shape)), img_leaves[0]), leaves


def _mark_path(gm: fx.GraphModule, eps_node: fx.Node) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Mark the ancestors of the output through data operands that depend on the image
    (``els_on_path``); returns the op counts on the path and its unknown ops."""
    stack, seen = [eps_node], set()
    while stack:
        n = stack.pop()
        if n.name in seen:
            continue
        seen.add(n.name)
        info = n.meta.get(META_OP)
        for o in operand_nodes(n, info) if info is not None else []:
            if o.meta.get(META_IMAGE):
                stack.append(o)
    counts: dict[str, int] = {}
    unknown: list[tuple[str, str]] = []
    for n in gm.graph.nodes:
        on = n.name in seen and n.meta.get(META_IMAGE, False)
        n.meta[META_ON_PATH] = bool(on)
        if on:
            k = n.meta[META_OP].kind
            counts[k] = counts.get(k, 0) + 1
            if k == "unknown":
                unknown.append((n.name, n.meta[META_OP].target))
    return counts, unknown


def _verify(module: nn.Module, args: tuple, kwargs: dict, returned: Any, eps_index: int
            ) -> tuple[Optional[float], Optional[float]]:
    """(max |graph - eager| over the outputs, max |analysed output|) on the example inputs;
    ``None`` where the outputs were not comparable."""
    got_leaves = [x for x in pytree.tree_leaves(returned) if isinstance(x, torch.Tensor)]
    out_max = float(got_leaves[eps_index].detach().abs().max()) if eps_index < len(got_leaves) else None
    try:
        with torch.no_grad():
            ref = module(*args, **kwargs)
        ref_leaves = [x for x in pytree.tree_leaves(ref) if isinstance(x, torch.Tensor)]
        if ref_leaves and len(ref_leaves) == len(got_leaves) and all(
                r.shape == g.shape for r, g in zip(ref_leaves, got_leaves)):
            return float(max((r.double() - g.double()).abs().max().item()
                             for r, g in zip(ref_leaves, got_leaves))), out_max
    except Exception:  # noqa: BLE001 - verification is best effort; reported as None
        pass
    return None, out_max
