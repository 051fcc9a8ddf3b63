"""The published numbers against docs/theory.md (sections 3 and 4) and the closest-setting lookup."""

import json
import re
from pathlib import Path

import pytest

from els_audit.published import (PUBLISHED_R, PUBLISHED_SCALES, R_PROTOCOL, closest_published, normalize_arch,
                                 normalize_dataset, normalize_padding)

ROOT = Path(__file__).resolve().parents[1]
THEORY = ROOT / "docs" / "theory.md"          # the repository's own restatement


def r_row(dataset, arch, padding, cond):
    (row,) = [r for r in PUBLISHED_R if (r.dataset, r.arch, r.padding, r.conditional) == (dataset, arch, padding, cond)]
    return row


def scales_row(dataset, arch, padding, cond):
    (row,) = [s for s in PUBLISHED_SCALES
              if (s.dataset, s.arch, s.padding, s.conditional) == (dataset, arch, padding, cond)]
    return row


def test_spot_values_from_the_text():
    # docs/theory.md section 4: "| MNIST | ResNet | zeros | .94 | .82 | .61 |"
    r = r_row("MNIST", "ResNet", "zeros", False)
    assert (r.els, r.ls, r.is_) == (0.94, 0.82, 0.61)
    r = r_row("CIFAR10", "UNet+attention", "zeros", True)
    assert (r.els, r.ls, r.is_) == (0.77, 0.77, 0.48)
    r = r_row("MNIST", "ResNet", "circular", False)
    assert (r.els, r.ls, r.is_) == (0.77, 0.36, 0.15)
    # "e.g. CIFAR10 UNet .82, CelebA UNet .75" with 20-step networks
    assert r_row("CIFAR10", "UNet", "zeros", True).els_net20 == 0.82
    assert r_row("CelebA", "UNet", "zeros", False).els_net20 == 0.75
    assert R_PROTOCOL["network_steps"] == 150 and R_PROTOCOL["machine_steps"] == 20
    # section 3: "| MNIST ResNet circular | 3 3 5 5 5 7 7 9 9 9 11 11 11 11 9 9 7 7 3 3 |"
    assert scales_row("MNIST", "ResNet", "circular", False).scales == \
        (3, 3, 5, 5, 5, 7, 7, 9, 9, 9, 11, 11, 11, 11, 9, 9, 7, 7, 3, 3)
    assert scales_row("CelebA", "UNet", "zeros", False).scales[-1] == 27


def test_table_shapes():
    assert len(PUBLISHED_SCALES) == 10 and len(PUBLISHED_R) == 11
    for s in PUBLISHED_SCALES:
        assert len(s.scales) == 20 and all(k % 2 == 1 and k >= 3 for k in s.scales)
    for r in PUBLISHED_R:
        assert all(0 < v < 1 for v in (r.els, r.ls, r.is_))


def test_tables_match_theory_md_text():
    text = THEORY.read_text()
    # section 3 rows: "| CIFAR10 ResNet circular cond. | 3 3 3 ... |"
    got_scales = {}
    for name, nums in re.findall(r"^\| ([A-Za-z0-9 .]+?) \| ((?:\d+ ){19}\d+) \|$", text, re.M):
        got_scales[name.strip()] = tuple(int(v) for v in nums.split())
    assert len(got_scales) == len(PUBLISHED_SCALES)
    for s in PUBLISHED_SCALES:
        name = f"{s.dataset} {s.arch} {s.padding}" + (" cond." if s.conditional else "")
        assert got_scales[name] == s.scales, name
    # section 4 rows: "| MNIST | ResNet | zeros | .94 | .82 | .61 |"
    rows = re.findall(r"^\| (\w+) \| ([\w +-]+?) \| ([\w ,.]+?) \| (\.\d+) \| (\.\d+) \| (\.\d+) \|$", text, re.M)
    assert len(rows) == len(PUBLISHED_R)
    arch_names = {"ResNet": "ResNet", "UNet": "UNet", "UNet + self-attention": "UNet+attention"}
    for ds, arch, pad, els, ls, is_ in rows:
        r = r_row(ds, arch_names[arch], pad.split(",")[0], "cond." in pad)
        assert (r.els, r.ls, r.is_) == (float(els), float(ls), float(is_))


def test_closest_exact_match():
    m = closest_published("mnist5k:size=32:limit=200", "resnet", "zeros", False)
    assert m.exact and m.r_differs == () and (m.r.els, m.r.ls, m.r.is_) == (0.94, 0.82, 0.61)
    assert m.scales.scales == scales_row("MNIST", "ResNet", "zeros", False).scales
    json.dumps(m.to_dict())


def test_closest_unknown_dataset_matches_on_architecture_first():
    # arch (8) + padding (4) + cond (1) = 13 beats any row matching fewer of them
    m = closest_published("my_faces", "ResNet", "circular", True)
    assert (m.r.dataset, m.r.arch, m.r.padding, m.r.conditional) == ("CIFAR10", "ResNet", "circular", True)
    assert m.r_differs == ("dataset",) and not m.exact


def test_closest_no_published_row_for_the_padding():
    # no circular UNet was published: MNIST UNet zeros scores arch 8 + dataset 2 + cond 1 = 11
    m = closest_published("MNIST", "UNet", "circular", False)
    assert (m.r.dataset, m.r.arch, m.r.padding) == ("MNIST", "UNet", "zeros") and m.r_differs == ("padding",)


def test_closest_attention_and_its_scales():
    m = closest_published("cifar-10", "UNet + self-attention", "zeros", True)
    assert m.r.arch == "UNet+attention" and m.exact
    # no attention row among the scales: the UNet (half the arch weight, 4 + 4 + 2 + 1 = 11)
    # beats the CIFAR10 ResNet zeros cond. row (4 + 2 + 1 = 7)
    assert (m.scales.dataset, m.scales.arch, m.scales.padding) == ("CIFAR10", "UNet", "zeros")
    assert m.scales_differs == ("arch",)


def test_unknown_everything_falls_back_to_the_first_row():
    m = closest_published(None, None, None, None)
    assert m.r is PUBLISHED_R[0] and set(m.r_differs) == {"dataset", "arch", "padding", "conditional"}


def test_normalisation_and_errors():
    assert normalize_dataset("Fashion-MNIST") == "FashionMNIST" and normalize_dataset("celeba") == "CelebA"
    assert normalize_dataset("imagenet") is None
    assert normalize_arch("UNET") == "UNet" and normalize_padding("periodic") == "circular"
    with pytest.raises(ValueError, match="unknown architecture"):
        closest_published("MNIST", "transformer-xl", "zeros", False)
    with pytest.raises(ValueError, match="unknown padding"):
        closest_published("MNIST", "ResNet", "reflect", False)
    with pytest.raises(ValueError, match="conditional"):
        closest_published("MNIST", "ResNet", "zeros", "yes")
