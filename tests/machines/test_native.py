"""The native kernels (els_audit/machines/_native.py, _native_kernels.c) and their fallback.

Checked against float64 torch formulas; then the engines (nested pass and single-k kernel)
with the kernels on and off must give the same float32 answers.  The suite's conftest builds
the kernels into a fresh folder, so these tests also exercise the compile step.
"""

import math
import shutil

import pytest
import torch

from els_audit.machines import _native, build_machine
from els_audit.machines._engine import exp2_floor

from .test_machines import data, rel_err

HAVE_CC = shutil.which("cc") is not None
needs_cc = pytest.mark.skipif(not HAVE_CC, reason="no C compiler: the engine runs torch ops (tested elsewhere)")




@pytest.fixture
def fresh_native(monkeypatch):
    """Forget the loaded kernels before and after a test that changes how they build."""
    _native._reset_for_tests()
    yield monkeypatch
    monkeypatch.undo()
    _native._reset_for_tests()


@needs_cc
def test_kernels_build_here():
    assert _native.available(), _native.status()
    assert _native.status().startswith("on ")


@needs_cc
def test_exp2_to_float32_rounding_and_clamped(two_threads):
    x = torch.cat([torch.linspace(-126.0, 127.0, 200_003), torch.tensor([-500.0, -126.5, 127.5, 1000.0])])
    S = x[None, :].contiguous()                                            # one node, R columns
    part = _native.softmax_sums(S, torch.zeros(x.numel()), torch.ones(1, 1), exp2_floor(torch.float32))
    want = torch.exp2(x.double().clamp(-126.0, 127.0))
    err = (part[0].double() / want - 1).abs()
    assert err.max().item() < 1e-7                                          # measured 5.6e-8
    # vs torch's float32 exp2 (Sleef, 1 ulp): the same to a few ulp
    assert ((part[0][:-4] / torch.exp2(x[:-4]) - 1).abs().max().item()) < 3e-7


def _want_sums(S, m, vals, lo):
    E = torch.exp2((S.double() - m.double()[None, :]).clamp(min=lo, max=127.0))
    return vals.double() @ E, vals.double().abs() @ E                      # sums, and the scale of each


@needs_cc
@pytest.mark.parametrize("nc", [1, 2, 3, 4, 5, 6, 7, 8])
def test_softmax_sums_against_float64(nc, two_threads):
    g = torch.Generator().manual_seed(nc)
    n, R = 257, 333                                                        # R: not a multiple of the block
    big = torch.randn(n, R + 7, generator=g) * 30                          # rows with a stride > R
    S = big[:, :R]
    m = S.amax(0) + torch.rand(R, generator=g) * 3 - 1                     # some logits above m: weights > 1
    vals_big = torch.randn(nc + 2, n + 5, generator=g)
    vals = vals_big[1:nc + 1, 3:n + 3]                                     # row stride > n
    got = _native.softmax_sums(S, m, vals, -126.0)
    want, scale = _want_sums(S, m, vals, -126.0)
    assert got.shape == (nc, R)
    assert ((got.double() - want).abs() / scale).max().item() < 1e-6


@needs_cc
@pytest.mark.parametrize("nc", [1, 2, 4])
def test_softmax_sums_rows_against_float64(nc, two_threads):
    g = torch.Generator().manual_seed(10 + nc)
    R, n = 45, 301                                                         # n: not a multiple of 8 or the block
    big = torch.randn(R, n + 3, generator=g) * 30
    L = big[:, 2:n + 2]
    m = L.amax(1) + torch.rand(R, generator=g) - 0.5
    vals = torch.randn(nc, n + 4, generator=g)[:, :n]
    got = _native.softmax_sums_rows(L, m, vals, -126.0)
    want, scale = _want_sums(L.t(), m, vals, -126.0)
    assert got.shape == (R, nc)
    assert ((got.t().double() - want).abs() / scale).max().item() < 1e-6


@needs_cc
def test_bad_arguments_are_refused():
    S = torch.zeros(3, 4)
    with pytest.raises(ValueError, match="float32"):
        _native.softmax_sums(S.double(), torch.zeros(4), torch.ones(2, 3), -126.0)
    with pytest.raises(ValueError, match="C\\+1 <= 8"):
        _native.softmax_sums(S, torch.zeros(4), torch.ones(9, 3), -126.0)
    with pytest.raises(ValueError, match="contiguous rows"):
        _native.softmax_sums_rows(S.t(), torch.zeros(4), torch.ones(2, 3), -126.0)


def test_switched_off_by_environment(fresh_native):
    fresh_native.setenv(_native.ENV_SWITCH, "0")
    assert not _native.available()
    assert "ELS_AUDIT_NATIVE=0" in _native.status()


def test_failed_build_falls_back(fresh_native, tmp_path):
    fresh_native.setenv("ELS_AUDIT_CACHE", str(tmp_path))
    fresh_native.setenv("CC", shutil.which("false") or "/bin/false")         # a "compiler" that fails
    assert not _native.available()
    assert "build failed" in _native.status()
    assert not list(tmp_path.glob("*.so"))                                  # nothing half-written left
    fresh_native.setenv("CC", "no-such-compiler-here")
    _native._reset_for_tests()
    assert not _native.available()
    assert "no C compiler" in _native.status()


def _with_and_without_native(monkeypatch, fn):
    on = fn()
    monkeypatch.setattr(_native, "available", lambda: False)
    off = fn()
    monkeypatch.undo()
    return on, off


@needs_cc
@pytest.mark.parametrize("kind", ["ELS", "bbELS"])
def test_engines_agree_with_and_without_native(kind, monkeypatch, two_threads):
    imgs, x = data(1, 7, 8, N=5)
    imgs, x = imgs.float(), x.float()
    t = torch.tensor([0.1, 0.5, 0.9])                                      # 0.1: the float64 refinement too
    ks = (3, 5, 7)
    m = build_machine(kind, imgs, memory_budget=64 * 2**20)
    assert m._nests(ks)
    sweep_on, sweep_off = _with_and_without_native(monkeypatch, lambda: m.score_sweep(x, t, ks))
    want = build_machine(kind, imgs.double()).score_sweep(x.double(), t.double(), ks)
    for k in ks:
        single_on, single_off = _with_and_without_native(monkeypatch, lambda: m.score(x, t, k=k))
        assert rel_err(sweep_on[k], sweep_off[k]) < 2e-6, k
        assert rel_err(single_on, single_off) < 2e-6, k
        # and right: the float64 engine, which the brute-force tests check (test_machines.py)
        assert rel_err(sweep_on[k].double(), want[k]) < 2e-5, k
        assert rel_err(single_on.double(), want[k]) < 2e-5, k


@needs_cc
def test_decode_rows_refuses_a_short_palette():
    codes = torch.zeros(2, 3, dtype=torch.uint8)
    with pytest.raises(ValueError, match="palette \\(256,\\)"):
        _native.decode_rows(codes, torch.zeros(10), torch.zeros(3), torch.zeros(2, 2))
    out = _native.decode_rows(codes + 7, torch.arange(256.0), torch.ones(3), torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    assert torch.equal(out, torch.tensor([[6.0, 6, 6, 1, 2], [6, 6, 6, 3, 4]]))


def _tile_fields(levels):
    """An int64 (levels, fields) table for native.nested_tile from dicts of tensors (with the
    optional tensors bias, top, best, best_j, t1 and integers key0, ones where a dict has them)."""
    rows = []
    for lv in levels:
        K, par, Q, vals, m, acc = lv["K"], lv.get("par"), lv["Q"], lv["vals"], lv["m"], lv["acc"]
        extra = {f: lv[f].data_ptr() for f in ("bias", "top", "best", "best_j", "t1") if lv.get(f) is not None}
        extra.update({f: lv[f] for f in ("key0", "ones") if f in lv})
        rows.append(_native.nested_level_fields(
            K=K.data_ptr(), ldK=K.stride(0), D=K.shape[1], n=K.shape[0], parent=0 if par is None else par.data_ptr(),
            Q=Q.data_ptr(), ldQ=Q.stride(0), own0=lv["own0"], want=lv["want"], rows=lv["rows"], vals=vals.data_ptr(),
            ldv=vals.stride(0), m=m.data_ptr(), acc=acc.data_ptr(), ldacc=acc.stride(0), **extra))
    return torch.tensor(rows, dtype=torch.int64)


def _random_tile(g, nc, ns=(9, 23, 30), rows=(45, 33, 17), Ds=(5, 7, 9), wants=(1, 0, 1), own0s=(2, 5, 0),
                 zeros=0.0):
    """A tile of three levels in the kernel's layout, with a 'previous tile' already summed;
    a fraction ``zeros`` of the key entries zero (the kernel runs levels below 60% nonzero
    sparse)."""
    pad = -(-max(rows) // 16) * 16
    levels = []
    for i, (n, R, D, want, own0) in enumerate(zip(ns, rows, Ds, wants, own0s)):
        K = (torch.randn(n, D + 3, generator=g) * 0.7)[:, :D]                      # row stride > D
        K[torch.rand(n, D, generator=g) < zeros] = 0.0
        Q = torch.zeros(D, pad)
        Q[:, :R] = torch.randn(D, R, generator=g) * 0.7
        m = torch.randn(pad, generator=g) * 2
        levels.append(dict(K=K, Q=Q, par=None if i == 0 else torch.randint(0, ns[i - 1], (n,), generator=g,
                                                                             dtype=torch.int32),
                           vals=torch.randn(nc, n + 2, generator=g)[:, :n], m=m, acc=torch.rand(nc, pad, generator=g),
                           own0=own0, want=want, rows=R))
    return levels


@needs_cc
@pytest.mark.parametrize("zeros", [0.0, 0.8])
@pytest.mark.parametrize("nc", [1, 2, 4])
def test_nested_tile_against_float64(nc, zeros, two_threads):
    g = torch.Generator().manual_seed(20 + nc)
    levels = _random_tile(g, nc, zeros=zeros)
    before = [(lv["m"].double().clone(), lv["acc"].double().clone()) for lv in levels]
    S_prev = None
    want_sums = []
    for lv in levels:
        S = lv["K"].double() @ lv["Q"].double()                                # (n, pad)
        if S_prev is not None:
            S = S + S_prev[lv["par"].long()]
        S_prev = S
        E = torch.exp2(S[lv["own0"]:])
        want_sums.append((lv["vals"].double()[:, lv["own0"]:] @ E, lv["vals"].double()[:, lv["own0"]:].abs() @ E))
    scratch = torch.empty(2 * (2 * 30 + 8) * 4 * 16)
    _native.nested_tile(_tile_fields(levels), nc, -126.0, -60.0, 32.0, 4, scratch, torch.empty(10000), 2)
    for lv, (m0, acc0), (ws, scale) in zip(levels, before, want_sums):
        R = lv["rows"]
        total = acc0 * torch.exp2(m0) + (ws if lv["want"] else 0)              # sums at maximum 0
        scale = acc0 * torch.exp2(m0) + scale                                   # of each sum's terms
        got = lv["acc"].double() * torch.exp2(lv["m"].double())
        if not lv["want"]:
            assert torch.equal(lv["m"].double(), m0) and torch.equal(lv["acc"].double(), acc0)
        assert ((got - total)[:, :R].abs() / scale[:, :R]).max().item() < 1e-6
        assert bool((lv["m"].double()[:R] >= m0[:R]).all())                     # maxima only rise


@needs_cc
def test_nested_tile_refuses_bad_tables():
    g = torch.Generator().manual_seed(5)
    scratch = torch.empty(2 * (2 * 30 + 8) * 4 * 16)
    levels = _random_tile(g, 2)
    levels[2]["par"][3] = 23                                                   # level 1 has 23 nodes
    with pytest.raises(ValueError, match="code 4"):
        _native.nested_tile(_tile_fields(levels), 2, -126.0, -60.0, 32.0, 4, scratch, torch.empty(10000), 2)
    levels = _random_tile(g, 2, rows=(17, 33, 17))                               # rows must not grow
    with pytest.raises(ValueError, match="code 3"):
        _native.nested_tile(_tile_fields(levels), 2, -126.0, -60.0, 32.0, 4, scratch, torch.empty(10000), 2)
    levels = _random_tile(g, 2)
    with pytest.raises(ValueError, match="code 5"):                              # scratch too small
        _native.nested_tile(_tile_fields(levels), 2, -126.0, -60.0, 32.0, 4, scratch[:100], torch.empty(10000), 2)
    with pytest.raises(ValueError, match="int64"):
        _native.nested_tile(_tile_fields(levels).int(), 2, -126.0, -60.0, 32.0, 4, scratch, torch.empty(10000), 2)
    R = levels[0]["m"].numel()
    levels[0].update(best=torch.zeros(R), t1=torch.zeros(R), ones=1)                  # best without best_j
    with pytest.raises(ValueError, match="code 8"):
        _native.nested_tile(_tile_fields(levels), 2, -126.0, -60.0, 32.0, 4, scratch, torch.empty(10000), 2)
    levels[0].update(best_j=torch.zeros(R, dtype=torch.int64), ones=2)               # ones: no such row of vals
    with pytest.raises(ValueError, match="code 8"):
        _native.nested_tile(_tile_fields(levels), 2, -126.0, -60.0, 32.0, 4, scratch, torch.empty(10000), 2)
    levels[0]["ones"] = 1                                                               # no room for t1's tile part
    with pytest.raises(ValueError, match="code 5"):
        _native.nested_tile(_tile_fields(levels), 2, -126.0, -60.0, 32.0, 4, scratch, torch.empty(10000), 2)


def _diagnostics_level(g, n=150, R=45, D=5, spread=12.0):
    """One level as the single-k engine passes it, with diagnostics: keys (n, D) with log2
    counts as bias, vals [centre, ones, log count]; rows 0-15 see their logits rise along the
    keys (the running maximum is raised again and again, in both calls below), and the best
    keys of rows 20-27 come again at the end with the same bias (exact ties: the first counts)."""
    pad = -(-R // 16) * 16
    Q = torch.zeros(D, pad)
    Q[:, :R] = torch.randn(D, R, generator=g) * spread
    qb = torch.randn(D, generator=g)
    Q[:, :16] = qb[:, None] * spread * torch.linspace(1.0, 2.5, 16) + torch.randn(D, 16, generator=g) * 0.01
    K = torch.randn(n, D, generator=g) * 0.7
    K = K[(K @ qb).argsort()]                                        # rising for rows 0-15
    counts = torch.randint(1, 5, (n,), generator=g).float()
    S = K.double() @ Q.double() + counts.log2().double()[:, None]
    firsts = sorted(set((S - counts.log2().double()[:, None])[:, 20:28].argmax(0).tolist()))
    K, counts = torch.cat([K, K[firsts]]), torch.cat([counts, counts[firsts]])   # later copies, the same counts
    n = K.shape[0]
    vals = torch.stack([torch.randn(n, generator=g), torch.ones(n), counts.log()])
    return K, Q, counts, vals, firsts


@needs_cc
@pytest.mark.parametrize("slack", [1.0, 32.0])
def test_nested_tile_diagnostics_against_float64(slack, two_threads):
    # The single-k engine's use of the kernel with diagnostics: one level per key chunk (two
    # here, keys 1000.. and 1070..), the best per-entry logit S - bias and its key (the first
    # on exact ties), and the entropy's t1 = sum 2**(S - m) (S - m), relative to the final m as
    # the sums are; against float64 sums over the same float32 keys and queries.
    g = torch.Generator().manual_seed(31)
    R, cut, key0 = 45, 70, 1000
    K, Q, counts, vals, firsts = _diagnostics_level(g, 150, R)
    n, pad = K.shape[0], Q.shape[1]
    bias = counts.log2()
    m, acc = torch.full((pad,), float("-inf")), torch.zeros(3, pad)
    t1, best, best_j = torch.zeros(pad), torch.full((pad,), float("-inf")), torch.full((pad,), -1, dtype=torch.int64)
    scratch = torch.empty(2 * (2 * n + 8 + 1) * 4 * 16)
    for lo, hi in ((0, cut), (cut, n)):
        lv = dict(K=K[lo:hi], Q=Q, vals=vals[:, lo:hi].contiguous(), m=m, acc=acc, own0=0, want=1, rows=R,
                  bias=bias[lo:hi].contiguous(), best=best, best_j=best_j, key0=key0 + lo, t1=t1, ones=1)
        _native.nested_tile(_tile_fields([lv]), 3, -126.0, -60.0, slack, 4, scratch, torch.empty(10000), 2)
    S = (K.double() @ Q.double() + bias.double()[:, None])[:, :R]          # (n, R)
    e = S - bias.double()[:, None]                                          # per-entry logits
    emax = e.amax(0)
    first = torch.where(e == emax, torch.arange(n)[:, None], n).amin(0)
    second = torch.where(e == emax, float("-inf"), e).amax(0)
    assert (emax - second).min() > 1e-3                                    # no near-ties but the exact ones
    assert (first[20:28, None] == torch.tensor(firsts)).any(1).all()        # whose copies come later
    assert torch.equal(best_j[:R], first + key0)
    assert torch.allclose(best[:R].double(), emax, rtol=0, atol=1e-4)
    top, mk = S.amax(0), m[:R].double()
    assert ((top - mk) < slack + 1e-3).all() and ((top - mk) > -1e-3).all()     # m within the slack
    if slack > 1:
        assert (top - mk).max() > 4.0                                       # and lagging
    w = torch.exp2(S - mk)
    z, d = w.sum(0), S - mk
    assert torch.allclose(acc[1, :R].double(), z, rtol=1e-5, atol=0)
    assert torch.allclose(acc[2, :R].double(), (w * counts.log().double()[:, None]).sum(0), rtol=1e-5, atol=0)
    # t1 to the float32 rounding of the logits (|S| up to ~200 bits here) and of its sums
    dS = 1e-6 * (K.double().abs() @ Q.double().abs()[:, :R] + 1)
    bound = (w * ((1 + d.abs()) * dS + 1e-6 * d.abs())).sum(0)
    assert ((t1[:R].double() - (w * d).sum(0)).abs() <= bound).all()
    # what the engine makes of them: entropy over entries and the best entry's weight
    p = torch.exp2(e - emax)
    p = p / (p * counts.double()[:, None]).sum(0)
    h_want = -(counts.double()[:, None] * torch.xlogy(p, p)).sum(0)
    z32 = acc[1, :R].double()
    h = torch.log(z32) - t1[:R].double() * math.log(2) / z32 + acc[2, :R].double() / z32
    assert ((h - h_want).abs() <= 1e-5 * h_want.abs() + bound / z).all()
    assert torch.allclose(torch.exp2(best[:R].double() - mk) / z32, p.amax(0), rtol=1e-5, atol=0)


@needs_cc
@pytest.mark.parametrize("mode", ["circular", "interior"])
@pytest.mark.parametrize("C", [1, 3])
def test_fused_nested_pass_matches_the_step_by_step_pass(mode, C, two_threads):
    from els_audit.machines._nested import build_nested_dictionary, nested_softmax_average
    from els_audit.schedules import get_schedule

    g = torch.Generator().manual_seed(C)
    imgs = (torch.randint(0, 6, (12, C, 11, 9), generator=g).float() / 5) * 2 - 1      # repeated patches
    imgs[:, :, :5] = imgs[:, :, :, :4] = -1.0          # a background: rows mostly zero after the shift, sparse
    x = torch.randn(3, C, 11, 9, generator=g)
    a, b = get_schedule("cosine-legacy").alpha_sigma(torch.tensor([0.35, 0.6, 0.95]))
    want = nested_softmax_average(build_nested_dictionary(imgs.double(), (3, 5, 7, 9), mode=mode), x.double(),
                                  a.double(), b.double())
    for tile_nodes, kept in ((5, 0.0), (1024, 0.0), (5, 0.5), (1024, 1.0)):
        nd = build_nested_dictionary(imgs, (3, 5, 7, 9), mode=mode, tile_nodes=tile_nodes)
        assert nd.codes_flat is not None                              # 6 grey levels: byte-coded rows
        assert torch.equal(nd.mu, torch.full((C,), -1.0))              # shifted by the background
        nd.materialize(int(kept * nd.unmaterialized_bytes()))        # kept rows: decoded in C
        assert abs(nd.materialized_fraction - kept) < 0.1
        for ks in ((3, 5, 7, 9), (5, 9), (3,)):
            stats_on, stats_off = {}, {}
            on = nested_softmax_average(nd, x, a, b, ks=ks, stats=stats_on)
            off = nested_softmax_average(nd, x, a, b, ks=ks, stats=stats_off, fuse=False)
            assert stats_on["redone"] == 0 and stats_on["done"] > 0
            for k in ks:
                assert torch.equal(on[k].isnan(), off[k].isnan())
                # right to float32 precision (as test_engines_agree_with_and_without_native; at t = 0.35
                # with C k^2 = 243 the logits' float32 rounding shows: ~1.4e-5 both ways, measured) and
                # within the two paths' rounding of each other (the step-by-step pass: up to 4e-5)
                assert rel_err(on[k].nan_to_num(), off[k].nan_to_num()) < 6e-5, (tile_nodes, ks, k)
                assert rel_err(on[k].nan_to_num().double(), want[k].nan_to_num()) < 2e-5, (tile_nodes, ks, k)


@needs_cc
@pytest.mark.parametrize("kind", ["ELS", "bbELS"])
def test_background_images_fused_single_k_and_sweep(kind, two_threads):
    # Half the pixels at -1 (a background): the shifts take it, most shifted key entries are
    # exactly zero, and the fused C kernel runs sparse products; answers as the float64 engine.
    from els_audit.machines._dictionary import background_of

    g = torch.Generator().manual_seed(7)
    imgs = (torch.randint(0, 6, (6, 1, 9, 10), generator=g).float() / 5) * 2 - 1
    imgs[:, :, :, :5] = -1.0
    x = torch.randn(2, 1, 9, 10, generator=g)
    assert background_of(imgs).tolist() == [-1.0]
    t = torch.tensor([0.5, 0.9])
    m32, m64 = build_machine(kind, imgs), build_machine(kind, imgs.double())
    sweep = m32.score_sweep(x, t, (3, 5, 7))
    want = m64.score_sweep(x.double(), t.double(), (3, 5, 7))
    for k in (3, 5, 7):
        dic = m32._dictionary(k, None)
        shifts = torch.cat([grp.mean for grp in dic.groups])
        assert bool((shifts == -1.0).any())                        # in-image pixels: the background
        if kind == "bbELS":
            assert bool((shifts == 0.0).any())                     # zero padding keeps its mean, 0
        assert rel_err(m32.score(x, t, k=k).double(), want[k]) < 2e-5, k
        assert rel_err(sweep[k].double(), want[k]) < 2e-5, k


@needs_cc
@pytest.mark.parametrize("kind", ["ELS", "bbELS"])
def test_fused_single_k_matches_the_gemm_path(kind, monkeypatch, two_threads):
    # Groups of >= 128 query rows per thread run the fused kernel (one level per key chunk,
    # log2 multiplicities as its bias); smaller ones keep GEMM + softmax_sums_rows.
    import els_audit.machines._engine as engine

    g = torch.Generator().manual_seed(11)
    imgs = (torch.randint(0, 4, (5, 1, 16, 17), generator=g).float() / 3) * 2 - 1
    imgs[:, :, :, :9] = -1.0                                            # background: sparse rows
    imgs[3] = imgs[0]                                                   # duplicates: counts > 1
    x = torch.randn(2, 1, 16, 17, generator=g)
    t = torch.tensor([0.5, 0.9])
    m32, m64 = build_machine(kind, imgs), build_machine(kind, imgs.double())
    calls = []
    fused = engine._fused_group_means
    monkeypatch.setattr(engine, "_fused_group_means", lambda *a: calls.append(1) or fused(*a))
    for k in (3, 5):                                                    # bbELS interior: 420, 312 rows
        on = m32.score(x, t, k=k)
        assert calls, "the fused kernel did not run"
        calls.clear()
        monkeypatch.setattr(engine, "FUSED_MIN_ROWS", 10**9)
        off = m32.score(x, t, k=k)
        assert not calls
        monkeypatch.setattr(engine, "FUSED_MIN_ROWS", 128)
        want = m64.score(x.double(), t.double(), k=k)
        assert rel_err(on, off) < 1e-5, k
        assert rel_err(on.double(), want) < 1e-5, k


@needs_cc
def test_fused_single_k_streams_chunks_larger_than_its_default(two_threads):
    # Without deduplication (a tight budget) a group streams whole images: 36 x 36 = 1,296 keys
    # per chunk, more than FUSED_CHUNK_KEYS; the kernel's buffers follow the chunk.
    import els_audit.machines._engine as engine

    g = torch.Generator().manual_seed(12)
    imgs = (torch.randint(0, 4, (3, 1, 36, 36), generator=g).float() / 3) * 2 - 1
    imgs[:, :, :20] = -1.0
    x = torch.randn(1, 1, 36, 36, generator=g)
    t = torch.tensor([0.6])
    m32 = build_machine("ELS", imgs, memory_budget=100_000)
    dic = m32._dictionary(3, None)
    assert not dic.groups[0].deduplicated and dic.groups[0].enum.npos > engine.FUSED_CHUNK_KEYS
    want = build_machine("ELS", imgs.double()).score(x.double(), t.double(), k=3)
    assert rel_err(m32.score(x, t, k=3).double(), want) < 1e-5
