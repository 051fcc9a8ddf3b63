"""The declared op kinds: every kind is modelled by both rule tables, data-free, or declared
unmodelled with a reason; a misspelt kind fails when it is registered."""

from __future__ import annotations

import pytest

from els_audit.probes import EQ_RULES, RF_RULES, eq_rule, rf_rule
from els_audit.probes.kinds import DATA_FREE, MODELLED, OP_KINDS, UNMODELLED


def test_the_three_groups_are_disjoint_and_make_the_vocabulary():
    assert not set(MODELLED) & set(DATA_FREE)
    assert not set(MODELLED) & set(UNMODELLED)
    assert not set(DATA_FREE) & set(UNMODELLED)
    assert OP_KINDS == set(MODELLED) | set(DATA_FREE) | set(UNMODELLED)
    assert all(isinstance(why, str) and why for why in {**MODELLED, **DATA_FREE, **UNMODELLED}.values())


@pytest.mark.parametrize("kind", sorted(MODELLED))
def test_every_modelled_kind_has_both_rules(kind):
    assert kind in RF_RULES, f"no receptive-field rule for {kind!r}"
    assert kind in EQ_RULES, f"no equivariance rule for {kind!r}"


def test_rule_tables_hold_only_modelled_kinds():
    assert set(RF_RULES) <= set(MODELLED)
    assert set(EQ_RULES) <= set(MODELLED)


@pytest.mark.parametrize("register", [rf_rule, eq_rule])
def test_a_misspelt_kind_fails_at_registration(register):
    with pytest.raises(ValueError, match="not a declared op kind"):
        register("convv")
    with pytest.raises(ValueError, match="not a declared op kind"):
        register("gather")  # declared, but as unmodelled: a rule for it must move it first
