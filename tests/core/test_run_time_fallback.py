"""A merged graph that fails at run time: the call is run by the unmerged graph. One failed
call is one unmerged call (an info record, counted in the report); the next call merges again,
and only ``MAX_CONSECUTIVE_FAILURES`` in a row make the graph keep the unmerged graph from then
on (one warning, the report says why). If the unmerged graph fails too, the error is the
caller's and reaches them as it would without turbo."""
from __future__ import annotations

import logging

import pytest
import torch

import turbo_fx
from model_builders import images, small_vit
from turbo_fx.guarded_call import MAX_CONSECUTIVE_FAILURES, GuardedCompiled, guard
from turbo_fx.passes.graph_traits import graph_traits
from turbo_fx.ops import merge_step
from turbo_fx.report import GraphReport


@pytest.fixture
def merge_fails_when_told(monkeypatch):
    """Makes the merge op raise on real tensors once ``state["fail"]`` is set (its fake
    implementation, which the compile uses, keeps working)."""
    state = {"fail": False, "real_calls": 0}
    real = merge_step.merge_step_outputs

    def maybe_failing(*args):
        x = args[0]
        if not merge_step._is_fake(x):
            state["real_calls"] += 1
            if state["fail"]:
                raise RuntimeError("injected kernel failure")
        return real(*args)

    monkeypatch.setattr(merge_step, "merge_step_outputs", maybe_failing)
    return state


@pytest.fixture
def compiled_merge_fails_when_told(monkeypatch):
    """Makes every compiled merge piece raise once ``state["fail"]`` is set (counting its calls
    in "real_calls"), as a failing generated kernel would."""
    from turbo_fx import block_compile

    state = {"fail": False, "real_calls": 0}
    real = block_compile._compile_merge_piece

    def compile_maybe_failing(*args, **kwargs):
        compiled = real(*args, **kwargs)
        assert compiled is not None, "the merge piece was expected to compile"

        def run(*piece_args):
            state["real_calls"] += 1
            if state["fail"]:
                raise RuntimeError("injected kernel failure")
            return compiled(*piece_args)

        return block_compile._Piece(run, "merge")

    monkeypatch.setattr(block_compile, "_compile_merge_piece", compile_maybe_failing)
    return state


# The eager merge op (compile_merge_step=False) under both inner backends, and the compiled
# merge pieces of the default Inductor path.
PATHS = [("eager", False, "merge_fails_when_told"), ("inductor", False, "merge_fails_when_told"),
         ("inductor", None, "compiled_merge_fails_when_told")]
PATH_IDS = ["eager", "inductor", "inductor, compiled merges"]


def _merging(turbo, request, inner, compile_merge_step, failing):
    """A small ViT compiled with merges that fail when told, after one merged call: the compiled
    model, the fixture's state, the input, the merged and the unmerged outputs for it."""
    merge_fails_when_told = request.getfixturevalue(failing)
    model = small_vit("vit", patch_size=4, depth=3)
    x = images(2)
    compiled = turbo(model, r=3, inner_backend=inner, compile_merge_step=compile_merge_step)
    with torch.no_grad():
        unmerged = model(x)
    merged = compiled(x)
    assert compiled.report.merges == 3 and compiled.report.fallback_reason is None
    assert ("3 compiled merge pieces" in (compiled.report.block_compile or "")) == (compile_merge_step is None)
    assert (merged - unmerged).abs().max().item() > 1e-3  # it really merged before the failure
    turbo_fx.counters.clear()
    return compiled, merge_fails_when_told, x, merged, unmerged


def _messages(caplog, level):
    return [r.getMessage() for r in caplog.records if r.levelno == level and r.name == "turbo_fx"]


@pytest.mark.parametrize("inner, compile_merge_step, failing", PATHS, ids=PATH_IDS)
def test_failures_in_a_row_run_the_unmerged_graph_from_then_on(turbo, request, caplog, inner, compile_merge_step,
                                                                failing):
    compiled, merge_fails_when_told, x, _, unmerged = _merging(turbo, request, inner, compile_merge_step, failing)
    calls = merge_fails_when_told["real_calls"]
    merge_fails_when_told["fail"] = True
    with caplog.at_level(logging.INFO, logger="turbo_fx"):
        for failed in range(1, MAX_CONSECUTIVE_FAILURES + 1):
            out = compiled(x)
            assert (out - unmerged).abs().max().item() < 1e-5
            assert compiled.report.run_time_failures == failed
            assert (compiled.report.fallback_reason is None) == (failed < MAX_CONSECUTIVE_FAILURES)
    assert compiled.report.fallback_reason == (f"the merged graph failed at run time {MAX_CONSECUTIVE_FAILURES} "
                                               "calls in a row: RuntimeError: injected kernel failure")
    assert compiled.report.last_run_time_failure == "RuntimeError: injected kernel failure"
    warnings = _messages(caplog, logging.WARNING)
    assert len(warnings) == 1 and "runs without token merging from now on" in warnings[0]
    infos = [m for m in _messages(caplog, logging.INFO) if "one call ran without token merging" in m]
    assert len(infos) == MAX_CONSECUTIVE_FAILURES - 1
    assert turbo_fx.counters["merged_calls_failed"] == MAX_CONSECUTIVE_FAILURES
    assert turbo_fx.counters["graphs_fallback_at_run_time"] == 1
    # Each failing call reached the merge op once; from then on it is not called at all.
    assert merge_fails_when_told["real_calls"] == calls + MAX_CONSECUTIVE_FAILURES
    out2 = compiled(images(2, seed=5))
    with torch.no_grad():
        assert (out2 - compiled.fn._orig_mod(images(2, seed=5))).abs().max().item() < 1e-5
    assert merge_fails_when_told["real_calls"] == calls + MAX_CONSECUTIVE_FAILURES
    assert turbo_fx.counters["graphs_fallback_at_run_time"] == 1


@pytest.mark.parametrize("inner, compile_merge_step, failing", [PATHS[0], PATHS[2]], ids=[PATH_IDS[0], PATH_IDS[2]])
def test_one_failed_call_runs_unmerged_and_the_next_merges_again(turbo, request, caplog, inner, compile_merge_step,
                                                                 failing):
    """A transient failure (memory, a race) costs that call its merging, not the process's:
    the following calls give the merged output again, and a success resets the count, so that
    failures apart from each other never turn merging off."""
    compiled, merge_fails_when_told, x, merged, unmerged = _merging(turbo, request, inner, compile_merge_step,
                                                                    failing)
    with caplog.at_level(logging.INFO, logger="turbo_fx"):
        for _ in range(2):
            merge_fails_when_told["fail"] = True
            for _ in range(MAX_CONSECUTIVE_FAILURES - 1):
                assert (compiled(x) - unmerged).abs().max().item() < 1e-5
            merge_fails_when_told["fail"] = False
            for _ in range(2):
                assert (compiled(x) - merged).abs().max().item() < 1e-6
    report = compiled.report
    assert report.fallback_reason is None and report.run_time_failures == 2 * (MAX_CONSECUTIVE_FAILURES - 1)
    assert report.last_run_time_failure == "RuntimeError: injected kernel failure"
    assert "run-time failures: 4 call(s) ran unmerged" in report.summary()
    assert not _messages(caplog, logging.WARNING)
    infos = _messages(caplog, logging.INFO)
    assert len([m for m in infos if "one call ran without token merging" in m]) == 2 * (MAX_CONSECUTIVE_FAILURES - 1)
    assert len([m for m in infos if f"merges again after {MAX_CONSECUTIVE_FAILURES - 1} failed" in m]) == 2
    assert turbo_fx.counters["merged_calls_failed"] == 2 * (MAX_CONSECUTIVE_FAILURES - 1)
    assert turbo_fx.counters["graphs_fallback_at_run_time"] == 0 and turbo_fx.counters["graphs_fallback"] == 0


def test_merging_turns_off_after_max_failures_in_a_row(caplog):
    """``max_failures`` on the guard: with 2, a failure, a success and a failure keep merging;
    two failures in a row end it, and the merged code is not called again."""
    report = GraphReport(graph_index=0, n_nodes=0)
    calls = []

    def merged(x):
        calls.append(x)
        if x < 0:
            raise ValueError("merged code failed")
        return "merged"

    guarded = GuardedCompiled(merged, lambda args: lambda x: "unmerged", report, max_failures=2)
    with caplog.at_level(logging.INFO, logger="turbo_fx"):
        assert [guarded(x) for x in (-1, 1, -2, -3, 4)] == ["unmerged", "merged", "unmerged", "unmerged", "unmerged"]
    assert calls == [-1, 1, -2, -3] and guarded.fell_back and guarded.merged is None
    assert report.fallback_reason == \
        "the merged graph failed at run time 2 calls in a row: ValueError: merged code failed"
    assert report.run_time_failures == 3
    assert len(_messages(caplog, logging.WARNING)) == 1


def test_max_consecutive_failures_set_to_one_turns_merging_off_at_the_first_failure(monkeypatch, caplog):
    from turbo_fx import guarded_call

    monkeypatch.setattr(guarded_call, "MAX_CONSECUTIVE_FAILURES", 1)
    report = GraphReport(graph_index=0, n_nodes=0)
    guarded = GuardedCompiled(_raises, lambda args: lambda x: "unmerged", report)
    with caplog.at_level(logging.INFO, logger="turbo_fx"):
        assert guarded(1) == "unmerged"
    assert guarded.fell_back
    assert report.fallback_reason == "the merged graph failed at run time: RuntimeError: merged code failed"
    assert len(_messages(caplog, logging.WARNING)) == 1 and not _messages(caplog, logging.INFO)


def test_an_error_the_unmerged_graph_repeats_is_the_callers():
    report = GraphReport(graph_index=0, n_nodes=0)
    calls = []

    def merged(x):
        calls.append("merged")
        if x < 0:
            raise ValueError("merged code failed")
        return "merged"

    def unmerged(x):
        calls.append("unmerged")
        raise KeyError("the caller's own error")

    guarded = GuardedCompiled(merged, lambda args: unmerged, report)
    with pytest.raises(KeyError, match="the caller's own error") as info:
        guarded(-1)
    assert info.value.__context__ is None  # not shown as raised while handling the merged failure
    assert report.fallback_reason is None and not guarded.fell_back
    assert report.run_time_failures == 0 and not turbo_fx.counters["merged_calls_failed"]
    assert guarded(1) == "merged"  # the merged code stays
    assert calls == ["merged", "unmerged", "merged"]


def _graph(in_place: bool) -> torch.fx.GraphModule:
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    y = graph.call_method("add_" if in_place else "add", (x, 1))
    graph.output(y)
    return torch.fx.GraphModule(torch.nn.Module(), graph)


def _raises(*args):
    raise RuntimeError("merged code failed")


def test_graphs_that_update_in_place_are_not_guarded():
    """A second run after a partial first one could apply the update twice."""
    gm = _graph(in_place=True)
    assert guard(_raises, gm, None, None, graph_traits(gm, [torch.zeros(2)])) is _raises


@pytest.mark.parametrize("inputs, compiles", [([torch.zeros(2)], True), ([torch.zeros(2), 3], False)],
                         ids=["static", "symbolic-input"])
def test_the_unmerged_graph_is_compiled_only_for_static_shapes(inputs, compiles):
    """A compile from one call's concrete inputs would fit only their shapes, so a graph with
    symbolic inputs falls back to running the unmerged graph eagerly."""
    compiled_with = []

    def compiler(gm, args):
        compiled_with.append(args)
        return gm.forward

    gm = _graph(in_place=False)
    report = GraphReport(graph_index=0, n_nodes=0)
    guarded = guard(_raises, gm, compiler, report, graph_traits(gm, inputs))
    assert torch.equal(guarded(torch.ones(2)), torch.full((2,), 2.0))
    assert len(compiled_with) == int(compiles)
    if compiles:
        assert torch.equal(compiled_with[0][0], torch.ones(2))  # the failing call's inputs, not Dynamo's
    assert report.run_time_failures == 1 and report.last_run_time_failure == "RuntimeError: merged code failed"
    for _ in range(MAX_CONSECUTIVE_FAILURES - 1):
        assert torch.equal(guarded(torch.ones(2)), torch.full((2,), 2.0))
    assert len(compiled_with) == int(compiles)  # compiled once, on first need
    assert guarded.fell_back and report.fallback_reason.startswith("the merged graph failed at run time")


class MaskedEncoder(torch.nn.Module):
    """A pre-norm encoder whose attention mask is an input, [B, 1, N, N], used as it is: the
    compile sees a key-padding mask, a later call may bring a causal one."""

    def __init__(self, dim: int = 32, heads: int = 2, depth: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.heads = heads
        self.norms = torch.nn.ModuleList(torch.nn.LayerNorm(dim) for _ in range(depth))
        self.qkv = torch.nn.ModuleList(torch.nn.Linear(dim, 3 * dim) for _ in range(depth))
        self.proj = torch.nn.ModuleList(torch.nn.Linear(dim, dim) for _ in range(depth))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        for norm, qkv, proj in zip(self.norms, self.qkv, self.proj):
            q, k, v = qkv(norm(x)).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
            a = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            x = x + proj(a.transpose(1, 2).reshape(b, n, c))
        return x[:, 0]


@pytest.mark.parametrize("inner", ["eager", "inductor"])
def test_a_causal_mask_after_a_padding_one_runs_unmerged(turbo, caplog, inner):
    """The check that a mask is a key-padding mask raises a plain error on the host (not a
    device assert, which on a GPU would lose the CUDA context): the run-time guard then runs
    the call unmerged, and the caller gets the unmerged model's output. One odd mask does not
    turn merging off: the next padding mask merges again."""
    model = MaskedEncoder().eval()
    x = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(3))
    padding = torch.ones(2, 1, 16, 16, dtype=torch.bool)
    padding[1, ..., 12:] = False
    # Laid out as the padding mask is, so that Dynamo reuses the graph compiled for it (an
    # expanded mask would be compiled anew, and refused at compile time).
    causal = torch.ones(16, 16, dtype=torch.bool).tril().expand(2, 1, 16, 16).contiguous()
    compiled = turbo(model, r=3, inner_backend=inner)
    merged = compiled(x, padding)
    assert compiled.report.merges == 3 and compiled.report.fallback_reason is None
    with torch.no_grad():
        assert (merged - model(x, padding)).abs().max().item() > 1e-4  # it merged
        unmerged = model(x, causal)
    with caplog.at_level(logging.INFO, logger="turbo_fx"):
        out = compiled(x, causal)
        again = compiled(x, padding)
    assert len(compiled.graphs) == 1 and (out - unmerged).abs().max().item() < 1e-5
    assert "varies by query" in compiled.report.last_run_time_failure
    assert compiled.report.run_time_failures == 1 and compiled.report.fallback_reason is None
    assert len(_messages(caplog, logging.INFO)) == 2 and not _messages(caplog, logging.WARNING)  # failed, merges again
    assert (again - merged).abs().max().item() < 1e-6
