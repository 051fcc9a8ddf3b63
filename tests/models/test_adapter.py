"""The denoiser adapter: conversions against hand-derived formulas, call-style detection,
the load-time sanity check and its diagnosis."""

import json

import pytest
import torch
import torch.nn as nn

from els_audit.models.adapter import Denoiser, detect_call_style, make_denoiser
from els_audit.models.loading import ModelLoadError, load_model
from els_audit.schedules import get_schedule

# cosine-legacy at t = 0.5: angle = 0.5/1.008 * pi/2 = 0.7791648 rad,
# a = cos(angle) = 0.7115006, b = sin(angle) = 0.7026855, b/a = tan(angle) = 0.9876104.
A05, B05 = 0.7115006375947301, 0.702685450754669

g = torch.Generator().manual_seed(0)
X_STAR = torch.randn(1, 1, 4, 4, generator=g)  # the one training image: the exact denoiser is known


class Oracle(nn.Module):
    """Exact denoiser for a data set of one image X_STAR, speaking a given dialect.

    With x_t = a x* + b eps the true noise is eps = (x_t - a x*) / b.  The model returns
    eps, x0 = x*, v = a eps - b x0 (Salimans & Ho) or score = -eps / b, and takes its
    time as unit t, index (t*T for a continuous schedule, t*T - 1 for a discrete one) or
    sigma = b/a with input x / a (VE form, where x / a = x* + sigma eps).
    """

    def __init__(self, prediction="eps", time_input="unit", schedule="cosine-legacy", T=1000):
        super().__init__()
        self.prediction, self.time_input, self.T = prediction, time_input, T
        self.sched = get_schedule(schedule)

    def forward(self, x, t):
        if self.time_input == "sigma":
            sigma = t[:, None, None, None]
            eps = (x - X_STAR) / sigma
            if self.prediction == "score":
                return -eps / sigma  # VE score of x/a
            return {"eps": eps, "x0": X_STAR.expand_as(x)}[self.prediction]
        if self.time_input == "index":
            discrete = hasattr(self.sched, "num_train_steps")
            tu = (t + 1) / self.T if discrete else t / self.T
        else:
            tu = t
        a, b = (v.to(x.dtype)[:, None, None, None] for v in self.sched.alpha_sigma(tu.double()))
        eps = (x - a * X_STAR) / b
        return {"eps": eps, "x0": X_STAR.expand_as(x), "v": a * eps - b * X_STAR, "score": -eps / b}[self.prediction]


def _noisy(t_vals, schedule="cosine-legacy"):
    t = torch.tensor(t_vals, dtype=torch.float64)
    a, b = get_schedule(schedule).alpha_sigma(t)
    eps = torch.randn(len(t_vals), 1, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x = a[:, None, None, None] * X_STAR.double() + b[:, None, None, None] * eps
    return x, t, eps


@pytest.mark.parametrize(
    "prediction,time_input,schedule",
    [
        ("eps", "unit", "cosine-legacy"),
        ("x0", "unit", "cosine-legacy"),
        ("v", "unit", "cosine-legacy"),
        ("score", "unit", "cosine-legacy"),
        ("eps", "index", "cosine-legacy"),
        ("v", "index", "linear"),
        ("x0", "index", "cosine"),
        ("eps", "sigma", "cosine-legacy"),
        ("x0", "sigma", "cosine-legacy"),
        ("score", "sigma", "linear"),
    ],
)
def test_conversions_recover_the_true_noise(prediction, time_input, schedule):
    oracle = Oracle(prediction, time_input, schedule).double()
    den = make_denoiser(oracle, prediction=prediction, time_input=time_input, schedule=schedule, check=False,
                        example_shape=(1, 4, 4))
    x, t, eps = _noisy([0.1, 0.5, 0.9], schedule)
    assert torch.allclose(den.eps(x, t), eps, atol=1e-9, rtol=0)


def test_conversions_by_hand_at_t_half():
    x = torch.ones(1, 1, 1, 1, dtype=torch.float64)
    t = torch.tensor([0.5], dtype=torch.float64)
    zero = lambda m, xi, ti, lab: torch.zeros_like(xi)  # noqa: E731
    one = lambda m, xi, ti, lab: torch.ones_like(xi)  # noqa: E731
    mk = lambda call, **kw: make_denoiser(nn.Identity(), call_style=call, check=False, **kw)  # noqa: E731
    # x0 = 0  ->  eps = (x - a*0)/b = 1/0.7026855 = 1.4231119
    assert mk(zero, prediction="x0").eps(x, t).item() == pytest.approx(1.4231119, abs=1e-6)
    # v = 0  ->  eps = a*0 + b*x = 0.7026855
    assert mk(zero, prediction="v").eps(x, t).item() == pytest.approx(0.7026855, abs=1e-6)
    # score = 1  ->  eps = -b * 1 = -0.7026855
    assert mk(one, prediction="score").eps(x, t).item() == pytest.approx(-0.7026855, abs=1e-6)
    # time seen by the model: unit 0.25; index 250 (continuous: t*T); index 249 for the
    # discrete linear schedule (index n sits at t = (n+1)/T); sigma at t = 0.5 is
    # b/a = 0.9876104 and the model sees x/a = 1/0.7115006 = 1.4054801
    seen = {}
    rec = lambda m, xi, ti, lab: seen.update(x=xi.item(), t=ti.item()) or xi  # noqa: E731
    q = torch.tensor([0.25], dtype=torch.float64)
    mk(rec, time_input="unit").eps(x, q)
    assert seen["t"] == 0.25
    mk(rec, time_input="index").eps(x, q)
    assert seen["t"] == pytest.approx(250.0)
    mk(rec, time_input="index", schedule="linear").eps(x, q)
    assert seen["t"] == pytest.approx(249.0)
    mk(rec, time_input="sigma").eps(x, t)
    assert seen["t"] == pytest.approx(0.9876104, abs=1e-6) and seen["x"] == pytest.approx(1.4054801, abs=1e-6)


# --------------------------------------------------------------------------- call styles
class XT(nn.Module):
    def forward(self, x, t):
        return x * t[:, None, None, None]


class TXLabel(nn.Module):
    """The paper's dialect: model(t, x, label=...)."""

    def __init__(self):
        super().__init__()
        self.last_label = None

    def forward(self, t, x, label=None):
        self.last_label = label
        return x * t[:, None, None, None] + (0 if label is None else label[:, None, None, None].to(x.dtype))


class Anonymous(nn.Module):
    """Argument names that say nothing; only x-t order runs (conv on the first)."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(1, 1, 1)

    def forward(self, a, b):
        return self.c(a) * b[:, None, None, None]


class Symmetric(nn.Module):
    """Runs in both argument orders: the order cannot be told."""

    def forward(self, p, q):
        return p if p.ndim == 4 else q


class WrongShape(nn.Module):
    def forward(self, x, t):
        return x.repeat(1, 3, 1, 1)


class NaNModel(nn.Module):
    def forward(self, x, t):
        return x * float("nan")


def test_call_style_detection():
    assert detect_call_style(XT())[0] == "x-t"
    assert detect_call_style(TXLabel())[0] == "t-x"
    assert detect_call_style(Anonymous())[0] is None
    den = make_denoiser(Anonymous(), check=False)
    assert den.call_style == "x-t" and "probe" in den.sources["call_style"]
    with pytest.raises(ModelLoadError) as ei:
        make_denoiser(Symmetric())
    msg = str(ei.value)
    assert "works in both argument orders" in msg and "--call-style" in msg and "\n" not in msg
    assert make_denoiser(Symmetric(), call_style="x-t", check=False).call_style == "x-t"


def test_paper_signature_gets_t_first_and_label_by_keyword():
    m = TXLabel()
    den = make_denoiser(m, check=False)
    x = torch.ones(2, 1, 2, 2)
    out = den.eps(x, torch.tensor([0.5, 0.25]), torch.tensor([3, 4]))
    assert torch.equal(m.last_label, torch.tensor([3, 4]))
    assert out[:, 0, 0, 0].tolist() == [3.5, 4.25]  # x*t + label


def test_user_callable_call_style_and_defaults_are_reported():
    den = make_denoiser(XT(), call_style=lambda m, x, t, label: m(x, t) * 2, check=False)
    assert torch.equal(den.eps(torch.ones(1, 1, 1, 1), torch.tensor([0.5])), torch.ones(1, 1, 1, 1))
    d = den.to_dict()
    json.dumps(d)
    assert d["sources"]["time_input"] == "default" and d["sources"]["call_style"] == "argument"
    assert any("--time-input" in w for w in den.warnings) and any("--prediction" in w for w in den.warnings)


def _tiny_unet(num_class_embeds=None):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    return diffusers.UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 8),
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4, num_class_embeds=num_class_embeds,
    ).eval()


def test_diffusers_directory_with_scheduler_config(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    unet = _tiny_unet(num_class_embeds=3)
    unet.save_pretrained(tmp_path / "m", safe_serialization=True)
    sched = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type="v_prediction")
    sched.save_pretrained(tmp_path / "m")
    with pytest.raises(ModelLoadError, match="part of a diffusers model directory"):
        load_model(tmp_path / "m" / "diffusion_pytorch_model.safetensors")
    loaded = load_model(tmp_path / "m")
    json.dumps(loaded.to_dict())
    assert [f.rsplit("/", 1)[1] for f, _ in loaded.files] == [
        "diffusion_pytorch_model.safetensors", "config.json", "scheduler_config.json"]
    den = make_denoiser(loaded, check=False, example_shape=(1, 8, 8))
    json.dumps(den.to_dict())
    assert (den.call_style, den.time_input, den.prediction, den.num_train_steps) == ("diffusers", "index", "v", 1000)
    assert den.sources["prediction"] == "diffusers config" and den.schedule.name == "linear"
    # independent check with diffusers' own alphas: at t = (n+1)/T the model sees index n
    # and eps = sqrt(abar_n) v + sqrt(1 - abar_n) x_t
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    n = torch.tensor([99, 499])
    label = torch.tensor([0, 2])
    abar = sched.alphas_cumprod[n].to(torch.float32)[:, None, None, None]
    with torch.no_grad():
        v = unet(x, n.to(torch.float32), class_labels=label).sample
        got = den.eps(x, (n + 1) / 1000.0, label)
    assert torch.allclose(got, abar.sqrt() * v + (1 - abar).sqrt() * x, atol=1e-5)


# --------------------------------------------------------------------------- sanity check
@pytest.fixture(scope="module")
def mnist_batch():
    from els_audit.data import load_dataset

    ds = load_dataset("mnist5k:size=32")
    idx = torch.randperm(ds.images.shape[0], generator=torch.Generator().manual_seed(0))[:16]
    return ds.images[idx]                                                      # (16, 1, 32, 32)


def test_sanity_check_passes_for_a_zoo_model(mnist_batch):
    den = make_denoiser(load_model("zoo:resnet-zeros"), check_images=mnist_batch)
    assert den.sanity.passed and den.sanity.ratio < 0.1
    assert {a[0] for a in den.sanity.alternatives} == {"prediction", "time_input", "data_range"}


@pytest.mark.parametrize(
    "wrong,fix",
    [
        ({"prediction": "x0"}, "--prediction=eps"),  # error far above predicting zero
        ({"prediction": "v"}, "--prediction=eps"),   # beats zero, but eps does far better
        ({"time_input": "index"}, "--time-input=unit"),
        ({"data_range": (0, 1)}, "--data-range=-1,1"),
    ],
)
def test_sanity_check_catches_a_wrong_setting_and_names_the_fix(mnist_batch, wrong, fix):
    loaded = load_model("zoo:resnet-zeros")
    with pytest.raises(ModelLoadError) as ei:
        make_denoiser(loaded, check_images=mnist_batch, **wrong)
    msg = str(ei.value)
    assert "\n" not in msg and loaded.path in msg and "sanity check failed" in msg and fix in msg


def test_sanity_check_rejects_useless_shape_and_nan_models(mnist_batch):
    zero = lambda m, x, t, label: torch.zeros_like(x)  # noqa: E731  (error = that of predicting zero)
    with pytest.raises(ModelLoadError, match=r"1\.00x that of predicting zero \(needs < 0\.8x\)"):
        make_denoiser(nn.Identity(), call_style=zero, check_images=mnist_batch)
    with pytest.raises(ModelLoadError, match=r"output shape \(16, 3, 32, 32\) differs from its input \(16, 1, 32, 32\)"):
        make_denoiser(WrongShape(), check_images=mnist_batch)
    with pytest.raises(ModelLoadError, match="non-finite") as ei:
        make_denoiser(NaNModel(), check_images=mnist_batch)
    assert "--data-range" in str(ei.value)
    with pytest.raises(ModelLoadError, match="non-finite"):
        make_denoiser(NaNModel())  # the check without data still catches it


def test_replace_and_repr():
    den = make_denoiser(XT(), check=False)
    d2 = den.replace(prediction="v")
    assert isinstance(d2, Denoiser) and d2.prediction == "v" and d2.sources["prediction"] == "argument"
    assert den.prediction == "eps"
    assert "x-t" in repr(den)
    with pytest.raises(ModelLoadError, match="v prediction with a sigma"):
        make_denoiser(XT(), prediction="v", time_input="sigma", check=False)
    with pytest.raises(ModelLoadError, match="disagrees"):
        make_denoiser(XT(), schedule="linear", num_train_steps=500, check=False)


def test_sanity_is_judged_in_the_models_own_output_space(mnist_batch):
    # a "v" model that outputs noise: in eps space (eps = a v + b x_t) it would beat zero at
    # about 0.5x, so the old check passed it; in v space it is no better than predicting 0
    torch.manual_seed(0)
    rand = lambda m, x, t, label: 0.1 * torch.randn_like(x)  # noqa: E731
    with pytest.raises(ModelLoadError, match=r"the v error is 1\.\d\dx that of predicting zero.*looks untrained"):
        make_denoiser(nn.Identity(), call_style=rand, prediction="v", check_images=mnist_batch)
    # an x0 model in [0, 1] is compared with the data mean (better than 0 there), not with 0
    mean = lambda m, x, t, label: torch.full_like(x, float(((mnist_batch + 1) / 2).mean()))  # noqa: E731
    with pytest.raises(ModelLoadError, match=r"the x0 error is 1\.00x that of predicting the data mean"):
        make_denoiser(nn.Identity(), call_style=mean, prediction="x0", data_range=(0, 1), check_images=mnist_batch)


def test_a_model_that_cannot_take_the_data_says_what_it_takes(mnist_batch):
    from els_audit.models.zoo import PaperResNet

    with pytest.raises(ModelLoadError, match="takes 3-channel images, but the data has 1 channel"):
        make_denoiser(PaperResNet(in_channels=3, width=8, n_layers=1).eval(), check_images=mnist_batch)


class NeedsLabel(nn.Module):
    """A class-conditional denoiser that cannot run without a label (a DiT's class embedder)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1)
        self.emb = nn.Embedding(10, 1)
        self.seen: list = []

    def forward(self, x, t, label):
        self.seen.append(label.clone())
        return self.conv(x) + self.emb(label)[:, :, None, None]


def test_a_model_that_needs_a_label_says_so(mnist_batch):
    with pytest.raises(ModelLoadError, match=r"needs a class label and none was given.*--conditional") as ei:
        make_denoiser(NeedsLabel(), call_style="x-t", check_images=mnist_batch)
    assert "\n" not in str(ei.value)


def test_the_sanity_check_passes_the_labels_it_is_given(mnist_batch):
    net = NeedsLabel()
    labels = torch.arange(16) % 10
    # random weights: the check runs (with the labels) and fails as untrained, not as a crash
    with pytest.raises(ModelLoadError, match="sanity check failed"):
        make_denoiser(net, call_style="x-t", check_images=mnist_batch, check_labels=labels)
    assert net.seen and all(torch.equal(s, labels) for s in net.seen)
