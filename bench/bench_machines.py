"""Side-by-side timing of the machines engine against the unfold + GEMM baseline.

    python bench/bench_machines.py                  # MNIST-5k at 32x32, the full table
    python bench/bench_machines.py --smoke          # 300 images, a few cells (about a minute)

Both run in one process, float32, all threads, alternating (engine, baseline) per cell and
keeping the best of --repeat runs each, so machine noise hits both alike.  Dictionaries are
built once per k for both before timing (build times are reported separately).  The answer
of every cell is compared: max |s_engine - s_baseline| / max |s_baseline|.

The sweep row times what a calibration step asks for, the score at every k of --sweep-ks
for one x and t: the engine's ``score_sweep`` (one nested pass for periodic ELS, built once
by ``prepare_sweep``; for bbELS the same over its interior tree when the whole tree fits the
budget, else one k at a time) against the sum of the baseline's single-k times at those k.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from baseline import UnfoldGemmMachine  # noqa: E402

from els_audit.data import load_dataset  # noqa: E402
from els_audit.machines import _native as native  # noqa: E402
from els_audit.machines import build_machine  # noqa: E402
from els_audit.schedules import get_schedule  # noqa: E402


def bench_query(imgs: torch.Tensor, batch: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, noise) of the benches' queries: seeded, horizontally flipped training images
    (image-like, not in the dictionary) and their noise; x_t = a x0 + b noise."""
    g = torch.Generator().manual_seed(0)
    x0 = imgs[torch.randperm(imgs.shape[0], generator=g)[:batch]].flip(-1)
    return x0, torch.randn(x0.shape, generator=g)


def best_of(fn, repeat):
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="mnist5k:size=32")
    ap.add_argument("--batch", type=int, default=2, help="query images per evaluation")
    ap.add_argument("--kinds", default="bbELS,ELS")
    ap.add_argument("--single-ks", default="3,7,11,15")
    ap.add_argument("--sweep-ks", default="3,5,7,9,11,13,15")
    ap.add_argument("--ts", default="0.1,0.5,0.9")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = all cores)")
    ap.add_argument("--memory-budget-gb", type=float, default=2.0,
                    help="the engine's memory budget (default: the library default, 2 GB)")
    ap.add_argument("--smoke", action="store_true", help="small and quick: 300 images, k 3 and 7, t 0.5")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    args = ap.parse_args(argv)
    if args.smoke:
        args.data, args.single_ks, args.sweep_ks, args.ts = "mnist5k:size=32:limit=300", "3,7", "3,5,7", "0.5"

    if args.threads:
        torch.set_num_threads(args.threads)
    ds = load_dataset(args.data)
    imgs = ds.images                                                             # (N, C, H, W)
    N, C, H, W = imgs.shape
    sched = get_schedule("cosine-legacy")
    x0, noise = bench_query(imgs, args.batch)
    kinds = args.kinds.split(",")
    single_ks = [int(v) for v in args.single_ks.split(",")]
    sweep_ks = [int(v) for v in args.sweep_ks.split(",")]
    ts = [float(v) for v in args.ts.split(",")]
    all_ks = sorted(set(single_ks) | set(sweep_ks))
    print(f"data {args.data}: N={N} {C}x{H}x{W}; batch {args.batch}; threads {torch.get_num_threads()}; "
          f"native kernels {native.status()}", flush=True)

    rows, builds = [], []
    for kind in kinds:
        eng = build_machine(kind, imgs, memory_budget=int(args.memory_budget_gb * 2**30))
        times = {}                                                  # (t, k) -> (engine, baseline)
        base_scores = {}                                            # (t, k) -> baseline score
        for k in all_ks:
            # one k at a time: the baseline's unfolded dictionary is 5.12M x k^2 floats
            # (4.6 GB at k = 15), so it is built, timed and freed before the next k
            tb, base = best_of(lambda: UnfoldGemmMachine(kind, imgs, k), 1)
            te, _ = best_of(lambda: eng._dictionary(k, None), 1)
            st = eng.dictionary_stats(k)
            builds.append({"kind": kind, "k": k, "baseline_build_s": tb, "engine_build_s": te,
                           "keys": st["keys"], "unique_keys": st["unique_keys"],
                           "materialized_fraction": st["materialized_fraction"]})
            print(f"  build {kind} k={k}: baseline {tb:.1f}s, engine {te:.1f}s, "
                  f"keys {st['keys']} -> unique {st['unique_keys']} ({st['unique_keys'] / st['keys']:.1%}), "
                  f"materialised {st['materialized_fraction']:.0%}", flush=True)
            for t in ts:
                a, b = (float(v) for v in sched.alpha_sigma(t))
                x = a * x0 + b * noise
                te, s_e = best_of(lambda: eng.score(x, t, k=k), args.repeat)
                tb, s_b = best_of(lambda: base.score(x, a, b), args.repeat)
                err = ((s_e - s_b).abs().max() / s_b.abs().max()).item()
                logits = args.batch * H * W * N * H * W
                times[(t, k)] = (te, tb)
                if k in sweep_ks:
                    base_scores[(t, k)] = s_b
                rows.append({"kind": kind, "t": t, "k": k, "engine_s": te, "baseline_s": tb, "speedup": tb / te,
                             "rel_err": err, "engine_logits_per_s": logits / te, "baseline_logits_per_s": logits / tb,
                             "single": k in single_ks})
                print(f"  {kind:5s} t={t:.1f} k={k:2d}: engine {te:7.2f}s  baseline {tb:7.2f}s  "
                      f"x{tb / te:5.2f}  err {err:.1e}  {logits / te / 1e9:.2f} G logits/s", flush=True)
            base = None                                              # free the unfolded patches
            eng._cache.clear()
        nested = eng._nests(tuple(sweep_ks))
        if nested:
            te, _ = best_of(lambda: eng.prepare_sweep(sweep_ks), 1)
            nd = eng._nested_dictionary(tuple(sweep_ks), None)
            builds.append({"kind": kind, "k": "sweep", "engine_build_s": te, "unique_keys": nd.unique_keys,
                           "materialized_fraction": nd.materialized_fraction})
            print(f"  build {kind} sweep {sweep_ks}: engine {te:.1f}s, nodes per level {nd.unique_keys}, "
                  f"materialised {nd.materialized_fraction:.0%}", flush=True)
        for t in ts:
            sb = sum(times[(t, k)][1] for k in sweep_ks)
            se_each = sum(times[(t, k)][0] for k in sweep_ks)
            row = {"kind": kind, "t": t, "k": "sweep", "baseline_s": sb, "engine_one_k_at_a_time_s": se_each,
                   "nested": nested}
            if nested:
                a, b = (float(v) for v in sched.alpha_sigma(t))
                x = a * x0 + b * noise
                se, s_e = best_of(lambda: eng.score_sweep(x, t, sweep_ks), args.repeat)
                row["rel_err"] = max(((s_e[k] - base_scores[(t, k)]).abs().max() / base_scores[(t, k)].abs().max()).item()
                                     for k in sweep_ks)
            else:
                se = se_each
            row |= {"engine_s": se, "speedup": sb / se}
            rows.append(row)
            print(f"  {kind:5s} t={t:.1f} sweep {sweep_ks}: engine {se:.1f}s (one k at a time {se_each:.1f}s) "
                  f"baseline {sb:.1f}s  x{sb / se:.2f}", flush=True)
        eng._cache.clear()
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "builds": builds,
                                         "rows": rows, "threads": torch.get_num_threads(),
                                         "torch": torch.__version__, "native": native.status()}, indent=1))
    worst = max((r["rel_err"] for r in rows if "rel_err" in r), default=0.0)
    print(f"max relative difference engine vs baseline: {worst:.1e}")
    return 0 if worst < 1e-4 else 1


if __name__ == "__main__":
    raise SystemExit(main())
