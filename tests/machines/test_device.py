"""The machines on any device: every tensor made where the images are, exact float32 products
whatever the caller set, answers on the caller's device; and on CUDA, where there is one,
the same answers as the CPU and the brute-force loop.

Without a GPU, the CUDA tests skip with a message; what the CPU can check of the device
path runs here: the torch path that other devices take (the C kernels run only on CPU
tensors) makes no tensor without an explicit device (:mod:`.device_check`)."""

import numpy as np
import pytest
import torch

from els_audit import get_schedule
from els_audit.machines import _native, build_machine
from els_audit.machines import _device as device_mod
from els_audit.machines._partial import Partial, merge_partials
from els_audit.machines.banded import banded_score
from els_audit.machines.supports import SupportSchedule

from .brute_force import brute_score
from .device_check import FactoriesWithoutDevice

SCHED = get_schedule("cosine-legacy")
KINDS = [("IS", "periodic"), ("LS", "periodic"), ("ELS", "periodic"), ("ELS", "valid"), ("bbELS", "periodic")]
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA device here: the machines' CUDA tests run on a GPU "
                                                 "machine (bench/README.md, 'The machines on the GPU')")


def ab(t):
    return [tuple(float(v) for v in SCHED.alpha_sigma(float(tt))) for tt in t]


def rel_err(a, b):
    return ((a.double().cpu() - b.double().cpu()).abs().max() / b.double().cpu().abs().max()).item()


def data(N=6, C=2, H=7, W=7, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    imgs = torch.rand(N, C, H, W, generator=g, dtype=torch.float64) * 2 - 1
    imgs[1] = imgs[0]                                   # duplicate keys: merged
    imgs[2, :, :2, :] = -1.0                            # a flat band
    x = torch.randn(3, C, H, W, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 1, 0, 1, 1, 0])[:N]
    return imgs.to(dtype), x.to(dtype), labels


def support_schedule(times=(0.03, 0.5), S=5, seed=1):
    m = np.random.default_rng(seed).uniform(0, 2, size=(len(times), S, S))
    m[m < 0.6] = 0.0
    return SupportSchedule("erf", tuple(times), m, "random maps (test)")


def exercise(m, x, kind):
    """Every public path of machine m at x: low noise (the float32 refinement), diagnostics,
    nested sweeps, labels, shard partials and their merge."""
    k = None if kind == "IS" else 3
    m.score(x, 0.5, k=k)
    m.score(x, 0.03, k=k)
    m.score(x, 0.5, k=k, diagnostics=True)
    m.score(x, 0.5, k=k, label=torch.tensor([0, 1, 1], device=x.device))
    merge_partials([m.partial(x, 0.4, k=k, diagnostics=True), m.partial(x, 0.4, k=k, diagnostics=True)])
    if kind != "IS":
        m.score_sweep(x, 0.03, (3, 5))
        m.denoised_sweep(x, 0.5, (3, 5, 7))
        m.partial_sweep(x, 0.3, (3, 5), label=1)


def test_the_check_catches_a_factory_without_a_device():
    mode = FactoriesWithoutDevice(package="tests/machines/")
    with mode:
        torch.zeros(3, device="cpu")
        torch.as_tensor(torch.ones(2, device="cpu"))
        assert not mode.sites
        torch.zeros(3)
    assert len(mode.sites) == 1 and "zeros" in next(iter(mode.sites))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind,dic", KINDS)
def test_every_tensor_is_made_on_the_images_device(kind, dic, dtype, monkeypatch):
    monkeypatch.setattr(_native, "available", lambda: False)          # the torch path other devices take
    imgs, x, labels = data(dtype=dtype)
    machines = [build_machine(kind, imgs, labels, dictionary=dic),
                build_machine(kind, imgs, labels, dictionary=dic, memory_budget=0)]   # keys gathered per tile
    if kind != "IS":
        machines.append(build_machine(kind, imgs, labels, dictionary=dic, supports=support_schedule()))
    mode = FactoriesWithoutDevice()
    with mode:
        for i, m in enumerate(machines):
            if i == 2:                                                   # shaped supports: their own times
                m.score(x, 0.03, k=3)
                m.partial(x, 0.5, k=5, diagnostics=True)
            else:
                exercise(m, x, kind)
        if kind == "bbELS":
            banded_score(machines[0], x, 0.5, 5, 3, diagnostics=True)
            banded_score(machines[0], x, 0.5, 5, 3)
    assert not mode.sites, f"tensors made without a device (CPU tensors on a GPU machine): {sorted(mode.sites)}"


def test_products_are_ieee_float32_inside_a_call_and_the_callers_setting_after(monkeypatch):
    import els_audit.machines as machines_mod
    seen = []
    inner = machines_mod.grouped_softmax_average

    def spy(*a, **kw):
        seen.append((torch.backends.cuda.matmul.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision))
        return inner(*a, **kw)

    monkeypatch.setattr(machines_mod, "grouped_softmax_average", spy)
    imgs, x, _ = data(dtype=torch.float32)
    m = build_machine("ELS", imgs)
    before = (torch.backends.cuda.matmul.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision)
    try:
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        torch.backends.mkldnn.matmul.fp32_precision = "bf16"
        m.score(x, 0.2, k=3)
        assert seen == [("ieee", "ieee")]
        assert (torch.backends.cuda.matmul.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision) == \
            ("tf32", "bf16")
    finally:
        torch.backends.cuda.matmul.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision = before


def test_to_device_moves_every_tensor_of_an_answer():
    p = Partial(torch.ones(2, 1, 3, 3), torch.zeros(2, 3, 3))
    got = device_mod.to_device({"a": (p, [torch.ones(1)]), "k": 3}, torch.device("meta"))
    assert got["a"][0].mean.is_meta and got["a"][0].log2_norm.is_meta and got["a"][1][0].is_meta
    assert got["a"][0].diagnostics is None and got["k"] == 3


def test_tile_sizes_per_device():
    budget = 1 << 30
    assert device_mod.engine_tile_elems(torch.device("cpu"), torch.float32, budget) == device_mod.CPU_TILE_ELEMS
    # another device: half of the working quarter of the budget, two float32 tensors of logits
    want = int(device_mod.GPU_TILE_SHARE * (budget // 4) // (2 * 4))
    assert device_mod.engine_tile_elems(torch.device("meta"), torch.float32, budget) == want
    assert device_mod.nested_row_block(torch.device("cpu"), want) == device_mod.CPU_NESTED_ROWS
    assert device_mod.nested_row_block(torch.device("meta"), want) == want // 2048
    assert device_mod.engine_tile_elems(torch.device("meta"), torch.float32, 1 << 20) == device_mod.CPU_TILE_ELEMS


def test_build_machine_device_argument_on_cpu():
    imgs, x, labels = data()
    m = build_machine("ELS", imgs, labels, device="cpu")
    assert m.device == torch.device("cpu") and m.labels.device == m.device
    assert torch.equal(m.score(x, 0.5, k=3), build_machine("ELS", imgs, labels).score(x, 0.5, k=3))


# -- on a GPU ------------------------------------------------------------------------------

@needs_cuda
@pytest.mark.parametrize("kind,dic", KINDS)
def test_cuda_float64_matches_brute_force_and_cpu(kind, dic):
    imgs, x, _ = data(C=1, H=5, W=6)
    t = torch.tensor([0.05, 0.4, 0.9], dtype=torch.float64)
    k = None if kind == "IS" else 3
    gpu = build_machine(kind, imgs, dictionary=dic, device="cuda")
    got = gpu.score(x.cuda(), t.cuda(), k=k)
    assert got.is_cuda
    assert rel_err(got, brute_score(kind, imgs, x, ab(t), k=k, dictionary=dic)) < 1e-5
    assert rel_err(got, build_machine(kind, imgs, dictionary=dic).score(x, t, k=k)) < 1e-10


@needs_cuda
@pytest.mark.parametrize("kind,dic", KINDS)
@pytest.mark.parametrize("t", [0.03, 0.1, 0.5, 0.9])
def test_cuda_float32_matches_float64(kind, dic, t):
    imgs, x, _ = data()
    k = None if kind == "IS" else 5
    s64 = build_machine(kind, imgs, dictionary=dic).score(x, t, k=k)
    s32 = build_machine(kind, imgs.float(), dictionary=dic, device="cuda").score(x.float().cuda(), t, k=k)
    assert s32.dtype == torch.float32 and s32.is_cuda
    assert rel_err(s32, s64) < 1e-5


@needs_cuda
@pytest.mark.parametrize("kind,dic", KINDS)
def test_cuda_every_path_equals_the_cpu(kind, dic):
    imgs, x, labels = data()
    cpu = build_machine(kind, imgs, labels, dictionary=dic)
    gpu = build_machine(kind, imgs, labels, dictionary=dic, device="cuda")
    k = None if kind == "IS" else 3
    s_c, d_c = cpu.score(x, 0.5, k=k, diagnostics=True)
    s_g, d_g = gpu.score(x, 0.5, k=k, diagnostics=True)               # x on the CPU: answers there
    assert not s_g.is_cuda and rel_err(s_g, s_c) < 1e-10
    for f in ("source_image", "source_y", "source_x", "count"):
        assert torch.equal(getattr(d_g, f), getattr(d_c, f)), f
    assert rel_err(d_g.entropy, d_c.entropy) < 1e-9
    lab = torch.tensor([0, 1, 1])
    assert rel_err(gpu.score(x, 0.3, k=k, label=lab), cpu.score(x, 0.3, k=k, label=lab)) < 1e-10
    pc, pg = cpu.partial(x, 0.4, k=k, diagnostics=True), gpu.partial(x, 0.4, k=k, diagnostics=True)
    assert rel_err(pg.mean, pc.mean) < 1e-10 and torch.allclose(pg.log2_norm, pc.log2_norm, rtol=0, atol=1e-9)
    assert torch.equal(pg.winner_hash, pc.winner_hash)
    if kind != "IS":
        sw_c, sw_g = cpu.score_sweep(x, 0.05, (3, 5, 7)), gpu.score_sweep(x, 0.05, (3, 5, 7))
        for kk in (3, 5, 7):
            assert rel_err(sw_g[kk], sw_c[kk]) < 1e-10


@needs_cuda
def test_cuda_shaped_supports_and_border_band_equal_the_cpu():
    imgs, x, _ = data()
    sup = support_schedule()
    for kind, dic in KINDS[1:]:
        cpu = build_machine(kind, imgs, dictionary=dic, supports=sup)
        gpu = build_machine(kind, imgs, dictionary=dic, supports=sup, device="cuda")
        assert rel_err(gpu.score(x, 0.03, k=5), cpu.score(x, 0.03, k=5)) < 1e-10
    cpu, gpu = build_machine("bbELS", imgs), build_machine("bbELS", imgs, device="cuda")
    assert rel_err(banded_score(gpu, x, 0.5, 5, 3), banded_score(cpu, x, 0.5, 5, 3)) < 1e-10


@needs_cuda
def test_cuda_ignores_the_callers_tf32():
    imgs, x, _ = data(N=40, C=3, H=16, W=16, dtype=torch.float32)
    gpu = build_machine("ELS", imgs, device="cuda")
    before = torch.backends.cuda.matmul.fp32_precision
    try:
        torch.backends.cuda.matmul.fp32_precision = "ieee"
        ieee = gpu.score(x, 0.05, k=7)
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        assert torch.equal(gpu.score(x, 0.05, k=7), ieee)
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
    finally:
        torch.backends.cuda.matmul.fp32_precision = before


@needs_cuda
def test_cuda_audit_equals_the_cpu_audit():
    from els_audit.audit import AuditConfig, run_audit
    tiny = dict(model="zoo:resnet-zeros", data="mnist5k:size=32:limit=100", data_limit=50, steps=4, seeds=3,
                calibration_seeds=1, threads=1, budget=None)
    cpu, gpu = run_audit(AuditConfig(**tiny)), run_audit(AuditConfig(device="cuda", **tiny))
    assert gpu.scales == cpu.scales
    assert abs(gpu.prediction.median_r - cpu.prediction.median_r) < 1e-4


def test_cuda_refused_without_a_device_or_memory():
    if CUDA:
        pytest.skip("this machine has a CUDA device")
    from els_audit.audit import AuditError, check_cuda
    with pytest.raises(AuditError, match="no CUDA device"):
        check_cuda(1 << 30)
