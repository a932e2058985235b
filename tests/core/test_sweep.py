"""``turbo-fx sweep`` (``turbo_fx.bench.sweep``): its cases and its rule for reasons that quote an
exception. The cases themselves run, with the outcome each has today, in
``tests/core/test_architectures.py`` (``test_recent_architectures``)."""
from __future__ import annotations

from turbo_fx.bench import sweep

NAMES = [case.name for case in sweep.CASES]


def test_the_reason_rule_catches_exception_text():
    assert sweep.exception_text("node x fails after merging: RuntimeError: shape '[2, 64]' is invalid")
    assert sweep.exception_text("internal error in a turbo pass: Exception raised")
    assert not sweep.exception_text("site 0 (blocks.0.attn): causal attention (merging would let tokens see the future)")


def test_every_case_has_a_builder_and_a_distinct_name():
    assert len(set(NAMES)) == len(NAMES)
    assert set(NAMES) == set(sweep.BUILDERS)
