"""Markdown tables from bench_machines.py / accuracy.py JSON results.

    python bench/results_tables.py bench/results/mnist5k_threads2.json [bench/results/accuracy_*.json ...]
"""

import json
import sys


def machines(path):
    res = json.load(open(path))
    rows = res["rows"]
    kinds = sorted({r["kind"] for r in rows}, reverse=True)
    ts = sorted({r["t"] for r in rows})
    ks = sorted({r["k"] for r in rows if r["k"] != "sweep"})
    print(f"torch {res['torch']}, {res['threads']} thread(s), batch {res['args']['batch']}, data {res['args']['data']}\n")
    for kind in kinds:
        print(f"**{kind}**: speed-up = baseline s / engine s (engine s in brackets)\n")
        print("| t | " + " | ".join(f"k={k}" for k in ks) + " | sweep k=" + res["args"]["sweep_ks"].replace(",", ",") + " |")
        print("|---" * (len(ks) + 2) + "|")
        for t in ts:
            cells = []
            for k in ks + ["sweep"]:
                r = next((r for r in rows if r["kind"] == kind and r["t"] == t and r["k"] == k), None)
                cell = "-" if r is None else f"{r['speedup']:.2f}x ({r['engine_s']:.1f}s)"
                if r is not None and r.get("nested"):
                    cell += f", one k at a time {r['baseline_s'] / r['engine_one_k_at_a_time_s']:.2f}x"
                cells.append(cell)
            print(f"| {t} | " + " | ".join(cells) + " |")
        rates = [r["engine_logits_per_s"] for r in rows if r["kind"] == kind and "engine_logits_per_s" in r]
        brates = [r["baseline_logits_per_s"] for r in rows if r["kind"] == kind and "baseline_logits_per_s" in r]
        errs = [r["rel_err"] for r in rows if r["kind"] == kind and "rel_err" in r]
        print(f"\n(query, key) logits per second, counting every dictionary entry: engine "
              f"{min(rates) / 1e9:.2f}-{max(rates) / 1e9:.2f} G/s, baseline {min(brates) / 1e9:.2f}-{max(brates) / 1e9:.2f} G/s; "
              f"max |engine - baseline| / max |baseline| = {max(errs):.1e}\n")
    b = res["builds"]
    print("| kind | k | keys | unique | engine build s | baseline build s |\n|---|---|---|---|---|---|")
    for r in b:
        if r["k"] == "sweep":
            print(f"| {r['kind']} | sweep (nested tree) | - | {r['unique_keys']} nodes per level | "
                  f"{r['engine_build_s']:.1f} | - |")
            continue
        print(f"| {r['kind']} | {r['k']} | {r['keys']} | {r['unique_keys']} ({r['unique_keys'] / r['keys']:.0%}) | "
              f"{r['engine_build_s']:.1f} | {r['baseline_build_s']:.1f} |")


def accuracy(paths):
    rows = [r for path in paths for r in json.load(open(path))]
    print("\n| kind | k | t | engine f32 vs f64 | sweep f32 vs f64 | baseline f32 vs f64 |\n|---|---|---|---|---|---|")
    for r in rows:
        sw = f"{r['sweep_f32_err']:.1e}" if "sweep_f32_err" in r else "-"
        if "sweep_f32_err" in r and not r.get("sweep_nested", True):
            sw += " (one k at a time)"
        print(f"| {r['kind']} | {r['k']} | {r['t']} | {r['engine_f32_err']:.1e} | {sw} | {r['baseline_f32_err']:.1e} |")


if __name__ == "__main__":
    machines(sys.argv[1])
    if len(sys.argv) > 2:
        accuracy(sys.argv[2:])
