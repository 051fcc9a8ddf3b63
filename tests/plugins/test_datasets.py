"""Tests for the first-party format plugins: npz, image folders, idx, CIFAR batches.

Every format round-trips a tiny seeded array written into tmp_path by hand (idx with
struct, CIFAR batches as pickles of dicts, image folders with Pillow, PNG for exact
values).  Expected pixels are (2v - 255) / 255 computed in float64.
"""

from __future__ import annotations

import builtins
import gzip
import hashlib
import os
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from els_audit.data import DataSpecError, load_dataset, tree_sha256
from els_audit_plugins.datasets import _np_multiarray, _np_numeric, restricted_unpickle

CIFAR_TAR = Path(__file__).resolve().parents[3] / "shared" / "data" / "cifar10-jpeg.tar.gz"


def scaled(u8: np.ndarray) -> torch.Tensor:
    """uint8 -> float32 in [-1, 1] via float64 arithmetic (the reference)."""
    return torch.from_numpy((2.0 * u8.astype(np.float64) - 255.0) / 255.0).float()


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


# ---------------------------------------------------------------------------------------
# npz
# ---------------------------------------------------------------------------------------
def test_npz_uint8_nhw_round_trip(tmp_path, rng):
    imgs = rng.integers(0, 256, size=(6, 5, 4), dtype=np.uint8)
    imgs[0, 0, 0], imgs[0, 0, 1] = 0, 255
    labels = np.array([2, 0, 1, 2, 0, 1], dtype=np.int32)
    f = tmp_path / "tiny.npz"
    np.savez(f, images=imgs, labels=labels, extra=np.arange(3))
    ds = load_dataset(str(f))
    assert ds.shape == (6, 1, 5, 4)
    assert torch.equal(ds.images, scaled(imgs)[:, None])
    assert ds.images[0, 0, 0, 0].item() == -1.0 and ds.images[0, 0, 0, 1].item() == 1.0
    assert torch.equal(ds.labels, torch.tensor([2, 0, 1, 2, 0, 1]))
    assert ds.value_range == "uint8 [0, 255]"
    assert ds.sha256 == sha(f) and ds.name == "tiny" and ds.source == str(f.resolve())
    assert ds.notes == ("ignored arrays: extra",)
    assert ds.spec == str(f)


@pytest.mark.parametrize(
    "shape, layout",
    [
        ((3, 5, 6, 3), "nhwc"),  # channels last
        ((3, 5, 6, 1), "nhwc"),
        ((3, 5, 6, 4), "nhwc"),
        ((3, 3, 5, 6), "nchw"),  # channels first
        ((3, 1, 5, 6), "nchw"),
        ((3, 3, 4, 4), "nchw"),  # both axes could be channels: the square reading wins
        ((3, 4, 4, 3), "nhwc"),
    ],
)
def test_npz_channel_layouts(tmp_path, rng, shape, layout):
    imgs = rng.integers(0, 256, size=shape, dtype=np.uint8)
    f = tmp_path / "x.npz"
    np.savez(f, images=imgs)
    ds = load_dataset(str(f))
    want = imgs if layout == "nchw" else imgs.transpose(0, 3, 1, 2)
    assert torch.equal(ds.images, scaled(np.ascontiguousarray(want)))
    assert ds.labels is None


def test_npz_ambiguous_layout_needs_option(tmp_path, rng):
    imgs = rng.integers(0, 256, size=(2, 3, 5, 3), dtype=np.uint8)
    f = tmp_path / "x.npz"
    np.savez(f, images=imgs)
    with pytest.raises(DataSpecError, match=r"cannot tell channels-first from channels-last .* add :layout=nchw"):
        load_dataset(str(f))
    nhwc = load_dataset(f"{f}:layout=nhwc")
    assert torch.equal(nhwc.images, scaled(np.ascontiguousarray(imgs.transpose(0, 3, 1, 2))))
    assert load_dataset(f"{f}:layout=nchw").shape == (2, 3, 5, 3)
    with pytest.raises(DataSpecError, match="layout='hwc' must be nchw or nhwc"):
        load_dataset(f"{f}:layout=hwc")


def test_npz_float_ranges(tmp_path):
    # [0, 1]: 0 -> -1, 0.25 -> -0.5, 1 -> 1 ; [-1, 1]: kept as is
    unit = np.array([[[0.0, 0.25], [0.5, 1.0]]], dtype=np.float32)
    f = tmp_path / "u.npz"
    np.savez(f, images=unit)
    ds = load_dataset(str(f))
    assert torch.equal(ds.images[0, 0], torch.tensor([[-1.0, -0.5], [0.0, 1.0]]))
    assert ds.value_range == "float [0, 1]"
    sym = np.array([[[-1.0, -0.3], [0.2, 1.0]]], dtype=np.float64)
    g = tmp_path / "s.npz"
    np.savez(g, images=sym)
    ds = load_dataset(str(g))
    assert torch.equal(ds.images[0, 0], torch.tensor([[-1.0, -0.3], [0.2, 1.0]], dtype=torch.float32))
    assert ds.value_range == "float [-1, 1]"


@pytest.mark.parametrize(
    "arrays, fragment",
    [
        (dict(images=np.full((1, 2, 2), 3.0)), r"float images range over 3..3; store them in \[0, 1\] or \[-1, 1\]"),
        (dict(images=np.array([[[0.0, np.nan]]])), "NaN or infinity"),
        (dict(images=np.zeros((1, 2, 2), np.int64)), "images have dtype int64; store uint8"),
        (dict(images=np.zeros((1, 2, 2), bool)), "images have dtype bool"),
        (dict(images=np.zeros((4,), np.uint8)), r"must be \[N,H,W\], \[N,H,W,C\] or \[N,C,H,W\]"),
        (dict(images=np.zeros((0, 2, 2), np.uint8)), "images array is empty"),
        (dict(images=np.zeros((1, 2, 5, 6), np.uint8)), "no channel axis of size 1, 3 or 4"),
        (dict(images=np.zeros((2, 2, 2), np.uint8), labels=np.array([0.0, 1.0])), "labels have dtype float64"),
        (dict(images=np.zeros((2, 2, 2), np.uint8), labels=np.array([0, 1, 2])), r"labels have shape \(3,\), expected \(2,\)"),
        (dict(images=np.zeros((2, 2, 2), np.uint8), labels=np.array([0, -2])), "labels must be >= 0"),
        (dict(pixels=np.zeros((2, 2, 2), np.uint8)), "no 'images' array \\(found: pixels\\)"),
    ],
)
def test_npz_errors(tmp_path, arrays, fragment):
    f = tmp_path / "bad.npz"
    np.savez(f, **arrays)
    with pytest.raises(DataSpecError, match=fragment) as info:
        load_dataset(str(f))
    assert str(f) in str(info.value) and "\n" not in str(info.value)


def test_npz_corrupt_and_truncated(tmp_path, rng):
    f = tmp_path / "garbage.npz"
    f.write_bytes(b"this is not a zip file at all")
    with pytest.raises(DataSpecError, match="garbage.npz: not a readable .npz file \\(not a zip archive"):
        load_dataset(str(f))
    good = tmp_path / "good.npz"
    np.savez(good, images=rng.integers(0, 256, size=(50, 8, 8), dtype=np.uint8))
    cut = tmp_path / "cut.npz"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(DataSpecError, match="cut.npz: not a readable .npz file"):
        load_dataset(str(cut))


def test_npz_object_array_refused(tmp_path):
    marker = tmp_path / "pwned"
    f = tmp_path / "obj.npz"
    np.savez(f, images=np.array([Evil(marker)], dtype=object))
    with pytest.raises(DataSpecError, match="object arrays, which need pickle and are refused"):
        load_dataset(str(f))
    assert not marker.exists()


def test_npz_limit_label_size(tmp_path, rng):
    imgs = rng.integers(0, 256, size=(12, 4, 4), dtype=np.uint8)
    labels = np.repeat(np.arange(3), 4)
    f = tmp_path / "x.npz"
    np.savez(f, images=imgs, labels=labels)
    ds = load_dataset(f"{f}:limit=6:seed=2")
    assert ds.label_counts() == {0: 2, 1: 2, 2: 2}
    assert torch.equal(ds.images, scaled(imgs[ds.index.numpy()])[:, None])
    one = load_dataset(f"{f}:label=1")
    assert torch.equal(one.index, torch.arange(4, 8))
    assert load_dataset(f"{f}:size=4").shape == (12, 1, 4, 4)
    with pytest.raises(DataSpecError, match="size=8 is not available: this source is 4x4"):
        load_dataset(f"{f}:size=8")


# ---------------------------------------------------------------------------------------
# image folders
# ---------------------------------------------------------------------------------------
def save(path: Path, arr: np.ndarray, mode: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode).save(path) if mode else Image.fromarray(arr).save(path)


def test_image_folder_grey_classes(tmp_path, rng):
    root = tmp_path / "digits"
    data = {}
    for cls, n in [("dog", 2), ("cat", 3)]:
        for i in range(n):
            a = rng.integers(0, 256, size=(5, 7), dtype=np.uint8)
            data[f"{cls}/{i:04d}.png"] = a
            save(root / cls / f"{i:04d}.png", a)
    (root / "cat" / "README.txt").write_text("not an image")
    (root / "emu").mkdir()  # an empty class folder keeps its label
    (root / ".hidden").mkdir()
    save(root / ".hidden" / "x.png", np.zeros((9, 9), np.uint8))
    ds = load_dataset(str(root))
    order = sorted(data)  # cat/0000, cat/0001, cat/0002, dog/0000, dog/0001
    assert ds.shape == (5, 1, 5, 7)
    assert ds.class_names == ("cat", "dog", "emu")
    assert ds.labels.tolist() == [0, 0, 0, 1, 1]
    assert "class folders without images (labels kept): emu" in ds.notes
    assert torch.equal(ds.images, scaled(np.stack([data[k] for k in order]))[:, None])
    assert ds.sha256 == tree_sha256(root, order)
    assert "skipped 1 entries that are not image files" in ds.notes
    assert ds.value_range == "uint8 [0, 255]"
    dogs = load_dataset(f"{root}:label=dog")
    assert dogs.labels.tolist() == [1, 1] and torch.equal(dogs.images, ds.images[3:])
    assert torch.equal(load_dataset(f"{root}:label=1").images, dogs.images)


def test_image_folder_rgb_and_mixed(tmp_path, rng):
    root = tmp_path / "mix"
    rgb = rng.integers(0, 256, size=(4, 6, 3), dtype=np.uint8)
    rgba = rng.integers(0, 256, size=(4, 6, 4), dtype=np.uint8)
    grey = rng.integers(0, 256, size=(4, 6), dtype=np.uint8)
    save(root / "a.png", rgb)
    save(root / "b.png", rgba)
    save(root / "c.png", grey)
    ds = load_dataset(str(root))
    assert ds.shape == (3, 3, 4, 6) and ds.labels is None and ds.class_names is None
    assert torch.equal(ds.images[0], scaled(rgb).permute(2, 0, 1))
    assert torch.equal(ds.images[1], scaled(rgba[..., :3]).permute(2, 0, 1))
    assert torch.equal(ds.images[2], scaled(grey)[None].expand(3, 4, 6))
    assert "alpha channel dropped" in ds.notes and "grey images repeated over R, G, B" in ds.notes


def test_image_folder_16bit_grey(tmp_path):
    a = np.array([[0, 1, 32768], [65535, 1000, 7]], dtype=np.uint16)
    save(tmp_path / "f" / "x.png", a)
    ds = load_dataset(str(tmp_path / "f"))
    want = torch.from_numpy((2.0 * a - 65535.0) / 65535.0).float()
    assert ds.value_range == "uint16 [0, 65535]"
    assert torch.equal(ds.images[0, 0], want)


def test_image_folder_jpeg(tmp_path):
    # A flat-colour JPEG at quality 100 decodes to within a few levels of the colour.
    save(tmp_path / "j" / "k" / "a.jpg", np.full((8, 8, 3), (200, 30, 90), np.uint8))
    ds = load_dataset(str(tmp_path / "j"))
    want = scaled(np.array([200, 30, 90], np.uint8))
    assert ds.shape == (1, 3, 8, 8)
    assert torch.allclose(ds.images[0].mean((1, 2)), want, atol=4 / 127.5)


def test_image_folder_errors(tmp_path, rng):
    sizes = tmp_path / "sizes"
    save(sizes / "a" / "1.png", np.zeros((4, 4), np.uint8))
    save(sizes / "b" / "2.png", np.zeros((4, 5), np.uint8))
    with pytest.raises(DataSpecError, match=r"b/2.png: image is 5x4 but a/1.png is 4x4; all images must share one size"):
        load_dataset(str(sizes))

    mixed = tmp_path / "mixed"
    save(mixed / "a" / "1.png", np.zeros((4, 4), np.uint8))
    save(mixed / "top.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(DataSpecError, match=r"mixes image files \(top.png\) with class sub-folders \(a/\)"):
        load_dataset(str(mixed))

    broken = tmp_path / "broken"
    save(broken / "ok.png", np.zeros((4, 4), np.uint8))
    (broken / "bad.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DataSpecError, match=r"bad.png: unreadable image"):
        load_dataset(str(broken))

    nested = tmp_path / "cifar10"
    save(nested / "train" / "cat" / "1.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(DataSpecError, match="no data set plugin recognises this folder"):
        load_dataset(str(nested))
    with pytest.raises(DataSpecError, match=r"no image files .* found \(sub-folders: train; point the spec"):
        load_dataset(f"{nested}:format=image-folder")


# ---------------------------------------------------------------------------------------
# idx
# ---------------------------------------------------------------------------------------
def idx_bytes(arr: np.ndarray, code: int) -> bytes:
    dt = {0x08: ">u1", 0x0D: ">f4", 0x0C: ">i4"}[code]
    head = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return head + arr.astype(dt).tobytes()


def test_idx_round_trip_with_labels(tmp_path, rng):
    imgs = rng.integers(0, 256, size=(4, 3, 5), dtype=np.uint8)
    labels = np.array([7, 1, 7, 3], np.uint8)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(idx_bytes(imgs, 0x08))
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_bytes(labels, 0x08))
    ds = load_dataset(str(tmp_path / "train-images-idx3-ubyte"))
    assert ds.shape == (4, 1, 3, 5)
    assert torch.equal(ds.images, scaled(imgs)[:, None])
    assert ds.labels.tolist() == [7, 1, 7, 3]
    assert ds.sha256 == sha(tmp_path / "train-images-idx3-ubyte")
    assert ds.notes[0].startswith("labels from train-labels-idx1-ubyte (sha256 ")
    assert load_dataset(f"{tmp_path / 'train-images-idx3-ubyte'}:label=7").index.tolist() == [0, 2]


def test_idx_gz_and_unlabelled(tmp_path, rng):
    imgs = rng.integers(0, 256, size=(3, 4, 4), dtype=np.uint8)
    labels = np.array([0, 1, 0], np.uint8)
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(imgs, 0x08)))
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(labels, 0x08)))
    ds = load_dataset(str(tmp_path / "t10k-images-idx3-ubyte.gz"))
    assert torch.equal(ds.images, scaled(imgs)[:, None]) and ds.labels.tolist() == [0, 1, 0]
    assert ds.name == "t10k-images-idx3-ubyte"
    alone = tmp_path / "sub"
    alone.mkdir()
    (alone / "x-images-idx3-ubyte").write_bytes(idx_bytes(imgs, 0x08))
    ds = load_dataset(str(alone / "x-images-idx3-ubyte"))
    assert ds.labels is None and "no labels file beside it" in ds.notes[0]


def test_idx_float_images(tmp_path):
    imgs = np.array([[[0.0, 0.5], [0.75, 1.0]]], np.float32)
    (tmp_path / "f-images-idx3-ubyte").write_bytes(idx_bytes(imgs, 0x0D))
    ds = load_dataset(str(tmp_path / "f-images-idx3-ubyte"))
    assert torch.equal(ds.images[0, 0], torch.tensor([[-1.0, 0.0], [0.5, 1.0]]))
    assert ds.value_range == "float [0, 1]"


def test_idx_errors(tmp_path, rng):
    imgs = rng.integers(0, 256, size=(4, 3, 3), dtype=np.uint8)
    good = idx_bytes(imgs, 0x08)
    f = tmp_path / "a-images-idx3-ubyte"
    f.write_bytes(good[:-5])
    with pytest.raises(DataSpecError, match=r"a-images-idx3-ubyte: idx header says \(4, 3, 3\) x 1 bytes = 36 but 31 follow"):
        load_dataset(str(f))
    f.write_bytes(b"\x01\x02" + good[2:])
    with pytest.raises(DataSpecError, match="not an idx file \\(bad magic 0102"):
        load_dataset(str(f))
    f.write_bytes(gzip.compress(good)[:-8])
    with pytest.raises(DataSpecError, match="corrupt gzip data"):
        load_dataset(str(f))
    lab = tmp_path / "a-labels-idx1-ubyte"
    lab.write_bytes(idx_bytes(np.array([1, 2, 3], np.uint8), 0x08))
    with pytest.raises(DataSpecError, match="is a labels file"):
        load_dataset(str(lab))
    f.write_bytes(good)  # 4 images but 3 labels beside it
    with pytest.raises(DataSpecError, match=r"labels have shape \(3,\), expected \(4,\)"):
        load_dataset(str(f))
    f.write_bytes(idx_bytes(imgs.astype(np.int32), 0x0C))
    with pytest.raises(DataSpecError, match="images have dtype int32"):
        load_dataset(str(f))


# ---------------------------------------------------------------------------------------
# CIFAR python batches
# ---------------------------------------------------------------------------------------
def cifar_batch(rng, n: int, py2_style: bool):
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, 3, size=n)]
    if py2_style:  # what the original files decode to with encoding="bytes"
        return {b"batch_label": b"training batch", b"labels": labels, b"data": data, b"filenames": [b"x.png"] * n}, data, labels
    return {"batch_label": "training batch", "labels": labels, "data": data, "filenames": ["x.png"] * n}, data, labels


def cifar_reference(data: np.ndarray) -> torch.Tensor:
    """Brute force: image i, channel c, row y, column x is data[i, c*1024 + y*32 + x]."""
    n = data.shape[0]
    out = np.empty((n, 3, 32, 32), np.float64)
    for i in range(n):
        for c in range(3):
            for y in range(32):
                for x in range(32):
                    out[i, c, y, x] = (2.0 * data[i, c * 1024 + y * 32 + x] - 255.0) / 255.0
    return torch.from_numpy(out).float()


def test_cifar_batches_folder(tmp_path, rng):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    parts = []
    for k, proto, py2 in [(1, 2, True), (2, pickle.HIGHEST_PROTOCOL, False)]:
        d, data, labels = cifar_batch(rng, 2, py2)
        (root / f"data_batch_{k}").write_bytes(pickle.dumps(d, protocol=proto))
        parts.append((data, labels))
    (root / "test_batch").write_bytes(pickle.dumps(cifar_batch(rng, 1, False)[0]))
    (root / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"airplane", b"automobile", b"bird"], b"num_vis": 3072}, protocol=2))
    ds = load_dataset(str(root))
    data = np.concatenate([p[0] for p in parts])
    assert ds.shape == (4, 3, 32, 32)
    assert torch.equal(ds.images, cifar_reference(data))
    assert ds.labels.tolist() == parts[0][1] + parts[1][1]
    assert ds.class_names == ("airplane", "automobile", "bird")
    assert ds.sha256 == tree_sha256(root, ["batches.meta", "data_batch_1", "data_batch_2"])
    assert ds.notes[0] == "batches: data_batch_1, data_batch_2"  # test_batch is not training data
    # one batch file, class names from the meta file beside it
    one = load_dataset(str(root / "data_batch_2"))
    assert torch.equal(one.images, ds.images[2:]) and one.class_names == ds.class_names
    assert one.sha256 == sha(root / "data_batch_2")
    assert len(load_dataset(str(root / "test_batch"))) == 1


class Evil:
    """Unpickling this would create ``marker`` (builtins.open(marker, 'w'))."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


class EvilSystem:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("evil_cls, refused", [(Evil, r"(io|builtins)\.open"), (EvilSystem, "system")])
def test_cifar_malicious_pickle_not_executed(tmp_path, rng, evil_cls, refused):
    marker = tmp_path / "pwned"
    d, _, _ = cifar_batch(rng, 1, False)
    d["payload"] = evil_cls(marker)
    f = tmp_path / "data_batch_1"
    f.write_bytes(pickle.dumps(d))
    with pytest.raises(DataSpecError, match=f"refused global .*{refused}.*nothing is executed"):
        load_dataset(str(f))
    assert not marker.exists()
    if evil_cls is Evil:  # the payload is real: plain pickle WOULD create the file
        probe = tmp_path / "probe"
        pickle.loads(pickle.dumps(evil_cls(probe))).close()
        assert probe.exists()


def test_restricted_unpickle_admits_only_plain_data(tmp_path):
    ok = {"a": [1, 2.5, None, True], b"b": (b"x", "y"), "arr": np.arange(4, dtype=np.int16), "s": np.float32(1.5)}
    for proto in (2, 4, 5):
        back = restricted_unpickle(pickle.dumps(ok, protocol=proto), "t")
        assert back["a"] == [1, 2.5, None, True] and np.array_equal(back["arr"], np.arange(4))
        assert back["arr"].dtype == np.int16 and back["s"] == np.float32(1.5)
    with pytest.raises(DataSpecError, match="numpy object array; refused"):
        restricted_unpickle(pickle.dumps({"o": np.array([1, "a"], dtype=object)}), "t")
    with pytest.raises(DataSpecError, match="refused global collections.OrderedDict"):
        restricted_unpickle(pickle.dumps({"o": __import__("collections").OrderedDict(a=1)}), "t")
    with pytest.raises(DataSpecError, match="t: corrupt pickle"):
        restricted_unpickle(pickle.dumps(ok)[:-10], "t")


class Call:
    """Pickles as the call fn(*args) (how a crafted pickle would look)."""

    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return (self.fn, self.args)


@pytest.mark.parametrize(
    "payload, fragment",
    [
        # an object array over raw bytes would be 2 forged PyObject pointers
        (Call(np.ndarray, ((2,), np.dtype("O"), b"\x01" * 16)), r"refused call numpy.ndarray\(...\)"),
        (Call(np.frombuffer, (b"\x01" * 16,)), r"refused global numpy.*frombuffer"),
        (Call(_np_numeric._frombuffer, (b"\x01" * 16, np.dtype([("a", "O")]), (2,), "C")), "object arrays are never unpickled"),
        (Call(_np_multiarray.scalar, (np.dtype("O"), b"\x01" * 8)), "object arrays are never unpickled"),
        (Call(_np_multiarray._reconstruct, (np.ndarray, 5, b"b")), "_reconstruct call with unexpected arguments"),
    ],
)
def test_restricted_unpickle_refuses_forged_arrays(payload, fragment):
    for proto in (2, 5):
        with pytest.raises(DataSpecError, match=fragment):
            restricted_unpickle(pickle.dumps({"data": payload}, protocol=proto), "t")


@pytest.mark.parametrize(
    "batch, fragment",
    [
        ({"labels": [0]}, "no 'data' entry"),
        ({"data": np.zeros((1, 100), np.uint8), "labels": [0]}, r"'data' must be uint8 \[N, 3072\]"),
        ({"data": np.zeros((1, 3072), np.float32), "labels": [0]}, r"'data' must be uint8"),
        ({"data": np.zeros((2, 3072), np.uint8)}, "no 'labels' entry"),
        ({"data": np.zeros((2, 3072), np.uint8), "labels": [0]}, r"labels have shape \(1,\), expected \(2,\)"),
        ({"data": np.zeros((1, 3072), np.uint8), "labels": ["a"]}, "must be a list of ints"),
        ([1, 2], "a CIFAR batch is a pickled dict, got list"),
    ],
)
def test_cifar_bad_batches(tmp_path, batch, fragment):
    f = tmp_path / "data_batch_1"
    f.write_bytes(pickle.dumps(batch))
    with pytest.raises(DataSpecError, match=fragment):
        load_dataset(str(f))


def test_cifar_truncated_and_meta_mismatch(tmp_path, rng):
    d, _, _ = cifar_batch(rng, 2, False)
    f = tmp_path / "data_batch_1"
    f.write_bytes(pickle.dumps(d)[:-100])
    with pytest.raises(DataSpecError, match="data_batch_1: corrupt pickle"):
        load_dataset(str(f))
    d["labels"] = [0, 5]
    f.write_bytes(pickle.dumps(d))
    (tmp_path / "batches.meta").write_bytes(pickle.dumps({"label_names": ["a", "b"]}))
    with pytest.raises(DataSpecError, match="label 5 but .*batches.meta names only 2 classes"):
        load_dataset(str(f))


# ---------------------------------------------------------------------------------------
# the real CIFAR-10 JPEGs (a handful of members), when the shared tarball is present
# ---------------------------------------------------------------------------------------
@pytest.mark.skipif(not CIFAR_TAR.is_file(), reason=f"{CIFAR_TAR} not present")
def test_real_cifar10_jpegs(tmp_path):
    want = {"airplane": 3, "automobile": 3}
    got: dict[str, int] = {c: 0 for c in want}
    with tarfile.open(CIFAR_TAR, "r:gz") as tf:
        for m in tf:
            parts = m.name.split("/")
            if m.isfile() and len(parts) == 4 and parts[1] == "test" and parts[2] in want and got[parts[2]] < want[parts[2]]:
                tf.extract(m, tmp_path, filter="data")
                got[parts[2]] += 1
            if got == want:
                break
    root = tmp_path / "cifar10" / "test"
    ds = load_dataset(str(root))
    assert ds.shape == (6, 3, 32, 32)
    assert ds.class_names == ("airplane", "automobile") and ds.labels.tolist() == [0, 0, 0, 1, 1, 1]
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.jpg"))
    ref = np.stack([np.asarray(Image.open(root / f).convert("RGB")) for f in files])  # (6, 32, 32, 3)
    assert torch.equal(ds.images, scaled(ref).permute(0, 3, 1, 2))
    assert ds.sha256 == tree_sha256(root, files)
    assert load_dataset(f"{root}:label=automobile:limit=2").labels.tolist() == [1, 1]


def test_image_folder_decodes_only_raster_formats(tmp_path, monkeypatch):
    # an EPS file named .png: Pillow would hand its PostScript to Ghostscript; a fake gs on
    # PATH shows whether anything ran
    marker = tmp_path / "PWNED"
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    gs = bin_ / "gs"
    gs.write_text(f"#!/bin/sh\ntouch {marker}\n")
    gs.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_}{os.pathsep}{os.environ.get('PATH', '')}")
    d = tmp_path / "imgs"
    d.mkdir()
    Image.new("L", (8, 8)).save(d / "a.png")
    (d / "b.png").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n")
    with pytest.raises(DataSpecError, match=r"b\.png: unreadable image.*PNG, JPEG"):
        load_dataset(str(d))
    assert not marker.exists()


def test_image_folder_refuses_decompression_bombs_and_keeps_pillow_quiet(tmp_path, recwarn):
    d = tmp_path / "bomb"
    d.mkdir()
    Image.new("L", (5000, 5000)).save(d / "big.png")            # a few KB, 25 M pixels decoded
    with pytest.raises(DataSpecError, match=r"big\.png: image is 5000x5000, larger than an audit can use"):
        load_dataset(str(d))
    p = tmp_path / "pal"
    p.mkdir()
    im = Image.new("P", (8, 8))
    im.putpalette([0, 0, 0, 255, 255, 255] * 128)
    im.info["transparency"] = bytes([0, 255] + [255] * 254)      # byte transparency: Pillow warns on convert
    im.save(p / "t.png", transparency=im.info["transparency"])
    ds = load_dataset(str(p))
    assert ds.images.shape == (1, 3, 8, 8)
    assert not [w for w in recwarn if "Palette" in str(w.message)]
