"""Float32 accuracy of the engine and of the baseline against a float64 reference.

    python bench/accuracy.py --kinds bbELS,ELS --ks 3,7,15 --ts 0.1
    python bench/accuracy.py --kinds ELS --ks 3,5,7 --sweep     # also the nested sweep (ELS)

The reference is the *baseline* (an independent implementation) run in float64.  Low noise
is the hard case: logits reach |q.p| a / b^2 ~ 1e3 there, so float32 rounding of the logits
(~1e-4 absolute) shows in the weights.  The engine subtracts a shift patch from keys and
queries first (exact: the mean patch, with the background value at in-image pixels where
the images have one), which keeps its logits smaller.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from baseline import UnfoldGemmMachine  # noqa: E402
from bench_machines import bench_query  # noqa: E402

from els_audit.data import load_dataset  # noqa: E402
from els_audit.machines import build_machine  # noqa: E402
from els_audit.schedules import get_schedule  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="mnist5k:size=32")
    ap.add_argument("--kinds", default="bbELS,ELS")
    ap.add_argument("--ks", default="3,7,15")
    ap.add_argument("--ts", default="0.1")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--sweep", action="store_true",
                    help="also score_sweep over --ks (nested for periodic ELS, and for bbELS when its tree fits the "
                         "budget), per k against the same reference")
    ap.add_argument("--memory-budget-gb", type=float, default=None,
                    help="the engine's memory budget (default: the library default, 2 GB; bbELS sweeps nest "
                         "only when the whole interior tree fits it)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    imgs = load_dataset(args.data).images
    x0, noise = bench_query(imgs)                           # the same query as bench_machines.py
    sched = get_schedule("cosine-legacy")
    rows = []
    ks = [int(v) for v in args.ks.split(",")]
    ts = [float(v) for v in args.ts.split(",")]
    for kind in args.kinds.split(","):
        budget = {} if args.memory_budget_gb is None else {"memory_budget": int(args.memory_budget_gb * 2**30)}
        eng = build_machine(kind, imgs, **budget)
        sweep, nested = {}, False
        if args.sweep:
            nested = eng._nests(tuple(ks))
            for t in ts:
                a, b = (float(v) for v in sched.alpha_sigma(t))
                sweep[t] = eng.score_sweep(a * x0 + b * noise, t, ks)
            print(f"{kind}: sweep over {ks} {'nested' if nested else 'one k at a time'}", flush=True)
            eng._cache.clear()
        for k in ks:
            base32 = UnfoldGemmMachine(kind, imgs, k)
            base64 = UnfoldGemmMachine(kind, imgs.double(), k)
            for t in ts:
                a, b = (float(v) for v in sched.alpha_sigma(t))
                x = a * x0 + b * noise
                ref = base64.score(x.double(), a, b)
                rel = lambda s: ((s.double() - ref).abs().max() / ref.abs().max()).item()  # noqa: E731
                row = {"kind": kind, "k": k, "t": t, "engine_f32_err": rel(eng.score(x, t, k=k)),
                       "baseline_f32_err": rel(base32.score(x, a, b))}
                if sweep:
                    row["sweep_f32_err"] = rel(sweep[t][k])
                    row["sweep_nested"] = nested
                rows.append(row)
                print(f"{kind:5s} k={k:2d} t={t}: engine f32 {row['engine_f32_err']:.1e}, "
                      + (f"sweep f32 {row['sweep_f32_err']:.1e}, " if sweep else "")
                      + f"baseline f32 {row['baseline_f32_err']:.1e} (vs float64 baseline)", flush=True)
                if args.json:                       # after every row: a run killed later keeps these
                    args.json.write_text(json.dumps(rows, indent=1))
            del base32, base64
            eng._cache.clear()


if __name__ == "__main__":
    main()
