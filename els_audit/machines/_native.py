"""Native (C) kernels for the engine's hot loop, compiled on first use, with a torch fallback.

Why: the nested pass (:mod:`._nested`) spends most of its time in memory passes over its
logit tiles: after the GEMM, subtract the running maximum, clamp, exp2 and the weighted sum
are four torch ops, each reading (and most writing) the whole tile.  ``_native_kernels.c``
does them in one read per tile and level (``bench/README.md`` has the measured gain), and
the single-k kernel (:mod:`._engine`) likewise for its (rows, keys) tiles; a third function
decodes byte-coded tree rows.  ``els_nested_tile`` goes further for float32 passes: it runs
a whole tile of the nested pass (every level's parent logits, ring GEMM and softmax sums)
per block of query rows, keeping the logits in registers and a cache-sized scratch instead
of writing (nodes, rows) tiles to memory; at low noise it also records, in per-thread
buffers, the keys the float64 refinement needs (:class:`RefineRecords`).  The answers
agree with the torch path to float32 rounding (its exp2 is a degree-7 polynomial, < 6e-8
relative; tests/machines/test_native.py).

How: the C source ships with the package.  On first use it is compiled with the system C
compiler (``$CC`` or ``cc``) into the user cache (``$ELS_AUDIT_CACHE``, else
``$XDG_CACHE_HOME/els-audit``, else ``~/.cache/els-audit``), named by a hash of the source,
the flags and the compiler's version, and loaded with ctypes.  It is built with OpenMP and
links the ``libgomp.so.1`` that torch has already loaded, so both share one thread pool.
Vector flags follow what torch detected on this CPU (``torch.backends.cpu.get_cpu_capability``).

When there is no compiler (or OpenMP), the build fails, or ``ELS_AUDIT_NATIVE=0`` is set, the
engine runs the same steps as torch ops: the same answers, slower.  :func:`status` says
which and why (the bench prints it).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Optional

import torch

__all__ = ["available", "status", "softmax_sums", "softmax_sums_rows", "decode_rows", "nested_tile", "key_hash",
           "key_verify", "exact_logits",
           "nested_level_fields", "nested_tile_buffers", "RefineRecords", "NESTED_LEVEL_FIELDS", "NESTED_MICRO_ROWS",
           "ENV_SWITCH", "MAX_CHANNELS"]

ENV_SWITCH = "ELS_AUDIT_NATIVE"
MAX_CHANNELS = 7                          # MAX_NC - 1 in the C source
NESTED_LEVEL_FIELDS = 28                  # int64 fields of els_level_t (pointers as integers)
NESTED_MICRO_ROWS = 16                    # MW in the C source
_SOURCE = Path(__file__).with_name("_native_kernels.c")
_ABI = 4

_lock = threading.Lock()
_lib: Optional[ctypes.CDLL] = None
_status: Optional[str] = None             # None: not tried yet


def _arch_flags() -> list[str]:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return []
    cap = torch.backends.cpu.get_cpu_capability()
    if cap.startswith("AVX512"):
        return ["-mavx512f", "-mavx512dq", "-mavx512bw", "-mavx512vl", "-mavx2", "-mfma"]
    if cap == "AVX2":
        return ["-mavx2", "-mfma"]
    return []


def _cache_dir() -> Path:
    root = os.environ.get("ELS_AUDIT_CACHE")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "els-audit"


def _compile(cc: str, flags: list[str], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        cmd = [cc, *flags, "-o", tmp, str(_SOURCE)]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if res.returncode:
            first = (res.stderr.strip().splitlines() or ["(no message)"])[0]
            raise RuntimeError(f"'{' '.join(cmd)}' failed: {first}")
        os.replace(tmp, out)                                   # atomic: a concurrent build is harmless
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load() -> Optional[ctypes.CDLL]:
    global _lib, _status
    if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
        _status = f"off ({ENV_SWITCH}=0): torch ops"
        return None
    cc = os.environ.get("CC") or "cc"
    if shutil.which(cc) is None:
        _status = f"off (no C compiler {cc!r} on PATH): torch ops"
        return None
    flags = ["-O3", "-fno-math-errno", "-fopenmp", "-fPIC", "-shared", *_arch_flags()]
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
        key = hashlib.sha256(_SOURCE.read_bytes() + " ".join(flags).encode() + version.encode()).hexdigest()[:16]
        path = _cache_dir() / f"els_native_{key}.so"
        if not path.exists():
            _compile(cc, flags, path)
        lib = ctypes.CDLL(str(path))
        if lib.els_native_abi() != _ABI:
            raise RuntimeError(f"{path} has ABI {lib.els_native_abi()}, expected {_ABI}")
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        _status = f"off (build failed: {e}): torch ops"
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.els_softmax_sums.argtypes = [ptr, i64, i64, i64, ptr, ptr, i64, i64, ctypes.c_float, ptr, ctypes.c_int]
    lib.els_softmax_sums.restype = ctypes.c_int
    lib.els_softmax_sums_rows.argtypes = lib.els_softmax_sums.argtypes
    lib.els_softmax_sums_rows.restype = ctypes.c_int
    lib.els_decode_rows.argtypes = [ptr, i64, i64, i64, ptr, ptr, ptr, i64, ptr, ctypes.c_int]
    lib.els_decode_rows.restype = ctypes.c_int
    lib.els_nested_tile.argtypes = [ptr, i64, i64, ctypes.c_float, ctypes.c_float, ctypes.c_float, i64, ptr, i64,
                                    ptr, i64, ptr, i64, ptr, ctypes.c_float, ctypes.c_int]
    lib.els_nested_tile.restype = ctypes.c_int
    for t in ("f32", "f64"):
        fn = getattr(lib, f"els_key_hash_{t}")
        fn.argtypes = [ptr, i64, ptr, i64, ptr, i64, i64, ptr, i64, i64, ptr, ptr, ctypes.c_int]
        fn.restype = ctypes.c_int
        fn = getattr(lib, f"els_key_verify_{t}")
        fn.argtypes = [ptr, i64, ptr, i64, ptr, i64, i64, ptr, ptr, i64, i64, ctypes.c_int]
        fn.restype = i64
        fn = getattr(lib, f"els_exact_logits_{t}")
        fn.argtypes = [ptr, i64, ptr, ptr, ptr, ptr, i64, ptr, ptr, ptr, ptr, ptr, i64, ptr, ctypes.c_int]
        fn.restype = ctypes.c_int
    _status = f"on ({path.name}, {' '.join(_arch_flags()) or 'no vector flags'})"
    return lib


def _get() -> Optional[ctypes.CDLL]:
    global _lib
    if _status is None:
        with _lock:
            if _status is None:
                _lib = _load()
    return _lib


def available() -> bool:
    """True when the native kernels are built and loaded (builds them on first call)."""
    return _get() is not None


def status() -> str:
    """One line: whether the native kernels are in use, and if not, why."""
    _get()
    return _status


def _reset_for_tests() -> None:
    global _lib, _status
    with _lock:
        _lib, _status = None, None


def _sums(kernel: str, T: torch.Tensor, m: torch.Tensor, vals: torch.Tensor, lo: float, *,
          keys_are_rows: bool) -> torch.Tensor:
    """Check and run one of the two softmax-sum kernels.  T holds the logits with contiguous
    rows: (n keys, R queries) if ``keys_are_rows``, else (R, n); the result is (C+1, R) or
    (R, C+1) respectively."""
    lib = _get()
    n, R = T.shape if keys_are_rows else T.shape[::-1]
    nc = vals.shape[0]
    if any(t.dtype != torch.float32 for t in (T, m, vals)) or T.stride(1) != 1 or not m.is_contiguous() \
            or vals.stride(1) != 1 or not 1 <= nc <= MAX_CHANNELS + 1 or vals.shape[1] != n or m.shape != (R,):
        layout = "(n, R)" if keys_are_rows else "(R, n)"
        raise ValueError(f"native {kernel} takes float32 logits {layout} with contiguous rows, m (R,), "
                         f"vals (C+1 <= {MAX_CHANNELS + 1}, n) with unit column stride")
    part = torch.empty((nc, R) if keys_are_rows else (R, nc), dtype=torch.float32)
    rc = getattr(lib, f"els_{kernel}")(T.data_ptr(), *T.shape, T.stride(0), m.data_ptr(), vals.data_ptr(), nc,
                                       vals.stride(0), float(lo), part.data_ptr(), torch.get_num_threads())
    if rc:
        raise ValueError(f"native {kernel} rejected its arguments (code {rc})")
    return part


def softmax_sums(S: torch.Tensor, m: torch.Tensor, vals: torch.Tensor, lo: float) -> torch.Tensor:
    """(C+1, R) sums over the n rows of S of ``vals[:, j] * 2**clamp(S[j] - m, lo, 127)``.

    S (n, R) float32 with contiguous rows, m (R,) contiguous, vals (C+1, n) float32 with unit
    column stride (C + 1 <= 8).  The same numbers as ``vals @ exp2(clamp(S - m, lo))`` up to
    float32 rounding.  Call only when :func:`available`.
    """
    return _sums("softmax_sums", S, m, vals, lo, keys_are_rows=True)


def softmax_sums_rows(L: torch.Tensor, m: torch.Tensor, vals: torch.Tensor, lo: float) -> torch.Tensor:
    """(R, C+1) sums over the n columns of L of ``vals[:, j] * 2**clamp(L[:, j] - m, lo, 127)``:
    :func:`softmax_sums` for (rows, keys) tiles.  L (R, n) float32 with contiguous rows, m (R,)
    contiguous, vals (C+1, n) float32 with unit column stride.  Call only when :func:`available`.
    """
    return _sums("softmax_sums_rows", L, m, vals, lo, keys_are_rows=False)


def decode_rows(codes: torch.Tensor, palette: torch.Tensor, mu: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
    """(n, ring + 2) float32 rows ``[palette[codes] - mu, extra]`` (the same bits as in torch).

    codes (n, ring) uint8 with contiguous rows, palette (256,) float32 (every code has an entry),
    mu (ring,) float32, extra (n, 2) float32 with contiguous rows.  Call only when
    :func:`available`.
    """
    lib = _get()
    n, ring = codes.shape
    if codes.dtype != torch.uint8 or codes.stride(1) != 1 or extra.shape != (n, 2) or extra.stride(1) != 1 \
            or any(t.dtype != torch.float32 for t in (palette, mu, extra)) or not palette.is_contiguous() \
            or not mu.is_contiguous() or mu.shape != (ring,) or palette.shape != (256,):
        raise ValueError("native decode_rows takes uint8 codes (n, ring), float32 palette (256,), "
                         "mu (ring,) and extra (n, 2)")
    out = torch.empty(n, ring + 2, dtype=torch.float32)
    rc = lib.els_decode_rows(codes.data_ptr(), n, ring, codes.stride(0), palette.data_ptr(), mu.data_ptr(),
                             extra.data_ptr(), extra.stride(0), out.data_ptr(), torch.get_num_threads())
    if rc:
        raise ValueError(f"native decode_rows rejected its arguments (code {rc})")
    return out


def nested_level_fields(*, K: int, ldK: int, D: int, n: int, parent: int, Q: int, ldQ: int, own0: int, want: bool,
                        rows: int, vals: int, ldv: int, m: int, acc: int, ldacc: int, codes: int = 0, ldc: int = 0,
                        palette: int = 0, mu: int = 0, extra: int = 0, lde: int = 0, bias: int = 0,
                        top: int = 0, best: int = 0, best_j: int = 0, key0: int = 0, t1: int = 0,
                        ones: int = 0) -> list[int]:
    """One level's row of :func:`nested_tile`'s table, in the order of the C struct
    ``els_level_t`` (which documents each field): addresses as integers, 0 for none.
    ``top``: the rows' true running maxima when the level records keys for the float64
    refinement (:class:`RefineRecords`).  Diagnostics (per row, updated): ``best`` float32 the
    largest per-entry logit (logit less bias), ``best_j`` int64 its key ``key0 + node``;
    ``t1`` float32 the entropy's sum of ``2**(S - m) (S - m)``, ``ones`` the row of vals that
    holds ones."""
    return [K, ldK, D, n, parent, Q, ldQ, own0, int(want), rows, vals, ldv, m, acc, ldacc, codes, ldc, palette, mu,
            extra, lde, bias, top, best, best_j, key0, t1, ones]


def nested_tile_buffers(n_nodes: int, widths, rows: int, nthreads: int, scratch_bytes: int,
                        dtype: torch.dtype = torch.float32) -> tuple[int, torch.Tensor, torch.Tensor]:
    """(block, scratch, csr) for :func:`nested_tile` calls on levels of at most ``n_nodes`` nodes,
    key rows of ``widths`` (D per level) and ``rows`` query rows: ``block`` micro-columns of 16
    rows per work item, as many as keep a worker's scratch near ``scratch_bytes`` (with room
    for the diagnostics' t1)."""
    n = max(1, n_nodes)
    mw = NESTED_MICRO_ROWS
    block = max(1, min(-(-rows // mw), scratch_bytes // (2 * n * mw * 4)))
    scratch = torch.empty(nthreads * (2 * n + MAX_CHANNELS + 2) * block * mw, dtype=dtype)
    csr = torch.empty(sum(2 * n * d + (n * d + 1) // 2 + n for d in widths), dtype=dtype)
    return block, scratch, csr


class RefineRecords:
    """Per-thread record buffers of :func:`nested_tile` for the float64 refinement (the C
    source's ``rec_t``): ``cap`` records (level, row, node, float32 logit) per thread, of
    the nodes whose logit lies within ``bits`` of their row's true running maximum (levels
    given a ``top`` array: -inf for rows to record, +inf for the others)."""

    def __init__(self, nthreads: int, bits: float, cap: int = 1 << 16):
        self.buf = torch.empty(nthreads, cap, 4, dtype=torch.int32)
        self.n = torch.zeros(nthreads, dtype=torch.int64)
        self.bits = float(bits)

    def take(self) -> Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(level, row, node, logit) of the last call's records, or None if a buffer
        overflowed (then some are missing)."""
        if bool((self.n < 0).any()):
            return None
        parts = [self.buf[t, :n] for t, n in enumerate(self.n.tolist()) if n]
        rec = torch.cat(parts) if parts else self.buf[0, :0]
        return rec[:, 0], rec[:, 1], rec[:, 2], rec[:, 3].view(torch.float32)


def nested_tile(levels: torch.Tensor, nc: int, lo: float, skip: float, slack: float, block: int,
                scratch: torch.Tensor, csr: torch.Tensor, nthreads: int,
                records: Optional[RefineRecords] = None) -> bool:
    """Run ``els_nested_tile`` (the C source documents it) over one tile's levels.

    levels: (nlev, NESTED_LEVEL_FIELDS) int64, one row per level in the order of the C struct
    ``els_level_t`` (pointers as integers; the caller keeps the tensors they point to alive);
    block: micro-columns of 16 rows per work item; scratch: float32 with
    ``scratch_per_thread = scratch.numel() // nthreads`` >= 2 * (largest level's nodes) *
    block * 16 (+ (MAX_CHANNELS + 1) * block * 16, and block * 16 more where a level has
    ``t1``); csr: float32 room for each level's key rows as nonzero entries (levels with
    fewer than 60% nonzero run sparse).  :func:`nested_tile_buffers` sizes both.  Updates the levels'
    running maxima and sums in place.  ``records``: where levels with a ``top`` field record
    their keys for the float64 refinement (``records.take()`` reads them).  Returns False when
    a record buffer overflowed (the sums are still right, the records incomplete).  Call only
    when :func:`available`.
    """
    lib = _get()
    if levels.dtype != torch.int64 or levels.dim() != 2 or levels.shape[1] != NESTED_LEVEL_FIELDS \
            or not levels.is_contiguous() or scratch.dtype != torch.float32 or not scratch.is_contiguous() \
            or csr.dtype != torch.float32 or not csr.is_contiguous() \
            or ctypes.sizeof(ctypes.c_void_p) != 8:
        raise ValueError(f"native nested_tile takes an int64 (levels, {NESTED_LEVEL_FIELDS}) table and float32 scratch and csr buffers "
                         "(64-bit platforms)")
    per_thread = scratch.numel() // nthreads
    if records is not None:
        if records.n.numel() < nthreads:
            raise ValueError("native nested_tile: fewer record buffers than threads")
        records.n.zero_()
        rec = (records.buf.data_ptr(), records.buf.shape[1], records.n.data_ptr(), records.bits)
    else:
        rec = (0, 0, 0, 0.0)
    rc = lib.els_nested_tile(levels.data_ptr(), levels.shape[0], nc, float(lo), float(skip), float(slack), block,
                             scratch.data_ptr(), per_thread, csr.data_ptr(), csr.numel(), *rec, nthreads)
    if rc:
        raise ValueError(f"native nested_tile rejected its arguments (code {rc})")
    return records is None or bool((records.n >= 0).all())


def _key_layout(x: torch.Tensor, pos_base: torch.Tensor, row_off: torch.Tensor, k: int, img_stride: int) -> tuple:
    """Check the key layout shared by :func:`key_hash` and :func:`key_verify`."""
    if x.dtype not in (torch.float32, torch.float64) or x.device.type != "cpu" or not x.is_contiguous() \
            or any(t.dtype != torch.int64 or not t.is_contiguous() or t.device.type != "cpu"
                   for t in (pos_base, row_off)) or k < 1:
        raise ValueError("native key kernels take contiguous float32/float64 images on the CPU and int64 "
                         "position and row offsets")
    suffix = "f32" if x.dtype == torch.float32 else "f64"
    return suffix, (x.data_ptr(), int(img_stride), pos_base.data_ptr(), pos_base.numel(), row_off.data_ptr(),
                    row_off.numel(), int(k))


def key_hash(x: torch.Tensor, img_stride: int, pos_base: torch.Tensor, row_off: torch.Tensor, k: int,
             R: torch.Tensor, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(h (end - start,) float64, column sums (K,) float64) of keys start..end-1 of a group
    (``els_key_hash``: the C source documents the layout): each key's row is the
    ``row_off.numel()`` runs of k elements at ``x.flat[(q // npos) * img_stride +
    pos_base[q % npos] + row_off[i]]``, h its float64 dot product with R (K,).  Equal rows get
    equal hashes.  Call only when :func:`available`."""
    lib = _get()
    suffix, layout = _key_layout(x, pos_base, row_off, k, img_stride)
    K = row_off.numel() * k
    if R.dtype != torch.float64 or R.shape != (K,) or not R.is_contiguous() or R.device.type != "cpu" \
            or not 0 <= start <= end:
        raise ValueError(f"native key_hash takes R ({K},) float64 and 0 <= start <= end")
    threads = torch.get_num_threads()
    h = torch.empty(end - start, dtype=torch.float64)
    colsum = torch.zeros(threads, K, dtype=torch.float64)        # OpenMP may start fewer threads
    rc = getattr(lib, f"els_key_hash_{suffix}")(*layout, R.data_ptr(), start, end, h.data_ptr(), colsum.data_ptr(),
                                                 threads)
    if rc:
        raise ValueError(f"native key_hash rejected its arguments (code {rc})")
    return h, colsum.sum(0)


def key_verify(x: torch.Tensor, img_stride: int, pos_base: torch.Tensor, row_off: torch.Tensor, k: int,
               rep: torch.Tensor, inverse: torch.Tensor, start: int, end: int) -> int:
    """How many keys q in start..end-1 differ, element for element, from their group's
    representative ``rep[inverse[q - start]]`` (same layout as :func:`key_hash`): 0 when a
    deduplication is exact.  Call only when :func:`available`."""
    lib = _get()
    suffix, layout = _key_layout(x, pos_base, row_off, k, img_stride)
    if any(t.dtype != torch.int64 or not t.is_contiguous() or t.device.type != "cpu" for t in (rep, inverse)) \
            or inverse.numel() != end - start or not 0 <= start <= end:
        raise ValueError("native key_verify takes int64 rep and inverse (end - start,)")
    bad = getattr(lib, f"els_key_verify_{suffix}")(*layout, rep.data_ptr(), inverse.data_ptr(), start, end,
                                                    torch.get_num_threads())
    if bad < 0:
        raise ValueError("native key_verify rejected its arguments")
    return int(bad)


def exact_logits(q_rows: torch.Tensor, qrow: torch.Tensor, x: torch.Tensor, kbase: torch.Tensor, off: torch.Tensor,
                 mu: torch.Tensor, w: Optional[torch.Tensor], a: torch.Tensor, b: torch.Tensor,
                 log2c: torch.Tensor) -> torch.Tensor:
    """(n,) float64 base-2 logits of n (query row, key) records (``els_exact_logits``, the C
    source documents them; the same formula as ``_engine.exact_logits``): queries are rows
    ``qrow`` of q_rows (R, >= K) with unit column stride, keys the elements ``kbase[i] + off``
    of the flat images x, ``mu`` (K,) the shift, ``w`` (K,) a column scale or None, a and b
    (R,) float64 per query row, log2c (n,) float64.  Call only when :func:`available`."""
    lib = _get()
    T = x.dtype
    K = off.numel()
    n = qrow.numel()
    if T not in (torch.float32, torch.float64) or q_rows.dtype != T or mu.dtype != T \
            or (w is not None and (w.dtype != T or not w.is_contiguous() or w.numel() != K)) \
            or q_rows.dim() != 2 or (q_rows.stride(1) != 1 and q_rows.shape[1] > 1) or q_rows.shape[1] < K \
            or not x.is_contiguous() or any(t.device.type != "cpu" for t in (q_rows, x, qrow, kbase, off, mu, a, b)) \
            or not mu.is_contiguous() or mu.numel() != K \
            or any(t.dtype != torch.int64 or not t.is_contiguous() for t in (qrow, kbase, off)) or kbase.numel() != n \
            or any(t.dtype != torch.float64 or not t.is_contiguous() for t in (a, b, log2c)) or log2c.numel() != n:
        raise ValueError("native exact_logits takes float32/float64 q_rows, images, mu and w of one dtype, int64 "
                         "qrow/kbase (n,) and off (K,), float64 a, b (R,) and log2c (n,)")
    out = torch.empty(n, dtype=torch.float64)
    suffix = "f32" if T == torch.float32 else "f64"
    rc = getattr(lib, f"els_exact_logits_{suffix}")(q_rows.data_ptr(), q_rows.stride(0), qrow.data_ptr(), x.data_ptr(),
                                                     kbase.data_ptr(), off.data_ptr(), K, mu.data_ptr(),
                                                     0 if w is None else w.data_ptr(), a.data_ptr(), b.data_ptr(),
                                                     log2c.data_ptr(), n, out.data_ptr(), torch.get_num_threads())
    if rc:
        raise ValueError(f"native exact_logits rejected its arguments (code {rc})")
    return out
