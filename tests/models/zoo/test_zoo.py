"""The committed zoo: every model loads, denoises real digits far better than predicting
zero, and the training script writes what the loader reads, atomically."""

import json

import pytest
import torch

from els_audit.models.adapter import make_denoiser
from els_audit.models.loading import ModelLoadError, file_sha256, load_model
from els_audit.models.zoo import count_parameters
from els_audit.models.zoo.catalog import WEIGHTS_DIR, build_zoo_architecture, list_zoo_models, zoo_config, zoo_model_path
from els_audit.models.zoo.train import ZOO_FILES, TrainConfig, main, train_zoo_model, write_zoo_model

NAMES = ["resnet-circular", "resnet-zeros", "unet-attention", "unet-zeros"]


def test_catalogue_and_sizes():
    assert list_zoo_models() == NAMES
    total = sum(f.stat().st_size for f in WEIGHTS_DIR.rglob("*") if f.is_file())
    assert total < 8 * 2**20  # a few MB in all
    for n in NAMES:
        d = zoo_model_path(n).parent
        assert {f.name for f in d.iterdir()} >= {"model.safetensors", "config.json", "loss.json", "loss.png", "samples.png"}
    with pytest.raises(ModelLoadError, match="no such zoo model"):
        zoo_model_path("resnet")


def test_missing_weights_say_how_to_train_them(tmp_path, monkeypatch):
    monkeypatch.setattr("els_audit.models.zoo.catalog.WEIGHTS_DIR", tmp_path)
    with pytest.raises(ModelLoadError, match="python -m els_audit.models.zoo.train unet-zeros"):
        load_model("zoo:unet-zeros")


@pytest.fixture(scope="module")
def mnist_batch():
    from els_audit.data import load_dataset

    ds = load_dataset("mnist5k:size=32")
    idx = torch.randperm(ds.images.shape[0], generator=torch.Generator().manual_seed(3))[:32]
    return ds.images[idx]                                                      # (32, 1, 32, 32)


@pytest.mark.parametrize("name", NAMES)
def test_zoo_model_loads_and_denoises(name, mnist_batch):
    cfg = zoo_config(name)
    loaded = load_model(f"zoo:{name}")
    assert loaded.sha256 == cfg["weights_sha256"] == file_sha256(zoo_model_path(name))
    assert loaded.n_params == cfg["n_params"] == count_parameters(build_zoo_architecture(name))
    assert loaded.dtype == "float32" and cfg["weights_dtype"] == "float16"
    assert (cfg["schedule"], cfg["time_input"], cfg["prediction"], cfg["data"]) == ("cosine-legacy", "unit", "eps", "mnist5k:size=32")
    # one-step denoising at t = 0.5: x_t = a x0 + b eps; predicting zero scores E[eps^2] ~ 1
    g = torch.Generator().manual_seed(7)
    eps = torch.randn(mnist_batch.shape, generator=g)
    a, b = 0.7115006375947301, 0.702685450754669  # cos, sin of 0.5/1.008 * pi/2
    with torch.no_grad():
        eps_hat = loaded.module(a * mnist_batch + b * eps, torch.full((32,), 0.5))
    err, zero = (eps_hat - eps).pow(2).mean().item(), eps.pow(2).mean().item()
    assert err < 0.1 * zero, (name, err, zero)
    # the same through the adapter's sanity check
    den = make_denoiser(loaded, check_images=mnist_batch[:8])
    assert den.sanity.passed and den.sanity.ratio < 0.1
    losses = json.loads((zoo_model_path(name).parent / "loss.json").read_text())["epoch_mean_loss"]
    assert len(losses) == cfg["training"]["epochs_completed"] and losses[-1] < losses[0] / 5


def _tiny_cfg(**kw):
    base = dict(name="resnet-zeros", epochs=2, batch_size=16, data="mnist5k:size=32:limit=32",
                arch_overrides={"width": 4, "n_layers": 1}, sample_steps=2, sample_seeds=(0, 1))
    base.update(kw)
    return TrainConfig(**base)


def test_train_write_and_load_round_trip(tmp_path):
    cfg = _tiny_cfg()
    res = train_zoo_model(cfg, log=lambda *a: None)
    assert res.epochs_completed == 2 and res.steps == 4  # 32 images / batch 16 = 2 steps per epoch
    out = write_zoo_model(cfg, res, tmp_path / "resnet-zeros", log=lambda *a: None)
    conf = json.loads((out / "config.json").read_text())
    assert conf["arch_kwargs"]["width"] == 4 and conf["training"]["steps"] == 4 and conf["training"]["epochs"] == 2
    loaded = load_model(out / "model.safetensors")
    x, t = torch.randn(2, 1, 32, 32), torch.tensor([0.3, 0.6])
    with torch.no_grad():
        assert torch.equal(loaded.module(x, t), res.module(x, t))  # weights were rounded to fp16 before both
    # same seed, same recipe -> same weights
    res2 = train_zoo_model(cfg, log=lambda *a: None)
    assert all(torch.equal(p, q) for p, q in zip(res.module.parameters(), res2.module.parameters()))


def test_write_is_atomic(tmp_path, monkeypatch):
    cfg = _tiny_cfg(epochs=1)
    res = train_zoo_model(cfg, log=lambda *a: None)

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr("els_audit.models.zoo.train.sample_grid", boom)
    with pytest.raises(RuntimeError):
        write_zoo_model(cfg, res, tmp_path / "m", log=lambda *a: None)
    assert list(tmp_path.iterdir()) == []


def test_command_line(tmp_path, capsys):
    rc = main(["resnet-zeros", "--epochs", "1", "--set", "width=4", "--set", "n_layers=1", "--batch-size", "32",
               "--data", "mnist5k:size=32:limit=32", "--sample-steps", "1", "--out", str(tmp_path / "z")])
    assert rc == 0 and (tmp_path / "z" / "samples.png").is_file()
    assert main(["resnet-zeros", "--epochs", "0", "--out", str(tmp_path / "y")]) == 2
    assert "epochs and batch_size must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()


def test_the_trainer_replaces_only_its_own_folders(tmp_path, capsys):
    mine = tmp_path / "thesis"
    mine.mkdir()
    (mine / "chapter1.tex").write_text("precious")
    args = ["resnet-zeros", "--epochs", "1", "--set", "width=4", "--set", "n_layers=1", "--batch-size", "32",
            "--data", "mnist5k:size=32:limit=32", "--sample-steps", "1"]
    assert main([*args, "--out", str(mine)]) == 2
    assert "is not a zoo model folder this script wrote" in capsys.readouterr().err
    assert (mine / "chapter1.tex").read_text() == "precious"
    assert main([*args, "--out", str(tmp_path / "z")]) == 0
    assert main([*args, "--out", str(tmp_path / "z")]) == 0               # its own folder: replaced
    assert sorted(p.name for p in (tmp_path / "z").iterdir()) == sorted(ZOO_FILES)


def test_training_on_rgb_data_samples_rgb_images(tmp_path):
    # the sample grid used to be drawn at (1, 32, 32) whatever the data: an RGB model failed after training
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    data = tmp_path / "rgb.npz"
    np.savez(data, images=rng.uniform(-1, 1, (16, 3, 16, 16)).astype(np.float32), labels=np.arange(16) % 2)
    out = tmp_path / "z"
    rc = main(["resnet-zeros", "--epochs", "1", "--set", "width=4", "--set", "n_layers=1", "--set", "in_channels=3",
               "--batch-size", "8", "--data", str(data), "--sample-steps", "1", "--out", str(out)])
    assert rc == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["arch_kwargs"]["in_channels"] == 3
    assert np.asarray(Image.open(out / "samples.png")).shape[-1] in (3, 4)        # colour, not grey
