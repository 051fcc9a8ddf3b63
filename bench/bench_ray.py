"""The sharded machines on Ray: 2 workers against 1, side by side in one run, and the paper
numbers for a dictionary that no single machine holds.

    python bench/bench_ray.py --data /tmp/cifar/cifar10/train --n 50000     # unconditional CIFAR-10
    python bench/bench_ray.py --smoke                                       # 2,000 MNIST digits

One local Ray cluster on loopback, declared with 3 logical CPUs so that the 1-actor and the
2-actor pools (1 CPU each) stay up side by side; only one row runs at a time, on the
machine's 2 cores.  Each row evaluates the same
unconditional ELS score (periodic dictionary, one k, float32) for the same noisy query:

- ``process``: the ordinary machine in this process, 1 torch thread;
- ``ray-1``: one shard on one actor (1 CPU, 1 thread);
- ``ray-2``: two shards on two actors (1 CPU, 1 thread each).

Each shard's dictionary is built first (reported apart); the evaluation is then timed
--repeat times, alternating the rows, and the best of each kept.  The answers are compared
(max |s - s_process| / max |s_process|).  The speed-up is ray-1 / ray-2.

The paper rows use the measured single-worker throughput (logit FLOP per second: query
pixels x dictionary keys x (C k^2 + 1) x 2) to size a full-fidelity audit with a 1.28 M-image
64x64 RGB dictionary (5.2 billion patches per size) on W workers: memory per shard and
predicted hours, for the CPU worker measured here and, marked as an assumption (no GPU was
measured), for a GPU worker at a stated float32 rate.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import ray
import torch

from els_audit.data import load_dataset
from els_audit.integrations.ray import RayShardPool
from els_audit.machines import build_machine
from els_audit.machines._dictionary import DEDUP_BYTES_PER_KEY
from els_audit.machines.sharded import sharded_machines
from els_audit.schedules import get_schedule


def query(imgs: torch.Tensor, t: float, batch: int) -> torch.Tensor:
    """Seeded, flipped training images (not in the dictionary), noised to time t."""
    g = torch.Generator().manual_seed(0)
    x0 = imgs[torch.randperm(imgs.shape[0], generator=g)[:batch]].flip(-1)
    a, b = (float(v) for v in get_schedule("cosine-legacy").alpha_sigma(t))
    return a * x0 + b * torch.randn(x0.shape, generator=g)


def best_of(fn, repeat: int) -> tuple[float, torch.Tensor]:
    best, out = math.inf, None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def full_fidelity_flop(n_images: int, side: int, C: int, ks: list[int], steps: int, seeds: int, cal_seeds: int) -> float:
    """Logit FLOP of a full-fidelity audit: every step of every evaluation seed at its own k
    (taken as the middle candidate), and a calibration sweep over ``ks`` per step and seed
    (the nested pass costs about one evaluation at the largest k)."""
    keys = n_images * side * side
    pix = side * side

    def one(k):
        return pix * keys * (C * k * k + 1) * 2
    k_mid = ks[len(ks) // 2]
    return steps * seeds * one(k_mid) + steps * cal_seeds * one(max(ks))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="mnist5k:size=32")
    ap.add_argument("--n", type=int, default=0, help="images in the dictionary (0 = all; a seeded subset)")
    ap.add_argument("--k", type=int, default=7)
    ap.add_argument("--t", type=float, default=0.5)
    ap.add_argument("--batch", type=int, default=1, help="query images")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--gpu-tflops", type=float, default=30.0,
                    help="ASSUMED sustained float32 TFLOP/s of one GPU worker for the paper rows")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.smoke:
        args.data, args.n, args.repeat = "mnist5k:size=32", 2000, 2
    torch.set_num_threads(1)
    ds = load_dataset(args.data)
    imgs = ds.images
    if args.n and args.n < imgs.shape[0]:
        imgs = imgs[torch.randperm(imgs.shape[0], generator=torch.Generator().manual_seed(1))[: args.n]].contiguous()
    N, C, H, W = imgs.shape
    x = query(imgs, args.t, args.batch)
    print(f"dictionary: {N} images {C}x{H}x{W} ({ds.spec}), k = {args.k}, t = {args.t}, {args.batch} query image(s)")

    ray.init(num_cpus=3, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    rows = {}
    t0 = time.perf_counter()
    local = build_machine("ELS", imgs)
    local.dictionary_stats(args.k)
    rows["process"] = {"build_s": time.perf_counter() - t0}
    machines = {"process": local}
    for S in (1, 2):
        t0 = time.perf_counter()
        pool = RayShardPool(imgs, None, [("ELS", "periodic")], n_shards=S)
        (m,) = sharded_machines(pool, imgs)
        m.dictionary_stats(args.k)                      # builds every shard's dictionary
        rows[f"ray-{S}"] = {"build_s": time.perf_counter() - t0, "shards": S, "pids": pool.pids}
        machines[f"ray-{S}"] = m
    outs = {}
    for name in machines:
        rows[name]["eval_s"] = math.inf
    for _ in range(args.repeat):                         # alternate the rows
        for name, m in machines.items():
            s, out = best_of(lambda m=m: m.score(x, args.t, k=args.k), 1)
            rows[name]["eval_s"] = min(rows[name]["eval_s"], s)
            outs[name] = out
    ref = outs["process"]
    keys = N * H * W
    flop = args.batch * H * W * keys * (C * args.k ** 2 + 1) * 2
    for name, r in rows.items():
        r["rel_err"] = float((outs[name] - ref).abs().max() / ref.abs().max())
        r["gflops"] = flop / r["eval_s"] / 1e9
        print(f"  {name:8s} build {r['build_s']:7.1f} s   eval {r['eval_s']:7.2f} s   {r['gflops']:6.1f} GFLOP/s   "
              f"max rel diff {r['rel_err']:.1e}")
    speedup = rows["ray-1"]["eval_s"] / rows["ray-2"]["eval_s"]
    print(f"  2 workers vs 1: {speedup:.2f}x")

    # paper: a 1.28 M-image 64x64 RGB dictionary
    big_n, side, bigC = 1_280_000, 64, 3
    ks = list(range(3, 16, 2))
    total = full_fidelity_flop(big_n, side, bigC, ks, steps=20, seeds=16, cal_seeds=8)
    cpu_rate = rows["ray-1"]["gflops"] * 1e9
    paper = []
    for workers in (8, 64):
        keys_per = big_n * side * side / workers
        img_bytes = big_n / workers * bigC * side * side * 4
        mem = img_bytes * 2 + keys_per * (DEDUP_BYTES_PER_KEY + 4 * bigC)
        paper.append({"workers": workers, "shard_images": big_n // workers, "shard_keys": int(keys_per),
                      "shard_memory_gb": mem / 1e9, "cpu_worker_hours": total / (cpu_rate * workers) / 3600,
                      "gpu_worker_hours_assumed": total / (args.gpu_tflops * 1e12 * workers) / 3600})
    print(f"paper: 1.28M x 3x64x64 dictionary, full fidelity (20 steps, 16 seeds, 8 calibration seeds, k = 3..15): "
          f"{total:.2e} logit FLOP")
    for p in paper:
        print(f"  {p['workers']:3d} workers: {p['shard_memory_gb']:.0f} GB per shard (one k, deduplication "
              f"bookkeeping), {p['cpu_worker_hours']:.0f} h on workers like this CPU core, "
              f"{p['gpu_worker_hours_assumed']:.1f} h on GPUs at an ASSUMED {args.gpu_tflops:g} TFLOP/s each")
    result = {"data": ds.spec, "n": N, "shape": [C, H, W], "k": args.k, "t": args.t, "batch": args.batch,
              "rows": rows, "speedup_2_vs_1": speedup, "paper": paper, "paper_flop": total,
              "gpu_tflops_assumed": args.gpu_tflops, "cpu": torch.backends.cpu.get_cpu_capability()}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
