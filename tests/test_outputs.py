"""The report folder: written atomically, never over what is not a previous report."""

import json

import numpy as np
import pytest

from els_audit.audit import AuditConfig, AuditError, run_audit
from els_audit.outputs import MARKER, write_outputs


@pytest.fixture(scope="module")
def runs():
    cfg = AuditConfig(model="zoo:resnet-circular", data="mnist5k:size=32:limit=60", data_limit=30, steps=2, seeds=3,
                      calibration_seeds=1, scales="erf", threads=1)
    return {"resnet-circular": run_audit(cfg)}


def test_write_outputs_atomic(runs, tmp_path, monkeypatch):
    r = runs["resnet-circular"]
    out = tmp_path / "rep"
    write_outputs(r, out, html=False)
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "arrays.npz", "summary.json"]
    assert json.loads((out / "summary.json").read_text())["machine"]["kind"] == "ELS"
    assert np.load(out / "arrays.npz")["network"].shape == (3, 1, 32, 32)
    # a failure while writing leaves the previous report as it was and no temp folder
    import els_audit.report as report

    def boom(_):
        raise RuntimeError("disk full")

    monkeypatch.setattr(report, "render_html", boom)
    with pytest.raises(RuntimeError):
        write_outputs(r, out, html=True)
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "arrays.npz", "summary.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rep"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(AuditError, match="not a folder"):
        write_outputs(r, tmp_path / "file")
    # a folder holding anything but a previous report is never replaced (think --out .)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(AuditError, match="was not written by els-audit"):
        write_outputs(r, tmp_path / "mine")
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"
    write_outputs(r, out, html=False)                     # a previous report is replaced
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "arrays.npz", "summary.json"]
