"""The machines on a GPU: one evaluation and one k = 3..15 sweep per noise level, achieved
float32 FLOP/s against the card's peak, the CPU engine side by side in the same run, and
TF32's error per noise level.

    tar -xzf cifar10-jpeg.tar.gz -C /tmp/cifar                    # ../shared/data (development)
    python bench/bench_cuda.py --data mnist5k:size=32 --data /tmp/cifar/cifar10/train \\
        --json bench/results/cuda.json
    python bench/bench_cuda.py --smoke                             # 200 MNIST digits, any device

Per data set (the whole set as the dictionary on the GPU; unconditional periodic ELS,
float32, ``--batch`` seeded query images noised to each t):

- ``eval``: one evaluation at ``--k`` (best of ``--repeat``, queued GPU work included);
- ``sweep``: one nested pass over k = 3, 5, ..., 15;
- FLOP: the logit products the engine performs (2 x query pixels x unique keys x (C k^2 + 2):
  the GEMM of ``[q', coef]`` against ``[p', ||p'||^2]`` plus the bias), and for the sweep the
  tree's levels (each level's nodes x its ring + 2); achieved = FLOP / seconds; the fraction
  of the card's float32 peak (a table of known cards by name, or ``--peak-tflops``);
- ``cpu``: the same evaluation by the CPU engine (this process's threads) on a seeded subset
  of ``--cpu-images`` images, its GFLOP/s, and the GPU's answer on that subset against the
  CPU's (max relative difference);
- TF32: on that subset, the float32 engine with TF32 products (the machines never allow
  it: :mod:`els_audit.machines._device`) and without, each against float64, per t.

Without a GPU the script runs on the CPU alone (``device: cpu``): a smoke test of the
script, not a GPU number.  Name the card with every number quoted from it.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from els_audit.data import load_dataset
from els_audit.machines import build_machine
from els_audit.machines._dictionary import circular_pad
from els_audit.machines._engine import grouped_softmax_average
from els_audit.schedules import get_schedule

# float32 (non-tensor-core) peak TFLOP/s by card name (vendor data sheets, boost clock)
PEAK_TFLOPS = {"H100 SXM": 67.0, "H100 80GB HBM3": 67.0, "H100 PCIe": 51.0, "H100 NVL": 60.0, "H200": 67.0,
               "A100": 19.5, "L40S": 91.6, "A10": 31.2, "RTX 4090": 82.6}
SCHED = get_schedule("cosine-legacy")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def best_of(fn, repeat: int):
    best, out = math.inf, None
    for _ in range(repeat):
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best, out


def card_peak(device: torch.device, override):
    if override:
        return override, "given"
    if device.type != "cuda":
        return None, "cpu"
    name = torch.cuda.get_device_name(device)
    for key, v in PEAK_TFLOPS.items():
        if all(w in name for w in key.split()):
            return v, name
    return None, name


def query(imgs: torch.Tensor, t: float, batch: int) -> torch.Tensor:
    """Seeded, flipped training images noised to time t (float32, on the CPU)."""
    g = torch.Generator().manual_seed(0)
    x0 = imgs[torch.randperm(imgs.shape[0], generator=g)[:batch]].flip(-1)
    a, b = (float(v) for v in SCHED.alpha_sigma(t))
    return a * x0 + b * torch.randn(x0.shape, generator=g)


def eval_flop(m, k: int, batch: int) -> float:
    C, H, W = m.image_shape
    st = m.dictionary_stats(k)
    return 2.0 * batch * H * W * st["unique_keys"] * (C * k * k + 2)


def sweep_flop(m, ks, batch: int) -> float:
    C, H, W = m.image_shape
    trees = [d for key, d in m._cache.items() if key[0] == "nested" and set(ks) <= set(key[1])]
    if not trees:
        return math.nan
    return 2.0 * batch * H * W * sum(lv.n_nodes * (lv.offsets.numel() + 2) for lv in trees[0].levels)


def tf32_errors(imgs: torch.Tensor, device: torch.device, k: int, ts, batch: int) -> list[dict]:
    """Max relative error of the float32 engine against float64, with IEEE and with TF32
    products (the engine called directly: the machines always run IEEE)."""
    out = []
    ref_m = build_machine("ELS", imgs.double(), device=device)
    m32 = build_machine("ELS", imgs, device=device)
    dic = m32._dictionary(k, None)
    r = k // 2
    for t in ts:
        x = query(imgs, t, batch).to(device)
        a, b = (v.to(device).float() for v in SCHED.alpha_sigma(torch.full((batch,), t, dtype=torch.float64)))
        want = ref_m.denoised(x.double(), t, k=k)
        q = F.unfold(circular_pad(x, r), k)
        row = {"t": t}
        for mode in ("ieee", "tf32"):
            old = torch.backends.cuda.matmul.fp32_precision
            torch.backends.cuda.matmul.fp32_precision = mode
            try:
                got = grouped_softmax_average(dic, q, a, b).mean_centre.reshape(x.shape)
            finally:
                torch.backends.cuda.matmul.fp32_precision = old
            row[mode] = float((got.double() - want).abs().max() / want.abs().max())
        out.append(row)
    return out


def bench_data(spec: str, args, device: torch.device, peak) -> dict:
    ds = load_dataset(spec)
    imgs = ds.images.contiguous()
    N, C, H, W = imgs.shape
    sub = imgs[torch.randperm(N, generator=torch.Generator().manual_seed(1))[: args.cpu_images]].contiguous()
    print(f"\n{spec}: {N} images {C}x{H}x{W}; GPU dictionary: all of them; CPU side by side: {sub.shape[0]}")
    budget = args.memory_budget or (8 << 30)
    t0 = time.perf_counter()
    gpu = build_machine("ELS", imgs, device=device, memory_budget=budget)
    gpu.prepare_sweep(args.ks)
    sync()
    tree_s = time.perf_counter() - t0
    gpu_sub = build_machine("ELS", sub, device=device, memory_budget=budget)
    cpu = build_machine("ELS", sub)
    for m in (gpu, gpu_sub, cpu):                        # the one-size dictionaries: built before timing
        m.dictionary_stats(args.k)
    rows = []
    for t in args.ts:
        x = query(imgs, t, args.batch).to(device)
        eval_s, _ = best_of(lambda: gpu.denoised(x, t, k=args.k), args.repeat)
        sweep_s, _ = best_of(lambda: gpu.denoised_sweep(x, t, args.ks), args.repeat)
        fe, fs = eval_flop(gpu, args.k, args.batch), sweep_flop(gpu, args.ks, args.batch)
        xc = query(sub, t, args.batch)
        cpu_s, want = best_of(lambda: cpu.denoised(xc, t, k=args.k), 1)
        got = gpu_sub.denoised(xc.to(device), t, k=args.k).cpu()
        row = {"t": t, "eval_s": eval_s, "eval_tflops": fe / eval_s / 1e12, "sweep_s": sweep_s,
               "sweep_tflops": fs / sweep_s / 1e12, "eval_flop": fe, "sweep_flop": fs,
               "cpu_eval_s": cpu_s, "cpu_gflops": eval_flop(cpu, args.k, args.batch) / cpu_s / 1e9,
               "gpu_vs_cpu_max_rel_diff": float((got - want).abs().max() / want.abs().max())}
        if peak:
            row["eval_peak_fraction"] = row["eval_tflops"] / peak
            row["sweep_peak_fraction"] = row["sweep_tflops"] / peak
        rows.append(row)
        frac = f" ({row['eval_peak_fraction']:.0%} of peak)" if peak else ""
        print(f"  t={t:.2f}  eval k={args.k}: {eval_s:8.3f} s {row['eval_tflops']:7.2f} TFLOP/s{frac}   "
              f"sweep {args.ks[0]}..{args.ks[-1]}: {sweep_s:8.3f} s {row['sweep_tflops']:7.2f} TFLOP/s   "
              f"cpu ({sub.shape[0]} images): {cpu_s:7.2f} s {row['cpu_gflops']:6.1f} GFLOP/s   "
              f"gpu-cpu {row['gpu_vs_cpu_max_rel_diff']:.1e}")
    tf32 = tf32_errors(sub, device, args.k, args.tf32_ts, args.batch)
    for r in tf32:
        print(f"  TF32 at t={r['t']:.2f}: float32 error {r['ieee']:.1e} (IEEE) vs {r['tf32']:.1e} (TF32)")
    return {"spec": spec, "n_images": N, "shape": [C, H, W], "cpu_images": int(sub.shape[0]),
            "tree_build_s": tree_s, "rows": rows, "tf32": tf32}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", action="append", help="data spec (repeatable)")
    ap.add_argument("--ts", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    ap.add_argument("--tf32-ts", type=float, nargs="+", default=[0.02, 0.1, 0.5, 0.9])
    ap.add_argument("--k", type=int, default=7)
    ap.add_argument("--ks", type=int, nargs="+", default=[3, 5, 7, 9, 11, 13, 15])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--cpu-images", type=int, default=1000)
    ap.add_argument("--memory-budget", type=int, default=0, help="bytes per GPU machine (default 8 GiB)")
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--smoke", action="store_true", help="200 MNIST digits, small sweep (checks the script)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if args.smoke:
        args.data, args.ks, args.cpu_images, args.repeat = ["mnist5k:size=28:limit=200"], [3, 5], 100, 1
    if not args.data:
        ap.error("give --data SPEC (repeatable) or --smoke")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    peak, card = card_peak(device, args.peak_tflops)
    print(f"device: {card}" + (f", float32 peak {peak:g} TFLOP/s" if peak else "") +
          f"; CPU side: {torch.get_num_threads()} threads ({torch.backends.cpu.get_cpu_capability()})")
    results = [bench_data(spec, args, device, peak) for spec in args.data]
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"device": card, "peak_tflops": peak, "torch": torch.__version__,
                                         "k": args.k, "ks": args.ks, "batch": args.batch, "data": results},
                                        indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
