"""The float64 refinement run inside the fused C kernel (els_nested_tile's records).

At low noise the float32 engines swap the float32 terms of the keys within REFINE_BITS of a
pixel's maximum for float64 ones (_engine.Float64Refinement).  The fused kernel records those
keys itself (per-thread buffers, pruned against the rows' true running maxima; an overflow
falls back to the step-by-step torch path).  Checked: the records against float64 logits;
the refined answers of the single-k engine and the nested pass, fused, against the float64
machines and the torch refined path, to the tolerance of tests/machines/test_nested.py's
refinement test; and that the fused path did run (and with records).
"""

import pytest
import torch

import els_audit.machines as machines
from els_audit.machines import _engine, _native, _nested, build_machine

from .test_machines import SCHED, rel_err
from .test_nested import _low_noise_case
from .test_native import _random_tile, _tile_fields, needs_cc


# -- the kernel's records ------------------------------------------------------------------
def _tile_with_tops(g, spread):
    levels = _random_tile(g, 2)
    for lv in levels:
        lv["Q"] *= spread                                  # logits spread over tens of bits
        lv["m"].fill_(float("-inf"))
        lv["acc"].zero_()
        lv["top"] = torch.full_like(lv["m"], float("inf"))
        lv["top"][: lv["rows"]] = float("-inf")
        lv["top"][1] = float("inf")                        # a row that is not refined
    return levels


def _fields_with_tops(levels):
    assert all(lv.get("top") is not None for lv in levels)
    return _tile_fields(levels)                             # with each level's top


def _float64_logits(levels):
    out, S_prev = [], None
    for lv in levels:
        S = lv["K"].double() @ lv["Q"].double()
        if S_prev is not None:
            S = S + S_prev[lv["par"].long()]
        S_prev = S
        out.append(S)
    return out


@needs_cc
def test_kernel_records_every_key_near_the_true_maximum(two_threads):
    g = torch.Generator().manual_seed(3)
    levels = _tile_with_tops(g, spread=12.0)
    plain = [dict(lv, m=lv["m"].clone(), acc=lv["acc"].clone(), top=None) for lv in levels]
    scratch = torch.empty(2 * (2 * 30 + 8) * 4 * 16)
    rec = _native.RefineRecords(2, 8.0, 1 << 12)
    assert _native.nested_tile(_fields_with_tops(levels), 2, -126.0, -60.0, 32.0, 4, scratch, torch.empty(10000), 2,
                               rec)
    _native.nested_tile(_tile_fields(plain), 2, -126.0, -60.0, 32.0, 4, scratch, torch.empty(10000), 2)
    for lv, p in zip(levels, plain):                                  # recording leaves the sums alone
        assert torch.equal(lv["m"], p["m"]) and torch.equal(lv["acc"], p["acc"])
    level, row, node, logit = rec.take()
    got = set(zip(level.tolist(), row.tolist(), node.tolist()))
    assert len(got) == level.numel()                                   # each key once
    S64 = _float64_logits(levels)
    for i, lv in enumerate(levels):
        own, R = lv["own0"], lv["rows"]
        S = S64[i][own:, :R]                                          # (owned nodes, rows)
        mine = level == i
        if not lv["want"]:
            assert not mine.any()
            continue
        assert lv["top"][1] == float("inf") and not (row[mine] == 1).any()
        top = lv["top"][:R].double()
        keep = torch.ones(R, dtype=torch.bool)
        keep[1] = False
        assert torch.allclose(top[keep], S.amax(0)[keep], rtol=0, atol=1e-3)      # the true maxima
        assert (S.amax(0)[keep] - lv["m"][:R].double()[keep]).max() > 1.0          # while m lags them
        # every key within 8 bits of its row's maximum (float32 rounding aside) is recorded,
        # with its logit as summed (float32 of the same products)
        need = (S >= S.amax(0) - 8.0 + 1e-3) & keep
        for j, r in need.nonzero().tolist():
            assert (i, r, own + j) in got
        assert row[mine].max() < R and (node[mine] >= own).all()
        s64 = S64[i][node[mine].long(), row[mine].long()]
        assert torch.allclose(logit[mine].double(), s64, rtol=0, atol=1e-3)


@needs_cc
def test_kernel_prunes_records_left_behind_by_a_rising_maximum(two_threads):
    # one level, 64 nodes whose logits rise by 10 bits each: every node is a row's new
    # maximum when met (recorded), and only the last stays within 8 bits; 16 rows (one work
    # item) record 256 (one per 4 nodes: a 4-node step records its largest) in a buffer of
    # 64: pruned on the way (to at most 16 + 8), no overflow
    n, R = 64, 16
    K = torch.stack([torch.arange(n, dtype=torch.float32) * 10, torch.zeros(n)], 1)   # (n, 2)
    Q = torch.ones(2, R)
    lv = dict(K=K, Q=Q, par=None, vals=torch.ones(1, n), m=torch.full((R,), float("-inf")), acc=torch.zeros(1, R),
              own0=0, want=1, rows=R, top=torch.full((R,), float("-inf")))
    scratch = torch.empty(2 * (2 * n + 8) * 4 * 16)
    rec = _native.RefineRecords(2, 8.0, 64)
    assert _native.nested_tile(_fields_with_tops([lv]), 1, -126.0, -60.0, 32.0, 1, scratch, torch.empty(10000), 2,
                               rec)
    level, row, node, logit = rec.take()
    assert row.numel() < 64                                           # pruned (256 were recorded)
    final = logit >= lv["top"][row.long()] - 8.0
    assert sorted(row[final].tolist()) == list(range(R)) and (node[final] == n - 1).all()
    assert (logit[final] == 630.0).all() and (lv["top"] == 630.0).all()


@needs_cc
def test_kernel_reports_a_record_overflow(two_threads):
    g = torch.Generator().manual_seed(4)
    levels = _tile_with_tops(g, spread=0.0)                           # every logit 0: all within 8 bits
    scratch = torch.empty(2 * (2 * 30 + 8) * 4 * 16)
    rec = _native.RefineRecords(2, 8.0, 16)
    assert not _native.nested_tile(_fields_with_tops(levels), 2, -126.0, -60.0, 32.0, 4, scratch,
                                   torch.empty(10000), 2, rec)
    assert rec.take() is None


@needs_cc
def test_kernel_with_nothing_to_record(two_threads):
    g = torch.Generator().manual_seed(6)
    levels = _tile_with_tops(g, spread=12.0)
    for lv in levels:
        lv["top"].fill_(float("inf"))                                 # no row refined
    scratch = torch.empty(2 * (2 * 30 + 8) * 4 * 16)
    rec = _native.RefineRecords(2, 8.0, 64)
    assert _native.nested_tile(_fields_with_tops(levels), 2, -126.0, -60.0, 32.0, 4, scratch, torch.empty(10000), 2,
                               rec)
    level, row, node, logit = rec.take()
    assert level.numel() == row.numel() == node.numel() == logit.numel() == 0 and logit.dtype == torch.float32


# -- the engines, refined inside the fused kernel -------------------------------------------
def _low_noise(C=1, H=16, W=16, B=2, N=30, seed=5, t=0.03):
    """Near-copies of one image and queries near it at t = 0.03 (as test_nested.py's
    refinement case): float32 rounding of the logits shows in the weights unless refined."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(1, C, H, W, generator=g, dtype=torch.float64) * 2 - 1
    imgs = base + 0.006 * torch.randn(N, C, H, W, generator=g, dtype=torch.float64)
    a, b = (float(v) for v in SCHED.alpha_sigma(t))
    x = a * base + b * torch.randn(B, C, H, W, generator=g, dtype=torch.float64)
    return imgs, x, t


def _spy(monkeypatch, module, name, refine_at):
    """Wrap module.name: a list of (refined, ran) per call (refined: a refinement was passed)."""
    calls, real = [], getattr(module, name)

    def spy(*args):
        out = real(*args)
        calls.append((len(args) > refine_at and args[refine_at] is not None, out is not None))
        return out
    monkeypatch.setattr(module, name, spy)
    return calls


@needs_cc
@pytest.mark.parametrize("kind,dic,case", [("ELS", "periodic", "9x9"), ("bbELS", "periodic", "9x9"),
                                           ("ELS", "valid", "9x9"), ("ELS", "periodic", "16x16"),
                                           ("bbELS", "periodic", "16x16")])
def test_single_k_refined_in_the_fused_kernel(kind, dic, case, monkeypatch, two_threads):
    # 9x9: test_nested.py's refinement case, every group fused (FUSED_MIN_ROWS = 1; bbELS's
    # edge groups have a few rows each, zero padding); 16x16: groups big enough to run fused
    # by default (bbELS's edges then keep the GEMM path)
    imgs, x, t = _low_noise_case() if case == "9x9" else _low_noise()
    min_rows = 1 if case == "9x9" else 128
    ks = (3, 5, 7)
    want = {k: build_machine(kind, imgs, dictionary=dic).score(x, t, k=k) for k in ks}
    m32 = build_machine(kind, imgs.float(), dictionary=dic)
    monkeypatch.setattr(_engine, "FUSED_MIN_ROWS", min_rows)
    calls = _spy(monkeypatch, _engine, "_fused_group_means", 6)
    fused = {k: m32.score(x.float(), t, k=k) for k in ks}
    assert calls and all(refined and ran for refined, ran in calls), calls     # refined, and fused
    if kind == "bbELS" and min_rows == 1:
        assert len(calls) > 3 * len(ks)                                        # edge groups ran fused too
    monkeypatch.setattr(_engine, "FUSED_MIN_ROWS", 10**9)                      # the torch refined path
    torch_path = {k: m32.score(x.float(), t, k=k) for k in ks}
    monkeypatch.setattr(_engine, "REFINE_MIN_COEF", float("inf"))              # no refinement
    plain = {k: m32.score(x.float(), t, k=k) for k in ks}
    _compare(ks, fused, torch_path, plain, want)


def _compare(ks, got, torch_path, plain, want):
    """The tolerances of test_nested.py's refinement test: within 3e-6 of float64 (float32
    output rounding, the score divides by b^2 at t = 0.03), so the two refined paths within
    6e-6 of each other; without the refinement 5x further off (k >= 5)."""
    for k in ks:
        e = rel_err(got[k].double(), want[k])
        assert e < 3e-6, (k, e)
        assert rel_err(got[k].double(), torch_path[k].double()) < 6e-6, k
        if k >= 5:
            assert rel_err(plain[k].double(), want[k]) > 5 * e, k


@needs_cc
@pytest.mark.parametrize("kind,dic", [("ELS", "periodic"), ("bbELS", "periodic"), ("ELS", "valid")])
def test_nested_pass_refined_in_the_fused_kernel(kind, dic, monkeypatch, two_threads):
    imgs, x, t = _low_noise_case()
    ks = (3, 5, 7)
    want = {k: build_machine(kind, imgs, dictionary=dic).score(x, t, k=k) for k in ks}
    m32 = build_machine(kind, imgs.float(), dictionary=dic)
    calls = _spy(monkeypatch, _nested, "_fused_row_block", 11)
    swept = m32.score_sweep(x.float(), t, ks)
    assert calls and all(refined and ran for refined, ran in calls), calls
    real = machines.nested_softmax_average                                    # as the machines call it
    monkeypatch.setattr(machines, "nested_softmax_average", lambda *a, **kw: real(*a, **kw, fuse=False))
    calls.clear()
    stepwise = m32.score_sweep(x.float(), t, ks)
    assert not calls                                                            # the torch refined path
    monkeypatch.setattr(_engine, "REFINE_MIN_COEF", float("inf"))
    monkeypatch.setattr(machines, "nested_softmax_average", real)
    plain = m32.score_sweep(x.float(), t, ks)
    _compare(ks, swept, stepwise, plain, want)


@needs_cc
@pytest.mark.parametrize("where", ["single-k", "nested"])
def test_record_overflow_falls_back_to_the_torch_path(where, monkeypatch, two_threads):
    imgs, x, t = _low_noise(C=1, H=16, W=16, B=2, N=30)
    m32 = build_machine("ELS", imgs.float())
    if where == "single-k":
        run, (module, name, at) = lambda: m32.score(x.float(), t, k=5), (_engine, "_fused_group_means", 6)
    else:
        run, (module, name, at) = lambda: m32.score_sweep(x.float(), t, (3, 5))[5], (_nested, "_fused_row_block", 11)
    ok = run()
    monkeypatch.setattr(_engine, "FUSED_RECORDS_PER_THREAD", 2)               # every buffer overflows
    calls = _spy(monkeypatch, module, name, at)
    fallen = run()
    assert calls and all(refined and not ran for refined, ran in calls), calls
    want = build_machine("ELS", imgs).score(x, t, k=5)
    assert rel_err(fallen.double(), want) < 3e-6
    assert rel_err(ok.double(), want) < 3e-6


@needs_cc
def test_shaped_support_refined_in_the_fused_kernel(monkeypatch, two_threads):
    # a data support with holes (col_scale with zeros: dropped columns) at low noise
    import numpy as np

    from els_audit.machines.supports import SupportSchedule

    imgs, x, t = _low_noise(C=1, H=16, W=16, B=2, N=30)
    rng = np.random.default_rng(2)
    maps = rng.uniform(0, 2, size=(1, 5, 5))
    maps[maps < 0.6] = 0.0
    sup = SupportSchedule("erf", (t,), maps, "test")
    calls = _spy(monkeypatch, _engine, "_fused_group_means", 6)
    m64 = build_machine("ELS", imgs, supports=sup).score(x, t, k=5)
    got = build_machine("ELS", imgs.float(), supports=sup).score(x.float(), t, k=5)
    assert calls and all(refined and ran for refined, ran in calls[-1:]), calls
    monkeypatch.setattr(_engine, "FUSED_MIN_ROWS", 10**9)
    torch_path = build_machine("ELS", imgs.float(), supports=sup).score(x.float(), t, k=5)
    assert rel_err(got.double(), m64) < 3e-6
    assert rel_err(got.double(), torch_path.double()) < 3e-6
