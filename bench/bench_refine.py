"""The float64 refinement (low noise) inside the fused C kernel vs the step-by-step torch path.

Below t ~ 0.27 the float32 engines refine the keys within REFINE_BITS of each pixel's
maximum in float64 (``_engine.Float64Refinement``).  The fused kernel (``els_nested_tile``)
now records those keys itself; before, both the nested pass and the single-k engine left it
for a step-by-step torch path there.  This bench runs both, alternated in one process, on
the full-fidelity audit's two hot calls (bbELS, MNIST at 32x32, 2,000 images):

- a calibration sweep: ``denoised_sweep`` over k = 7, 9, 11 for 4 seeds (nested interior
  tree + the edge groups one k at a time), at each ``--sweep-t``;
- a prediction step: ``denoised`` at k = 7 for 16 seeds, at ``--predict-t``.

    python bench/bench_refine.py                      # 2 threads, 2 repeats, best of each
    python bench/bench_refine.py --repeat 1 --threads 1

"old" is the step-by-step path (the nested pass with ``fuse=False``; the single-k engine
with FUSED_MIN_ROWS out of reach, so every group keeps the GEMM), "new" the fused one.
Prints each variant's best time, the ratio old / new, the largest difference between the
two answers relative to the answer's largest entry, how many fused calls fell back to the
torch path (record buffers overflowed), and with ``--float64`` each path's error against the
float64 machine.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_machines import bench_query  # noqa: E402

import els_audit.machines as machines  # noqa: E402
from els_audit.data import load_dataset  # noqa: E402
from els_audit.machines import _engine, _native, _nested, build_machine  # noqa: E402


@contextlib.contextmanager
def step_by_step():
    """The torch refined path of both engines (as before the kernel recorded the keys)."""
    real, min_rows = machines.nested_softmax_average, _engine.FUSED_MIN_ROWS
    machines.nested_softmax_average = lambda *a, **kw: real(*a, **{**kw, "fuse": False})
    _engine.FUSED_MIN_ROWS = 10**9
    try:
        yield
    finally:
        machines.nested_softmax_average, _engine.FUSED_MIN_ROWS = real, min_rows


@contextlib.contextmanager
def counting_fallbacks(counts):
    """Count the fused calls that fell back to the torch path (record buffers overflowed)."""
    real = {mod: getattr(mod, name) for mod, name in ((_engine, "_fused_group_means"),
                                                      (_nested, "_fused_row_block"))}

    def wrap(mod, fn):
        def spy(*a):
            out = fn(*a)
            counts["fused calls"] += 1
            counts["fallbacks"] += out is None
            return out
        return spy
    for mod, fn in real.items():
        setattr(mod, fn.__name__, wrap(mod, fn))
    try:
        yield
    finally:
        for mod, fn in real.items():
            setattr(mod, fn.__name__, fn)


def alternate(fn, repeat):
    """Best wall time of fn() for "old" and "new", run old, new, old, new, ...; the answers
    of the last run of each; and the new path's fused calls and fallbacks."""
    best, out, counts = {"old": float("inf"), "new": float("inf")}, {}, {"fused calls": 0, "fallbacks": 0}
    for _ in range(repeat):
        for name in ("old", "new"):
            with step_by_step() if name == "old" else counting_fallbacks(counts):
                t0 = time.perf_counter()
                out[name] = fn()
                best[name] = min(best[name], time.perf_counter() - t0)
    return best, out, counts


def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().nan_to_num(), b.double().nan_to_num()
    return ((a - b).abs().max() / b.abs().max()).item()


def report(what, best, out, counts, want=None):
    diffs = {k: max_rel_diff(out["new"][k], out["old"][k]) for k in out["old"]}
    line = (f"{what}: old {best['old']:.1f}s  new {best['new']:.1f}s  old/new {best['old'] / best['new']:.2f}x  "
            f"max rel diff " + ", ".join(f"k={k} {d:.1e}" for k, d in diffs.items()) +
            f"  (new: {counts['fallbacks']} of {counts['fused calls']} fused calls fell back)")
    if want is not None:
        line += "; vs float64: " + ", ".join(
            f"k={k} old {max_rel_diff(out['old'][k], w):.1e} new {max_rel_diff(out['new'][k], w):.1e}"
            for k, w in want.items())
    print(line, flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="mnist5k:size=32:limit=2000")
    ap.add_argument("--sweep-ks", default="7,9,11")
    ap.add_argument("--sweep-t", default="0.25,0.15")
    ap.add_argument("--sweep-seeds", type=int, default=4)
    ap.add_argument("--predict-k", type=int, default=7)
    ap.add_argument("--predict-t", type=float, default=0.2)
    ap.add_argument("--predict-seeds", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--skip", default="", help="'sweep' or 'predict' to leave one out")
    ap.add_argument("--float64", action="store_true", help="also the float64 answer, and each path's error")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"native kernels: {_native.status()}; {args.threads} threads", flush=True)
    imgs = load_dataset(args.data).images
    machine = build_machine("bbELS", imgs)
    m64 = build_machine("bbELS", imgs.double()) if args.float64 else None
    sched = machine.schedule
    ks = tuple(int(v) for v in args.sweep_ks.split(","))

    def query(seeds, t):
        x0, noise = bench_query(imgs, batch=seeds)
        a, b = (float(v) for v in sched.alpha_sigma(t))
        return a * x0 + b * noise, torch.full((seeds,), t, dtype=imgs.dtype)

    if "sweep" not in args.skip:
        machine.prepare_sweep(ks)
        print(f"bbELS sweep over k={ks} nests: {machine._nests(ks)}", flush=True)
        for t in (float(v) for v in args.sweep_t.split(",")):
            x, tv = query(args.sweep_seeds, t)
            best, out, counts = alternate(lambda: machine.denoised_sweep(x, tv, ks), args.repeat)
            want = m64.denoised_sweep(x.double(), tv.double(), ks) if m64 else None
            report(f"calibration sweep k={ks} t={t} seeds={args.sweep_seeds}", best, out, counts, want)
    if "predict" not in args.skip:
        x, tv = query(args.predict_seeds, args.predict_t)
        k = args.predict_k
        best, out, counts = alternate(lambda: {k: machine.denoised(x, tv, k=k)}, args.repeat)
        want = {k: m64.denoised(x.double(), tv.double(), k=k)} if m64 else None
        report(f"prediction k={k} t={args.predict_t} seeds={args.predict_seeds}", best, out, counts, want)


if __name__ == "__main__":
    main()
