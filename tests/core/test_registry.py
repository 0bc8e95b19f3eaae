"""Registries exist only at the three extension points; names are unique and errors list them."""

import pytest

from align.core import ADVANTAGE_ESTIMATORS, POLICY_LOSSES, PREFERENCE_LOSSES, Registry, UnknownNameError


def test_register_and_get_return_the_same_function():
    reg = Registry("widget")

    @reg.register("a")
    def a():
        return 1

    assert reg.get("a") is a and reg["a"] is a
    assert "a" in reg and "b" not in reg
    assert list(reg) == ["a"] and len(reg) == 1


def test_duplicate_name_is_rejected_and_first_entry_kept():
    reg = Registry("widget")

    @reg.register("a")
    def first():
        return 1

    with pytest.raises(ValueError, match="'a' is already registered"):

        @reg.register("a")
        def second():
            return 2

    assert reg.get("a") is first


def test_unknown_name_lists_every_valid_name():
    reg = Registry("widget")
    for name in ("zeta", "alpha", "mid"):
        reg.register(name)(lambda: None)
    with pytest.raises(UnknownNameError) as info:
        reg.get("nope")
    message = str(info.value)
    assert message == "unknown widget 'nope'; valid names: alpha, mid, zeta"
    # Catchable as either a failed lookup or a bad config value.
    assert isinstance(info.value, KeyError) and isinstance(info.value, ValueError)


def test_the_three_extension_points_hold_the_documented_names():
    assert set(ADVANTAGE_ESTIMATORS) == {"grpo", "dr_grpo", "rloo", "reinforce_pp"}
    assert "ppo" in POLICY_LOSSES
    assert set(PREFERENCE_LOSSES) == {"sigmoid", "robust", "ipo", "hinge", "simpo", "kto", "orpo"}
