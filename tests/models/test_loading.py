"""load_model: sources of the architecture, sidecars, zoo specs, and every bad input of
issue 4 section 4 (one-line ModelLoadError naming the file, the problem and the flag)."""

import json
import textwrap

import pytest
import torch
import torch.nn as nn

from els_audit.models.loading import LOADERS, ModelLoader, ModelLoadError, load_model, sniff_format
from els_audit.models.zoo import PaperResNet

ARCH_SRC = textwrap.dedent(
    """
    import torch.nn as nn

    def build(width=4):
        return nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, 1, 3, padding=1))

    class Toy(nn.Sequential):
        def __init__(self, width=4):
            super().__init__(nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, 1, 3, padding=1))
    """
)


def _toy(width=4):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, 1, 3, padding=1))


@pytest.fixture
def archmod(tmp_path, monkeypatch):
    """An importable module ``toyarch_mod`` with ``build(width=4)`` and ``Toy(width=4)``; returns its .py path."""
    d = tmp_path / "code"
    d.mkdir()
    f = d / "toyarch_mod.py"
    f.write_text(ARCH_SRC)
    monkeypatch.syspath_prepend(str(d))
    return f


def _save_st(module, path):
    LOADERS.get("safetensors")().save(module, path)
    return path


def _err(excinfo, path, *needles):
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    assert str(path) in msg, msg
    for n in needles:
        assert n in msg, f"{n!r} not in {msg!r}"
    return msg


# --------------------------------------------------------------------------- architecture sources
def test_weights_only_without_arch_names_the_flag_and_the_sidecar(tmp_path):
    p = _save_st(_toy(), tmp_path / "m.safetensors")
    with pytest.raises(ModelLoadError) as ei:
        load_model(p)
    _err(ei, p, "weights only", "--arch module:Class", "m.els.toml")


def test_arch_argument_as_module_callable_and_as_py_file(tmp_path, archmod):
    p = _save_st(_toy(), tmp_path / "m.safetensors")
    a = load_model(p, arch="toyarch_mod:Toy")
    b = load_model(p, arch=f"{archmod}:build")  # a file path given by the user is the user's say-so
    x = torch.randn(2, 1, 6, 6)
    with torch.no_grad():
        assert torch.equal(a.module(x), _toy()(x)) and torch.equal(b.module(x), _toy()(x))
    assert a.arch.source == "argument" and a.arch.name == "toyarch_mod:Toy"
    # 2 convs: 1*4*9 + 4 + 4*1*9 + 1 = 36 + 4 + 36 + 1 = 77 parameters
    assert a.n_params == 77


def test_arch_kwargs_and_zoo_class_name(tmp_path):
    m = PaperResNet(width=8, n_layers=2)
    p = _save_st(m, tmp_path / "r.safetensors")
    loaded = load_model(p, arch="PaperResNet", arch_kwargs={"width": 8, "n_layers": 2})
    assert loaded.arch.name == "els_audit.models.zoo.architectures:PaperResNet"   # a registered architecture
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([0.2, 0.8])
    with torch.no_grad():
        assert torch.equal(loaded.module(x, t), m.eval()(x, t))


def test_bad_arch_specs(tmp_path):
    p = _save_st(_toy(), tmp_path / "m.safetensors")
    for spec, needle in [
        ("no_colon_here", "module:Class"),
        ("surely_not_a_module_xyz:build", "cannot import"),
        ("json:no_such_attr", "no attribute"),
        (str(tmp_path / "missing.py") + ":build", "does not exist"),
    ]:
        with pytest.raises(ModelLoadError, match=needle) as ei:
            load_model(p, arch=spec)
        assert "--arch" in str(ei.value)


def test_state_dict_that_does_not_fit_the_architecture(tmp_path, archmod):
    p = _save_st(_toy(width=4), tmp_path / "m.safetensors")
    with pytest.raises(ModelLoadError) as ei:
        load_model(p, arch="toyarch_mod:Toy", arch_kwargs={"width": 5})
    _err(ei, p, "do not fit architecture toyarch_mod:Toy", "shape mismatch", "0.weight (file [4, 1, 3, 3], model [5, 1, 3, 3])", "--arch")
    with pytest.raises(ModelLoadError) as ei:
        load_model(p, arch="PaperResNet")
    _err(ei, p, "missing key", "unexpected key", "--arch")


# --------------------------------------------------------------------------- sidecar
def test_sidecar_supplies_arch_and_settings_and_arguments_win(tmp_path):
    p = _save_st(PaperResNet(width=8, n_layers=2), tmp_path / "m.safetensors")
    (tmp_path / "m.els.toml").write_text(
        'arch = "PaperResNet"\narch_kwargs = { width = 8, n_layers = 2 }\nprediction = "v"\ntime_input = "index"\n'
        "num_train_steps = 500\ndata_range = [0, 1]\n"
    )
    loaded = load_model(p, time_input="sigma")   # a registered architecture needs no trust
    assert loaded.arch.source == "sidecar"
    assert loaded.sidecar == str(tmp_path / "m.els.toml")
    assert dict(loaded.settings) == {"prediction": "v", "time_input": "sigma", "num_train_steps": 500, "data_range": (0.0, 1.0)}
    assert loaded.setting_sources["prediction"] == "sidecar" and loaded.setting_sources["time_input"] == "argument"
    assert [f for f, _ in loaded.files] == [str(p), str(tmp_path / "m.els.toml")]
    json.dumps(loaded.to_dict())  # JSON-safe


@pytest.mark.parametrize("ref", ["{archmod}:Toy", "toyarch_mod:Toy"])
def test_sidecar_naming_unregistered_code_needs_trust(tmp_path, archmod, ref):
    p = _save_st(_toy(), tmp_path / "m.safetensors")
    side = tmp_path / "m.els.toml"
    side.write_text(f'arch = "{ref.format(archmod=archmod)}"\n')
    with pytest.raises(ModelLoadError) as ei:
        load_model(p)
    _err(ei, side, "not a registered architecture", "--trust-model", "--arch")
    assert load_model(p, trust_model=True).arch.source == "sidecar"
    # even trusted, a file may only name a module class: the factory function is refused
    side.write_text(f'arch = "{ref.format(archmod=archmod).replace(":Toy", ":build")}"\n')
    with pytest.raises(ModelLoadError) as ei:
        load_model(p, trust_model=True)
    _err(ei, side, "is a function", "torch.nn.Module subclass")


@pytest.mark.parametrize(
    "text,needle",
    [
        ('archh = "x:y"\n', "unknown sidecar key 'archh'"),
        ("num_train_steps = \"many\"\n", "must be int"),
        ('prediction = "noise"\n', "prediction 'noise' is not one of"),
        ("data_range = [1, 0]\n", "LO < HI"),
        ("this is not toml\n", "cannot read the sidecar"),
    ],
)
def test_bad_sidecars(tmp_path, text, needle):
    p = _save_st(_toy(), tmp_path / "m.safetensors")
    side = tmp_path / "m.els.toml"
    side.write_text(text)
    with pytest.raises(ModelLoadError) as ei:
        load_model(p, arch=_toy)
    _err(ei, side, needle)


def test_zoo_config_may_only_name_zoo_architectures(tmp_path):
    p = _save_st(_toy(), tmp_path / "model.safetensors")
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"format": "els-audit-zoo", "arch": "os:system"}))
    with pytest.raises(ModelLoadError) as ei:
        load_model(p)
    _err(ei, cfg, "not a registered architecture", "--arch")
    with pytest.raises(ModelLoadError) as ei:
        load_model(p, trust_model=True)
    _err(ei, cfg, "built-in function", "torch.nn.Module subclass")


# --------------------------------------------------------------------------- state dict extraction
def test_checkpoint_dicts(tmp_path):
    m = _toy()
    sd = m.state_dict()
    one = tmp_path / "one.pt"
    torch.save({"epoch": 3, "model": sd}, one)
    loaded = load_model(one, arch=_toy)
    assert any(n.startswith("weights taken from checkpoint entry 'model'") for n in loaded.notes)
    two = tmp_path / "two.pt"
    torch.save({"model": sd, "model2": sd}, two)
    with pytest.raises(ModelLoadError) as ei:
        load_model(two, arch=_toy)
    _err(ei, two, "several hold weights (model, model2)", "--state-dict-key")
    assert load_model(two, arch=_toy, state_dict_key="model2").format == "state-dict"
    dp = tmp_path / "dp.pt"
    torch.save({f"module.{k}": v for k, v in sd.items()}, dp)
    assert any("'module.'" in n for n in load_model(dp, arch=_toy).notes)


# --------------------------------------------------------------------------- section 4: bad files
def test_missing_file(tmp_path):
    p = tmp_path / "nope.pt"
    with pytest.raises(ModelLoadError) as ei:
        load_model(p)
    _err(ei, p, "no such file")


def test_unknown_format_and_empty_file(tmp_path):
    p = tmp_path / "weird.bin"
    p.write_bytes(b"hello, I am not a model")
    with pytest.raises(ModelLoadError) as ei:
        load_model(p, arch=_toy)
    _err(ei, p, "unknown model format", "--format")
    e = tmp_path / "empty.pt"
    e.write_bytes(b"")
    with pytest.raises(ModelLoadError) as ei:
        load_model(e, arch=_toy)
    _err(ei, e, "is empty")


def test_truncated_files(tmp_path):
    m = _toy()
    full = tmp_path / "full.pt"
    torch.save(m.state_dict(), full)
    data = full.read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError) as ei:
        load_model(cut, arch=_toy)
    _err(ei, cut, "truncated or corrupt")

    st = _save_st(m, tmp_path / "full.safetensors")
    raw = st.read_bytes()
    cut_data = tmp_path / "cut_data.safetensors"  # header intact, tensor bytes missing
    cut_data.write_bytes(raw[: len(raw) - 100])
    with pytest.raises(ModelLoadError) as ei:
        load_model(cut_data, arch=_toy)
    _err(ei, cut_data, "truncated or corrupt safetensors", "re-download")
    cut_head = tmp_path / "cut_head.safetensors"  # cut inside the JSON header
    cut_head.write_bytes(raw[:20])
    with pytest.raises(ModelLoadError) as ei:
        load_model(cut_head, arch=_toy)
    _err(ei, cut_head, "safetensors", "truncated or corrupt")


def test_ambiguous_and_forced_format(tmp_path):
    p = _save_st(_toy(), tmp_path / "m.safetensors")

    @LOADERS.register("greedy-test-loader")
    class Greedy(ModelLoader):
        description = "anything"

        def claim(self, path):
            return True

    try:
        with pytest.raises(ModelLoadError) as ei:
            sniff_format(p)
        _err(ei, p, "ambiguous", "greedy-test-loader", "safetensors", "--format")
        assert load_model(p, arch=_toy, format="safetensors").format == "safetensors"
    finally:
        LOADERS.unregister("greedy-test-loader")
    with pytest.raises(ModelLoadError, match="unknown model loader 'nope'"):
        load_model(p, arch=_toy, format="nope")


def test_unknown_override_and_bad_values(tmp_path):
    p = _save_st(_toy(), tmp_path / "m.safetensors")
    with pytest.raises(ModelLoadError, match="unknown setting 'predicton'"):
        load_model(p, arch=_toy, predicton="eps")
    with pytest.raises(ModelLoadError, match="--time-input"):
        load_model(p, arch=_toy, time_input="seconds")


def test_failed_load_leaves_nothing_behind(tmp_path):
    p = _save_st(_toy(), tmp_path / "m.safetensors")
    before = sorted(x.name for x in tmp_path.iterdir())
    with pytest.raises(ModelLoadError):
        load_model(p, arch="PaperResNet")
    assert sorted(x.name for x in tmp_path.iterdir()) == before


# --------------------------------------------------------------------------- zoo specs
def test_zoo_spec_loads_and_unknown_zoo_name_is_an_error():
    loaded = load_model("zoo:resnet-zeros")
    assert loaded.format == "safetensors" and loaded.arch.source == "zoo config"
    assert loaded.settings["time_input"] == "unit" and loaded.setting_sources["prediction"] == "zoo config"
    with pytest.raises(ModelLoadError) as ei:
        load_model("zoo:resnet-zero")
    _err(ei, "zoo:resnet-zero", "no such zoo model", "resnet-zeros")
