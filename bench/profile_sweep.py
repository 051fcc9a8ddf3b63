"""Where the time of one nested sweep goes: torch's CPU profiler over one
``nested_softmax_average`` pass (periodic ELS, MNIST-5k at 32x32 by default, the bench's query).

    python bench/profile_sweep.py --t 0.5                  # k = 3..15, 2 threads, 2 GB budget
    python bench/profile_sweep.py --t 0.9 --memory-budget-gb 8

Prints the pass's wall time, the share of the key gathers (rows not kept in memory, gathered
from the images), and the profiler's table of operators by self CPU time.  In float32 above
t ~ 0.3 each tile runs as one fused C call (kept byte-coded rows decoded inside it), which the
profiler sees as Python time; ``--step-by-step`` profiles the torch path instead.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_machines import bench_query  # noqa: E402

import els_audit.machines._nested as nested  # noqa: E402
from els_audit.data import load_dataset  # noqa: E402
from els_audit.machines import build_machine  # noqa: E402
from els_audit.schedules import get_schedule  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="mnist5k:size=32")
    ap.add_argument("--ks", default="3,5,7,9,11,13,15")
    ap.add_argument("--t", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--memory-budget-gb", type=float, default=2.0)
    ap.add_argument("--rows", type=int, default=18, help="operators shown")
    ap.add_argument("--step-by-step", action="store_true", help="the torch path, not the fused C step")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    imgs = load_dataset(args.data).images
    x0, noise = bench_query(imgs)                           # the same query as bench_machines.py
    ks = tuple(int(v) for v in args.ks.split(","))
    eng = build_machine("ELS", imgs, memory_budget=int(args.memory_budget_gb * 2**30))
    t0 = time.perf_counter()
    eng.prepare_sweep(ks)
    nd = eng._nested_dictionary(ks, None)
    kept = ", ".join(f"k={lv.k} {lv.n_materialized / lv.n_nodes:.0%}" for lv in nd.levels)
    print(f"tree built in {time.perf_counter() - t0:.1f}s; rows kept: {kept}")
    a, b = (float(v) for v in get_schedule("cosine-legacy").alpha_sigma(args.t))
    x = a * x0 + b * noise
    gather_s = [0.0]
    keys = nested.NestedLevel.keys

    def timed_keys(self, padded_flat, j0, j1):
        s = time.perf_counter()
        out = keys(self, padded_flat, j0, j1)
        gather_s[0] += time.perf_counter() - s
        return out

    nested.NestedLevel.keys = timed_keys
    try:
        stats = {}
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            nested.nested_softmax_average(nd, x, torch.tensor([a]), torch.tensor([b]), stats=stats,
                                          fuse=not args.step_by_step)
            wall = time.perf_counter() - t0
    finally:
        nested.NestedLevel.keys = keys
    print(f"t={args.t}: pass {wall:.1f}s (under the profiler), key rows fetched in {gather_s[0]:.1f}s; "
          f"(tile, level) steps {stats}")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
