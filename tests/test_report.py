"""The HTML report: self-contained, escaped, every section present; opened in Chromium when installed."""

import base64
import html
import re
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
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
                                    "code", "span", "br", "table", "tr", "th", "td", "img", "div", "ul", "li",
                                    "details", "summary"}
    assert not re.search(r"https?://", page.replace("https://json-schema.org", ""))
    assert "url(" not in page and "@import" not in page and "<link" not in page.lower()
    assert "default-src 'none'" in page          # a CSP that forbids any fetch
    # every inline image is a real PNG
    for s in srcs:
        raw = base64.b64decode(s.split(",", 1)[1])
        assert raw[:8] == b"\x89PNG\r\n\x1a\n"


def test_sections_and_numbers(hostile_run, page):
    for sec in ("glance", "verdict", "architecture", "erf", "equivariance", "scales", "gallery", "scatter", "novelty",
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


def test_the_first_screen_answers_the_four_questions(hostile_run, page):
    first = page[page.index("<h2 id=glance>"):page.index("<h2 id=verdict>")]
    for q in ("How local is it?", "What breaks equivariance?", "How much does locality explain?",
              "Does it copy its training data?"):
        assert q in first
    p = hostile_run.prediction
    assert f"r = {p.median_r:.2f}" in first and f"{p.is_median_r:.2f}" in first
    assert f"patch {int(np.median(hostile_run.scales))} px" in first
    assert html.escape(hostile_run.to_dict()["structure"]["verdict_line"]) in first
    assert first.count("<img ") == 1                                   # one figure
    status = {c.name: c.status for c in hostile_run.checks}            # cards coloured as the checks say
    assert f'<div class="card {status["memorization"]}"><div class=q>Does it copy' in first
    assert f'<div class="card {status["machine_beats_memorization"]}"><div class=q>How much' in first


def test_breakers_are_grouped_with_counts_and_amounts_in_words():
    from els_audit.report_glance import amount_in_words, breaker_groups

    conv = "zeros padding of conv k3"
    br = [{"kind": "boundary", "cause": conv, "node": f"c{i}", "module_path": f"net.c{i}",
           "amount": {"band_width": w, "spreads_globally": w > 4}} for i, w in enumerate((1, 3, 5, 16))]
    br += [{"kind": "global-op", "cause": "GroupNorm(8) statistics over H,W", "node": "n", "module_path": "net.n",
            "amount": {"scope": "whole image", "axes": ["H", "W"]}}]
    br += [{"kind": "stride", "cause": "downsampling", "node": "d", "module_path": "net.d", "amount": {"period": 2}}]
    g = breaker_groups(br)
    assert [(x["kind"], x["count"]) for x in g] == [("boundary", 4), ("global-op", 1), ("stride", 1)]
    assert g[0]["nodes"] == ["net.c0", "net.c1", "net.c2", "net.c3"]
    assert g[0]["amount"] == "pixels within 1 to 16 px of the border; through a later global op every pixel (2 of 4)"
    assert g[1]["amount"] == "whole image (over H, W)"
    assert g[2]["amount"] == "equivariant only to shifts by multiples of 2 px"
    assert amount_in_words([None, "x"]) == "no measured amount"


def test_the_calibration_heat_map_is_scaled_per_step():
    from els_audit.report import _per_step_scaled

    v = np.array([[1e-4, 2e-4, 3e-4], [10.0, 5.0, np.nan], [7.0, 7.0, 7.0]])
    got = _per_step_scaled(v, lower_is_better=True)
    assert np.allclose(got[0], [0, 0.5, 1]) and np.allclose(got[1][:2], [1, 0]) and np.isnan(got[1][2])
    assert np.allclose(got[2], 0)
    assert np.allclose(_per_step_scaled(v, lower_is_better=False)[0], [1, 0.5, 0])


def _layout_in_chromium(report, width, workdir, screenshot):
    """(scrollWidth, clientWidth, console lines) of the report shown ``width`` px wide.

    Headless Chromium's window is at least 500 px wide, so the page is shown in an iframe of
    exactly ``width`` px; a probe script (the CSP widened for it, in a copy) posts the
    page's widths to the frame, which writes them into its title for --dump-dom."""
    page = report.read_text()
    probe = ("<script>window.addEventListener('load',()=>{const d=document.documentElement;"
             "parent.postMessage('WIDTHS '+d.scrollWidth+' '+d.clientWidth,'*');});</script>")
    page = page.replace("default-src 'none';", "default-src 'none'; script-src 'unsafe-inline';", 1)
    (workdir / "page.html").write_text(page.replace("</body>", probe + "</body>"))
    frame = workdir / "frame.html"
    frame.write_text(f"<!DOCTYPE html><html><body style='margin:0'><iframe src='page.html' "
                     f"style='width:{width}px;height:2400px;border:0'></iframe><script>addEventListener('message',"
                     f"e=>{{document.title=e.data}})</script></body></html>")
    args = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--enable-logging=stderr",
            "--v=0", "--no-first-run", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--virtual-time-budget=8000", f"--window-size={max(width, 500)},2400"]
    res = subprocess.run(args + ["--dump-dom", frame.as_uri()], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    m = re.search(r"<title>WIDTHS (\d+) (\d+)</title>", res.stdout)
    assert m, res.stdout[:500]
    shot = subprocess.run(args + [f"--screenshot={screenshot}", frame.as_uri()], capture_output=True, timeout=120)
    assert shot.returncode == 0 and screenshot.stat().st_size > 10_000
    console = [ln for ln in res.stderr.splitlines() if "CONSOLE" in ln or "Refused to" in ln]
    return int(m.group(1)), int(m.group(2)), console


@pytest.mark.skipif(shutil.which("chromium") is None, reason="headless Chromium (Debian's chromium) not installed")
@pytest.mark.parametrize("width", [1280, 390])
def test_no_sideways_scrolling_at_1280_and_390_px(hostile_run, tmp_path, width):
    out = write_outputs(hostile_run, tmp_path / "rep")
    scroll, client, console = _layout_in_chromium(out / "index.html", width, tmp_path, tmp_path / f"{width}.png")
    assert client == width and scroll <= client, (scroll, client)
    assert not console, console


@pytest.mark.skipif(shutil.which("chromium") is None, reason="headless Chromium (Debian's chromium) not installed")
def test_the_width_probe_sees_an_overflowing_page(hostile_run, tmp_path):
    out = write_outputs(hostile_run, tmp_path / "rep")
    wide = tmp_path / "wide.html"
    wide.write_text((out / "index.html").read_text().replace("</body>", "<div style='width:900px'>x</div></body>"))
    scroll, client, _ = _layout_in_chromium(wide, 390, tmp_path, tmp_path / "wide.png")
    assert client == 390 and scroll > 800


def test_the_graph_drawing_collapses_chains_and_keeps_skips():
    import networkx as nx

    from els_audit.report_graph import collapse_chains, layered_positions

    # in -> a1 -> a2 -> a3 -> split -> {b1 -> b2, c} -> cat -> out, and a skip in -> cat
    g = nx.DiGraph([("in", "a1"), ("a1", "a2"), ("a2", "a3"), ("a3", "split"), ("split", "b1"), ("b1", "b2"),
                    ("b2", "cat"), ("split", "c"), ("c", "cat"), ("cat", "out"), ("in", "cat")])
    blocks, members = collapse_chains(g)
    chains = sorted(members.values())
    assert ["a1", "a2", "a3", "split"] in chains and ["b1", "b2"] in chains and ["cat", "out"] in chains
    assert sorted(len(m) for m in chains) == [1, 1, 2, 2, 4] and sum(len(m) for m in chains) == g.number_of_nodes()
    assert nx.is_directed_acyclic_graph(blocks) and blocks.number_of_nodes() == 5
    pos = layered_positions(blocks)
    assert pos["in"][0] == 0 and pos["a1"][0] == 1 and pos["b1"][0] == pos["c"][0] == 2 and pos["cat"][0] == 3
    assert pos["b1"][1] != pos["c"][1]                                   # parallel blocks side by side
    assert blocks.has_edge("in", "cat") and pos["cat"][0] - pos["in"][0] == 3   # the skip spans layers
