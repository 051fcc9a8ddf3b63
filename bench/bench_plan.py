"""How well the cost planner predicts: audits within a --budget, predicted against measured
seconds per stage, and the whole audit's wall time against its budget.

    python bench/bench_plan.py --budget 2m --budget 10m                      # the four zoo models
    python bench/bench_plan.py --model zoo:resnet-zeros --budget 2m          # one model
    python bench/bench_plan.py --model bench/models/cifar10-resnet \\
        --data /tmp/cifar/cifar10/train --budget 10m                        # CIFAR-10 (unpack ../shared/data)
    python bench/bench_plan.py ... --json bench/results/plan.json
    python bench/bench_plan.py --budget 2m --reports reports      # also the example reports
    python bench/bench_plan.py --table bench/results/plan_*.json  # the tables of earlier runs

Each row is one whole audit as the CLI runs it (``run_audit`` then ``write_outputs`` into a
temporary folder), with the default settings left to the planner.  ``ratio`` is measured /
predicted; the target is every stage within 0.7-1.3 and the wall time inside the budget.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from els_audit.audit import AuditConfig, run_audit  # noqa: E402
from els_audit.config import parse_duration  # noqa: E402
from els_audit.outputs import write_outputs  # noqa: E402

ZOO = ("zoo:resnet-zeros", "zoo:resnet-circular", "zoo:unet-zeros", "zoo:unet-attention")


def one(model: str, data, budget: float, threads: int, extra: dict, reports=None) -> dict:
    cfg = AuditConfig(model=model, data=data, budget=budget, threads=threads, **extra)
    t0 = time.perf_counter()
    res = run_audit(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        write_outputs(res, Path(reports) / res.name if reports else Path(tmp) / "out")
    wall = time.perf_counter() - t0
    plan = res.to_dict()["plan"]
    return {"model": model, "data": res.data.get("spec"), "budget_s": budget, "wall_s": round(wall, 1),
            "within_budget": wall <= budget, "settings": plan["settings"], "n_full": plan["n_full"],
            "cuts": plan["cuts"], "stages": plan["stages"], "predicted_total_s": plan["predicted_total_s"],
            "probe_s": (plan.get("probe") or {}).get("seconds"), "probe": plan.get("probe"),
            "median_r": res.prediction.median_r,
            "machine": res.choice.kind}


def table(rows: list[dict]) -> str:
    out = ["| model | budget s | settings (dictionary/N, steps, cal. seeds, seeds) | calibrate pred / meas s "
           "| predict pred / meas s | novelty pred / meas s | whole audit pred / wall s | in budget | median r |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s = r["settings"]
        cells = []
        for st in ("calibrate", "predict", "novelty"):
            v = r["stages"][st]
            cells.append(f"{v['predicted_s']} / {v['measured_s']} ({v['ratio']}x)")
        out.append(f"| {r['model']} | {r['budget_s']:.0f} | {s['n_dictionary']}/{r['n_full']}, {s['steps']}, "
                   f"{s['calibration_seeds']}, {s['seeds']} | " + " | ".join(cells)
                   + f" | {r['predicted_total_s']} / {r['wall_s']} | {'yes' if r['within_budget'] else 'NO'} "
                   f"| {r['median_r']:.3f} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", default=None, help="model (default: the four zoo models)")
    ap.add_argument("--data", default=None, help="data spec for --model (default: the model's own)")
    ap.add_argument("--budget", action="append", default=None, help="budget(s), e.g. 2m (default: 2m and 10m)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the CLI's default is 1)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                    help="any other AuditConfig setting, e.g. conditional=true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--reports", default=None, metavar="DIR",
                    help="write each audit's report folder to DIR/<model name> (e.g. reports/, the examples)")
    ap.add_argument("--table", nargs="+", default=None, metavar="JSON",
                    help="only print the table of earlier --json files")
    args = ap.parse_args(argv)
    if args.table:
        print(table([r for f in args.table for r in json.loads(Path(f).read_text())["rows"]]))
        return 0
    extra = {k: json.loads(v) for k, v in (it.split("=", 1) for it in args.set)}
    rows = []
    for budget in [parse_duration(b) for b in (args.budget or ["2m", "10m"])]:
        for model in args.model or ZOO:
            row = one(model, args.data, budget, args.threads, extra, args.reports)
            print(json.dumps(row), flush=True)
            rows.append(row)
    meta = {"torch": torch.__version__, "threads": args.threads, "when": time.strftime("%Y-%m-%d %H:%M")}
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
