"""Fidelity of the machine variants: square windows against shaped supports and a border-band
scale, at equal settings, on the zoo models and any other model (issue 19).

    python bench/fidelity.py --model zoo:resnet-zeros --json bench/results/fidelity/resnet-zeros.json
    python bench/fidelity.py --table bench/results/fidelity/*.json > bench/fidelity.md   # the table

Per model, the audit's own stages run once (load, probes: the ERF the shaped supports come
from) and then, for each variant, the machine's fit (calibration of k per step, the same
candidates, criterion and seeds for every variant) and the prediction (network, machine and
IS from the same seeds).  Variants (``els-audit --support``):

- ``square``: the paper's k x k windows;
- ``erf``: the window weighted by the network's measured x0 ERF map (centre pixel);
- ``erf-area``: the k^2 offsets where that map is largest;
- ``data``: the data's locality mask (optimal linear denoiser, Lukoianov et al.);
- ``border``: square windows with a second calibrated size for the border band.

Each row records median r, median R^2, the IS baseline's r, the win rate over IS, the
scales and the seconds its fit and prediction took; ``els-audit MODEL --support V`` with the
row's settings gives the same numbers (the command is in the table).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from els_audit.audit import AuditConfig, AuditError, parse_arch_kwargs
from els_audit.config import SUPPORT_CHOICES
from els_audit.stages.clock import Clock
from els_audit.stages.inputs import load_inputs, settle_inputs
from els_audit.stages.machine import fit_machine
from els_audit.stages.outcome import run_prediction
from els_audit.stages.plan import plan_audit
from els_audit.stages.probes import run_probes


def settings_flags(a) -> list[str]:
    out = ["--steps", str(a.steps), "--seeds", str(a.seeds), "--calibration-seeds", str(a.calibration_seeds),
           "--data-limit", str(a.data_limit), "--budget", "none", "--threads", str(a.threads)]
    if a.data:
        out[:0] = ["--data", a.data]
    if a.arch:
        out += ["--arch", a.arch, "--arch-kwargs", f"'{a.arch_kwargs}'"]
    return out


def run_model(a, save=None) -> dict:
    torch.set_num_threads(a.threads)
    cfg = AuditConfig(model=a.model, data=a.data, data_limit=a.data_limit, steps=a.steps, seeds=a.seeds,
                      calibration_seeds=a.calibration_seeds, budget=None, threads=a.threads, arch=a.arch,
                      arch_kwargs=parse_arch_kwargs(a.arch_kwargs) if a.arch_kwargs else None)
    clock = Clock(None)
    t0 = time.perf_counter()
    inp = load_inputs(cfg, clock)
    probes = run_probes(cfg, clock, inp, steps=cfg.steps)
    _, cfg = plan_audit(cfg, clock, inp, probes)
    inp, probes = settle_inputs(inp, cfg), probes.on_grid(cfg.steps)
    shared = time.perf_counter() - t0
    rows = []
    res = {"model": a.model, "data": a.data, "n_dictionary": len(inp.dic), "steps": cfg.steps, "seeds": cfg.seeds,
           "calibration_seeds": cfg.calibration_seeds, "threads": a.threads, "shared_s": round(shared, 1),
           "torch": torch.__version__, "platform": platform.platform(), "rows": rows}
    for v in a.variants:
        cv = dataclasses.replace(cfg, support=v)
        t1 = time.perf_counter()
        try:
            fitted = fit_machine(cv, clock, inp, probes)
        except AuditError as exc:                         # e.g. border on a machine without a border band
            print(f"{a.model} {v:9s} not applicable: {exc}", flush=True)
            rows.append({"variant": v, "not_applicable": str(exc)})
            if save:
                save(res)
            continue
        t2 = time.perf_counter()
        pred = run_prediction(cv, clock, inp, fitted)
        t3 = time.perf_counter()
        row = {"variant": v, "machine": fitted.choice.kind, "median_r": pred.median_r, "median_r2": pred.median_r2,
               "is_median_r": pred.is_median_r, "win_rate": pred.win_rate, "scales": list(fitted.scales),
               "band_scales": None if fitted.band_scales is None else list(fitted.band_scales),
               "sides": list(fitted.support.sides), "fit_s": round(t2 - t1, 1), "predict_s": round(t3 - t2, 1),
               "r": [float(x) for x in pred.r],
               "command": " ".join(["els-audit", a.model, "--support", v] + settings_flags(a))}
        rows.append(row)
        if save:                                          # after every row: a long run keeps what it measured
            save(res)
        print(f"{a.model} {v:9s} median r {row['median_r']:.4f}  R2 {row['median_r2']:.4f}  IS r "
              f"{row['is_median_r']:.4f}  fit {row['fit_s']} s  predict {row['predict_s']} s", flush=True)
    return res


def table(paths: list[Path]) -> str:
    out = ["| model | variant | machine | median r (vs square) | per-seed r - square's r, mean +- s.e. | median R^2 | "
           "IS r | win rate | fit + predict s | command |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for p in paths:
        res = json.loads(Path(p).read_text())
        base = next((r for r in res["rows"] if r["variant"] == "square"), None)
        name = res["model"] if res["model"].startswith("zoo:") else Path(res["model"]).parent.name
        for r in res["rows"]:
            if "not_applicable" in r:
                out.append(f"| {name} | {r['variant']} | - | not applicable: "
                           f"{r['not_applicable'].split(':')[0]} | | | | | | |")
                continue
            d = paired = ""
            if base is not None and r is not base:
                d = f" ({r['median_r'] - base['median_r']:+.3f})"
                diff = np.asarray(r["r"]) - np.asarray(base["r"])        # the same seeds: paired
                paired = f"{diff.mean():+.3f} +- {diff.std(ddof=1) / np.sqrt(len(diff)):.3f}"
            out.append(f"| {name} | {r['variant']} | {r['machine']} | {r['median_r']:.3f}{d} | "
                       f"{paired} | {r['median_r2']:.3f} | {r['is_median_r']:.3f} | {r['win_rate']:.2f} | "
                       f"{r['fit_s'] + r['predict_s']:.0f} | `{r['command']}` |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model")
    ap.add_argument("--data", default=None)
    ap.add_argument("--arch", default=None, help="as els-audit --arch (a weights file's architecture)")
    ap.add_argument("--arch-kwargs", default=None, help="as els-audit --arch-kwargs (JSON)")
    ap.add_argument("--variants", nargs="+", default=list(SUPPORT_CHOICES), choices=SUPPORT_CHOICES)
    ap.add_argument("--data-limit", type=int, default=300)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--calibration-seeds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--table", nargs="+", type=Path, default=None, help="print the Markdown table of these results")
    a = ap.parse_args(argv)
    if a.table:
        print(table(a.table))
        return 0
    if not a.model:
        ap.error("--model is required (or --table)")
    def save(res):
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(res, indent=1))

    run_model(a, save if a.json else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
