"""A merged graph that fails at run time: the call is run by the unmerged graph, which the
graph keeps from then on (one warning, the report says why), unless the unmerged graph
fails too, in which case the error is the caller's and reaches them as it would without turbo."""
from __future__ import annotations

import logging

import pytest
import torch

import turbo_fx
from model_builders import images, small_vit
from turbo_fx.guarded_call import GuardedCompiled, guard
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
@pytest.mark.parametrize("inner, compile_merge_step, failing", [
    ("eager", False, "merge_fails_when_told"), ("inductor", False, "merge_fails_when_told"),
    ("inductor", None, "compiled_merge_fails_when_told")], ids=["eager", "inductor", "inductor, compiled merges"])
def test_a_run_time_failure_runs_the_unmerged_graph_from_then_on(turbo, request, caplog, inner, compile_merge_step,
                                                                  failing):
    merge_fails_when_told = request.getfixturevalue(failing)
    model = small_vit("vit", patch_size=4, depth=3)
    x = images(2)
    compiled = turbo(model, r=3, inner_backend=inner, compile_merge_step=compile_merge_step)
    with torch.no_grad():
        unmerged = model(x)
    merged_out = compiled(x)
    assert compiled.report.merges == 3 and compiled.report.fallback_reason is None
    assert ("3 compiled merge pieces" in (compiled.report.block_compile or "")) == (compile_merge_step is None)
    assert (merged_out - unmerged).abs().max().item() > 1e-3  # it really merged before the failure
    calls = merge_fails_when_told["real_calls"]
    merge_fails_when_told["fail"] = True
    turbo_fx.counters.clear()
    with caplog.at_level(logging.WARNING, logger="turbo_fx"):
        out = compiled(x)
    assert (out - unmerged).abs().max().item() < 1e-5
    assert compiled.report.fallback_reason == \
        "the merged graph failed at run time: RuntimeError: injected kernel failure"
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name == "turbo_fx"]
    assert len(warnings) == 1 and "runs without token merging from now on" in warnings[0]
    assert turbo_fx.counters["graphs_fallback_at_run_time"] == 1
    # The failing call reached the merge op once; from then on it is not called at all.
    assert merge_fails_when_told["real_calls"] == calls + 1
    out2 = compiled(images(2, seed=5))
    with torch.no_grad():
        assert (out2 - model(images(2, seed=5))).abs().max().item() < 1e-5
    assert merge_fails_when_told["real_calls"] == calls + 1
    assert turbo_fx.counters["graphs_fallback_at_run_time"] == 1


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
    the call unmerged, and the caller gets the unmerged model's output."""
    model = MaskedEncoder().eval()
    x = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(3))
    padding = torch.ones(2, 1, 16, 16, dtype=torch.bool)
    padding[1, ..., 12:] = False
    causal = torch.ones(16, 16, dtype=torch.bool).tril().expand(2, 1, 16, 16)
    compiled = turbo(model, r=3, inner_backend=inner)
    merged = compiled(x, padding)
    assert compiled.report.merges == 3 and compiled.report.fallback_reason is None
    with torch.no_grad():
        assert (merged - model(x, padding)).abs().max().item() > 1e-4  # it merged
        unmerged = model(x, causal)
    with caplog.at_level(logging.WARNING, logger="turbo_fx"):
        out = compiled(x, causal)
    assert (out - unmerged).abs().max().item() < 1e-5
    assert "varies by query" in compiled.report.fallback_reason
    assert len([r for r in caplog.records if r.levelno >= logging.WARNING and r.name == "turbo_fx"]) == 1
