"""The trust boundary, as a hostile download and a careless user would test it.

Every vector is a fixture whose payload, if it ever ran, would write a marker file.  Each
test asserts: exit code 2, one line on stderr, no marker, and nothing left where the report
would have gone.  The first block is the code a *file* names (sidecars, configs: the trust
policy in els_audit/models/trust.py); then files that carry code (pickles, archives); then
code that stops the process (SystemExit) and the current folder on sys.path.
"""

import json
import os
import pickle
import shutil
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from cli_helpers import one_line_error
from cli_helpers import runner as _runner

from els_audit.cli import main
from els_audit.models.zoo.catalog import zoo_model_path

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--data", "mnist5k:size=32:limit=40", "--data-limit", "20", "--steps", "2", "--seeds", "1",
        "--calibration-seeds", "1", "--scales", "erf", "--threads", "1", "--quiet"]


@pytest.fixture
def site(tmp_path):
    """A download folder with the zoo's resnet weights, a marker path, and an output folder path."""
    d = tmp_path / "download"
    d.mkdir()
    shutil.copy(zoo_model_path("resnet-zeros"), d / "model.safetensors")
    return {"dir": d, "model": d / "model.safetensors", "marker": tmp_path / "PWNED", "out": tmp_path / "rep",
            "tmp": tmp_path}


def _assert_refused(res_code, stderr, site, *needles):
    assert not site["marker"].exists(), f"the payload ran ({stderr.strip()[:300]})"
    line = one_line_error(res_code, stderr, *needles)
    assert not site["out"].exists()
    assert not [p for p in site["tmp"].iterdir() if p.name.startswith(".")], "temporaries left behind"
    return line


def _cli(site, *args, model=None):
    res = _runner().invoke(main, [str(model or site["model"]), *TINY, "--out", str(site["out"]), *args])
    return res.exit_code, res.stderr


def _py(marker):
    return f"open({str(marker)!r}, 'w').write('ran')"


# ----------------------------------------------------------------------------- code named by a sidecar
def _sidecars(site):
    m = site["marker"]
    evil = site["dir"] / "evil.py"
    evil.write_text(_py(m) + "\nimport torch.nn as nn\nclass Net(nn.Module):\n    pass\n")
    return {
        "subprocess.run": f'arch = "subprocess:run"\narch_kwargs = {{ args = "touch {m}", shell = true }}\n',
        "os.system": f'arch = "os:system"\narch_kwargs = {{ command = "touch {m}" }}\n',
        "runpy.run_path": f'arch = "runpy:run_path"\narch_kwargs = {{ path_name = "{evil}" }}\n',
        "builtins.exec": f"arch = \"builtins:exec\"\narch_kwargs = {{ source = \"{_py(m)}\" }}\n",
        "file beside the model": 'arch = "evil.py:Net"\n',
        "module beside the model": 'arch = "evil:Net"\n',
        "sys.exit": 'arch = "sys:exit"\n',
    }


@pytest.mark.parametrize("vector", ["subprocess.run", "os.system", "runpy.run_path", "builtins.exec",
                                    "file beside the model", "module beside the model", "sys.exit"])
def test_sidecar_code_is_refused_without_trust(site, vector):
    (site["dir"] / "model.els.toml").write_text(_sidecars(site)[vector])
    code, err = _cli(site)
    _assert_refused(code, err, site, "not a registered architecture", "--trust-model")


@pytest.mark.parametrize("vector", ["subprocess.run", "os.system", "runpy.run_path", "builtins.exec", "sys.exit"])
def test_sidecar_code_is_refused_even_with_trust_unless_a_module_class(site, vector):
    # --trust-model lets a sidecar import code, but only a torch.nn.Module subclass is ever called
    (site["dir"] / "model.els.toml").write_text(_sidecars(site)[vector])
    code, err = _cli(site, "--trust-model")
    _assert_refused(code, err, site, "torch.nn.Module subclass")


def test_trusted_sidecar_never_imports_from_the_current_or_model_folder(site, monkeypatch):
    (site["dir"] / "model.els.toml").write_text(_sidecars(site)["module beside the model"])
    monkeypatch.chdir(site["dir"])
    monkeypatch.syspath_prepend("")            # what python -m / python -c put first on sys.path
    code, err = _cli(site, "--trust-model")
    _assert_refused(code, err, site, "cannot import architecture module 'evil'")


def test_zoo_config_naming_code_is_refused(site):
    cfg = {"format": "els-audit-zoo", "arch": "os:system", "arch_kwargs": {"command": f"touch {site['marker']}"}}
    (site["dir"] / "config.json").write_text(json.dumps(cfg))
    code, err = _cli(site)
    _assert_refused(code, err, site, "not a registered architecture")


@pytest.mark.parametrize("cls", ["DiffusionPipeline", "subprocess.run", "os:system", "ModelMixin.__init__"])
def test_diffusers_config_naming_anything_but_a_diffusers_model_class_is_refused(site, cls):
    pytest.importorskip("diffusers")
    d = site["dir"] / "unet"
    d.mkdir()
    shutil.copy(site["model"], d / "diffusion_pytorch_model.safetensors")
    (d / "config.json").write_text(json.dumps({"_class_name": cls, "command": f"touch {site['marker']}"}))
    code, err = _cli(site, model=d)
    _assert_refused(code, err, site, "is not a diffusers ModelMixin class")


# ----------------------------------------------------------------------------- what the user names
def test_arch_sys_exit_is_exit_2_not_0(site):
    # a gate must never pass because user code called sys.exit: exit 2, even with a --fail-on rule
    code, err = _cli(site, "--arch", "sys:exit", "--fail-on", "median_r<2")
    _assert_refused(code, err, site, "built-in function")


def test_user_code_that_raises_systemexit_is_exit_2(site, tmp_path):
    f = tmp_path / "mine.py"
    f.write_text("import sys\nimport torch.nn as nn\nclass Net(nn.Module):\n"
                 "    def __init__(self):\n        super().__init__()\n        sys.exit(0)\n")
    code, err = _cli(site, "--arch", f"{f}:Net", "--fail-on", "median_r<2")
    _assert_refused(code, err, site, "SystemExit", "mine.py:Net")


def test_a_model_forward_that_raises_systemexit_is_exit_2(site, tmp_path):
    f = tmp_path / "exits.py"
    f.write_text("import sys\nimport torch.nn as nn\nfrom els_audit.models.zoo import PaperResNet\n"
                 "class Net(PaperResNet):\n    def forward(self, x, t, label=None):\n        raise SystemExit(0)\n")
    code, err = _cli(site, "--arch", f"{f}:Net", "--arch-kwargs",
                     '{"in_channels": 1, "width": 64, "n_layers": 6, "padding_mode": "zeros", "time_dim": 64}',
                     "--fail-on", "median_r<2")
    _assert_refused(code, err, site, "SystemExit")


# ----------------------------------------------------------------------------- files that carry code
class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _pickle_files(site):
    m, d = site["marker"], site["dir"]
    files = {}
    files["torch.save object"] = d / "obj.pt"
    torch.save({"model": _Payload(m)}, files["torch.save object"])
    files["legacy pickle"] = d / "legacy.pt"
    torch.save({"model": _Payload(m)}, files["legacy pickle"], _use_new_zipfile_serialization=False)
    files["plain pickle"] = d / "plain.pkl"
    files["plain pickle"].write_bytes(pickle.dumps(_Payload(m)))
    files["zip renamed .safetensors"] = d / "renamed.safetensors"
    shutil.copy(files["torch.save object"], files["zip renamed .safetensors"])
    files["torchscript"] = d / "ts.pt"
    with warnings.catch_warnings():                  # TorchScript is deprecated; users still bring it
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(nn.Conv2d(1, 1, 3)), str(files["torchscript"]))
    files["torch.export .pt2"] = d / "m.pt2"
    with zipfile.ZipFile(files["torch.export .pt2"], "w") as z:
        z.writestr("m/archive_format", "pt2")
        z.writestr("m/data.pkl", pickle.dumps(_Payload(m)))
    return files


@pytest.mark.parametrize("kind", ["torch.save object", "legacy pickle", "plain pickle", "zip renamed .safetensors",
                                  "torchscript", "torch.export .pt2"])
def test_files_that_carry_code_are_refused_without_trust(site, kind):
    f = _pickle_files(site)[kind]
    code, err = _cli(site, "--arch", "PaperResNet", model=f)
    _assert_refused(code, err, site)


@pytest.mark.parametrize("fmt", ["pickled-module", "torchscript", "torch-export"])
def test_forcing_a_format_does_not_bypass_trust(site, fmt):
    f = _pickle_files(site)["torch.save object"]
    (site["dir"] / "obj.els.toml").write_text(f'format = "{fmt}"\n')
    code, err = _cli(site, model=f)
    _assert_refused(code, err, site)


# ----------------------------------------------------------------------------- the current folder
def _python_m(site, *args, pythonpath=None, command=(sys.executable, "-m", "els_audit")):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    return subprocess.run([*command, *args], cwd=site["dir"], capture_output=True, text=True, timeout=300, env=env)


def test_python_m_from_the_model_folder_imports_nothing_from_it(site):
    # a download that plants modules the tool imports (typing before anything else, networkx,
    # matplotlib) and a sidecar arch
    for name in ("typing.py", "networkx.py", "matplotlib.py", "evilarch.py"):
        (site["dir"] / name).write_text(_py(site["marker"]) + "\n")
    (site["dir"] / "model.els.toml").write_text('arch = "evilarch:Net"\n')
    p = _python_m(site, "model.safetensors", *TINY, "--trust-model", "--out", str(site["out"]))
    _assert_refused(p.returncode, p.stderr, site, "cannot import architecture module 'evilarch'")


@pytest.mark.parametrize("how", ["els-audit", "python -m"])
def test_an_empty_pythonpath_entry_does_not_put_the_model_folder_on_the_path(site, how):
    # PYTHONPATH=":/x" (a common slip) means the current folder; a planted module and a
    # planted plugin (a dist-info declaring an els_audit.loaders entry point) must not run
    (site["dir"] / "networkx.py").write_text(_py(site["marker"]) + "\n")
    (site["dir"] / "evilep.py").write_text(_py(site["marker"]) + "\nclass Loader:\n    pass\n")
    info = site["dir"] / "evilplug-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: evilplug\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[els_audit.loaders]\nevil = evilep:Loader\n")
    command = ((str(Path(sys.executable).parent / "els-audit"),) if how == "els-audit" else
               (sys.executable, "-m", "els_audit"))
    if not Path(command[0]).exists():
        pytest.skip("the els-audit command is not installed beside this Python")
    p = _python_m(site, "model.safetensors", *TINY, "--out", str(site["out"]), "--arch", "nosuchmodule:Net",
                  pythonpath=os.pathsep + "/nonexistent", command=command)
    _assert_refused(p.returncode, p.stderr, site, "cannot import architecture module 'nosuchmodule'")


def test_a_downloaded_config_may_not_choose_which_of_your_files_are_read(site, tmp_path):
    # a zoo-format config beside downloaded weights names a private folder as the training data;
    # without --data the audit would read it and embed those images in the report
    private = tmp_path / "private"
    private.mkdir()
    from PIL import Image

    for i in range(3):
        Image.new("L", (32, 32), color=40 * i).save(private / f"holiday{i}.png")
    cfg = {"format": "els-audit-zoo", "arch": "PaperResNet", "data": str(private),
           "arch_kwargs": {"in_channels": 1, "width": 64, "n_layers": 6, "padding_mode": "zeros", "time_dim": 64}}
    (site["dir"] / "config.json").write_text(json.dumps(cfg))
    res = _runner().invoke(main, [str(site["model"]), *TINY[2:], "--out", str(site["out"])])
    _assert_refused(res.exit_code, res.stderr, site, "names data by path", "pass --data yourself")
    cfg["data"] = "mnist5k:size=32:limit=40"                     # a named data set is fine
    (site["dir"] / "config.json").write_text(json.dumps(cfg))
    res = _runner().invoke(main, [str(site["model"]), *TINY[2:], "--out", str(site["out"])])
    assert res.exit_code == 0, res.stderr


# ----------------------------------------------------------------------------- malformed files: one line, no hang
def test_a_fifo_as_the_model_is_refused_not_read(site):
    fifo = site["dir"] / "model.pt"
    os.mkfifo(fifo)
    (site["dir"] / "model.els.toml").write_text('format = "state-dict"\narch = "PaperResNet"\n')
    code, err = _cli(site, model=fifo)
    _assert_refused(code, err, site, "not a regular file or folder")


@pytest.mark.parametrize("what", ["sidecar", "zoo config", "rules"])
def test_deeply_nested_files_are_user_errors(site, what):
    deep = "a = " + "[" * 100_000 + "]" * 100_000 + "\n"
    if what == "sidecar":
        (site["dir"] / "model.els.toml").write_text(deep)
        code, err = _cli(site)
    elif what == "zoo config":
        (site["dir"] / "config.json").write_text('{"format": "els-audit-zoo", "x": ' + "[" * 100_000 + "]" * 100_000 + "}")
        code, err = _cli(site, "--arch", "PaperResNet", "--arch-kwargs", '{"width": 8}')
    else:
        rules = site["tmp"] / "rules.toml"
        rules.write_text(deep)
        code, err = _cli(site, "--rules", str(rules))
    line = _assert_refused(code, err, site)
    assert "internal error" not in line


@pytest.mark.parametrize("sched", [[1, 2], {"num_train_timesteps": 1e9}, {"num_train_timesteps": "abc"},
                                   {"trained_betas": {"a": 1}}, {"prediction_type": ["v"]}, {"beta_start": None}])
def test_malformed_scheduler_configs_are_user_errors(site, sched):
    pytest.importorskip("diffusers")
    import diffusers

    unet = diffusers.UNet2DModel(sample_size=32, in_channels=1, out_channels=1, layers_per_block=1,
                                 block_out_channels=(8, 8), down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4)
    d = site["dir"] / "unet"
    unet.save_pretrained(str(d))
    (d / "scheduler_config.json").write_text(json.dumps(sched))
    code, err = _cli(site, model=d)
    line = _assert_refused(code, err, site, "scheduler")
    assert "internal error" not in line


def test_a_sidecar_is_read_beside_the_link_the_user_named(site, tmp_path):
    # a Hugging Face cache: snapshots/<rev>/model.safetensors links to blobs/<hash>; the sidecar a
    # user writes sits beside the link, and a sidecar beside the blob is not the model's
    blobs, snap = tmp_path / "blobs", tmp_path / "snapshots" / "rev"
    blobs.mkdir()
    snap.mkdir(parents=True)
    shutil.move(str(site["model"]), blobs / "aaa111")
    (snap / "model.safetensors").symlink_to(blobs / "aaa111")
    (blobs / "aaa111.els.toml").write_text('arch = "os:system"\n')           # beside the blob: not read
    (snap / "model.els.toml").write_text(
        'arch = "PaperResNet"\narch_kwargs = { in_channels = 1, width = 64, n_layers = 6, padding_mode = "zeros", '
        'time_dim = 64 }\n')
    res = _runner().invoke(main, [str(snap / "model.safetensors"), *TINY, "--out", str(site["out"])])
    assert res.exit_code == 0, res.stderr
