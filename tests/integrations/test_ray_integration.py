"""Ray: the machines' dictionary sharded over actors of a real local Ray cluster (2 CPUs, on
loopback): answers equal to one process, an actor killed mid-evaluation rebuilt and its
shard re-run, restarts spent -> one-line error, and a whole audit with --ray.  Needs the ray
extra (in the test extra; skipped, with the reason, without it)."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from cli_helpers import runner as _runner

ray = pytest.importorskip("ray")
from els_audit.cli import main  # noqa: E402
from els_audit.integrations.ray import RayShardPool, plan_shards  # noqa: E402
from els_audit.machines import build_machine  # noqa: E402
from els_audit.machines.sharded import ShardError, sharded_machines  # noqa: E402


@pytest.fixture(scope="module")
def cluster():
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield
    ray.shutdown()


def _data(N=40, H=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    imgs = (torch.rand(N, 1, H, H, generator=g) > 0.6).float() * 2 - 1
    x = torch.randn(4, 1, H, H, generator=g)
    return imgs, torch.arange(N) % 3, x


@pytest.mark.parametrize("kind,n_shards", [("ELS", 2), ("bbELS", 3)])
def test_ray_shards_equal_one_process(cluster, kind, n_shards):
    imgs, labels, x = _data()
    pool = RayShardPool(imgs, labels, [(kind, "periodic"), ("IS", "periodic")], n_shards=n_shards)
    assert pool.n_shards == n_shards and len(set(pool.pids)) == n_shards and os.getpid() not in pool.pids
    m, ism = sharded_machines(pool, imgs, labels)
    ref, ref_is = build_machine(kind, imgs, labels), build_machine("IS", imgs, labels)
    t = torch.tensor([0.05, 0.3, 0.6, 0.95])
    s0, d0 = ref.score(x, t, k=5, diagnostics=True)
    s1, d1 = m.score(x, t, k=5, diagnostics=True)
    assert torch.allclose(s1, s0, rtol=1e-5, atol=1e-4 * float(s0.abs().max()))
    assert torch.equal(d1.source_image, d0.source_image) and torch.equal(d1.multiplicity, d0.multiplicity)
    lab = torch.tensor([0, 1, 2, 0])
    m.prepare_sweep((3, 5, 7), label=lab)
    got, want = m.denoised_sweep(x, t, (3, 5, 7), label=lab), ref.denoised_sweep(x, t, (3, 5, 7), label=lab)
    for k in want:
        assert torch.allclose(got[k], want[k], rtol=1e-5, atol=1e-5), k
    assert torch.allclose(ism.eps(x, t, label=lab), ref_is.eps(x, t, label=lab), rtol=1e-5, atol=1e-5)
    assert m.to_dict()["backend"] == "ray" and m.to_dict()["shards"] == n_shards
    pool.close()


def _slow_call(pool, m, x, out):
    out["score"] = m.score(x, 0.5, k=9)


def test_actor_killed_mid_evaluation_is_rebuilt_and_rerun(cluster):
    imgs, _, _ = _data(N=600, H=16, seed=1)
    x = torch.randn(16, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    pool = RayShardPool(imgs, None, [("LS", "periodic")], n_shards=2, max_restarts=2)
    (m,) = sharded_machines(pool, imgs)
    want = build_machine("LS", imgs).score(x, 0.5, k=9)
    out = {}
    worker = threading.Thread(target=_slow_call, args=(pool, m, x, out))
    started = time.time()
    worker.start()
    time.sleep(0.3)
    assert worker.is_alive(), "the evaluation ended before the kill; make it longer"
    victim = pool.pids[0]
    os.kill(victim, signal.SIGKILL)
    worker.join(timeout=120)
    assert not worker.is_alive() and "score" in out
    assert torch.allclose(out["score"], want, rtol=1e-5, atol=1e-4 * float(want.abs().max()))
    pids = pool.call("pid")
    assert victim not in pids                      # the shard was rebuilt in a new actor process
    assert time.time() - started < 120
    pool.close()


def test_restarts_spent_stop_with_one_line(cluster):
    imgs, _, x = _data()
    pool = RayShardPool(imgs, None, [("ELS", "periodic")], n_shards=2, max_restarts=0)
    (m,) = sharded_machines(pool, imgs)
    os.kill(pool.pids[1], signal.SIGKILL)
    time.sleep(0.5)
    with pytest.raises(ShardError) as err:
        m.score(x, 0.5, k=3)
    msg = str(err.value)
    assert "\n" not in msg and "died" in msg and "partial answer" in msg
    pool.close()


def test_plan_shards_from_cpus_and_memory():
    imgs = torch.zeros(1000, 1, 32, 32)
    assert plan_shards(imgs, 2.0, 2 * 1024**3) == 2
    assert plan_shards(imgs, 0.5, 2 * 1024**3) == 1
    many = plan_shards(imgs, 2.0, 16 * 1024**2)           # 16 MB each: the dictionary needs more shards
    assert many > 2
    from els_audit.integrations.ray import shard_bytes
    assert shard_bytes(imgs, many) <= 8 * 1024**2 < shard_bytes(imgs, many - 1)


TINY_CLI = ["--data", "mnist5k:size=32:limit=120", "--data-limit", "60", "--steps", "4", "--seeds", "2",
            "--calibration-seeds", "1", "--threads", "1", "--quiet", "--budget", "none", "--no-report"]


def test_audit_with_ray_gives_the_same_numbers(cluster, tmp_path):
    summaries = []
    for extra in ([], ["--ray", "auto"]):
        out = tmp_path / f"s{len(summaries)}.json"
        res = _runner().invoke(main, ["zoo:resnet-zeros", *TINY_CLI, *extra, "--out", str(tmp_path / f"r{len(extra)}"),
                                      "--json", str(out)])
        assert res.exit_code == 0, res.stderr
        summaries.append(json.loads(out.read_text()))
    plain, sharded = summaries
    assert sharded["config"]["ray"] == "auto" and sharded["prediction"]["machine"]["backend"] == "ray"
    assert sharded["machine"]["scales"] == plain["machine"]["scales"]
    for key in ("median_r", "median_r2", "is_median_r"):
        assert sharded["prediction"][key] == pytest.approx(plain["prediction"][key], rel=1e-5, abs=1e-6), key
    assert sharded["novelty"]["memorized_fraction"] == plain["novelty"]["memorized_fraction"]
    assert [(c["name"], c["status"]) for c in sharded["checks"]] == [(c["name"], c["status"]) for c in plain["checks"]]


def test_core_never_imports_ray():
    code = ("import sys, els_audit, els_audit.cli, els_audit.audit, els_audit.machines.sharded; "
            "print('ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_an_unreachable_address_is_one_line_at_once(tmp_path):
    started = time.time()
    p = subprocess.run([sys.executable, "-m", "els_audit", "zoo:resnet-zeros", "--ray", "127.0.0.1:1", "--out",
                        str(tmp_path / "r")], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and time.time() - started < 60
    (line,) = p.stderr.strip().splitlines()
    assert "cannot reach the Ray cluster at '127.0.0.1:1'" in line and "ray start --head" in line
    assert not (tmp_path / "r").exists()


def test_joining_a_cluster_keeps_the_signal_handlers(cluster):
    """ray.init replaces SIGTERM's handler with an exit; the audit's own (which reports and
    cleans up) must stay."""
    code = ("import signal; from els_audit.integrations.ray import connect\n"
            "def mine(*a): pass\n"
            "signal.signal(signal.SIGTERM, mine)\n"
            "res = connect('auto')\n"
            "print(signal.getsignal(signal.SIGTERM) is mine, res.get('CPU'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == ["True", "2.0"]                   # and it joined the running cluster


def test_workers_do_not_import_from_the_users_folder(cluster, tmp_path):
    """ray.init puts the driver's current folder on the workers' sys.path: a folder holding a
    package named like ours must not be imported by them (the audit drops it from its own)."""
    plant = tmp_path / "plant"
    (plant / "els_audit").mkdir(parents=True)
    marker = tmp_path / "imported"
    (plant / "els_audit" / "__init__.py").write_text(
        f"open({str(marker)!r}, 'a').write('x')\nraise ImportError('planted')\n")
    script = Path(sys.executable).with_name("els-audit")          # the console script: the folder is not on its path
    p = subprocess.run([str(script), "zoo:resnet-zeros", *TINY_CLI, "--scales", "erf",
                        "--ray", "auto", "--out", str(tmp_path / "r")], cwd=plant, capture_output=True, text=True,
                       timeout=300)
    assert not marker.exists(), "a Ray worker imported the planted package"
    assert p.returncode == 0, p.stderr
