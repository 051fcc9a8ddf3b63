"""The shared contract every model loader passes (a table of loader x toy model).

For each loader: save a toy model in its format -> the loader (and only it) claims the
file -> load_model round trip gives bit-identical outputs -> format, SHA-256, parameter
count and dtype are recorded.  Formats that can run code are refused without trust, with
a message naming the file, why, and both ways forward.
"""

import hashlib

import pytest
import torch
import torch.nn as nn

from els_audit.models.loading import LOADERS, ModelLoadError, load_model, sniff_format


class ToyXT(nn.Module):
    """A tiny time-conditioned conv net: forward(x, t)."""

    def __init__(self, width: int = 4):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.time = nn.Linear(1, width)
        self.conv2 = nn.Conv2d(width, 1, 3, padding=1)

    def forward(self, x, t):
        h = torch.relu(self.conv1(x) + self.time(t[:, None])[:, :, None, None])
        return self.conv2(h)


def make_toy():
    torch.manual_seed(0)
    return ToyXT().eval()


def make_diffusers_toy():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    return diffusers.UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 8),
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    ).eval()


# loader name -> (toy factory, file name, weights-only: pass arch)
CASES = {
    "safetensors": (make_toy, "model.safetensors", True),
    "state-dict": (make_toy, "model.pt", True),
    "pickled-module": (make_toy, "model.pt", False),
    "torchscript": (make_toy, "model.ts.pt", False),
    "torch-export": (make_toy, "model.pt2", False),
    "diffusers": (make_diffusers_toy, "unet_dir", False),
}


def _inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 1, 8, 8, generator=g)                                   # (B, C, H, W)
    t = torch.tensor([0.1, 0.5, 0.9])                                          # (B,)
    return x, t


def _out(module, x, t, diffusers_style):
    with torch.no_grad():
        return module(x, t * 1000).sample if diffusers_style else module(x, t)


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_every_registered_loader_has_a_contract_case():
    assert sorted(CASES) == LOADERS.names()


@pytest.mark.parametrize("name", sorted(CASES))
def test_round_trip(name, tmp_path):
    factory, fname, weights_only = CASES[name]
    loader = LOADERS.get(name)()
    module = factory()
    x, t = _inputs()
    path = tmp_path / fname
    loader.save(module, path, example_inputs=(x, t))

    # sniffing picks exactly this loader
    assert sniff_format(path) == name

    # safe formats need no trust; the others are refused without it
    kw = {"arch": make_toy} if weights_only else {}
    if not loader.safe:
        with pytest.raises(ModelLoadError) as ei:
            load_model(path, **kw)
        msg = str(ei.value)
        assert "\n" not in msg and str(path) in msg
        assert loader.description in msg and "arbitrary code" in msg
        assert "--trust-model" in msg and "--arch" in msg and "safetensors" in msg
    loaded = load_model(path, trust_model=not loader.safe, **kw)

    diffusers_style = name == "diffusers"
    assert torch.equal(_out(loaded.module, x, t, diffusers_style), _out(module, x, t, diffusers_style))
    assert loaded.format == name
    weights = path / "diffusion_pytorch_model.safetensors" if diffusers_style else path
    assert loaded.sha256 == _sha(weights)
    assert loaded.n_params == sum(p.numel() for p in module.parameters())
    assert loaded.dtype == "float32"
    assert loaded.ran_code == (not loader.safe)
    d = loaded.to_dict()
    assert d["format"] == name and d["sha256"] == loaded.sha256 and d["files"][0]["sha256"] == loaded.sha256


def test_state_dict_and_pickled_module_are_told_apart_without_unpickling(tmp_path, monkeypatch):
    """Sniffing a pickled module must not import/execute the classes it references."""
    m = make_toy()
    torch.save(m, tmp_path / "whole.pt")
    torch.save(m.state_dict(), tmp_path / "sd.pt")
    called = []
    monkeypatch.setattr(ToyXT, "__setstate__", lambda self, s: called.append(1), raising=False)
    assert sniff_format(tmp_path / "whole.pt") == "pickled-module"
    assert sniff_format(tmp_path / "sd.pt") == "state-dict"
    with pytest.raises(ModelLoadError, match="ToyXT"):  # the refusal names what it would unpickle
        load_model(tmp_path / "whole.pt")
    assert called == []
