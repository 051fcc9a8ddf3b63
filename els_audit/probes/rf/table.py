"""The receptive-field rule table: one rule per declared op kind (duplicates refused)."""

from __future__ import annotations

from ..kinds import MODELLED
from ..rules import RuleTable

#: Receptive-field rules, one per canonical op kind: ``rule(ctx) -> Effect`` (or a tuple
#: of effects, one per output, for a multi-output op).
RF_RULES = RuleTable("receptive-field", allowed=MODELLED, describe=lambda k: f"op kind {k!r}")
rf_rule = RF_RULES.register
