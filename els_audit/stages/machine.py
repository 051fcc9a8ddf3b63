"""Stage 3 of an audit: which machine models the network, from the structural verdict
(theory.md section 2)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..config import MACHINE_CHOICES
from ..errors import AuditError


@dataclass(frozen=True)
class MachineChoice:
    """Which machine models the network, and why.

    ``kind``: ELS, bbELS or LS.  ``reason``: one line.  ``forced``: ``--machine`` chose.
    ``dictionary``: ``periodic``/``valid`` for ELS, else ``None``.  ``caveats``: what the
    machine does not model (a stride period, global ops).
    """

    kind: str
    reason: str
    forced: bool
    dictionary: Optional[str]
    caveats: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return {"kind": self.kind, "reason": self.reason, "forced": self.forced, "dictionary": self.dictionary,
                "caveats": list(self.caveats)}


#: breaker kinds after which no translation symmetry is left to use
_EVERYWHERE = ("position-embedding", "coordinate-channels", "position-dependent", "dense-over-space")


def choose_machine(structure: Optional[dict], override: str = "auto", dictionary: str = "periodic") -> MachineChoice:
    """The machine the verdict calls for (theory.md section 2).

    Rules: equivariant (circular padding, period 1) -> ELS; a boundary band (zero-type
    padding) -> bbELS; translation symmetry broken everywhere (position embeddings,
    coordinates, dense layers over space), an op without a rule, or no structural
    analysis at all -> LS (locality without equivariance: nothing unproven is assumed).
    A stride period P > 1 and global ops are recorded as caveats: the machines model
    neither.  ``override`` (``--machine``) wins, with the verdict kept in the reason.

    Args:
        structure: ``StructuralEquivarianceResult.to_dict()``, or ``{"error": ...}`` /
            ``None`` when the network could not be traced.
        override: ``auto`` or a machine kind.
        dictionary: ELS dictionary (``periodic``/``valid``).
    Returns:
        :class:`MachineChoice`.
    """
    caveats: list[str] = []
    if not structure or structure.get("error"):
        why = (structure or {}).get("error", "no structural analysis")
        kind, reason = "LS", f"the network's structure is unknown ({why}); LS assumes no equivariance"
    else:
        verdict = list(structure.get("verdict") or [])
        kinds = {b.get("kind") for b in structure.get("breakers") or [] if b.get("breaks_equivariance", True)}
        period = int(structure.get("period_all") or 1)
        if period > 1:
            caveats.append(f"equivariant only to shifts by multiples of {period} (strided layers); "
                           f"the machine assumes every shift")
        if "non-local" in verdict:
            caveats.append("global ops (attention / statistics over space) mix the whole image; "
                           "a local machine cannot explain that part")
        hard = sorted(kinds & set(_EVERYWHERE))
        if structure.get("partial"):
            kind, reason = "LS", "some ops have no equivariance rule (partial analysis); LS assumes no equivariance"
        elif hard:
            kind = "LS"
            reason = f"translation symmetry is broken everywhere ({', '.join(hard)}); LS keeps locality only"
        elif "boundary-broken" in verdict:
            band = structure.get("band_width")
            kind, reason = "bbELS", f"zero-type padding breaks equivariance within {band} px of the border -> bbELS"
        else:
            kind, reason = "ELS", "circular / no padding: equivariant to shifts -> ELS"
    if override != "auto":
        if override not in MACHINE_CHOICES:
            raise AuditError(f"machine must be one of {', '.join(MACHINE_CHOICES)}; got {override!r}")
        reason = f"--machine {override} (the verdict suggests {kind}: {reason})"
        kind, forced = override, True
    else:
        forced = False
    return MachineChoice(kind=kind, reason=reason, forced=forced,
                         dictionary=dictionary if kind == "ELS" else None, caveats=tuple(caveats))
