"""CUDA-graph modes: the split forward captured whole (``turbo_fx.cuda_graphs``).

A real CUDA graph needs a GPU (``tests/cuda`` holds those checks). Here a stand-in graph
keeps what makes CUDA graphs easy to get wrong: a replay reads exactly the tensors the
capture saw (so an input not copied into its buffer, or one that moved, gives stale
results) and writes into the same output tensors every time (so an output handed out
uncloned changes under the caller). A variant yields to other threads inside the replay, as
a replay queued on the device lets the host go on, so that calls from two threads interleave
there. Every test compares against the function run plainly or the reference implementation."""
from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from threading import Barrier

import pytest
import torch
from torch.fx import GraphModule, symbolic_trace

import turbo_fx
from turbo_fx import backend, cuda_graphs
from turbo_fx.cuda_graphs import MAX_CAPTURES, CapturedForward, layout_refusal, unsafe_op_refusal
from model_builders import images, padded_batch, small_hf, small_vit
from turbo_fx.config import TurboConfig
from turbo_fx.reference import reference_forward

DEPTH, R = 4, 3


class ReplayingGraph:
    """A CUDA graph's contract on the CPU: the capture fixes the argument tensors and the
    output tensors; a replay recomputes from those arguments into those outputs."""

    captures = 0

    def capture(self, fn, args):
        ReplayingGraph.captures += 1
        self.fn, self.args = fn, list(args)
        self.outputs = fn(*self.args)
        return self.outputs

    def replay(self):
        fresh = self.fn(*self.args)
        for old, new in zip(torch.utils._pytree.tree_leaves(self.outputs), torch.utils._pytree.tree_leaves(fresh)):
            old.copy_(new)


class YieldingGraph(ReplayingGraph):
    """A replay during which other threads run: after the inputs were copied in and before
    they are read, and after the outputs were written and before they are cloned out. The
    capture yields too, so that a recapture overlaps other threads' calls."""

    def capture(self, fn, args):
        time.sleep(0.002)
        return super().capture(fn, args)

    def replay(self):
        time.sleep(0.0005)
        super().replay()
        time.sleep(0.0005)


class FailingGraph:
    def capture(self, fn, args):
        raise RuntimeError("operation not permitted when stream is capturing")


def linear(w: torch.Tensor, x: torch.Tensor):
    return (x @ w, x.sum())


def _captured(fn=linear, graph=ReplayingGraph):
    ReplayingGraph.captures = 0
    report = turbo_fx.GraphReport(graph_index=0, n_nodes=0)
    return CapturedForward(fn, 0, report, new_graph=graph), report


def _x(seed):
    return torch.randn(3, 4, generator=torch.Generator().manual_seed(seed))


W = torch.randn(4, 5, generator=torch.Generator().manual_seed(0))


def test_new_inputs_are_copied_in_and_outputs_cloned_out():
    captured, report = _captured()
    xs = [_x(i) for i in range(5)]
    outs = [captured(W, x) for x in xs]  # the first call warms up, the second captures
    for x, out in zip(xs, outs):  # every output still holds its own call's values
        assert torch.equal(out[0], x @ W) and torch.equal(out[1], x.sum())
    assert ReplayingGraph.captures == 1 and captured.replays == 4
    assert captured.in_place == [0] and captured.copied == [1]
    assert report.cuda_graph == "captured (1 capture; 1 inputs read in place, 1 copied per call)"


def test_an_input_read_in_place_sees_updates_made_in_place():
    captured, _ = _captured()
    w, x = W.clone(), _x(1)
    captured(w, x), captured(w, _x(2))
    w.mul_(2.0)  # same storage: the graph reads it where it is
    assert torch.equal(captured(w, x)[0], x @ w)


def test_an_input_that_moves_after_the_capture_is_copied_from_then_on():
    """A caller that passes the same tensor twice makes it look like a parameter; when it
    moves, the graph is captured again with that input copied."""
    captured, report = _captured()
    x = _x(1)
    captured(W, x), captured(W, x)
    assert captured.in_place == [0, 1]
    for seed in (2, 3):
        x = _x(seed)
        assert torch.equal(captured(W, x)[0], x @ W)
    assert ReplayingGraph.captures == 2 and captured.copied == [1]
    assert report.cuda_graph.startswith("captured (2 captures")


def test_a_weight_replaced_on_every_call_is_captured_again_once():
    captured, _ = _captured()
    x = _x(1)
    for i in range(6):
        w = W + i  # a new tensor each call
        assert torch.equal(captured(w, x)[0], x @ w)
    assert ReplayingGraph.captures == 1 and captured.copied == [0] and captured.in_place == [1]


def test_inputs_that_keep_moving_end_the_captures(caplog):
    """Each capture copies at least one more input from then on, so captures are bounded by
    the inputs; a forward whose inputs move one after the other stops at MAX_CAPTURES and runs
    uncaptured, still correct, with one info record."""
    n = MAX_CAPTURES + 3
    ws = [W + i for i in range(n)]

    def chain(*args):
        return (sum(w.sum() for w in args[:-1]) * args[-1],)

    captured, report = _captured(chain)
    x = _x(1)
    with caplog.at_level(logging.INFO, logger="turbo_fx"):
        for call in range(n + 2):
            if 2 <= call < n + 2:  # from the capture on, one more input moves each call
                ws[call - 2] = ws[call - 2].clone()
            assert torch.allclose(captured(*ws, x)[0], chain(*ws, x)[0])
    assert ReplayingGraph.captures == MAX_CAPTURES and captured.disabled
    assert report.cuda_graph.startswith(f"not captured: its inputs moved {MAX_CAPTURES} times")
    assert [r.levelno for r in caplog.records if "without a CUDA graph" in r.getMessage()] == [logging.INFO]


def test_a_failed_capture_runs_the_forward_uncaptured(caplog):
    captured, report = _captured(graph=FailingGraph)
    with caplog.at_level(logging.INFO, logger="turbo_fx"):
        outs = [captured(W, _x(i)) for i in range(3)]
    assert all(torch.equal(out[0], _x(i) @ W) for i, out in enumerate(outs))
    assert report.cuda_graph.startswith("not captured: the capture failed: RuntimeError")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def _in_two_threads(work, calls):
    """``work(thread, call)`` for ``calls`` calls in each of two threads started together; the
    results by thread. An exception in either thread is raised here."""
    start = Barrier(2)

    def run(thread):
        start.wait()
        return [work(thread, call) for call in range(calls)]

    with ThreadPoolExecutor(2) as pool:
        return [f.result() for f in [pool.submit(run, thread) for thread in (0, 1)]]


def test_two_threads_calling_one_captured_forward_each_get_their_own_outputs():
    """One graph has one set of input buffers and one output memory: without a lock from the
    input copy to the output clone, a thread's replay reads the other's inputs or hands out
    the other's outputs."""
    captured, _ = _captured(graph=YieldingGraph)
    # Both warm-up inputs alive at once: a freed first one could hand its address to the
    # second, which would then look like an input read in place and be captured again later.
    first, second = _x(0), _x(1)
    captured(W, first), captured(W, second)  # warm up and capture

    def call(thread, i):
        x = _x(100 * thread + i + 2)
        return x, captured(W, x)

    for results in _in_two_threads(call, 30):
        for x, (product, total) in results:
            assert torch.equal(product, x @ W) and torch.equal(total, x.sum())
    assert ReplayingGraph.captures == 1 and captured.replays == 61


def test_a_recapture_in_one_thread_while_another_replays_does_not_raise():
    """One thread moves an input read in place three times (three recaptures) while the other
    replays: neither call raises, each returns its own result, and the captures stay bounded."""
    ws = [W + i for i in range(3)]

    def chain(*args):
        return (sum(w.sum() for w in args[:-1]) * args[-1],)

    captured, report = _captured(chain, YieldingGraph)
    first, second = _x(0), _x(1)  # alive together, so the second has an address of its own
    captured(*ws, first), captured(*ws, second)

    def call(thread, i):
        args = [*ws, _x(100 * thread + i + 2)]
        if thread == 1:  # a new tensor where a weight was: it moved
            args[i % 3] = ws[i % 3].clone()
        return args, captured(*args)

    for results in _in_two_threads(call, 12):
        for args, out in results:
            assert torch.allclose(out[0], chain(*args)[0])
    assert ReplayingGraph.captures == 4 and not captured.disabled
    assert report.cuda_graph.startswith("captured (4 captures")


class NamedStream:
    """A CUDA stream's two calls the captured forward makes, recorded by name."""

    def __init__(self, name):
        self.name, self.waited_for = name, []

    def wait_stream(self, other):
        self.waited_for.append(other.name)


def test_a_replay_from_another_stream_waits_for_the_stream_that_last_used_the_graph(monkeypatch):
    """Captured on stream a; a replay on b waits for a and marks the buffers as used on b (the
    allocator must not reuse them before b is done); back on a, it waits for b. Replays on the
    stream that used the graph last wait for nothing."""
    a, b = NamedStream("a"), NamedStream("b")
    now = {"stream": a}
    used_on = []
    monkeypatch.setattr(cuda_graphs, "_current_stream", lambda args: now["stream"])
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda tensor, stream: used_on.append(stream.name))
    captured, _ = _captured()
    for seed, stream in enumerate([a, a, a, b, b, a]):
        now["stream"] = stream
        x = _x(seed)
        assert torch.equal(captured(W, x)[0], x @ W)
    assert a.waited_for == ["b"] and b.waited_for == ["a"]
    assert used_on == ["b", "b"]  # one copied buffer, two replays on b


def test_overlapping_inputs_and_ops_that_wait_for_the_device_are_not_captured():
    assert layout_refusal([torch.zeros(3, 4), torch.zeros(4, 1).expand(4, 4)]).startswith("input 1 has overlapping")
    assert layout_refusal([torch.zeros(3, 4).t(), torch.zeros(8)[::2]]) is None  # transposed, gapped: copyable

    graph = torch.fx.Graph()
    mask = graph.placeholder("mask")
    graph.output(graph.call_function(torch.ops.turbo_fx.check_key_padding_mask.default, (mask,)))
    assert "waits for the device" in unsafe_op_refusal(GraphModule(torch.nn.Module(), graph))
    assert unsafe_op_refusal(symbolic_trace(lambda x: x.softmax(-1) * 2)) is None


@pytest.fixture(scope="module")
def model():
    return small_vit("vit", patch_size=4, depth=DEPTH)


@pytest.fixture
def replaying(monkeypatch):
    """The backend's capture with the stand-in graph, as if the inputs were on a GPU."""
    monkeypatch.setattr(backend, "capture_refusal", lambda gm, inputs: None)
    monkeypatch.setattr(cuda_graphs, "CudaGraph", ReplayingGraph)
    ReplayingGraph.captures = 0


@pytest.mark.parametrize("mode", ["reduce-overhead", "max-autotune"])
def test_a_cuda_graph_mode_splits_then_captures_the_whole_forward(model, replaying, mode):
    """Four calls with new images: each gives the reference's output for its own images, the
    graph is captured once (on the second call), and the pieces were compiled without
    Inductor's own CUDA graphs."""
    compiled = torch.compile(model, backend="turbo", options={"r": R, "mode": mode})
    xs = [images(2, seed=s) for s in range(4)]
    with turbo_fx.recording() as rec, torch.no_grad():
        outs = [compiled(x) for x in xs]
        expected = [reference_forward(model, x, TurboConfig(r=R)) for x in xs]
    report = rec.graphs[-1]
    assert report.merges == DEPTH and report.fallback_reason is None
    assert report.block_compile.startswith(f"{DEPTH + 1} compute pieces")
    assert report.cuda_graph.startswith("captured (1 capture;") and "1 copied per call" in report.cuda_graph
    assert ReplayingGraph.captures == 1
    for out, ref in zip(outs, expected):
        assert (out - ref).abs().max().item() < 1e-4


def test_two_threads_calling_one_compiled_model_each_get_their_own_reference(model, replaying, monkeypatch):
    """The backend's captured forward called from two threads at once, with new images on
    every call: each output is the reference's for its own images."""
    monkeypatch.setattr(cuda_graphs, "CudaGraph", YieldingGraph)
    compiled = torch.compile(model, backend="turbo", options={"r": R, "mode": "reduce-overhead"})
    with torch.no_grad():
        compiled(images(2, seed=0)), compiled(images(2, seed=1))  # compile, warm up, capture

    def call(thread, i):
        x = images(2, seed=100 * thread + i + 2)
        with torch.no_grad():
            return x, compiled(x)

    outputs = _in_two_threads(call, 8)
    assert ReplayingGraph.captures == 1
    with torch.no_grad():
        for results in outputs:
            for x, out in results:
                assert (out - reference_forward(model, x, TurboConfig(r=R))).abs().max().item() < 1e-4


def test_merges_are_recorded_while_the_graph_is_captured(model, replaying):
    """record_merges copies each merge's map to the host, which a replay would skip: while it
    records, the forward runs uncaptured, and the records equal those of the eager op."""
    compiled = torch.compile(model, backend="turbo", options={"r": R, "mode": "reduce-overhead"})
    x = images(2)
    with torch.no_grad():
        compiled(x), compiled(images(2, seed=5))
        with turbo_fx.record_merges() as records:
            compiled(x)
    assert [(m.block, m.tokens_in, m.tokens_out) for m in records] == [
        (0, 65, 62), (1, 62, 59), (2, 59, 56), (3, 56, 53)]
    assert all(int(m.size.sum(dim=1).min()) == 65 for m in records)


def test_on_the_cpu_a_cuda_graph_mode_splits_and_says_why_nothing_is_captured(model, caplog):
    compiled = torch.compile(model, backend="turbo", options={"r": R, "mode": "reduce-overhead"})
    x = images(2)
    with caplog.at_level(logging.INFO, logger="turbo_fx"), turbo_fx.recording() as rec, torch.no_grad():
        out = compiled(x)
        out = compiled(x)
    report = rec.graphs[-1]
    assert report.cuda_graph == "not captured: inputs on cpu: CUDA graphs need every input on one CUDA device"
    assert report.block_compile.startswith(f"{DEPTH + 1} compute pieces")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and r.name == "turbo_fx"]
    with torch.no_grad():
        assert (out - reference_forward(model, x, TurboConfig(r=R))).abs().max().item() < 1e-4


def test_compiled_whole_in_a_cuda_graph_mode_the_token_counts_stay_concrete(model, caplog):
    """Inductor captures no graph with a data-dependent size. Compiled whole (the opaque op),
    the merged counts are therefore concrete under a CUDA-graph mode; asking for symbolic ones
    there gets the one warning that says the graphs are lost."""
    from torch._inductor.utils import get_first_incompatible_cudagraph_node

    seen = []

    def inspect(graph):  # what Inductor's own CUDA-graph check would find in the graph it compiles
        seen.append(get_first_incompatible_cudagraph_node(GraphModule(torch.nn.Module(), graph)))

    x = images(2)
    for symbolic in (None, True):
        torch._dynamo.reset()
        seen.clear()
        options = {"r": R, "mode": "reduce-overhead", "compile_blocks": False, "symbolic_tokens": symbolic}
        compiled = torch.compile(model, backend="turbo", options=options)
        with caplog.at_level(logging.WARNING, logger="turbo_fx"), torch._inductor.config.patch(
                post_grad_custom_post_pass=inspect), torch.no_grad():
            caplog.clear()
            out = compiled(x)
        warnings = [r.getMessage() for r in caplog.records if r.name == "turbo_fx"]
        assert len(seen) == 1
        if symbolic is None:
            assert seen == [None] and not warnings
        else:
            assert "merge_block" in str(seen[0].target) and len(warnings) == 1 and "no CUDA graph" in warnings[0]
        with torch.no_grad():
            assert (out - reference_forward(model, x, TurboConfig(r=R))).abs().max().item() < 1e-4


@pytest.mark.parametrize("kind", ["vit", "dinov2"])
def test_captured_transformers_encoders_compute_what_the_uncaptured_split_does(replaying, kind):
    """Models the capture was not written for (transformers' ViT and DINOv2 with layer scale):
    over three new inputs, the replayed forward equals the same split run uncaptured."""
    model = small_hf(kind, layers=4)
    xs = [images(2, seed=s) for s in range(3)]
    plain = torch.compile(model, backend="turbo", options={"r": 2})
    with torch.no_grad():
        expected = [plain(pixel_values=x).last_hidden_state for x in xs]
    torch._dynamo.reset()
    captured = torch.compile(model, backend="turbo", options={"r": 2, "mode": "reduce-overhead"})
    with turbo_fx.recording() as rec, torch.no_grad():
        outs = [captured(pixel_values=x).last_hidden_state for x in xs]
    assert rec.graphs[-1].cuda_graph.startswith("captured (1 capture;"), rec.graphs[-1].cuda_graph
    assert ReplayingGraph.captures == 1
    for out, ref in zip(outs, expected):
        assert out.shape == ref.shape and (out - ref).abs().max().item() < 1e-5


def test_a_padded_text_encoder_is_not_captured_since_its_mask_check_waits_for_the_device():
    """BERT with padding keeps the run-time key-padding check, which reads the mask on the
    host: the rewritten graph is refused by name, and a ViT's is not."""
    ids, mask = padded_batch([16, 9], 16)
    graphs = {}
    for kind, model, inputs in [("bert", small_hf("bert", layers=3), dict(input_ids=ids, attention_mask=mask)),
                                ("vit", small_vit("vit", patch_size=4, depth=3), dict(x=images(2)))]:
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="turbo", options={"r": 2, "inner_backend": "eager"})
        with turbo_fx.recording(keep_graphs=True) as rec, torch.no_grad():
            compiled(**inputs)
        graphs[kind] = rec.graphs[-1].graph_module
    assert "check_key_padding_mask" in unsafe_op_refusal(graphs["bert"])
    assert unsafe_op_refusal(graphs["vit"]) is None
