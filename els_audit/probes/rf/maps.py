"""Exact per-axis index maps: how an op maps positions (:class:`AxisOp`) and what image
interval each position of a node depends on (:class:`PeriodicMap`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Optional

import numpy as np

BIG = 1 << 40  # "no dependence" sentinel for an interval bound


class Unsupported(Exception):
    """Raised by a rule for a call pattern it does not model (reported, never guessed)."""


# ----------------------------------------------------------------------------------------
# Index maps
# ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AxisOp:
    """How one op maps one spatial axis: output position ``o`` reads input positions
    ``taps(o)``, periodic as ``taps(o + k n_out) = taps(o mod n_out) + k n_in``.

    Attributes:
        n_out, n_in: the period in output / input positions (conv stride s: ``(1, s)``;
            transposed conv or nearest upsampling by s: ``(s, 1)``).
        taps: for ``o = 0 .. n_out - 1`` the input positions read (may be negative or past
            the end: those are padding, handled by ``boundary``).
        boundary: what an out-of-range tap reads: ``"zeros"`` (any constant, incl. the
            -inf of max pooling), ``"reflect"``, ``"replicate"``, ``"circular"``, or
            ``"none"`` (never happens for this op).
        finite_taps: exact taps for the example's sizes when the op is not translation
            periodic (``align_corners=True`` resampling); ``None`` otherwise.
        label: short description, e.g. ``"conv k3 s1 d1 pad(1,1) zeros"``.
    """

    n_out: int
    n_in: int
    taps: tuple[tuple[int, ...], ...]
    boundary: str = "none"
    finite_taps: Optional[tuple[tuple[int, ...], ...]] = None
    label: str = ""

    @property
    def downsample(self) -> Fraction:
        """Input positions per output position (the op's own stride)."""
        return Fraction(self.n_in, self.n_out)

    def _tap_matrix(self) -> tuple[np.ndarray, np.ndarray]:
        T = max(1, max(len(t) for t in self.taps))
        m = np.zeros((self.n_out, T), dtype=np.int64)
        valid = np.zeros((self.n_out, T), dtype=bool)
        for o, row in enumerate(self.taps):
            m[o, : len(row)] = row
            valid[o, : len(row)] = True
        return m, valid

    def taps_for(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Taps of many output positions: (positions [P], T) int array and a validity mask."""
        m, valid = self._tap_matrix()
        k, r = np.divmod(positions, self.n_out)
        return m[r] + (k * self.n_in)[:, None], valid[r]

    @staticmethod
    def _outside(q: np.ndarray, valid: np.ndarray, n_in: int) -> np.ndarray:
        return valid & ((q < 0) | (q >= n_in))

    def reads_outside(self, n_in: int, n_out: int) -> bool:
        """Some output position (at these sizes) reads a tap past either end of the input,
        i.e. the op's boundary condition matters (circular included)."""
        if self.finite_taps is not None:
            return any(not 0 <= t < n_in for row in self.finite_taps[:n_out] for t in row)
        q, valid = self.taps_for(np.arange(n_out))
        return bool(self._outside(q, valid, n_in).any())

    def finite(self, n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Taps on a finite axis of ``n_in`` -> ``n_out`` positions, boundary applied.

        Returns:
            idx: (n_out, T) int64 input index read by each tap, ``-1`` where the tap reads
                a constant (zero padding / nothing);
            valid: (n_out, T) bool, the tap exists;
            touched: (n_out,) bool, the output reads padding (the boundary condition).
        """
        if self.finite_taps is not None:
            T = max(1, max(len(t) for t in self.finite_taps))
            q = np.zeros((n_out, T), dtype=np.int64)
            valid = np.zeros((n_out, T), dtype=bool)
            for o, row in enumerate(self.finite_taps[:n_out]):
                q[o, : len(row)] = row
                valid[o, : len(row)] = True
        else:
            q, valid = self.taps_for(np.arange(n_out))
        out_of_range = self._outside(q, valid, n_in)
        touched = out_of_range.any(axis=1) & (self.boundary not in ("circular",))
        idx = q.copy()
        if self.boundary == "circular":
            idx = np.mod(q, n_in)
        elif self.boundary == "reflect":
            if n_in == 1:
                idx = np.zeros_like(q)
            else:
                period = 2 * (n_in - 1)
                r = np.mod(q, period)
                idx = np.where(r > n_in - 1, period - r, r)
        elif self.boundary == "replicate":
            idx = np.clip(q, 0, n_in - 1)
        else:  # zeros / none: an out-of-range tap reads a constant
            idx = np.where(out_of_range, -1, q)
        idx = np.where(valid, idx, -1)
        return idx, valid, touched


@dataclass(frozen=True)
class PeriodicMap:
    """Exact dependence interval of each position of a node along one axis, on an
    infinite image: ``[lo(o), hi(o)]`` with ``lo(o + n) = lo(o) + D`` (same for hi).

    ``lo[r] > hi[r]`` marks a phase that depends on no image pixel.
    """

    n: int
    D: int
    lo: tuple[int, ...]
    hi: tuple[int, ...]

    @staticmethod
    def identity() -> "PeriodicMap":
        return PeriodicMap(1, 1, (0,), (0,))

    @property
    def scale(self) -> Fraction:
        """Jump: image pixels per node position."""
        return Fraction(self.D, self.n)

    def eval(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        k, r = np.divmod(q, self.n)
        lo = np.asarray(self.lo, dtype=np.int64)[r] + k * self.D
        hi = np.asarray(self.hi, dtype=np.int64)[r] + k * self.D
        return lo, hi

    @staticmethod
    def _make(n: int, D: int, lo: np.ndarray, hi: np.ndarray) -> "PeriodicMap":
        empty = (lo > BIG // 2) | (hi < -BIG // 2) | (lo > hi)
        lo = np.where(empty, BIG, lo)
        hi = np.where(empty, -BIG, hi)
        # Smallest period that reproduces the map.
        for d in range(1, n):
            if n % d or (D * d) % n:
                continue
            step = D * d // n
            e = empty
            if not np.array_equal(e[d:], e[:-d]):
                continue
            ok = ~e[d:]
            if np.array_equal(lo[d:][ok], lo[:-d][ok] + step) and np.array_equal(hi[d:][ok], hi[:-d][ok] + step):
                return PeriodicMap(d, step, tuple(int(v) for v in lo[:d]), tuple(int(v) for v in hi[:d]))
        return PeriodicMap(n, D, tuple(int(v) for v in lo), tuple(int(v) for v in hi))

    def apply(self, op: AxisOp) -> "PeriodicMap":
        """The map of the op's output: exact, phase by phase."""
        m = self.n // math.gcd(self.n, op.n_in)
        n_o = op.n_out * m
        D_o = self.D * (m * op.n_in // self.n)
        q, valid = op.taps_for(np.arange(n_o))
        lo, hi = self.eval(q)
        lo = np.where(valid, lo, BIG).min(axis=1)
        hi = np.where(valid, hi, -BIG).max(axis=1)
        return PeriodicMap._make(n_o, D_o, lo, hi)

    def union(self, other: "PeriodicMap") -> "PeriodicMap":
        if self.scale != other.scale:
            raise Unsupported(f"branches at different scales ({self.scale} vs {other.scale} px per position) are combined")
        n = self.n * other.n // math.gcd(self.n, other.n)
        D = self.D * (n // self.n)
        q = np.arange(n)
        l1, h1 = self.eval(q)
        l2, h2 = other.eval(q)
        return PeriodicMap._make(n, D, np.minimum(l1, l2), np.maximum(h1, h2))

    def phases(self) -> list[Optional[tuple[Fraction, Fraction]]]:
        """Per phase o: (lo(o) - o j, hi(o) - o j) relative to the position's own image
        coordinate ``o j`` (``None`` for a phase that depends on nothing)."""
        out = []
        for o in range(self.n):
            if self.lo[o] > self.hi[o]:
                out.append(None)
            else:
                c = Fraction(o * self.D, self.n)
                out.append((self.lo[o] - c, self.hi[o] - c))
        return out

    def size(self) -> int:
        sizes = [h - l + 1 for l, h in zip(self.lo, self.hi) if l <= h]
        return max(sizes) if sizes else 0

    def is_empty(self) -> bool:
        return all(l > h for l, h in zip(self.lo, self.hi))

    def to_dict(self) -> dict:
        return {"period": self.n, "shift": self.D, "lo": list(self.lo), "hi": list(self.hi)}
