"""Tests for els_audit.data: spec grammar, common options, the plugin protocol, mnist5k.

Ground truth: the real mnist5k file parsed independently with ``csv`` (no numpy), hand
arithmetic in comments, and hashlib for the folder hash.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from els_audit.data import (
    COMMON_OPTIONS,
    DATASETS,
    Dataset,
    DatasetPlugin,
    DataSpecError,
    balanced_subset_indices,
    get_plugin,
    load_dataset,
    parse_spec,
    tree_sha256,
)


# ---------------------------------------------------------------------------------------
# spec grammar
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, source, options",
    [
        ("mnist5k", "mnist5k", ()),
        ("  mnist5k  ", "mnist5k", ()),
        ("mnist5k:size=32:limit=100", "mnist5k", (("size", "32"), ("limit", "100"))),
        ("data/train.npz:label=3", "data/train.npz", (("label", "3"),)),
        # Windows drive letter: no '=' after the first ':', so it stays in the source.
        ("C:\\data\\x.npz:limit=5", "C:\\data\\x.npz", (("limit", "5"),)),
        ("C:\\data\\x.npz", "C:\\data\\x.npz", ()),
        # A value with a path separator is not an option: the whole text is the path.
        ("dir:x=y/f.npz", "dir:x=y/f.npz", ()),
        ("dir:x=y/f.npz:seed=2:limit=4", "dir:x=y/f.npz", (("seed", "2"), ("limit", "4"))),
    ],
)
def test_parse_spec(text, source, options):
    spec = parse_spec(text)
    assert spec.source == source
    assert spec.options == options
    assert spec.text == text.strip()


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("", "empty data spec"),
        ("   ", "empty data spec"),
        (":limit=3", "no source"),
        ("mnist5k:limit=3:limit=4", "limit= twice"),
        ("mnist5k:limit=", "has no value"),
    ],
)
def test_parse_spec_errors(text, fragment):
    with pytest.raises(DataSpecError, match=fragment):
        parse_spec(text)


def test_parse_spec_rejects_non_string():
    with pytest.raises(DataSpecError, match="must be a string"):
        parse_spec(None)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------
# option and resolution errors (all one line, DataSpecError is a ValueError)
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("mnist5k:colour=red", "unknown option colour=; known options for 'mnist5k': limit, seed, label, size, format"),
        ("mnist5k:limit=0", "limit=0 must be >= 1"),
        ("mnist5k:limit=ten", "limit='ten' is not an integer"),
        ("mnist5k:seed=3", "seed= only chooses the limit= subset"),
        ("mnist5k:seed=-1:limit=3", "seed=-1 must be >= 0"),
        ("mnist5k:size=30", "size=30 is not offered; use size=28"),
        ("mnist5k:label=11", "no image with label 11; labels present: 0, 1, 2"),
        ("mnist5k:label=-1", "label=-1 must be >= 0"),
        ("mnist5k:label=cat", "label='cat' is neither an integer label nor a class name; class names: 0, 1"),
        ("no/such/file.npz", "neither a named data set (mnist5k) nor an existing file or folder"),
        ("mnist5k:limit", "options are written :key=value"),
        ("npz", "'npz' is a file format, not a data set; give a path"),
        ("mnist5k:format=zip", "format=zip is not a data set plugin; known: cifar-batches, idx, image-folder, mnist5k, npz"),
    ],
)
def test_spec_errors(spec, fragment):
    with pytest.raises(DataSpecError) as info:
        load_dataset(spec)
    msg = str(info.value)
    assert fragment in msg
    assert "\n" not in msg
    assert isinstance(info.value, ValueError)


def test_format_option_needs_a_format_plugin(tmp_path):
    f = tmp_path / "x.npz"
    np.savez(f, images=np.zeros((1, 2, 2), np.uint8))
    with pytest.raises(DataSpecError, match="'mnist5k' is a named data set, not a file format"):
        load_dataset(f"{f}:format=mnist5k")


def test_unrecognised_path(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("hello")
    with pytest.raises(DataSpecError, match="no data set plugin recognises this file .*add :format=NAME"):
        load_dataset(str(f))


# ---------------------------------------------------------------------------------------
# mnist5k against an independent parse of the real file
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mnist_truth():
    """(pixels int (5000, 784), labels int (5000,)) read with csv, no numpy parsing."""
    from els_audit_plugins.datasets import _mnist5k_path

    with gzip.open(_mnist5k_path(), "rt") as fh:
        rows = [list(map(int, r)) for r in csv.reader(fh)]
    arr = np.array(rows, dtype=np.int64)                                           # (5000, 785)
    return arr[:, :784], arr[:, 784]


@pytest.fixture(scope="module")
def mnist():
    return load_dataset("mnist5k")


def test_mnist5k_full(mnist, mnist_truth):
    pix, lab = mnist_truth
    assert mnist.shape == (5000, 1, 28, 28)
    assert mnist.images.dtype == torch.float32 and mnist.labels.dtype == torch.int64
    # The real file: label is the LAST column, 500 per digit, sorted by label.
    assert np.bincount(lab).tolist() == [500] * 10
    assert torch.equal(mnist.labels, torch.from_numpy(lab))
    assert mnist.label_counts() == {d: 500 for d in range(10)}
    # x -> (2x - 255) / 255: 0 -> -1, 255 -> +1 exactly; compare every pixel with float64.
    want = torch.from_numpy((2.0 * pix - 255.0) / 255.0).reshape(5000, 1, 28, 28)
    assert torch.allclose(mnist.images.double(), want, rtol=0, atol=6e-8)
    assert mnist.images.min().item() == -1.0 and mnist.images.max().item() == 1.0
    assert mnist.class_names == tuple("0123456789")
    assert mnist.value_range == "uint8 [0, 255]"
    assert mnist.sha256 == hashlib.sha256(Path(mnist.source).read_bytes()).hexdigest()


def test_mnist5k_exact_values(mnist, mnist_truth):
    pix, _ = mnist_truth
    flat = mnist.images.reshape(5000, 784)
    # Hand values: 51 -> (102 - 255)/255 = -0.6 ; 128 -> 1/255 ; 0 -> -1 ; 255 -> 1.
    for v, expect in [(0, -1.0), (255, 1.0), (51, -0.6), (128, 1.0 / 255.0)]:
        i, j = np.argwhere(pix == v)[0]
        assert flat[i, j].item() == np.float32(expect)


def test_mnist5k_cached_but_not_shared(mnist):
    again = load_dataset("mnist5k")
    assert again.images is not mnist.images
    again.images[0, 0, 0, 0] = 0.5
    third = load_dataset("mnist5k")
    assert third.images[0, 0, 0, 0].item() == mnist.images[0, 0, 0, 0].item()


def test_mnist5k_load_time():
    from els_audit_plugins.datasets import _mnist5k_arrays

    _mnist5k_arrays.cache_clear()
    t0 = time.perf_counter()
    load_dataset("mnist5k")
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    load_dataset("mnist5k:size=32")
    warm = time.perf_counter() - t0
    assert cold < 2.0, cold
    assert warm < 1.0, warm


def test_mnist5k_size32_padding(mnist):
    ds = load_dataset("mnist5k:size=32")
    assert ds.shape == (5000, 1, 32, 32)
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert torch.all(ds.images[:, :, border] == -1.0)
    assert torch.equal(ds.images[:, :, 2:30, 2:30], mnist.images)
    assert torch.equal(load_dataset("mnist5k:size=28").images, mnist.images)


def test_mnist5k_limit_balanced_and_seeded(mnist):
    a = load_dataset("mnist5k:limit=100")
    assert a.label_counts() == {d: 10 for d in range(10)}
    # rows come from the right images, and are not the first 100 rows (all zeros)
    assert torch.equal(a.images, mnist.images[a.index])
    assert torch.equal(a.labels, mnist.labels[a.index])
    assert len(set(a.index.tolist())) == 100
    assert not torch.equal(a.index, torch.arange(100))
    # determinism, and the explicit default seed is the same subset
    assert torch.equal(a.index, load_dataset("mnist5k:limit=100").index)
    assert torch.equal(a.index, load_dataset("mnist5k:limit=100:seed=0").index)
    b = load_dataset("mnist5k:limit=100:seed=1")
    assert b.label_counts() == {d: 10 for d in range(10)}
    assert not torch.equal(a.index, b.index)
    assert a.spec == "mnist5k:limit=100"


def test_mnist5k_limit_not_a_multiple():
    # 105 = 10 * 10 + 5: every digit gets 10, five digits drawn at random get one more.
    ds = load_dataset("mnist5k:limit=105:seed=4")
    counts = ds.label_counts()
    assert sum(counts.values()) == 105
    assert sorted(counts.values()) == [10] * 5 + [11] * 5
    # 5 < 10 classes: five different digits, one image each
    small = load_dataset("mnist5k:limit=5")
    assert sorted(small.label_counts().values()) == [1] * 5
    others = [set(load_dataset(f"mnist5k:limit=5:seed={s}").label_counts()) for s in range(1, 6)]
    assert any(o != set(small.label_counts()) for o in others)  # the extra classes vary with the seed


def test_mnist5k_limit_above_size_keeps_all(mnist):
    ds = load_dataset("mnist5k:limit=9999")
    assert len(ds) == 5000
    assert any("all kept" in n for n in ds.notes)


def test_mnist5k_label_and_limit(mnist):
    three = load_dataset("mnist5k:label=3")
    assert len(three) == 500 and torch.all(three.labels == 3)
    assert torch.equal(three.images, mnist.images[1500:2000])  # file sorted: digit 3 is rows 1500..1999
    few = load_dataset("mnist5k:label=3:limit=7:size=32")
    assert few.shape == (7, 1, 32, 32) and torch.all(few.labels == 3)
    assert torch.all((few.index >= 1500) & (few.index < 2000))
    assert torch.equal(few.images[:, :, 2:30, 2:30], mnist.images[few.index])


def test_subset_method(mnist):
    s = mnist.subset(7)
    assert len(s) == 500 and torch.all(s.labels == 7)
    assert s.spec == "mnist5k:label=7"
    assert torch.equal(s.index, torch.arange(3500, 4000))
    with pytest.raises(DataSpecError, match="no image with label 12"):
        mnist.subset(12)


def test_to_dict_json_safe(mnist):
    d = load_dataset("mnist5k:limit=20:size=32").to_dict()
    json.dumps(d)
    assert (d["N"], d["C"], d["H"], d["W"]) == (20, 1, 32, 32)
    assert d["label_counts"] == {str(k): 2 for k in range(10)}
    assert d["name"] == "mnist5k" and d["spec"] == "mnist5k:limit=20:size=32"
    assert d["sha256"] == mnist.sha256 and len(d["sha256"]) == 64
    assert d["class_names"] == list("0123456789")
    assert set(d) >= {"name", "spec", "source", "sha256", "N", "C", "H", "W", "label_counts", "class_names"}


# ---------------------------------------------------------------------------------------
# balanced_subset_indices by hand
# ---------------------------------------------------------------------------------------
def test_balanced_subset_shortfall_redistributed():
    # counts: class 0 -> 3, class 1 -> 10, class 2 -> 10; limit 12
    # round 1: 12 // 3 = 4 each; class 0 gives only 3 -> 3 + 4 + 4 = 11, 1 left
    # round 2: 1 // 2 = 0, so one of classes 1, 2 (seeded) gets 1 more -> {3, 4, 5} or {3, 5, 4}
    labels = torch.tensor([0] * 3 + [1] * 10 + [2] * 10)
    for seed in range(6):
        rows = balanced_subset_indices(labels, 23, 12, seed)
        assert rows.numel() == 12 and torch.equal(rows, rows.unique())
        c = torch.bincount(labels[rows], minlength=3).tolist()
        assert c[0] == 3 and sorted(c[1:]) == [4, 5]


def test_balanced_subset_unlabelled_uniform():
    rows = balanced_subset_indices(None, 50, 7, seed=3)
    assert rows.numel() == 7 and torch.equal(rows, rows.unique())
    assert torch.equal(rows, balanced_subset_indices(None, 50, 7, seed=3))
    assert not torch.equal(rows, balanced_subset_indices(None, 50, 7, seed=4))
    assert torch.equal(balanced_subset_indices(None, 5, 9, seed=0), torch.arange(5))


# ---------------------------------------------------------------------------------------
# Dataset validation
# ---------------------------------------------------------------------------------------
def _ds(**kw):
    base = dict(images=torch.zeros(2, 1, 3, 3), labels=torch.tensor([0, 1]), name="t", spec="t", source="t")
    base.update(kw)
    return Dataset(**base)


@pytest.mark.parametrize(
    "kw, fragment",
    [
        (dict(images=torch.zeros(2, 1, 3, 3, dtype=torch.float64)), "float32 tensor"),
        (dict(images=torch.zeros(2, 3, 3)), "float32 tensor"),
        (dict(images=torch.full((2, 1, 3, 3), 1.5)), r"must lie in \[-1, 1\]"),
        (dict(images=torch.full((2, 1, 3, 3), float("nan"))), r"must lie in \[-1, 1\]"),
        (dict(labels=torch.tensor([0, 1, 2])), r"shape \(2,\)"),
        (dict(labels=torch.tensor([0.0, 1.0])), "int64"),
        (dict(labels=torch.tensor([0, -1])), ">= 0"),
        (dict(class_names=("a",)), "label 1 has no class name"),
    ],
)
def test_dataset_validation(kw, fragment):
    with pytest.raises(DataSpecError, match=fragment):
        _ds(**kw)


def test_subset_unlabelled_refused():
    with pytest.raises(DataSpecError, match="has no labels"):
        _ds(labels=None).subset(0)


# ---------------------------------------------------------------------------------------
# the plugin protocol, with a third-party plugin registered in code
# ---------------------------------------------------------------------------------------
class ToyText(DatasetPlugin):
    """'.toy' text files: one line per image, H*W integers 0..9, H = W = 2; option scale."""

    name = "toy"
    summary = "test plugin"
    options = {"scale": "divide values by this (default 9)"}

    def sniff(self, path):
        return path.is_file() and path.suffix == ".toy"

    def load(self, path, options):
        scale = float(options.get("scale", "9"))
        vals = np.array([[int(v) for v in line.split()] for line in path.read_text().splitlines()], np.float64)
        imgs = torch.from_numpy(vals / scale * 2 - 1).float().reshape(-1, 1, 2, 2)
        return Dataset(images=imgs, labels=None, name=path.stem, spec="", source=str(path), value_range=f"[0, {scale:g}]")


class GreedyToy(ToyText):
    name = "greedy"

    def sniff(self, path):
        return path.suffix in (".toy", ".npz")


class BrokenSniff(DatasetPlugin):
    name = "broken"

    def sniff(self, path):
        raise RuntimeError("boom")


@pytest.fixture
def toy_registry():
    names = []

    def add(name, plugin):
        DATASETS.register(name)(plugin)
        names.append(name)

    yield add
    for n in names:
        DATASETS.unregister(n)


def test_third_party_plugin(tmp_path, toy_registry):
    toy_registry("toy", ToyText)
    f = tmp_path / "a.toy"
    f.write_text("0 9 9 0\n9 9 9 9\n0 0 0 0\n")
    ds = load_dataset(str(f))
    # 0 -> -1, 9 -> +1 with scale 9
    assert torch.equal(ds.images[0, 0], torch.tensor([[-1.0, 1.0], [1.0, -1.0]]))
    assert ds.spec == str(f) and ds.labels is None
    # its own option is known, and scale=18 maps 9 -> 9/18*2-1 = 0
    half = load_dataset(f"{f}:scale=18")
    assert torch.equal(half.images[1, 0], torch.zeros(2, 2))
    # unlabelled limit: seeded uniform
    lim = load_dataset(f"{f}:limit=2:seed=5")
    assert len(lim) == 2 and torch.equal(lim.images, ds.images[lim.index])
    assert "uniform" in lim.notes[-1]
    with pytest.raises(DataSpecError, match="unknown option gamma=; known options for 'toy': limit, seed, label, size, format, scale"):
        load_dataset(f"{f}:gamma=2")
    with pytest.raises(DataSpecError, match="size=3 is not available: this source is 2x2"):
        load_dataset(f"{f}:size=3")
    assert len(load_dataset(f"{f}:size=2")) == 3
    with pytest.raises(DataSpecError, match="has no labels"):
        load_dataset(f"{f}:label=0")


def test_ambiguous_claim_and_format_override(tmp_path, toy_registry):
    toy_registry("toy", ToyText)
    toy_registry("greedy", GreedyToy)
    f = tmp_path / "a.toy"
    f.write_text("0 9 9 0\n")
    with pytest.raises(DataSpecError, match=r"claimed by several data set plugins \(greedy, toy\); add :format=NAME"):
        load_dataset(str(f))
    assert len(load_dataset(f"{f}:format=toy")) == 1
    n = tmp_path / "b.npz"
    np.savez(n, images=np.zeros((1, 2, 2), np.uint8))
    with pytest.raises(DataSpecError, match=r"\(greedy, npz\)"):
        load_dataset(str(n))
    assert load_dataset(f"{n}:format=npz").shape == (1, 1, 2, 2)


def test_broken_plugin_names_itself(tmp_path, toy_registry):
    toy_registry("broken", BrokenSniff)
    f = tmp_path / "a.npz"
    np.savez(f, images=np.zeros((1, 2, 2), np.uint8))
    with pytest.raises(DataSpecError, match="plugin 'broken' failed while sniffing .*boom"):
        load_dataset(str(f))


def test_registry_refuses_duplicates(toy_registry):
    toy_registry("toy", ToyText)
    with pytest.raises(ValueError, match="registered twice"):
        DATASETS.register("toy")(GreedyToy)


def test_first_party_plugins_registered_by_entry_point():
    from els_audit_plugins import datasets as fp

    expected = {
        "mnist5k": fp.MNIST5k,
        "npz": fp.NpzDataset,
        "image-folder": fp.ImageFolderDataset,
        "idx": fp.IdxDataset,
        "cifar-batches": fp.CifarBatchesDataset,
    }
    for name, cls in expected.items():
        assert DATASETS.get(name) is cls
        assert DATASETS.origin(name) == f"els_audit_plugins.datasets:{cls.__name__}"
        plugin = get_plugin(name)
        assert isinstance(plugin, DatasetPlugin) and plugin.name == name and plugin.summary
        assert plugin.needs_path == (name != "mnist5k")
        assert not set(plugin.options) & set(COMMON_OPTIONS)


# ---------------------------------------------------------------------------------------
# folder hash
# ---------------------------------------------------------------------------------------
def test_tree_sha256_by_hand(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "a.txt").write_bytes(b"xy")
    (tmp_path / "b" / "c.bin").write_bytes(b"\x00\x01\x02")
    h = hashlib.sha256()
    for rel, data in [("a.txt", b"xy"), ("b/c.bin", b"\x00\x01\x02")]:  # sorted order
        h.update(struct.pack(">Q", len(rel)) + rel.encode() + struct.pack(">Q", len(data)) + data)
    assert tree_sha256(tmp_path, ["b/c.bin", "a.txt"]) == h.hexdigest()
    # moving bytes between the name and the content changes the hash (length framing)
    (tmp_path / "b" / "c.bin").write_bytes(b"\x00\x01\x03")
    assert tree_sha256(tmp_path, ["a.txt", "b/c.bin"]) != h.hexdigest()
