"""``--support`` end to end (tiny settings): the shaped and banded machines in an audit, their
windows in summary.json, arrays.npz and the report, and bad combinations refused."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from els_audit.audit import AuditConfig, AuditError, run_audit
from els_audit.machines.supports import erf_supports
from els_audit.report import render_html

jsonschema = pytest.importorskip("jsonschema")
SCHEMA = json.loads((Path(__file__).resolve().parents[2] / "els_audit" / "summary_schema.json").read_text())
TINY = dict(model="zoo:resnet-zeros", data="mnist5k:size=32:limit=100", data_limit=40, steps=4, seeds=2,
            calibration_seeds=2, threads=1)


@pytest.fixture(scope="module")
def runs():
    return {v: run_audit(AuditConfig(support=v, **TINY)) for v in ("erf-area", "border", "square")}


def test_the_shaped_window_is_the_erf_rule_at_the_fitted_scales(runs):
    r = runs["erf-area"]
    sup = erf_supports(r.erf.on_grid(4), "erf-area")
    for j, k in enumerate(r.scales):
        side, w = sup.window((j + 1) / 4, k)
        assert r.support.sides[j] == side and np.array_equal(r.support.weights[j], w.numpy())
        assert float(w.sum()) == k * k                       # the square's area, the ERF's shape
    # the machine the audit sampled IS that shaped machine: rebuilt here, same samples
    from els_audit.data import load_dataset
    from els_audit.machines import build_machine, scale_schedule_eps
    from els_audit.sampler import ddim_sample
    from els_audit.data import balanced_subset_indices
    full = load_dataset(TINY["data"])
    dic = full.images[balanced_subset_indices(full.labels, len(full), TINY["data_limit"], 0)]   # as the audit
    m = build_machine("bbELS", dic, supports=sup)
    x_T = torch.as_tensor(r.prediction.x_T)
    mac = ddim_sample(scale_schedule_eps(m, r.scales, 4), x_T, steps=4, schedule=m.schedule).x0
    assert np.allclose(mac.numpy(), r.prediction.machine_samples, atol=1e-4)
    d = r.to_dict()
    jsonschema.validate(d, SCHEMA)
    assert d["machine"]["support"]["kind"] == "erf-area" and d["machine"]["support"]["weight_sum"][0] > 0
    assert d["machine"]["support"]["kind"] == "erf-area" and d["prediction"]["machine"]["support"] == "erf-area"
    assert r.arrays()["support_weights"].shape == (4, max(r.support.sides), max(r.support.sides))
    assert "Machine support per step" in render_html(r) and "erf-area" in render_html(r)


def test_the_border_band_gets_its_own_calibrated_scale(runs):
    r = runs["border"]
    cal = r.calibration
    assert cal.band_scales is not None and len(cal.band_scales) == 4
    assert r.prediction.band_scales == cal.band_scales == r.support.band_sides
    for j in range(4):
        assert cal.band_scales[j] in cal.candidates
    d = r.to_dict()
    jsonschema.validate(d, SCHEMA)
    assert d["machine"]["support"]["band_sides"] == list(cal.band_scales)
    assert "border band k" in render_html(r)


def test_square_is_the_default_and_reports_its_windows(runs):
    r = runs["square"]
    assert r.support.kind == "square" and r.support.sides == r.scales
    assert all(float(w.sum()) == k * k for w, k in zip(r.support.weights, r.scales))
    assert r.calibration.band_scales is None and r.prediction.band_scales is None


@pytest.mark.parametrize("kw,msg", [
    (dict(support="round"), "--support must be one of"),
    (dict(support="border", scales="erf"), "--support border"),
    (dict(support="border", criterion="cosine"), "--support border"),
])
def test_bad_support_settings_are_refused(kw, msg):
    with pytest.raises(AuditError, match=msg):
        AuditConfig(**{**TINY, **kw})


def test_border_is_refused_for_a_machine_without_a_border():
    """resnet-circular is equivariant (ELS): there is no padding band to give a scale."""
    with pytest.raises(AuditError, match="--support border"):
        run_audit(AuditConfig(**{**TINY, "model": "zoo:resnet-circular", "support": "border"}))


def test_data_support_on_large_images_is_refused_before_any_work(tmp_path):
    import time
    big = tmp_path / "big.npz"
    np.savez(big, images=np.zeros((4, 3, 40, 40), dtype=np.float32))
    t0 = time.perf_counter()
    with pytest.raises(AuditError, match="up to 4096"):
        run_audit(AuditConfig(**{**TINY, "data": str(big), "support": "data", "data_limit": None}))
    assert time.perf_counter() - t0 < 30
