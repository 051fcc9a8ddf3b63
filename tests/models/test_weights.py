"""Real checkpoints into an architecture (els_audit.models.weights): which entry, which prefix."""

import pytest
import torch
import torch.nn as nn

from els_audit.models import ModelLoadError, load_model
from els_audit.models.weights import checkpoint_entry, fit_state_dict, fitting_prefixes


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 1, 1))


def _sd(seed):
    torch.manual_seed(seed)
    return {k: torch.randn_like(v) for k, v in net().state_dict().items()}


def _prefixed(p, sd):
    return {p + k: v for k, v in sd.items()}


def _same(module, sd):
    return all(torch.equal(module.state_dict()[k], v) for k, v in sd.items())


def test_fitting_prefixes_by_hand():
    own = net().state_dict()              # keys 0.weight 0.bias 2.weight 2.bias
    assert fitting_prefixes(own, own) == [""]
    assert fitting_prefixes(_prefixed("module.", own), own) == ["module."]
    both = {**_prefixed("ema_model.", own), **_prefixed("online_model.", own), "step": torch.tensor(3)}
    assert fitting_prefixes(both, own) == ["ema_model.", "online_model."]
    assert fitting_prefixes({"0.weight": own["0.weight"]}, own) == []      # keys missing: nothing fits


def test_training_checkpoint_prefers_ema_and_says_so(tmp_path):
    model, ema = _sd(1), _sd(2)
    p = tmp_path / "ckpt.pt"
    torch.save({"model": model, "ema": ema, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3}]},
                "step": 1000}, p)
    loaded = load_model(p, arch=net)
    assert _same(loaded.module, ema)
    assert any("entry 'ema'" in n and "EMA" in n for n in loaded.notes)
    assert _same(load_model(p, arch=net, state_dict_key="model").module, model)


def test_lightning_checkpoint_strips_the_model_prefix(tmp_path):
    sd = _sd(3)
    p = tmp_path / "epoch=9.ckpt"
    torch.save({"state_dict": _prefixed("model.", sd), "optimizer_states": [{}], "epoch": 9,
                "pytorch-lightning_version": "2.4.0"}, p)
    loaded = load_model(p, arch=net)
    assert _same(loaded.module, sd)
    assert any("removed the key prefix 'model.'" in n for n in loaded.notes)


def test_an_ema_wrapper_holding_two_copies_gives_the_ema_copy(tmp_path):
    online, ema = _sd(4), _sd(5)
    p = tmp_path / "ema.pt"
    torch.save({**_prefixed("online_model.", online), **_prefixed("ema_model.", ema),
                "initted": torch.tensor(True), "step": torch.tensor(7)}, p)
    loaded = load_model(p, arch=net)
    assert _same(loaded.module, ema)
    assert any("EMA copy" in n for n in loaded.notes) and any("2 other entries" in n or "other entries" in n
                                                              for n in loaded.notes)


def test_the_entry_that_fits_the_architecture_is_taken(tmp_path):
    sd = _sd(6)
    other = {"w": torch.zeros(2)}
    fitted, notes = checkpoint_entry({"generator": sd, "discriminator": other, "step": 1}, net().state_dict(), None,
                                     "x.pt")
    assert fitted is sd and "the only one of generator, discriminator that fits" in notes[0]


def test_ambiguous_copies_and_bad_keys_are_one_line_errors(tmp_path):
    own = net().state_dict()
    with pytest.raises(ModelLoadError, match="several copies of the weights"):
        fit_state_dict({**_prefixed("a.", own), **_prefixed("b.", own)}, own, "net", "x.pt")
    with pytest.raises(ModelLoadError, match="several hold weights.*--state-dict-key"):
        checkpoint_entry({"a": own, "b": own}, own, None, "x.pt")
    with pytest.raises(ModelLoadError, match="entry 'c' is missing"):
        checkpoint_entry({"a": own}, own, "c", "x.pt")
    p = tmp_path / "plain.pt"
    torch.save(own, p)
    with pytest.raises(ModelLoadError, match="plain state dict.*drop --state-dict-key"):
        load_model(p, arch=net, state_dict_key="ema")


def test_shape_mismatch_after_stripping_is_reported_with_shapes():
    own = net().state_dict()
    bad = dict(own)
    bad["0.weight"] = torch.zeros(4, 1, 3, 3)
    with pytest.raises(ModelLoadError, match=r"shape mismatch.*0.weight \(file \[4, 1, 3, 3\], model \[3, 1, 3, 3\]\)"):
        fit_state_dict(_prefixed("model.", bad), own, "net", "x.pt")


def test_a_misfit_is_refused_before_the_architecture_is_allocated(tmp_path):
    # a sidecar asking a registered class for width 30000: one conv alone would be 30000^2 x 9
    # floats (32 GB, more than this machine has); the file's small weights cannot fit, and that
    # is found on torch's meta device, so the load fails at once instead of allocating
    from safetensors.torch import save_file

    from els_audit.models.zoo import PaperResNet

    p = tmp_path / "m.safetensors"
    save_file(PaperResNet(width=8, n_layers=1).state_dict(), str(p))
    (tmp_path / "m.els.toml").write_text('arch = "PaperResNet"\narch_kwargs = { width = 30000, n_layers = 1 }\n')
    with pytest.raises(ModelLoadError, match="do not fit architecture"):
        load_model(p)


def test_many_keys_under_many_prefixes():
    # 20,000 keys each under its own prefix: every prefix fits (found per key and dotted
    # component, not by comparing every prefix with every key)
    got = fitting_prefixes({f"{i}.c.weight": torch.zeros(0) for i in range(20000)}, {"c.weight": 0})
    assert len(got) == 20000 and got[:2] == ["0.", "1."]


@pytest.mark.parametrize("kwargs,needle", [
    ("width = 8, n_layers = 300000", "registers more than"),              # minutes and GBs on meta alone
    ("width = 510000000, n_layers = 1", "cannot be checked against the file before it is allocated"),  # meta overflows
])
def test_a_downloaded_sidecar_cannot_make_the_build_cost_minutes_or_gigabytes(tmp_path, kwargs, needle):
    from safetensors.torch import save_file

    from els_audit.models.zoo import PaperResNet

    p = tmp_path / "m.safetensors"
    save_file(PaperResNet(width=8, n_layers=1).state_dict(), str(p))
    (tmp_path / "m.els.toml").write_text(f'arch = "PaperResNet"\narch_kwargs = {{ {kwargs} }}\n')
    with pytest.raises(ModelLoadError, match=needle):
        load_model(p)
