"""The HTML report: self-contained, escaped, every section present; opened in Chromium when installed."""

import base64
import html
import re
import shutil
import subprocess
from html.parser import HTMLParser

import pytest

from els_audit.audit import AuditConfig, run_audit
from els_audit.outputs import write_outputs
from els_audit.report import render_html
from els_audit.models.zoo.catalog import zoo_model_path

def _tags(page):
    """(tag, attrs) of every start tag, parsed as a browser would (text is not a tag)."""
    out = []

    class P(HTMLParser):
        def handle_starttag(self, tag, attrs):
            out.append((tag, attrs))

        handle_startendtag = handle_starttag

    P().feed(page)
    return out


HOSTILE = "<img src=x onerror=alert(1)>&\"'"


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory):
    """A zoo model copied under a hostile file name (its zoo config beside it names the architecture)."""
    d = tmp_path_factory.mktemp("hostile")
    src = zoo_model_path("resnet-zeros")
    p = d / f"{HOSTILE}.safetensors"
    shutil.copy(src, p)
    shutil.copy(src.with_name("config.json"), d / "config.json")
    cfg = AuditConfig(model=str(p), data="mnist5k:size=32:limit=40", data_limit=30, steps=2, seeds=2,
                      calibration_seeds=1, scales="erf", threads=1)
    return run_audit(cfg)


@pytest.fixture(scope="module")
def page(hostile_run):
    return render_html(hostile_run)


def test_hostile_names_are_escaped(hostile_run, page):
    assert HOSTILE in hostile_run.model["path"]
    assert HOSTILE not in page
    assert "<img src=x" not in page and "onerror=alert" not in page.replace(html.escape("onerror=alert"), "")
    assert html.escape(HOSTILE, quote=True) in page
    # the title carries the sanitised name, the config the escaped path
    assert "<title>els-audit: img_src_x_onerror_alert_1" in page


def test_self_contained(page):
    assert "<script" not in page.lower()
    tags = _tags(page)
    srcs = [v for _, a in tags for k, v in a if k == "src"]
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert not [v for _, a in tags for k, v in a if k in ("href", "action", "srcset", "poster", "data")]
    assert {t for t, _ in tags} <= {"html", "head", "meta", "title", "style", "body", "h1", "h2", "h3", "p", "b",
                                    "code", "span", "br", "table", "tr", "th", "td", "img", "div", "ul", "li"}
    assert not re.search(r"https?://", page.replace("https://json-schema.org", ""))
    assert "url(" not in page and "@import" not in page and "<link" not in page.lower()
    assert "default-src 'none'" in page          # a CSP that forbids any fetch
    # every inline image is a real PNG
    for s in srcs:
        raw = base64.b64decode(s.split(",", 1)[1])
        assert raw[:8] == b"\x89PNG\r\n\x1a\n"


def test_sections_and_numbers(hostile_run, page):
    for sec in ("verdict", "architecture", "erf", "equivariance", "scales", "gallery", "scatter", "novelty",
                "published", "settings"):
        assert f"<h2 id={sec}>" in page, sec
    p = hostile_run.prediction
    assert f"{p.median_r:.3f}" in page and f"{p.is_median_r:.3f}" in page
    # one gallery row per seed, each with its r
    for ps in p.per_seed:
        assert f'alt="seed {ps.seed}"' in page and f"{ps.r:.3f}" in page
    assert hostile_run.model["sha256"] in page
    assert "bbELS" in page and "Full fidelity" in page
    assert len(page.encode()) < 10 * 2**20


def test_render_only_reads(hostile_run):
    before = hostile_run.to_dict()
    render_html(hostile_run)
    assert hostile_run.to_dict() == before


@pytest.mark.skipif(shutil.which("chromium") is None, reason="headless Chromium (Debian's chromium) not installed")
def test_opens_in_headless_chromium(hostile_run, tmp_path):
    out = write_outputs(hostile_run, tmp_path / "rep")
    page = (out / "index.html").read_text()
    # NB: a copy of the page with a probe script (the CSP is widened for that script only)
    # writes how many images decoded into the title; --dump-dom prints the DOM after load.
    probe = ("<script>window.addEventListener('load',()=>{const i=[...document.images];"
             "document.title='IMAGES '+i.filter(x=>x.complete&&x.naturalWidth>0).length+'/'+i.length;});</script>")
    page = page.replace("default-src 'none';", "default-src 'none'; script-src 'unsafe-inline';", 1)
    probed = tmp_path / "probe.html"
    probed.write_text(page.replace("</body>", probe + "</body>"))
    res = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
                          "--v=0", "--virtual-time-budget=5000", "--dump-dom", probed.as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    m = re.search(r"<title>IMAGES (\d+)/(\d+)</title>", res.stdout)
    assert m, res.stdout[:500]
    assert int(m.group(1)) == int(m.group(2)) > 0
    console = [ln for ln in res.stderr.splitlines() if "CONSOLE" in ln or "Refused to" in ln]
    assert not console, console
