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

from .test_machines import SCHED, ab, data, rel_err
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
@needs_cc
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scaled", [False, True, "k1"])
def test_exact_logits_in_place_match_the_torch_formula(dtype, scaled, two_threads):
    g = torch.Generator().manual_seed(7)
    R, K, n = 9, (1 if scaled == "k1" else 13), 500
    x = torch.randn(4000, generator=g).to(dtype)                                # flat images
    off = torch.randperm(40, generator=g)[:K].sort().values                     # a window's offsets
    kbase = torch.randint(0, 4000 - 40, (n,), generator=g)
    q_rows = torch.randn(R, K + 3, generator=g).to(dtype)[:, :K]                 # a row stride > K
    if scaled == "k1":                            # one column: a view with column stride R (torch's reshape)
        q_rows = torch.randn(1, R, generator=g).to(dtype).t()
        assert q_rows.stride(1) != 1
    qrow = torch.randint(0, R, (n,), generator=g)
    mu = torch.randn(K, generator=g).to(dtype)
    w = torch.rand(K, generator=g).to(dtype) if scaled else None
    a, b = torch.rand(R, generator=g, dtype=torch.float64) + 0.5, torch.rand(R, generator=g, dtype=torch.float64) * 0.1 + 0.02
    log2c = torch.rand(n, generator=g, dtype=torch.float64) * 3
    got = _native.exact_logits(q_rows, qrow, x, kbase, off, mu, w, a, b, log2c)
    ww = torch.ones(K, dtype=dtype) if w is None else w
    want = _engine.exact_logits(q_rows[qrow] * ww, x[kbase[:, None] + off[None, :]] * ww, a[qrow], b[qrow], mu * ww,
                                log2c)
    assert ((got - want).abs() / want.abs().clamp(min=1)).max() < 1e-12


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
@pytest.mark.parametrize("trouble", ["none", "overflow", "gave up"])
def test_fused_row_blocks_and_their_fallback_cover_every_row(trouble, monkeypatch, two_threads):
    # the fused pass takes blocks of up to FUSED_MAX_ROWS rows; when one overflows (or its
    # refinement gives up), that block is redone in blocks of the step-by-step size, fused
    # where they do not overflow, else by the torch path
    import functools
    import warnings

    from els_audit.machines import _device

    imgs, x, t = _low_noise(C=1, H=16, W=16, B=2, N=30)                        # 512 query rows
    want = {k: build_machine("ELS", imgs).score(x, t, k=k) for k in (3, 5)}
    m32 = build_machine("ELS", imgs.float())
    monkeypatch.setattr(_nested, "FUSED_MAX_ROWS", 96)
    monkeypatch.setattr(_device, "CPU_NESTED_ROWS", 40)
    if trouble == "overflow":
        monkeypatch.setattr(_engine, "FUSED_RECORDS_PER_THREAD", 2)
    if trouble == "gave up":                                  # room for no record at all
        monkeypatch.setattr(_nested, "Float64Refinement",
                            functools.partial(_engine.Float64Refinement, prune_at=1, cap=0))
    sizes = {"fused": [], "stepwise": []}
    for name, key, real in (("_fused_row_block", "fused", _nested._fused_row_block),
                            ("_stepwise_row_block", "stepwise", _nested._stepwise_row_block)):
        def spy(*args, real=real, key=key):
            sizes[key].append(args[3].shape[0])                                # Q's rows
            return real(*args)
        monkeypatch.setattr(_nested, name, spy)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = m32.score_sweep(x.float(), t, (3, 5))
    split = [96, 40, 40, 16] * 5 + [32]
    assert sizes["fused"] == ([96] * 5 + [32] if trouble == "none" else split)
    assert sizes["stepwise"] == ([40, 40, 16] * 5 + [32] if trouble == "overflow" else [])
    # a large block that gave up warns nothing itself; each small block that gives up does
    skipped = [w for w in caught if "refinement skipped" in str(w.message)]
    assert len(skipped) == (16 * 2 if trouble == "gave up" else 0)            # 16 small blocks x 2 levels
    for k in (3, 5):
        assert rel_err(got[k].double(), want[k]) < (1e-4 if trouble == "gave up" else 3e-6), k


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


# -- the diagnostics in the fused kernel -----------------------------------------------------
# With diagnostics the fused kernel also keeps each row's best entry (largest logit less its
# key's log2 count, the first on ties) and the entropy's t1, and sums weights x log counts as
# one more channel; the float32 diagnostics come from the float32 sums, refined or not (as the
# torch path's).  Checked: against brute force, against the torch path and the float64 engine,
# without deduplication (exact ties: the first key wins), after a record overflow, and the
# channel limit.
DIAG_TIMES = (0.05, 0.2, 0.5, 0.9)
# float32 logits at low noise are hundreds of bits: their rounding shows in the weights
DIAG_ABS = {0.05: 1e-4, 0.2: 1e-5, 0.5: 3e-6, 0.9: 3e-6}


def _spy_diagnostics(monkeypatch):
    """Wrap _engine._fused_group_means: a list of (diagnostics asked, ran and returned them)."""
    calls, real = [], _engine._fused_group_means

    def spy(*args):
        out = real(*args)
        calls.append((bool(args[7]), out is not None and out[3] is not None))
        return out
    monkeypatch.setattr(_engine, "_fused_group_means", spy)
    return calls


def _diag_data(C=1, H=6, W=6, N=4, seed=0):
    """test_machines.data (a duplicate image, a flat band: merged keys with counts > 1) with one
    query per time of DIAG_TIMES."""
    imgs, x = data(C, H, W, N=N, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    x = torch.cat([x, torch.randn(len(DIAG_TIMES) - x.shape[0], C, H, W, generator=g, dtype=x.dtype)])
    return imgs, x, torch.tensor(DIAG_TIMES, dtype=torch.float64)


@needs_cc
@pytest.mark.parametrize("kind", ["LS", "ELS", "bbELS"])
def test_fused_diagnostics_match_brute_force(kind, monkeypatch, two_threads):
    # every group fused (bbELS's edges too), in chunks of 16 keys: the rows' maxima rise from
    # call to call, with sums and t1 to rescale
    from .brute_force import brute_score, brute_winner

    imgs, x, t = _diag_data()
    monkeypatch.setattr(_engine, "FUSED_MIN_ROWS", 1)
    monkeypatch.setattr(_engine, "FUSED_CHUNK_KEYS", 16)
    calls = _spy_diagnostics(monkeypatch)
    _, diag = build_machine(kind, imgs.float()).score(x.float(), t.float(), k=3, diagnostics=True)
    assert calls and all(asked and ran for asked, ran in calls), calls
    _, ref = brute_score(kind, imgs, x, ab(t), k=3, diagnostics=True)
    for bi, tt in enumerate(DIAG_TIMES):
        tol = DIAG_ABS[tt]
        for (y, xx), (ents, w) in ref[bi].items():
            src, ties, wmax = brute_winner(ents, w)
            assert (diag.source_image[bi, y, xx].item(), diag.source_y[bi, y, xx].item(),
                    diag.source_x[bi, y, xx].item(), diag.multiplicity[bi, y, xx].item()) == (*src, ties)
            assert diag.weight[bi, y, xx].item() == pytest.approx(wmax.item(), rel=1e-5, abs=tol)
            h = -torch.xlogy(w, w).sum().item()
            assert diag.entropy[bi, y, xx].item() == pytest.approx(h, rel=1e-5, abs=tol), (tt, y, xx)


@needs_cc
@pytest.mark.parametrize("kind,C,stream", [("LS", 1, False), ("ELS", 1, False), ("bbELS", 1, False),
                                           ("ELS", 3, False), ("ELS", 1, True), ("bbELS", 1, True)])
def test_fused_diagnostics_match_the_torch_path(kind, C, stream, monkeypatch, two_threads):
    # Bigger images with a background (sparse key rows); stream: no deduplication, so the
    # duplicate image's keys tie exactly with the first's (the first wins, as when merged) and
    # no counts (no bias)
    imgs, x, t = _diag_data(C, 14, 15, N=5, seed=2)
    imgs[:, :, :, :6] = -1.0
    budget = 20_000 if stream else None
    kw = {} if budget is None else dict(memory_budget=budget)
    m32 = build_machine(kind, imgs.float(), **kw)
    assert m32.dictionary_stats(k=3)["deduplicated"] != stream
    monkeypatch.setattr(_engine, "FUSED_MIN_ROWS", 1)
    monkeypatch.setattr(_engine, "FUSED_CHUNK_KEYS", 64)
    calls = _spy_diagnostics(monkeypatch)
    s_f, fused = m32.score(x.float(), t.float(), k=3, diagnostics=True)
    assert calls and all(asked and ran for asked, ran in calls), calls
    monkeypatch.setattr(_engine, "FUSED_MIN_ROWS", 10**9)                      # the torch path
    calls.clear()
    s_t, torch_path = m32.score(x.float(), t.float(), k=3, diagnostics=True)
    assert not calls
    s64, want = build_machine(kind, imgs).score(x, t, k=3, diagnostics=True)
    for f in ("source_image", "source_y", "source_x"):
        assert torch.equal(getattr(fused, f), getattr(torch_path, f)), f
        assert torch.equal(getattr(fused, f), getattr(want, f)), f
    assert torch.equal(fused.multiplicity, torch_path.multiplicity)
    assert torch.equal(fused.multiplicity, torch.ones_like(want.multiplicity) if stream else want.multiplicity)
    if not stream:
        assert (want.multiplicity > 1).any()                                   # counts > 1 where it matters
    for bi, tt in enumerate(DIAG_TIMES):
        for f in ("weight", "entropy"):
            got, ref, w64 = (getattr(d, f)[bi].double() for d in (fused, torch_path, want))
            # as close to float64 as the torch path's float32, and close to it
            assert (got - w64).abs().max() <= 2 * (ref - w64).abs().max() + 1e-6, (tt, f)
            assert ((got - ref).abs() <= 1e-5 * ref.abs() + DIAG_ABS[tt]).all(), (tt, f)
    assert rel_err(s_f.double(), s64) < 3e-5 and rel_err(s_t.double(), s64) < 3e-5


@needs_cc
def test_fused_diagnostics_after_a_record_overflow(monkeypatch, two_threads):
    # at low noise the kernel records keys for the float64 refinement: should its buffers
    # overflow, the group runs the torch path, diagnostics included
    imgs, x, t = _low_noise(C=1, H=16, W=16, B=2, N=30)
    m32 = build_machine("ELS", imgs.float())
    calls = _spy_diagnostics(monkeypatch)
    s_ok, ok = m32.score(x.float(), t, k=5, diagnostics=True)
    assert calls and all(asked and ran for asked, ran in calls), calls
    monkeypatch.setattr(_engine, "FUSED_RECORDS_PER_THREAD", 2)               # every buffer overflows
    calls.clear()
    s_fb, fallen = m32.score(x.float(), t, k=5, diagnostics=True)
    assert calls and all(asked and not ran for asked, ran in calls), calls
    s64, want = build_machine("ELS", imgs).score(x, t, k=5, diagnostics=True)
    for f in ("source_image", "source_y", "source_x", "multiplicity"):
        assert torch.equal(getattr(ok, f), getattr(want, f)), f
        assert torch.equal(getattr(fallen, f), getattr(want, f)), f
    for f in ("weight", "entropy"):
        # the two float32 paths alike (measured 3e-7 relative); both off float64 by the float32
        # logits' rounding at t = 0.03 (measured 1.1e-4, unrefined as the torch path's)
        assert torch.allclose(getattr(ok, f), getattr(fallen, f), rtol=1e-5, atol=1e-6), f
        assert torch.allclose(getattr(ok, f).double(), getattr(want, f), rtol=0, atol=5e-4), f
    assert rel_err(s_ok.double(), s64) < 3e-6 and rel_err(s_fb.double(), s64) < 3e-6


@needs_cc
def test_diagnostics_beyond_the_kernels_channels_run_the_torch_path(monkeypatch, two_threads):
    # diagnostics take one channel more (sum of weights x log count): with C + 1 channels over
    # the kernel's limit the torch path runs them (here a limit of 3 for 3 colour channels)
    imgs, x, t = _diag_data(3, 6, 6)
    m32 = build_machine("ELS", imgs.float())
    monkeypatch.setattr(_engine, "FUSED_MIN_ROWS", 1)
    want = m32.score(x.float(), t.float(), k=3, diagnostics=True)[1]
    monkeypatch.setattr(_native, "MAX_CHANNELS", 3)
    calls = _spy_diagnostics(monkeypatch)
    got = m32.score(x.float(), t.float(), k=3, diagnostics=True)[1]
    assert not calls
    assert torch.equal(got.source_image, want.source_image) and torch.equal(got.multiplicity, want.multiplicity)
    assert torch.allclose(got.entropy, want.entropy, rtol=1e-5, atol=1e-4)
