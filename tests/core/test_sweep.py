"""Recent architectures (rotary positions, joint image-text attention, readers that reshape the
tokens, video, NaFlex, a tower compiled as many graphs), built tiny from their library classes
(the list is ``turbo_fx.bench.sweep.CASES``, also run by ``turbo-fx sweep``). Each either merges or
falls back, and never breaks: it runs, keeps the unmerged output's shape, stays finite where it
merges, and every fallback reason names a structure rather than quoting an exception.

Which ones merge is not asserted here: it moves as support grows, and ``turbo-fx sweep`` prints
where each stands. Each case's outcome is recorded as the test's ``outcome`` property.
"""
from __future__ import annotations

import pytest
import torch

from turbo_fx.bench import sweep

pytestmark = pytest.mark.usefixtures("one_torch_thread")

NAMES = [case.name for case in sweep.CASES]

# One compile per case for both tests below: the compile is nearly all of a case's time.
_RUNS: dict[str, tuple] = {}


def compile_and_run(turbo, name: str) -> tuple:
    """(merged output, unmerged output, graph reports) of case ``name``; an exception raised by
    the compiled call is kept and raised again for the second test."""
    if name not in _RUNS:
        case = sweep.BY_NAME[name]
        built = sweep.build(case)
        compiled = turbo(built.model, **case.options)
        try:
            out = built.output(compiled(*built.args, **built.kwargs))
        except Exception as exc:
            _RUNS[name] = (exc,)
            raise
        with torch.no_grad():
            plain = built.output(built.model(*built.args, **built.kwargs))
        _RUNS[name] = (out, plain, list(compiled.graphs))
    if len(_RUNS[name]) == 1:
        raise _RUNS[name][0]
    return _RUNS[name]


@pytest.mark.parametrize("name", NAMES)
def test_runs_and_keeps_the_output_shape(turbo, record_property, name):
    out, plain, graphs = compile_and_run(turbo, name)
    record_property("outcome", sweep.outcome(graphs))
    assert graphs, "turbo compiled no graph"
    assert out.shape == plain.shape
    if sweep.outcome(graphs) == "merged":
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", NAMES)
def test_fallback_reasons_name_a_structure(turbo, name):
    """Fails where a graph's fallback reason carries the text of an exception (``Error:``,
    ``Exception``) from a trial build instead of the structure turbo could not handle."""
    _, _, graphs = compile_and_run(turbo, name)
    reasons = [g.fallback_reason for g in graphs if g.fallback_reason]
    quoting = [reason for reason in reasons if "Error:" in reason or "Exception" in reason]
    assert not quoting, "\n".join(quoting)


def test_the_reason_rule_catches_exception_text():
    assert sweep.exception_text("node x fails after merging: RuntimeError: shape '[2, 64]' is invalid")
    assert sweep.exception_text("internal error in a turbo pass: Exception raised")
    assert not sweep.exception_text("site 0 (blocks.0.attn): causal attention (merging would let tokens see the future)")


def test_every_case_has_a_builder_and_a_distinct_name():
    assert len(set(NAMES)) == len(NAMES)
    assert set(NAMES) == set(sweep.BUILDERS)
