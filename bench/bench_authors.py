"""Side-by-side timing of our machines against the authors' public code on identical inputs.

    git clone https://github.com/Kambm/convolutional_diffusion /tmp/authors   # not shipped here
    python bench/bench_authors.py --authors-code /tmp/authors
    python bench/bench_authors.py --authors-code /tmp/authors --n 320 --ts 0.5   # a few minutes
    python bench/bench_authors.py --table bench/results/authors_*.json

The authors' code (Kamb & Ganguli, github.com/Kambm/convolutional_diffusion, MIT) is read
from a checkout the developer names: this repository carries none of it.  Their module
imports torchvision, which the ELS classes do not use; the only torchvision wheel that
installs beside torch 2.13 here fails to import, so the harness puts an empty stand-in
module in ``sys.modules`` before importing theirs.  Nothing else of theirs is changed.

Pairs timed (same float32 images, same query, same t, one query image):
- ``ELS-valid``: their ``LocalEquivScoreModule`` (every interior patch, circular query
  padding) against ``build_machine("ELS", dictionary="valid")``;
- ``bbELS``: their ``LocalEquivBordersScoreModule`` against ``build_machine("bbELS")``.
Per t: one evaluation at each k of --ks, and the sweep a calibration step asks for (the
score at every k of --ks for one x and t): theirs is the sum of their single-k times (their
code has no sweep), ours ``score_sweep`` over a tree built once by ``prepare_sweep`` (its
build time is reported beside, not in the timing; theirs has no build).  Alternating
(theirs, ours) per cell, best of --repeat.  Each cell's answers are compared:
``max |ours - theirs| / max |theirs|``.  Their code averages the softmax terms per batch of
64 training images (``torch.mean`` over each batch's patches), which is the softmax over
the whole dictionary only when every batch is full: --n is a multiple of 64 (at N = 100
their answer differs from the exact one by 14% at t = 0.1, in float64 as in float32).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_machines import bench_query, best_of  # noqa: E402

from els_audit.data import load_dataset  # noqa: E402
from els_audit.machines import _native as native  # noqa: E402
from els_audit.machines import build_machine  # noqa: E402
from els_audit.schedules import get_schedule  # noqa: E402

PAIRS = {"ELS-valid": ("LocalEquivScoreModule", "ELS", "valid"),
         "bbELS": ("LocalEquivBordersScoreModule", "bbELS", "periodic")}


def load_authors(root: Path):
    """Their ``utils/idealscore.py`` as a module, with an empty torchvision stand-in."""
    path = root / "utils" / "idealscore.py"
    if not path.is_file():
        raise SystemExit(f"{path} not found: --authors-code must name a checkout of "
                         "github.com/Kambm/convolutional_diffusion")
    for name in ("torchvision", "torchvision.transforms", "torchvision.datasets", "torchvision.models"):
        sys.modules.setdefault(name, types.ModuleType(name))
    tv = sys.modules["torchvision"]
    for sub in ("transforms", "datasets", "models"):
        setattr(tv, sub, sys.modules[f"torchvision.{sub}"])
    spec = importlib.util.spec_from_file_location("authors_idealscore", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--authors-code", type=Path, help="checkout of Kambm/convolutional_diffusion")
    ap.add_argument("--n", type=int, default=1920, help="MNIST images (a multiple of 64, see below)")
    ap.add_argument("--ks", default="3,5,7,9,11,13,15")
    ap.add_argument("--ts", default="0.1,0.5,0.9")
    ap.add_argument("--pairs", default=",".join(PAIRS))
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--table", type=Path, nargs="+", default=None, help="print the tables of saved runs and exit")
    args = ap.parse_args(argv)
    if args.table:
        for f in args.table:
            print(table(json.loads(f.read_text())) + "\n")
        return
    torch.set_num_threads(args.threads)
    if args.authors_code is None:
        raise SystemExit("--authors-code is required: a checkout of github.com/Kambm/convolutional_diffusion")
    theirs_mod = load_authors(args.authors_code)
    if args.n % 64:
        raise SystemExit("--n must be a multiple of 64: their code averages its softmax terms per batch of 64 "
                         "images, which equals the whole-dictionary softmax only when every batch is full")
    data = f"mnist5k:size=32:limit={args.n}"
    ds = load_dataset(data)
    imgs = ds.images.contiguous()                                                 # (N, C, H, W) float32
    N, C, H, W = imgs.shape
    ks = [int(v) for v in args.ks.split(",")]
    ts = [float(v) for v in args.ts.split(",")]
    sched = get_schedule("cosine-legacy")
    x0, noise = bench_query(imgs, 1)
    # their schedule returns beta_t = b_t^2 ('legacy' cosine); check it is ours
    for t in ts:
        a, b = sched.alpha_sigma(t)
        beta = float(theirs_mod.cosine_noise_schedule(torch.tensor([t])))
        assert abs(beta - float(b) ** 2) < 1e-6, (t, beta, float(b) ** 2)
    dataset = torch.utils.data.TensorDataset(imgs, torch.zeros(N, dtype=torch.long))
    print(f"data {data}: N={N} {C}x{H}x{W}; threads {torch.get_num_threads()}; native kernels {native.status()}",
          flush=True)
    rows, builds = [], {}
    for pair in args.pairs.split(","):
        cls_name, kind, dic = PAIRS[pair]
        theirs = getattr(theirs_mod, cls_name)(dataset, kernel_size=ks[0], image_size=H, channels=C)
        ours = build_machine(kind, imgs, dictionary=dic)
        t0 = time.perf_counter()
        ours.prepare_sweep(ks)
        builds[pair] = {"tree_s": round(time.perf_counter() - t0, 2), "nests": ours._nests(ks)}
        for k in ks:                                   # single-k dictionaries, built before timing
            t0 = time.perf_counter()
            ours.dictionary_stats(k)
            builds[pair][f"k{k}_s"] = round(time.perf_counter() - t0, 2)
        print(f"{pair}: builds {builds[pair]}", flush=True)
        for t in ts:
            a, b = (float(v) for v in sched.alpha_sigma(t))
            x = a * x0 + b * noise                                                # (1, C, H, W)
            tt = torch.tensor([t])
            cell = {"pair": pair, "t": t, "single": {}}
            sweep_theirs = 0.0
            with torch.no_grad():
                for k in ks:
                    s_t, want = best_of(lambda: theirs(tt, x, k=k), args.repeat)
                    s_o, got = best_of(lambda: ours.score(x, t, k=k), args.repeat)
                    err = float((got - want).abs().max() / want.abs().max())
                    cell["single"][k] = {"theirs_s": s_t, "ours_s": s_o, "speedup": s_t / s_o, "err": err}
                    sweep_theirs += s_t
                    print(f"  {pair} t={t} k={k}: theirs {s_t:.2f}s ours {s_o:.2f}s ({s_t / s_o:.1f}x) err {err:.1e}",
                          flush=True)
                s_sw, got = best_of(lambda: ours.score_sweep(x, t, ks), args.repeat)
            cell["sweep"] = {"theirs_s": sweep_theirs, "ours_s": s_sw, "speedup": sweep_theirs / s_sw}
            print(f"  {pair} t={t} sweep: theirs {sweep_theirs:.2f}s ours {s_sw:.2f}s ({sweep_theirs / s_sw:.1f}x)",
                  flush=True)
            rows.append(cell)
    out = {"data": data, "n": N, "threads": torch.get_num_threads(), "torch": torch.__version__,
           "native": native.status(), "ks": ks, "builds": builds, "rows": rows,
           "when": time.strftime("%Y-%m-%d %H:%M")}
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    print(table(out))


def table(out: dict) -> str:
    """The Markdown table of a run (also: ``python bench/bench_authors.py --table FILE.json``)."""
    ks = out["ks"]
    lines = ["| pair | t | " + " | ".join(f"k={k}" for k in ks) + " | sweep | ours one k at a time |",
             "|---|---|" + "---|" * (len(ks) + 2)]
    for r in out["rows"]:
        single = {int(k): v for k, v in r["single"].items()}
        cells = [f"{single[k]['speedup']:.1f}x ({single[k]['ours_s']:.2f}s)" for k in ks]
        sw = r["sweep"]
        one_at_a_time = sum(single[k]["ours_s"] for k in ks)
        lines.append(f"| {r['pair']} | {r['t']} | " + " | ".join(cells)
                     + f" | {sw['speedup']:.1f}x ({sw['ours_s']:.2f}s vs {sw['theirs_s']:.1f}s)"
                     + f" | {sw['theirs_s'] / one_at_a_time:.1f}x ({one_at_a_time:.2f}s) |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
