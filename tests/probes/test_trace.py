"""Stage 1 (trace): tracer choice, shapes on every node, canonical ops, networkx view."""

from __future__ import annotations

import json

import networkx as nx
import pytest
import torch

from els_audit.probes import OP_TABLE, TraceError, register_op, to_networkx, trace_model
from els_audit.probes.meta import META_IMAGE, META_OP, META_SHAPE

from toy_models import (
    tiny_diffusers_unet,
    AttnNet,
    ControlFlowNet,
    ConvStack,
    FlipNet,
    ShapeBranchNet,
    TimeEmbNet,
    TwoLevelUNet,
)


def _xt(shape=(1, 8, 8), batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((batch,) + shape, generator=g), torch.rand(batch, generator=g)


def test_symbolic_trace_with_shapes_on_every_node():
    x, t = _xt()
    tr = trace_model(TwoLevelUNet().eval(), (x, t))
    assert tr.tracer == "torch.fx.symbolic_trace"
    assert tr.concrete_args == {"label": "None"}           # non-tensor default -> concrete arg
    assert tr.image_node == "x" and tr.image_arg == "x"
    assert tr.input_shape == (2, 1, 8, 8) and tr.output_shape == (2, 1, 8, 8)
    assert tr.verified_max_abs_diff == 0.0                 # graph == eager on the example
    for n in tr.graph.nodes:
        if n.op in ("call_module", "call_function", "call_method", "placeholder", "get_attr"):
            assert META_SHAPE in n.meta, n.name
    # Hand count of the image path: image, c1, relu, max_pool2d, c2, relu, up, cat, c3.
    assert tr.op_counts == {"cat": 1, "conv": 3, "conv_transpose": 1, "image": 1, "pointwise": 2, "pool": 1}
    assert tr.unknown_ops == ()
    json.dumps(tr.to_dict(), allow_nan=False)


def test_conv_params_canonicalised():
    x, t = _xt((1, 12, 12))
    tr = trace_model(ConvStack(3, dilations=(1, 2, 4), padding_mode="reflect").eval(), (x, t))
    convs = [n.meta[META_OP] for n in tr.graph.nodes if n.meta[META_OP].kind == "conv"]
    assert [c.params["dilation"] for c in convs] == [[1, 1], [2, 2], [4, 4]]
    # padding = d (k - 1) / 2 = 1, 2, 4 on both sides of both axes
    assert [c.params["padding"] for c in convs] == [[[1, 1], [1, 1]], [[2, 2], [2, 2]], [[4, 4], [4, 4]]]
    assert {c.params["padding_mode"] for c in convs} == {"reflect"}
    assert convs[0].module_path == "convs.0"


def test_conv_padding_same_even_kernel():
    # padding='same' with k = 4, d = 1: total d (k - 1) = 3 -> 1 before, 2 after.
    m = torch.nn.Sequential(torch.nn.Conv2d(1, 1, 4, padding="same")).eval()

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = m

        def forward(self, x, t):
            return self.m(x)

    x, t = _xt()
    tr = trace_model(Wrap().eval(), (x, t))
    conv = next(n.meta[META_OP] for n in tr.graph.nodes if n.meta[META_OP].kind == "conv")
    assert conv.params["padding"] == [[1, 2], [1, 2]]


def test_control_flow_on_non_tensor_args_is_resolved():
    x, t = _xt()
    m = ControlFlowNet().eval()
    tr2 = trace_model(m, (x, t), {"n_blocks": 2})
    tr4 = trace_model(m, (x, t), {"n_blocks": 4, "use_skip": False})
    convs = lambda tr: sum(1 for n in tr.nodes_on_path() if n.meta[META_OP].kind == "conv")  # noqa: E731
    assert convs(tr2) == 1 + 2 + 1 and convs(tr4) == 1 + 4 + 1  # inp + blocks + out
    assert tr4.concrete_args["n_blocks"] == "4" and tr4.concrete_args["use_skip"] == "False"
    assert tr4.tracer == "torch.fx.symbolic_trace"


def test_export_fallback_when_symbolic_tracing_fails():
    x, t = _xt((1, 6, 6))
    tr = trace_model(ShapeBranchNet().eval(), (x, t))
    assert tr.tracer == "torch.export"
    assert "len" in tr.tracer_reason and "symbolic tracing failed" in tr.tracer_reason
    assert tr.op_counts.get("conv") == 1 and tr.unknown_ops == ()
    assert tr.verified_max_abs_diff == 0.0
    with pytest.raises(TraceError, match="symbolic tracing failed"):
        trace_model(ShapeBranchNet().eval(), (x, t), tracer="fx")


def test_export_requested_gives_same_kinds():
    x, t = _xt()
    fx_tr = trace_model(TwoLevelUNet().eval(), (x, t))
    ex_tr = trace_model(TwoLevelUNet().eval(), (x, t), tracer="export")
    assert ex_tr.tracer == "torch.export"
    assert ex_tr.op_counts == fx_tr.op_counts


def test_shape_query_is_not_a_data_dependence():
    # AttnNet reads h.shape: the getattr/getitem nodes are "meta", not image-dependent.
    x, t = _xt((1, 6, 6))
    tr = trace_model(AttnNet().eval(), (x, t))
    metas = [n for n in tr.graph.nodes if n.meta[META_OP].kind == "meta"]
    assert metas and not any(n.meta[META_IMAGE] for n in metas)
    # the time input never reaches the image path in TimeEmbNet except through the bias
    tr2 = trace_model(TimeEmbNet().eval(), (x, t))
    assert not tr2.node("t").meta[META_IMAGE]


def test_unknown_op_is_reported():
    x, t = _xt((1, 6, 6))
    tr = trace_model(FlipNet().eval(), (x, t))
    assert [k for _, k in tr.unknown_ops] == ["torch._VariableFunctionsClass.flip"]
    assert tr.op_counts["unknown"] == 1


def test_bad_inputs_raise_one_line_value_errors():
    x, t = _xt()
    m = ConvStack(2).eval()
    for args, kwargs, match in [
        ([x, t], None, "must be a tuple"),
        ((x, t, t, t), None, "do not match"),
        ((t, t), None, "no tensor argument with >= 3 dims"),
    ]:
        with pytest.raises(ValueError, match=match) as ei:
            trace_model(m, args, kwargs)
        assert "\n" not in str(ei.value)
    with pytest.raises(ValueError, match="nn.Module"):
        trace_model(lambda x: x, (x,))
    with pytest.raises(ValueError, match="tracer must be"):
        trace_model(m, (x, t), tracer="jit")


def test_register_op_refuses_duplicates():
    with pytest.raises(ValueError, match="already registered"):
        register_op(torch.nn.Conv2d)(lambda ctx: ("conv", {}, []))
    assert "op torch.nn.modules.conv.Conv2d" in OP_TABLE.keys()


def test_networkx_view_reads_annotations():
    x, t = _xt()
    tr = trace_model(TwoLevelUNet().eval(), (x, t))
    g = to_networkx(tr)
    assert isinstance(g, nx.DiGraph) and g.number_of_nodes() == len(tr.graph.nodes)
    up = g.nodes["up"]
    assert up["kind"] == "conv_transpose" and up["kernel"] == [2, 2] and up["stride"] == [2, 2]
    assert up["in_shapes"] == [[2, 4, 4, 4]] and up["out_shape"] == [2, 4, 8, 8]
    assert g.nodes["c1"]["padding_mode"] == "zeros" and g.nodes["c1"]["groups"] == 1
    assert g.has_edge("up", "cat") and g.edges["up", "cat"]["data"]
    # topological order exists: it is a DAG
    assert nx.is_directed_acyclic_graph(g)
    # after the analyses, the view carries their annotations (read, not recomputed)
    from els_audit.probes import equivariance_structure

    equivariance_structure(tr)
    g = to_networkx(tr)
    assert g.nodes["c3"]["field"] == {"H": 10, "W": 10} and g.nodes["c3"]["layout"] == ".,1,H,W"  # B, C=1, H, W
    assert g.nodes["max_pool2d"]["scale"] == {"H": "2", "W": "2"}
    assert g.nodes["max_pool2d"]["breakers"] == ["stride"] and "boundary" in g.nodes["c1"]["breakers"]


def test_diffusers_unet_traces_through_export():
    m = tiny_diffusers_unet(8)
    x = torch.randn(2, 1, 8, 8)
    tr = trace_model(m, (x, torch.tensor([10, 500])), {"return_dict": False})
    assert tr.tracer == "torch.export"
    assert tr.image_arg == "sample" and tr.output_shape == (2, 1, 8, 8)
    assert tr.unknown_ops == ()
    assert {"conv", "norm", "attention", "upsample"} <= set(tr.op_counts)
    assert tr.verified_max_abs_diff == 0.0
