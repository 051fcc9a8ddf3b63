"""The receptive-field result dataclasses."""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from typing import Optional, Union

import numpy as np

from .maps import PeriodicMap


# ----------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------
def as_number(x: Fraction) -> Union[int, float]:
    return int(x) if x.denominator == 1 else round(float(x), 4)


@dataclass(frozen=True)
class AxisField:
    """The local receptive field along one image axis at the analysed output.

    Attributes:
        axis: ``"H"``, ``"W"`` (or ``"L"``, ``"D"``).
        size: the largest field, in image pixels, over output positions (on an infinite
            image, i.e. away from the borders).  L stacked conv3: ``2L + 1``.
        extent: (lo, hi) offsets of the field relative to the output pixel, over all
            phases (a stride-2 conv then a k2 s2 transposed conv: size 3, extent (-2, 1)).
        centred_side: the smallest odd centred window holding the field at every phase:
            ``2 max(|lo|, |hi|) + 1``.
        period: the phase period of the field pattern at the output (1 for stride-1 nets).
        scale: image pixels per output position (``"1"`` for a denoiser).
        image_size: the example's size along this axis.
        covers_image: ``size >= image_size``.
        phases: per output phase, the (lo, hi) offsets.
    """

    axis: str
    size: int
    extent: tuple[Union[int, float], Union[int, float]]
    centred_side: int
    period: int
    scale: str
    image_size: int
    covers_image: bool
    phases: tuple
    map: Optional[PeriodicMap] = field(default=None, repr=False, compare=False)

    def interval(self, pixel: int) -> tuple[int, int]:
        """(first, last) image index of the field of output position ``pixel`` (infinite
        image: may lie outside the example)."""
        lo, hi = self.map.eval(np.asarray([pixel]))
        return int(lo[0]), int(hi[0])

    def to_dict(self) -> dict:
        return {
            "axis": self.axis,
            "size": self.size,
            "extent": list(self.extent),
            "centred_side": self.centred_side,
            "period": self.period,
            "scale": self.scale,
            "image_size": self.image_size,
            "covers_image": self.covers_image,
            "phases": [list(p) if p is not None else None for p in self.phases],
        }


@dataclass(frozen=True)
class GlobalPath:
    """A node through which the output depends on every position along ``axes``."""

    node: str
    target: str
    module_path: str
    kind: str
    axes: tuple[str, ...]
    reason: str
    equivariant: bool

    def to_dict(self) -> dict:
        return {"node": self.node, "target": self.target, "module_path": self.module_path, "kind": self.kind,
                "axes": list(self.axes), "reason": self.reason, "equivariant": self.equivariant}


@dataclass(frozen=True)
class UnsupportedOp:
    """An op on the image path that no rule models (treated as global, result partial)."""

    node: str
    target: str
    kind: str
    reason: str

    def to_dict(self) -> dict:
        return {"node": self.node, "target": self.target, "kind": self.kind, "reason": self.reason}


@dataclass(frozen=True)
class ReceptiveFieldResult:
    """Theoretical receptive field of the analysed output.

    Attributes:
        axes: the *local* field per image axis (paths that avoid global ops); empty when
            every path from the image passes a global op.
        is_global: some path passes an op that mixes all positions (the field is then the
            whole image); those ops are in ``global_paths``.
        global_paths: the global ops upstream of the output, in graph order.
        unsupported_ops: ops on the image path without a rule (``partial`` is then True).
        partial: the answer is a bound under assumptions (see ``unsupported_ops``).
        input_shape / output_node: what was analysed.
    """

    axes: tuple[AxisField, ...]
    is_global: bool
    global_paths: tuple[GlobalPath, ...]
    unsupported_ops: tuple[UnsupportedOp, ...]
    partial: bool
    input_shape: tuple[int, ...]
    output_node: str
    spatial_axes: tuple[str, ...] = ("H", "W")

    @property
    def has_local_field(self) -> bool:
        return bool(self.axes)

    def size(self, axis: str) -> int:
        """Local field size along ``axis``."""
        for a in self.axes:
            if a.axis == axis:
                return a.size
        raise KeyError(f"no local field along {axis!r} (axes: {[a.axis for a in self.axes]})")

    @property
    def field(self) -> dict[str, Union[int, str]]:
        """Per axis: the local field size, or ``"whole image"`` when a global op is on a path."""
        if self.is_global:
            return {a: "whole image" for a in self.spatial_axes}
        return {a.axis: a.size for a in self.axes}

    def summary(self) -> str:
        loc = " x ".join(str(a.size) for a in self.axes) + " px" if self.axes else "none"
        s = f"local field {loc}"
        if self.is_global:
            kinds = sorted({g.kind for g in self.global_paths})
            s += f"; global through {len(self.global_paths)} op(s) ({', '.join(kinds)})"
        if self.partial:
            s += f"; PARTIAL: {len(self.unsupported_ops)} unsupported op(s)"
        return s

    def to_dict(self) -> dict:
        return {
            "summary": self.summary(),
            "axes": [a.to_dict() for a in self.axes],
            "field": self.field,
            "is_global": self.is_global,
            "global_paths": [g.to_dict() for g in self.global_paths],
            "unsupported_ops": [u.to_dict() for u in self.unsupported_ops],
            "partial": self.partial,
            "input_shape": list(self.input_shape),
            "output_node": self.output_node,
            "spatial_axes": list(self.spatial_axes),
        }
