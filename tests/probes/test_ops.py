"""The canonical op table: in-place variants and tagged aten ops resolve to the rule of
their out-of-place op; every pointwise aten op of this torch build has a rule."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from els_audit.probes import equivariance_structure, trace_model
from els_audit.probes.ops import OP_TABLE
from els_audit.probes.ops.base import rule_for_target


def _aten_packets():
    names = sorted({n.split("::")[1].split(".")[0] for n in torch._C._dispatch_get_all_op_names()
                    if n.startswith("aten::")})
    for n in names:
        pk = getattr(torch.ops.aten, n, None)
        if isinstance(pk, torch._ops.OpOverloadPacket):
            yield n, pk


def _overloads(pk):
    out = []
    for o in pk.overloads():
        try:
            out.append(getattr(pk, o))
        except Exception:  # noqa: BLE001 - some overloads fail to materialise
            pass
    return out


def test_every_pointwise_aten_op_has_a_rule():
    missing = [f"{n}.{ov._overloadname}" for n, pk in _aten_packets() for ov in _overloads(pk)
               if torch.Tag.pointwise in ov.tags and rule_for_target(ov) is None]
    assert not missing, missing
    assert len([1 for _, pk in _aten_packets() for ov in _overloads(pk) if torch.Tag.pointwise in ov.tags]) > 200


def test_inplace_variants_share_the_rule_of_their_out_of_place_op():
    checked = 0
    for n, pk in _aten_packets():
        if not n.endswith("_") or n.endswith("__"):
            continue
        base = getattr(torch.ops.aten, n[:-1], None)
        if base is None or OP_TABLE.get(base) is None or OP_TABLE.get(pk) is not None:
            continue
        for ov in _overloads(pk):
            assert rule_for_target(ov) is OP_TABLE.get(base), ov
            checked += 1
    assert checked > 20
    assert rule_for_target("Tensor.clamp_") is OP_TABLE.get("Tensor.clamp")
    assert rule_for_target("Tensor.__iadd__") is None  # a dunder is no in-place variant of "Tensor.__iadd_"


class InplaceNet(nn.Module):
    """Every in-place form the issue named, on a circular (equivariant) stack."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(1, 8, 3, padding=1, padding_mode="circular")
        self.acts = nn.Sequential(nn.Dropout2d(inplace=True), nn.Dropout(inplace=True), nn.LeakyReLU(inplace=True),
                                  nn.ReLU6(inplace=True), nn.ELU(inplace=True), nn.Hardtanh(inplace=True))
        self.o = nn.Conv2d(8, 1, 1)

    def forward(self, x, t):
        h = self.c(x)
        h.clamp_(-5, 5)
        h.mul_(2.0)
        return self.o(self.acts(h))


@pytest.mark.parametrize("tracer", ["fx", "export"])
def test_inplace_ops_are_known_on_both_tracers(tracer):
    tr = trace_model(InplaceNet().eval(), (torch.randn(2, 1, 16, 16), torch.rand(2)), tracer=tracer)
    assert tr.unknown_ops == ()
    st = equivariance_structure(tr)
    assert st.verdict == ("equivariant",) and not st.partial
    if tracer == "export":
        names = {n.target.__name__ for n in tr.graph.nodes if isinstance(n.target, torch._ops.OpOverload)}
        assert {"feature_dropout_.default", "dropout_.default", "leaky_relu_.default", "hardtanh_.default",
                "elu_.default"} <= names
