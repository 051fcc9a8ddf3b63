"""The exact grouped-softmax kernel shared by every local machine.

References:
- Kamb & Ganguli, ICML 2025 (arXiv 2412.20292): the machines' score
  ``s(x)[p] = -(x[p] - a * sum_j w_j(p) centre_j) / b^2`` with
  ``w_j(p) = softmax_j(-||Omega_p(x) - a patch_j||^2 / (2 b^2))`` (docs/theory.md section 2).
- Milakov & Gimelshein 2018, "Online normalizer calculation for softmax"; Dao et al. 2022
  (FlashAttention): tiled online log-sum-exp.

The logit is computed as dot-product attention.  With ``q' = q - a*mu`` and
``p' = p - mu`` for the group's shift patch mu (so ``q - a p = q' - a p'`` for any mu; the
mean patch, or the images' background at in-image pixels: :mod:`._dictionary`):

    -||q - a p||^2 / (2b^2) = -||q'||^2/(2b^2) + (a/b^2) q'.p' - (a^2/(2b^2)) ||p'||^2

The first term is constant per query and cancels in the softmax.  The other two are one
GEMM of ``[q' * a/b^2, -a^2/(2b^2)]`` against ``[p', ||p'||^2]``, plus the per-key bias
``log(count)`` of merged duplicate keys.  Subtracting mu changes nothing in exact
arithmetic and keeps float32 logits small (MNIST keys are mostly the -1 background).

The softmax is normalised over the whole key set of a group with an online log-sum-exp over
key chunks (never per batch): memory is O(tile), whatever the dictionary size.

Speed notes (measured, ``bench/README.md``): logits are kept in base 2 (every coefficient
carries a factor log2(e)) because float32 ``exp2`` runs about 3x faster than ``exp`` in
torch on CPU; the same weights.  A key tile whose largest logit lies more than
``SKIP_BITS + log2(keys)`` below the running maximum (in base 2) is skipped after its GEMM:
its keys together weigh less than ``2**-SKIP_BITS`` of the total, far below float64
rounding of the result, so the skip is exact to that stated bound.

After the GEMM, the float32 softmax sums of a tile (subtract the running maximum, clamp,
exp2, weighted sum of centres) run as one C pass when the native kernels build
(:mod:`._native`), else as torch ops; the same answers to float32 rounding.

Float32 at low noise: logits there are hundreds to thousands of bits, so float32 rounding
of the GEMM (~1e-3 bits) shows in the weights (~1e-5 relative in the answer).  The keys
that carry each query's softmax (within ``REFINE_BITS`` of its maximum) then get float64
logits after the pass (:class:`Float64Refinement`); float64 inputs compute in float64
throughout.  The fused C kernel records those keys itself (per-thread buffers; should they
overflow, the group runs the step-by-step path instead).

Diagnostics (winning entry, its weight, the entropy) come from the float32 sums, refined or
not; the fused kernel keeps them too (each row's best entry and the entropy's T1, one more
channel for the log counts), with a small slack (FUSED_DIAG_SLACK_BITS) for T1's precision.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import math
import warnings

import torch

from . import _native as native
from ._dictionary import KeyChunk, PatchDictionary

__all__ = ["GroupedResult", "grouped_softmax_average", "log2_norm_of", "SKIP_BITS", "exp2_floor", "skip_threshold",
           "exact_logits", "exact_logits_at",
           "REFINE_BITS", "REFINE_MIN_COEF", "refine_rows", "Float64Refinement"]

LOG2E = 1.0 / math.log(2.0)
# A tile whose keys weigh less than 2**-SKIP_BITS of the softmax mass in all is skipped.
SKIP_BITS = 48.0


def exp2_floor(dtype: torch.dtype) -> float:
    """Clamp for base-2 logits before ``exp2``: the smallest normal exponent of ``dtype``.

    NB: exp2 of arguments in float32's subnormal range (-149..-126) takes a slow path, 2.5x
    slower; clamping at -126 changes each such weight by < 1.2e-38 relative to the largest
    (which is 2**0 = 1): far below float precision.
    """
    return -126.0 if dtype == torch.float32 else -1022.0


# Float32 refinement (see Float64Refinement): keys within REFINE_BITS of a query's maximum
# get float64 logits, in rows whose logit scale a^2 / (2 b^2) log2(e) is at least
# REFINE_MIN_COEF bits per unit of squared distance (low noise, where float32 rounding of
# logits in the hundreds or thousands shows in the weights).
REFINE_BITS = 8.0
REFINE_MIN_COEF = 3.0


def refine_rows(dtype: torch.dtype, coef_sq: torch.Tensor) -> Optional[torch.Tensor]:
    """(R,) bool: rows whose float32 answer gets a float64 refinement (None: no row)."""
    if dtype != torch.float32:
        return None
    rows = coef_sq.abs() >= REFINE_MIN_COEF
    return rows if bool(rows.any()) else None


class Float64Refinement:
    """Float64 logits for the keys that carry a query's softmax, at low noise.

    In float32 the logit ``-||q - a p||^2 / (2 b^2)`` comes out of a GEMM of terms up to
    ~1e3 bits at t ~ 0.1, so each logit carries ~1e-4 to 1e-3 bits of rounding, and the
    answer ~1e-5 relative.  The float32 pass stays as it is (it finds every query's
    maximum); on the way, every key whose float32 logit lies within ``REFINE_BITS`` of the
    running maximum is recorded with that logit.  At the end the recorded keys still within
    ``REFINE_BITS`` of the final maximum m get float64 logits, and their terms in the float32
    sums are swapped: ``acc += (2**(S64 - m) - 2**(S32 - m)) * [centre, 1]`` in float64.
    The other keys weigh < 2**-REFINE_BITS of the maximum each, so their float32 rounding
    (~1e-3 relative of a small weight) no longer shows (measured: ``bench/accuracy.py``).

    ``add`` takes rows, key positions and float32 logits of one tile; the list is pruned
    against the running maximum when it grows.  Should it still hold more than ``cap``
    records (a very flat softmax at a logit scale above REFINE_MIN_COEF), the refinement
    gives up (``gave_up``, with a RuntimeWarning) and the float32 answer stands.
    """

    def __init__(self, active_rows: torch.Tensor, prune_at: int = 1 << 20, cap: int = 1 << 24):
        self.active = active_rows
        self.rows: list[torch.Tensor] = []
        self.keys: list[torch.Tensor] = []
        self.logits: list[torch.Tensor] = []
        self.n = 0
        self.prune_at = prune_at
        self.cap = cap
        self.gave_up = False

    def add(self, L: torch.Tensor, tile_max: torch.Tensor, m: torch.Tensor, row0: int, key0: int,
            keys_first: bool = False) -> None:
        """Record the entries of logit tile L (rows row0.., keys key0..; L is (rows, keys), or
        (keys, rows) if ``keys_first``; tile_max its per-row maxima) within REFINE_BITS of m
        (the rows' running maxima).  Only the rows that have such entries are scanned."""
        if self.gave_up:
            return
        thr = torch.where(self.active[row0: row0 + m.numel()], m - REFINE_BITS, torch.full_like(m, float("inf")))
        hit = (tile_max >= thr).nonzero().flatten()                                    # rows with records
        if not hit.numel():
            return
        sub = L.index_select(0 if not keys_first else 1, hit)
        if keys_first:
            c, h = (sub >= thr[hit][None, :]).nonzero(as_tuple=True)
            vals = sub[c, h]
        else:
            h, c = (sub >= thr[hit][:, None]).nonzero(as_tuple=True)
            vals = sub[h, c]
        if h.numel():
            self.rows.append(hit[h] + row0)
            self.keys.append(c + key0)
            self.logits.append(vals)
            self.n += h.numel()

    def add_records(self, rows: torch.Tensor, keys: torch.Tensor, logits: torch.Tensor) -> None:
        """Record keys found elsewhere (the fused C kernel's records, :mod:`._native`): rows,
        key positions and the float32 logits that were summed."""
        if rows.numel() and not self.gave_up:
            self.rows.append(rows.long())
            self.keys.append(keys.long())
            self.logits.append(logits)
            self.n += rows.numel()

    def prune(self, m: torch.Tensor) -> None:
        if self.n < self.prune_at or self.gave_up:
            return
        rows, keys, logits = self.final(m)
        self.rows, self.keys, self.logits, self.n = [rows], [keys], [logits], rows.numel()
        self.prune_at = max(self.prune_at, 2 * self.n)
        if self.n > self.cap:
            self.gave_up = True
            self.rows, self.keys, self.logits, self.n = [], [], [], 0
            warnings.warn(f"float64 refinement skipped: more than {self.cap} keys lie within {REFINE_BITS:g} bits "
                          "of their pixels' maxima (a very flat softmax at low noise), so this float32 answer "
                          "may be off by ~1e-5 relative; pass float64 images and x for a float64 computation",
                          RuntimeWarning, stacklevel=2)

    def final(self, m: torch.Tensor):
        """(rows, keys, float32 logits) of the records within REFINE_BITS of the maxima m."""
        if not self.rows or self.gave_up:
            e = torch.empty(0, dtype=torch.long, device=m.device)
            return e, e, torch.empty(0, dtype=m.dtype, device=m.device)
        rows, keys, logits = torch.cat(self.rows), torch.cat(self.keys), torch.cat(self.logits)
        keep = logits >= m[rows] - REFINE_BITS
        return rows[keep], keys[keep], logits[keep]

    def corrected(self, acc: torch.Tensor, m: torch.Tensor, exact, step: int = 1 << 15,
                  top: Optional[torch.Tensor] = None) -> torch.Tensor:
        """float64 (R, C+1) sums ``acc`` (relative to the maxima m) with the recorded keys'
        float32 terms swapped for float64 ones.  ``exact(rows, keys)`` gives those keys'
        float64 logits and their (n, C+1) centres and ones; it is called in chunks of ``step``
        records.  ``top``: the rows' true maxima where m lags them (the fused kernel raises m
        only by more than FUSED_SLACK_BITS); the records are filtered against it."""
        acc = acc.to(torch.float64)
        rows, keys, s32 = self.final(m if top is None else top)
        m64 = m.to(torch.float64)
        for s in range(0, rows.numel(), step):
            r, kk = rows[s: s + step], keys[s: s + step]
            s64, vals = exact(r, kk)
            dw = torch.exp2(s64 - m64[r]) - torch.exp2(s32[s: s + step].to(torch.float64) - m64[r])
            acc.index_add_(0, r, dw[:, None] * vals.to(torch.float64))
        return acc


def exact_logits(q: torch.Tensor, p: torch.Tensor, a: torch.Tensor, b: torch.Tensor, mu: torch.Tensor,
                 log2_count: torch.Tensor) -> torch.Tensor:
    """Base-2 logits in float64, in the engine's convention (the GEMM's, which leaves out the
    per-query constant): ``log2(e) (||q'||^2 - ||q - a p||^2) / (2 b^2) + log2(count)`` with
    ``q' = q - a mu``.  q, p (n, K); a, b (n,); mu (K,) the mean the GEMM subtracted."""
    q, p, a, b = (v.to(torch.float64) for v in (q, p, a, b))
    qc = q - a[:, None] * mu.to(torch.float64)
    d = q - a[:, None] * p
    return LOG2E * ((qc * qc).sum(1) - (d * d).sum(1)) / (2 * b * b) + log2_count.to(torch.float64)


def exact_logits_at(q_rows: torch.Tensor, qrow: torch.Tensor, x: torch.Tensor, kbase: torch.Tensor,
                    off: torch.Tensor, mu: torch.Tensor, w: Optional[torch.Tensor], a_rows: torch.Tensor,
                    b_rows: torch.Tensor, log2c: torch.Tensor) -> torch.Tensor:
    """:func:`exact_logits` of n (query row, key) records whose keys lie in the flat images x
    (key i: ``x[kbase[i] + off]``): queries ``q_rows[qrow]`` (R, >= K), ``w`` (K,) a column
    scale or None, a_rows and b_rows (R,) contiguous float64 per query row, log2c (n,).  On the
    CPU the C kernel reads the keys where they lie (:func:`._native.exact_logits`); elsewhere
    they are gathered."""
    if x.device.type == "cpu" and x.is_contiguous() and native.available():
        q = q_rows if q_rows.stride(-1) == 1 or q_rows.shape[1] == 1 else q_rows.contiguous()
        return native.exact_logits(q, qrow, x, kbase, off.contiguous(), mu.contiguous(),
                                   None if w is None else w.contiguous(), a_rows, b_rows, log2c)
    K = off.numel()
    ww = torch.ones(K, dtype=x.dtype, device=x.device) if w is None else w
    return exact_logits(q_rows[qrow, :K] * ww, x[kbase[:, None] + off[None, :]] * ww, a_rows[qrow], b_rows[qrow],
                        mu * ww, log2c)


def skip_threshold(n_keys: int) -> float:
    """A tile whose largest base-2 logit lies below the running max by more than this is
    negligible: all ``n_keys`` keys together weigh < 2**-SKIP_BITS (module docstring)."""
    return -(SKIP_BITS + math.log2(max(2, n_keys)))


@dataclass
class GroupedResult:
    """Per query pixel: the softmax average of key centres, plus optional diagnostics.

    Shapes (B queries, C channels, HW pixels):
      mean_centre: (B, C, HW)
      winner_source: (B, HW, 3) long (image index, y, x) of the highest-weight entry
      winner_weight: (B, HW) weight of that single entry (duplicates share weight equally)
      winner_count: (B, HW) long, how many identical entries share that weight
      entropy: (B, HW) softmax entropy in nats over the full (non-merged) dictionary
      log2_norm: (B, HW) float64 (with ``log_norm=True``): the softmax's log2 normaliser in
          absolute terms, ``log2 sum_j count_j 2**(-log2(e) ||q - a p_j||^2 / (2 b^2))``,
          free of the group's shift patch: partial answers over disjoint key sets (shards)
          merge exactly with it (:func:`log2_norm_of`)
    """

    mean_centre: torch.Tensor
    winner_source: Optional[torch.Tensor] = None
    winner_weight: Optional[torch.Tensor] = None
    winner_count: Optional[torch.Tensor] = None
    entropy: Optional[torch.Tensor] = None
    log2_norm: Optional[torch.Tensor] = None


def log2_norm_of(m: torch.Tensor, z: torch.Tensor, q_shifted: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(R,) float64 absolute log2 normaliser of rows whose engine sums are ``z = sum_j
    2**(S_j - m)`` (S the engine's base-2 logits, which leave out the per-query constant
    ``log2(e) ||q'||^2 / (2 b^2)``); q_shifted (R, K) the rows' ``q' = q - a mu``, b (R,).

    In float64: at low noise the constant is thousands of bits, and the merge of shards
    weighs each by ``2**(log2_norm_s - max)``."""
    q = q_shifted.to(torch.float64)
    b = b.to(torch.float64)
    return m.to(torch.float64) + torch.log2(z.to(torch.float64)) - LOG2E * (q * q).sum(1) / (2 * b * b)


# fused kernel (native.nested_tile): keys per call here; the running max is raised only when a
# logit exceeds it by more than FUSED_SLACK_BITS; a worker's scratch (its rows' logits of the
# previous and current level) is kept near FUSED_SCRATCH_BYTES, within a core's L2 cache
FUSED_CHUNK_KEYS = 1024
FUSED_SLACK_BITS = 32.0
# with diagnostics the slack is small: the entropy's t1 sums 2**(S - m) (S - m) in float32, whose
# rounding grows with the lag of m behind the true maximum (~1e-7 (lag + spread) nats)
FUSED_DIAG_SLACK_BITS = 1.0
FUSED_SCRATCH_BYTES = 512 << 10
FUSED_MIN_ROWS = 128          # per thread (two of the kernel's 64-row blocks)
# the float64 refinement's records per thread and kernel call (16 bytes each; more, after
# pruning, and the call falls back to the step-by-step torch path); the nested pass, whose
# fused blocks hold up to _nested.FUSED_MAX_ROWS query rows, has this many per 1,024 rows
FUSED_RECORDS_PER_THREAD = 1 << 16


def _fused_group_means(chunks, qa: torch.Tensor, R: int, C: int, lo: float, skip: float,
                       refine: Optional[Float64Refinement] = None, diagnostics: bool = False):
    """Softmax sums of one group's key centres for float32 query rows ``qa`` (R, K + 1)
    (``[q' a/b^2 log2e, coef_sq]``), with ``els_nested_tile`` as a one-level tree per key
    chunk (``chunks(size)`` yields the group's :class:`KeyChunk` s): the log2 multiplicity
    enters as the level's bias, each row keeps a running maximum and the chunk's sums are
    added at its end (:mod:`._native`).

    Returns (acc (R, C+1) sums relative to m, m (R,), top (R,) the true maxima, which m may
    lag by FUSED_SLACK_BITS, diag), or None when ``refine`` is given and the kernel's record
    buffers overflowed (the caller then runs the torch path).  With ``refine``, the kernel
    records the keys within REFINE_BITS of their rows' true maxima into it.  With
    ``diagnostics`` (C + 2 <= MAX_CHANNELS + 1), as :func:`_gemm_group_sums`: acc is (R, C+2)
    (the last column: sum of weights x log count) and diag is (t1, best, best_i), computed in
    the kernel (m then lags the true maxima by at most FUSED_DIAG_SLACK_BITS); else diag is
    None."""
    mw = native.NESTED_MICRO_ROWS
    pad = -(-R // mw) * mw
    D = qa.shape[1]
    qT = torch.zeros(D, pad, dtype=qa.dtype)
    qT[:, :R] = qa.t()
    m = torch.full((pad,), float("-inf"), dtype=qa.dtype)
    acc = torch.zeros(C + 2 if diagnostics else C + 1, pad, dtype=qa.dtype)
    slack = FUSED_DIAG_SLACK_BITS if diagnostics else FUSED_SLACK_BITS
    diag_fields = {}
    if diagnostics:
        t1 = torch.zeros(pad, dtype=qa.dtype)
        best = torch.full((pad,), float("-inf"), dtype=qa.dtype)
        best_i = torch.zeros(pad, dtype=torch.long)
        diag_fields = dict(t1=t1.data_ptr(), best=best.data_ptr(), best_j=best_i.data_ptr(), ones=C)
    threads = torch.get_num_threads()
    top, records = m, None                   # the true maxima: m itself without records
    if refine is not None:
        top = torch.full((pad,), float("inf"), dtype=qa.dtype)          # +inf: never recorded
        top[:R].masked_fill_(refine.active, float("-inf"))
        records = native.RefineRecords(threads, REFINE_BITS, FUSED_RECORDS_PER_THREAD)
    n = 0                                    # keys the buffers hold (streaming chunks are whole images)
    for ch in chunks(FUSED_CHUNK_KEYS):
        kaug = ch.kaug if ch.kaug.stride(1) == 1 else ch.kaug.contiguous()                # (mc, K + 1)
        mc = kaug.shape[0]
        if mc > n:
            n = mc
            block, scratch, csr = native.nested_tile_buffers(n, [D], R, threads, FUSED_SCRATCH_BYTES, qa.dtype)
            ones = torch.ones(1, n, dtype=qa.dtype)
        cols = [ch.centre.t(), ones[:, :mc]]
        if diagnostics and ch.log_count is not None:
            cols.append(ch.log_count[None, :])          # acc's last row (without counts it stays 0)
        vals = torch.cat(cols, 0)                                                         # (C + 1 [+ 1], mc)
        bias = None if ch.log_count is None else (ch.log_count * LOG2E).contiguous()      # base 2
        fields = native.nested_level_fields(
            K=kaug.data_ptr(), ldK=kaug.stride(0), D=D, n=mc, parent=0, Q=qT.data_ptr(), ldQ=pad, own0=0, want=True,
            rows=R, vals=vals.data_ptr(), ldv=vals.stride(0), m=m.data_ptr(), acc=acc.data_ptr(), ldacc=pad,
            bias=0 if bias is None else bias.data_ptr(), top=0 if records is None else top.data_ptr(),
            key0=ch.start, **diag_fields)
        if not native.nested_tile(torch.tensor([fields], dtype=torch.int64), vals.shape[0], lo, skip, slack,
                                  block, scratch, csr, threads, records):
            return None                                                    # a record buffer overflowed
        if records is not None:
            _, rows, keys, logits = records.take()
            refine.add_records(rows, keys.long() + ch.start, logits)       # int64: > 2**31 keys
            refine.prune(top[:R])
    diag = (t1[:R], best[:R], best_i[:R]) if diagnostics else None
    return acc[:, :R].t(), m[:R], top[:R], diag


def _scaled_chunks(g, scale: torch.Tensor, keep: Optional[torch.Tensor] = None):
    """``g.chunks`` with every key row ``[p', ||p'||^2]`` replaced by ``[s p', ||s p'||^2]``
    for the column scale s (K,), only its columns ``keep`` (those with s > 0: the others add
    nothing) when given, into one reused buffer (each chunk is consumed first)."""
    cols = None if keep is None else keep.nonzero().flatten()
    s = scale if cols is None else scale[cols]
    K = s.numel()

    def chunks(size: int):
        buf = None
        for ch in g.chunks(size):
            mc = ch.kaug.shape[0]
            if buf is None or buf.shape[0] < mc:
                buf = torch.empty(mc, K + 1, dtype=ch.kaug.dtype, device=ch.kaug.device)
            out = buf[:mc]
            rows = ch.kaug[:, : scale.numel()] if cols is None else ch.kaug.index_select(1, cols)
            torch.mul(rows, s, out=out[:, :K])
            out[:, K] = (out[:, :K] * out[:, :K]).sum(1)
            yield KeyChunk(out, ch.centre, ch.log_count, ch.start)
    return chunks


def _gemm_group_sums(chunks, qa: torch.Tensor, R: int, C: int, diagnostics: bool, Mc: int, underflow: float,
                     skip_below: float, refine: Optional[Float64Refinement], use_native: bool, tile_elems: int):
    """The step-by-step softmax sums of one group: per (query tile x key chunk) a GEMM into a
    logit tile, its maxima, the refinement's records, then the sums (one C pass when
    ``use_native``, else torch ops).  Returns (acc (R, C+1), or (R, C+2) with ``diagnostics``
    (the last column: sum of weights x log count), m (R,), and with ``diagnostics`` the
    entropy's T1 and each row's best entry (t1, best, best_i), else None)."""
    dtype, dev = qa.dtype, qa.device
    ncol = C + 2 if diagnostics else C + 1                                          # centre, 1, [log count]
    acc = torch.zeros(R, ncol, dtype=dtype, device=dev)
    m = torch.full((R,), float("-inf"), dtype=dtype, device=dev)
    if diagnostics:
        t1 = torch.zeros(R, dtype=dtype, device=dev)
        best = torch.full((R,), float("-inf"), dtype=dtype, device=dev)
        best_i = torch.zeros(R, dtype=torch.long, device=dev)
    buf = None
    for ch in chunks(Mc):
        mc = ch.kaug.shape[0]
        Rt = max(1, min(R, tile_elems // mc))
        if buf is None or buf.numel() < Rt * mc:
            buf = torch.empty(Rt * mc, dtype=dtype, device=dev)
        kaug_t = ch.kaug.t()                                                        # (K+1, mc)
        bias = None if ch.log_count is None else ch.log_count * LOG2E               # (mc,) base 2
        cols = [ch.centre.t(), torch.ones(1, mc, dtype=dtype, device=dev)]
        if diagnostics:
            cols.append(torch.zeros(1, mc, dtype=dtype, device=dev) if bias is None else ch.log_count[None, :])
        vals_rows = torch.cat(cols, 0)                                              # (ncol, mc)
        vals_t = vals_rows.t()                                                      # (mc, ncol), column-major
        for rs in range(0, R, Rt):
            re = min(R, rs + Rt)
            L = buf[: (re - rs) * mc].view(re - rs, mc)
            if bias is None:
                torch.mm(qa[rs:re], kaug_t, out=L)                                  # (rt, mc) logits
            else:
                torch.addmm(bias, qa[rs:re], kaug_t, out=L)
            m_old = m[rs:re]
            tile_max = L.amax(1)
            # NB: negligible with diagnostics too: the winning entry's logit is at least the final
            # maximum less log2(keys) (its key's count), above any skipped tile's; the entropy's
            # terms there weigh < (SKIP_BITS + log2 keys) 2**-SKIP_BITS in all
            if bool((tile_max - m_old).max() < skip_below):
                continue                                                            # negligible tile
            m_new = torch.maximum(m_old, tile_max)
            if refine is not None:
                refine.add(L, tile_max, m_new, rs, ch.start)
            if diagnostics:
                ent_logit = L if bias is None else L - bias                         # per-entry logits
                bv, bi = ent_logit.max(1)
                upd = bv > best[rs:re]
                best[rs:re] = torch.where(upd, bv, best[rs:re])
                best_i[rs:re] = torch.where(upd, bi + ch.start, best_i[rs:re])
            scale = torch.exp2(m_old - m_new)                                       # (rt,) 0 at start
            if use_native:                                                          # one fused C pass
                acc[rs:re].mul_(scale[:, None]).add_(native.softmax_sums_rows(L, m_new, vals_rows, underflow))
                m[rs:re] = m_new
                continue
            L.sub_(m_new[:, None])
            if diagnostics:
                z_old = acc[rs:re, C]
                shift = torch.where(z_old > 0, (m_old - m_new) * z_old, torch.zeros_like(z_old))
                t1_chunk = (L.exp2() * L).sum(1)                                    # base 2
                t1[rs:re] = scale * (t1[rs:re] + shift) + t1_chunk
            L.clamp_(min=underflow).exp2_()                                         # see exp2_floor
            acc[rs:re].mul_(scale[:, None]).add_(torch.mm(L, vals_t))
            m[rs:re] = m_new
        if refine is not None:
            refine.prune(m)
    return acc, m, ((t1, best, best_i) if diagnostics else None)


def grouped_softmax_average(
    dic: PatchDictionary,
    queries: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    diagnostics: bool = False,
    log_norm: bool = False,
    col_scale: Optional[torch.Tensor] = None,
    tile_elems: int = 1 << 18,
) -> GroupedResult:
    """Softmax-weighted average of key centres for every query pixel.

    Args:
        dic: the machine's patch dictionary at one k.
        queries: (B, K, HW) query patches (``F.unfold`` layout, padded as the machine needs).
        a, b: (B,) schedule coefficients per query image.
        diagnostics: also return the winning entry, its weight and the entropy.
        log_norm: also return the absolute log2 normaliser (``GroupedResult.log2_norm``).
        col_scale: (K,) non-negative square roots of per-element weights: the distance
            becomes ``sum_i col_scale_i^2 (q_i - a p_i)^2`` (a shaped support,
            :mod:`.supports`); keys and queries are scaled, the centres are not.
        tile_elems: logits per (query tile x key chunk) tile; bounds the working memory.
    Returns:
        :class:`GroupedResult`.
    """
    B, K, HW = queries.shape
    C = dic.image_shape[0]
    dtype, dev = queries.dtype, queries.device
    out = torch.empty(B, C, HW, dtype=dtype, device=dev)
    if diagnostics:
        w_src = torch.empty(B, HW, 3, dtype=torch.long, device=dev)
        w_wt = torch.empty(B, HW, dtype=dtype, device=dev)
        w_cnt = torch.empty(B, HW, dtype=torch.long, device=dev)
        ent = torch.empty(B, HW, dtype=dtype, device=dev)
    norm = torch.empty(B, HW, dtype=torch.float64, device=dev) if log_norm else None
    # base-2 logits: exp2 is ~3x faster than exp here (module docstring)
    underflow = exp2_floor(dtype)
    coef_lin = LOG2E * a / b**2                                                        # (B,)
    coef_sq = -LOG2E * (a**2) / (2 * b**2)                                            # (B,)
    refine_items = refine_rows(dtype, coef_sq)                                          # (B,) or None
    # float32 softmax sums run fused in C when the native kernels build (:mod:`._native`), with
    # diagnostics too (one more channel: the sum of weights x log count); the step-by-step path's
    # C pass has no diagnostics
    use_native = (dtype == torch.float32 and C <= native.MAX_CHANNELS and dev.type == "cpu"
                  and native.available())
    fuse = use_native and (not diagnostics or C + 1 <= native.MAX_CHANNELS)
    for g in dic.groups:
        P = g.query_pixels.numel()
        q_raw = queries[:, :, g.query_pixels].permute(0, 2, 1)                          # (B, P, K)
        q = q_raw - a[:, None, None] * g.mean                                          # q' = q - a mu
        chunks = g.chunks
        if col_scale is not None:                       # a shaped support: zero-weight columns dropped
            keep = None if bool((col_scale > 0).all()) else col_scale > 0
            q = q * col_scale if keep is None else q[:, :, keep] * col_scale[keep]
            chunks = _scaled_chunks(g, col_scale, keep)
        Kq = q.shape[2]                                 # K, or the support's non-zero columns
        qa = torch.cat([q * coef_lin[:, None, None],
                        coef_sq[:, None, None].expand(B, P, 1)], dim=2).reshape(B * P, Kq + 1)
        R = B * P
        M = g.n_keys
        b_rows = b[:, None].expand(B, P).reshape(R)                                     # (R,) b of each row
        # tile shape: Rt query rows x Mc keys
        Mc = max(64, min(M, tile_elems // max(1, min(R, 256))))
        skip_below = skip_threshold(g.total_keys)
        active = None if refine_items is None else refine_items[:, None].expand(B, P).reshape(R)
        refine = None if active is None else Float64Refinement(active)      # the float64 refinement's records
        fused = None
        if fuse and R >= FUSED_MIN_ROWS * torch.get_num_threads():
            # float32: logits and softmax fused in C, one call per key chunk, recording the keys for
            # the refinement and the diagnostics (its threads split the query rows: small groups,
            # e.g. bbELS edges, keep the GEMM; None: the records overflowed, see below)
            fused = _fused_group_means(chunks, qa, R, C, underflow, skip_below, refine, diagnostics)
        top = None                                      # true maxima where m lags them (fused)
        if fused is not None:
            acc, m, top, diag = fused
        else:
            refine = None if active is None else Float64Refinement(active)   # afresh after an overflow
            acc, m, diag = _gemm_group_sums(chunks, qa, R, C, diagnostics, Mc, underflow, skip_below, refine,
                                            use_native and not diagnostics, tile_elems)
        if diagnostics:
            t1, best, best_i = diag
        z = acc[:, C]                                                                   # (R,)
        z_norm = z
        if refine is None:
            mean_c = (acc[:, :C] / z[:, None]).reshape(B, P, C).permute(0, 2, 1)
        else:
            q_rows = q_raw.reshape(R, K)
            if q_rows.stride(-1) != 1 and K > 1:
                q_rows = q_rows.contiguous()                  # once, not per chunk of records
            x_flat, offsets = g.enum.padded.reshape(-1), g.enum.flat_offsets()
            a64 = a.to(torch.float64)[:, None].expand(B, P).reshape(R).contiguous()
            b64 = b_rows.to(torch.float64).contiguous()

            def exact(rows, keys):
                s64 = exact_logits_at(q_rows, rows, x_flat, g.key_bases(keys), offsets, g.mean, col_scale, a64, b64,
                                      g.log2_multiplicity(keys))
                return s64, torch.cat([g.centres(keys), torch.ones(keys.numel(), 1, dtype=dtype, device=dev)], 1)

            acc64 = refine.corrected(acc[:, : C + 1], m, exact, top=top)
            mean_c = (acc64[:, :C] / acc64[:, C:]).to(dtype).reshape(B, P, C).permute(0, 2, 1)
            z_norm = acc64[:, C]
        out[:, :, g.query_pixels] = mean_c
        if norm is not None:
            norm[:, g.query_pixels] = log2_norm_of(m, z_norm, q.reshape(R, Kq), b_rows).reshape(B, P)
        if diagnostics:
            # entropy over entries: H = log Z - T1/Z + T2/Z  (see module docstring of machines)
            h = torch.log(z) - (t1 / LOG2E) / z + acc[:, C + 1] / z                      # t1 in base 2
            ent[:, g.query_pixels] = h.reshape(B, P)
            w = torch.exp2(best - m) / z                                                # single-entry weight
            w_wt[:, g.query_pixels] = w.reshape(B, P)
            w_src[:, g.query_pixels] = g.source(best_i).reshape(B, P, 3)
            w_cnt[:, g.query_pixels] = g.multiplicity(best_i).reshape(B, P)
    if diagnostics:
        return GroupedResult(out, w_src, w_wt, w_cnt, ent, norm)
    return GroupedResult(out, log2_norm=norm)
