"""Timing of the architecture probes (issue 3) on the zoo networks and a diffusers UNet.

    python bench/bench_probes.py                 # 32x32, 20 steps, the full table
    python bench/bench_probes.py --quick         # 5 steps, PaperResNet + PaperUNet only

Budgets from the issue: tracing plus structural analysis under 2 s; the ERF (20 steps) and
the shift tests for a 32x32 UNet under 30 s on 2 CPU cores.  For each model the table
gives, best of ``--repeat`` runs (warm: imports and the first torch.export are done once
before timing):

- ``trace``: :func:`trace_model` (symbolic trace or torch.export, ShapeProp, the eager
  check); ``struct``: :func:`receptive_field` + :func:`equivariance_structure`;
- ``erf[autograd]`` / ``erf[captum]``: :func:`effective_receptive_field` with each
  gradient backend (same inputs; their maps are compared: ``max|diff|``), alternating
  backends within each repeat so that machine noise hits both alike;
- ``shift``: :func:`equivariance_measured` (4 shifts x 3 noise levels);
- ``erf+shift``: the faster ERF backend plus the shift tests, against the 30 s budget.

Untrained networks (random init, seeded): the timings do not depend on the weights.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from els_audit.probes import effective_receptive_field, equivariance_measured, equivariance_structure, receptive_field, trace_model
from els_audit.models.zoo import AttentionUNet, PaperResNet, PaperUNet


def best_of(fn, repeat):
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def _diffusers_unet(size):
    try:
        from diffusers import UNet2DModel
    except ImportError:  # pragma: no cover - optional
        return None
    return UNet2DModel(
        sample_size=size, in_channels=1, out_channels=1, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8, attention_head_dim=32,
    ).eval()


class _DiffusersEps(torch.nn.Module):
    """eps(x, t, label) for a diffusers UNet2DModel (t in [0, 1] -> step index 0..999)."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, x, t, label=None):
        return self.unet(x, (t * 999).round().long(), return_dict=False)[0]


def models(names, size):
    out = {}
    for name in names:
        torch.manual_seed(0)
        if name == "PaperResNet":
            out[name] = PaperResNet().eval()
        elif name == "PaperUNet":
            out[name] = PaperUNet().eval()
        elif name == "AttentionUNet":
            out[name] = AttentionUNet().eval()
        elif name == "diffusers":
            u = _diffusers_unet(size)
            if u is not None:
                out[name] = u
        else:
            raise SystemExit(f"unknown model {name!r}")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--n-samples", type=int, default=None, help="ERF inputs per step (default: the library's)")
    ap.add_argument("--models", default="PaperResNet,PaperUNet,AttentionUNet,diffusers")
    ap.add_argument("--backends", default="autograd,captum")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave torch's default)")
    ap.add_argument("--quick", action="store_true", help="5 steps, PaperResNet + PaperUNet, 1 repeat")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    a = ap.parse_args(argv)
    if a.quick:
        a.steps, a.models, a.repeat = 5, "PaperResNet,PaperUNet", 1
    if a.threads:
        torch.set_num_threads(a.threads)
    erf_kw = {} if a.n_samples is None else {"n_samples": a.n_samples}
    size = a.size
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, size, size, generator=g)
    t = torch.rand(2, generator=g)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, image 1x{size}x{size}, "
          f"{a.steps} steps, best of {a.repeat}", flush=True)

    rows = []
    for name, model in models(a.models.split(","), size).items():
        if name == "diffusers":
            args, kwargs = (x, torch.tensor([10, 500])), {"return_dict": False}
            eps_mod = _DiffusersEps(model).eval()
        else:
            args, kwargs = (x, t), {}
            eps_mod = model
        eps = lambda xx, tt, ll, m=eps_mod: m(xx, tt, ll)  # noqa: E731
        trace_model(model, args, kwargs)  # warm-up (imports, first export)
        t_trace, tr = best_of(lambda: trace_model(model, args, kwargs), a.repeat)
        t_struct, (rf, eq) = best_of(lambda: (lambda r: (r, equivariance_structure(tr, r)))(receptive_field(tr)), a.repeat)
        row = {"model": name, "tracer": tr.tracer, "nodes": len(tr.graph.nodes), "trace_s": t_trace,
               "struct_s": t_struct, "rf": rf.summary(), "verdict": eq.verdict_line}
        # Backends alternate within each repeat, so machine noise hits both alike.
        maps, best = {}, {}
        for _ in range(a.repeat):
            for be in a.backends.split(","):
                t0 = time.perf_counter()
                res = effective_receptive_field(eps, (1, size, size), steps=a.steps, backend=be, **erf_kw)
                best[be] = min(best.get(be, float("inf")), time.perf_counter() - t0)
                maps[be] = res.maps
        for be, v in best.items():
            row[f"erf_{be}_s"] = v
        row["predicted_patch"] = list(res.predicted_patch)
        row["erf_n_samples"] = res.n_samples
        if len(maps) == 2:
            m1, m2 = maps.values()
            row["backend_max_abs_diff"] = float(np.abs(m1 - m2).max())
        t_shift, me = best_of(lambda: equivariance_measured(eps, (1, size, size), band=eq), a.repeat)
        row["shift_s"] = t_shift
        row["effective_band"] = [list(r) for r in me.effective_band]
        fastest = min(row[k] for k in row if k.startswith("erf_") and k.endswith("_s"))
        row["erf_plus_shift_s"] = fastest + t_shift
        rows.append(row)
        print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)

    print()
    bes = a.backends.split(",")
    head = f"{'model':14s} {'tracer':8s} {'trace':>6s} {'struct':>6s} " + " ".join(f"{'erf[' + b + ']':>14s}" for b in bes) \
        + f" {'shift':>6s} {'erf+shift':>9s}  verdict"
    print(head)
    print("-" * len(head))
    for r in rows:
        erfs = " ".join(f"{r.get(f'erf_{b}_s', float('nan')):14.2f}" for b in bes)
        flag2 = "" if r["trace_s"] + r["struct_s"] < 2 else " (>2s)"
        flag30 = "" if r["erf_plus_shift_s"] < 30 else " (>30s)"
        print(f"{r['model']:14s} {r['tracer'][:8]:8s} {r['trace_s']:6.2f} {r['struct_s']:6.3f}{flag2} {erfs} "
              f"{r['shift_s']:6.2f} {r['erf_plus_shift_s']:9.2f}{flag30}  {r['verdict']}")
    if a.json:
        a.json.write_text(json.dumps({"argv": sys.argv[1:], "torch": torch.__version__,
                                      "threads": torch.get_num_threads(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
