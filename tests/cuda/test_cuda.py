"""The GPU path (issue 7): skipped without a CUDA device, so CI on CPU machines never runs it.
`scripts/gpu_check.sh tests` runs this file on a lent GPU machine.

What it holds a GPU to: the default compile (block by block, the merge pieces compiled too)
computes the reference; a warm forward of every merge path never waits for the device
(CUDA's sync debug mode turns any host synchronisation into an error);
``mode="reduce-overhead"`` never raises and gives the reference or, on a call the report
counts as failed, the unmerged model's output; the split forward is captured as one CUDA
graph whose replays compute each call's own reference, also when two threads on their own
streams call it at once; and compiled whole the graph keeps concrete token counts, so that
Inductor captures it itself."""
from __future__ import annotations

import copy
import functools
from concurrent.futures import ThreadPoolExecutor
from threading import Barrier

import pytest
import torch

import turbo_fx
from model_builders import images, small_vit
from turbo_fx.backend import turbo_backend
from turbo_fx.config import TurboConfig
from turbo_fx.reference import reference_forward

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DEPTH, R = 4, 3
# The default compiles the merge pieces too; "eager merge op" runs the opaque op's ATen calls.
PATHS = {"default": {}, "eager merge op": {"compile_merge_step": False}, "fuse_merges": {"fuse_merges": True},
         "compile_merge_step, compiled whole": {"compile_merge_step": True, "compile_blocks": False},
         "CUDA graph of the split forward": {"mode": "reduce-overhead"}}


@pytest.fixture(scope="module")
def model():
    return small_vit("vit", patch_size=4, depth=DEPTH).cuda()


def _x(seed: int = 1) -> torch.Tensor:
    return images(2, seed=seed).cuda()


def test_the_default_compile_splits_by_block_and_computes_the_reference(model):
    compiled = torch.compile(model, backend="turbo", options={"r": R})
    with turbo_fx.recording() as rec, torch.no_grad():
        out = compiled(_x())
        expected = reference_forward(model, _x(), TurboConfig(r=R))
    report = rec.graphs[-1]
    assert report.merges == DEPTH and report.fallback_reason is None
    assert report.block_compile.startswith(f"{DEPTH + 1} compute pieces"), report.block_compile
    assert f"{DEPTH} compiled merge pieces" in report.block_compile and "failed" not in report.block_compile
    assert (out - expected).abs().max().item() < 1e-3


@pytest.mark.parametrize("path", list(PATHS))
def test_bf16_merges_and_stays_finite(model, path):
    """In bf16 near-ties may pick other merge partners than float32 does, so only the merge
    and finite outputs are asserted, not closeness to the float32 reference."""
    half = copy.deepcopy(model).to(torch.bfloat16)
    compiled = torch.compile(half, backend="turbo", options={"r": R, **PATHS[path]})
    with turbo_fx.recording() as rec, torch.no_grad():
        out = compiled(_x().to(torch.bfloat16))
    assert rec.graphs[-1].merges == DEPTH and rec.graphs[-1].fallback_reason is None
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


@pytest.mark.parametrize("path", list(PATHS))
def test_a_warm_forward_never_waits_for_the_gpu(model, path):
    compiled = torch.compile(model, backend="turbo", options={"r": R, **PATHS[path]})
    x = _x()
    with torch.no_grad():
        for _ in range(3):  # compile, the compiled step's own first calls, the CUDA graph's capture
            compiled(x)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            compiled(x)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()


@pytest.mark.parametrize("path", ["default", "fuse_merges"])
def test_reduce_overhead_never_raises(model, path):
    """CUDA graphs record on the second call and replay after: four calls cover all three.
    Each output is cloned, since a replay overwrites the last one's memory."""
    backend = functools.partial(turbo_backend, options=TurboConfig(r=R, **PATHS[path]), mode="reduce-overhead")
    compiled = torch.compile(model, backend=backend)
    x = _x()
    with torch.no_grad():
        merged = reference_forward(model, x, TurboConfig(r=R))
        unmerged = model(x)
    with turbo_fx.recording() as rec, torch.no_grad():
        outs = [compiled(x).clone() for _ in range(4)]
    report = rec.graphs[-1]
    # Merged, or unmerged where the merged code failed (each such call counted in the report),
    # and unmerged for good once merging turned off.
    kinds = ["merged" if (out - merged).abs().max().item() < 1e-3 else
             "unmerged" if (out - unmerged).abs().max().item() < 1e-3 else "wrong" for out in outs]
    why = (kinds, report.run_time_failures, report.last_run_time_failure, report.fallback_reason)
    assert "wrong" not in kinds, why
    assert ("unmerged" in kinds) == bool(report.run_time_failures), why
    if report.fallback_reason is None:
        assert kinds.count("unmerged") == report.run_time_failures, why
    else:
        assert kinds[-1] == "unmerged", why


def test_the_split_forward_is_captured_once_and_replays_compute_each_calls_reference(model):
    compiled = torch.compile(model, backend="turbo", options={"r": R, "mode": "reduce-overhead"})
    xs = [_x(seed) for seed in range(5)]
    with turbo_fx.recording() as rec, torch.no_grad():
        outs = [compiled(x) for x in xs]  # kept, not cloned: turbo's replays hand out copies
        expected = [reference_forward(model, x, TurboConfig(r=R)) for x in xs]
    report = rec.graphs[-1]
    assert report.block_compile.startswith(f"{DEPTH + 1} compute pieces"), report.block_compile
    assert report.cuda_graph.startswith("captured (1 capture;") and "1 copied per call" in report.cuda_graph, \
        report.cuda_graph
    for out, ref in zip(outs, expected):
        assert (out - ref).abs().max().item() < 1e-3


def test_two_threads_on_their_own_streams_share_the_captured_forward(model):
    """The captured graph has one set of input buffers and one output memory: two threads, each
    queuing on a stream of its own, call it at once with new images every time, and each
    output is the reference's for its own images."""
    compiled = torch.compile(model, backend="turbo", options={"r": R, "mode": "reduce-overhead"})
    with turbo_fx.recording() as rec, torch.no_grad():
        compiled(_x(0)), compiled(_x(1))  # compile, warm up, capture
        xs = [[_x(100 * thread + i + 2) for i in range(25)] for thread in (0, 1)]
        expected = [[reference_forward(model, x, TurboConfig(r=R)) for x in inputs] for inputs in xs]
    torch.cuda.synchronize()
    start = Barrier(2)

    def run(inputs):
        stream = torch.cuda.Stream()
        start.wait()
        with torch.cuda.stream(stream), torch.no_grad():
            outs = [compiled(x) for x in inputs]
        stream.synchronize()
        return outs

    with ThreadPoolExecutor(2) as pool:
        outs = [f.result() for f in [pool.submit(run, inputs) for inputs in xs]]
    assert rec.graphs[-1].cuda_graph.startswith("captured (1 capture;"), rec.graphs[-1].cuda_graph
    for thread in (0, 1):
        for out, ref in zip(outs[thread], expected[thread]):
            assert (out - ref).abs().max().item() < 1e-3


def test_compiled_whole_in_reduce_overhead_inductor_captures_the_graph(model):
    from torch._dynamo.utils import counters

    counters["inductor"].clear()
    compiled = torch.compile(model, backend="turbo", options={"r": R, "mode": "reduce-overhead",
                                                              "compile_blocks": False})
    x = _x()
    with torch.no_grad():
        outs = [compiled(x).clone() for _ in range(4)]
        expected = reference_forward(model, x, TurboConfig(r=R))
    assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])
    assert all((out - expected).abs().max().item() < 1e-3 for out in outs)


def test_record_merges_under_reduce_overhead_records_every_merge_and_computes_the_reference(model):
    """While ``record_merges`` records, the captured forward runs uncaptured (the records copy
    the maps to the host); before and after, the replays stay right."""
    compiled = torch.compile(model, backend="turbo", options={"r": R, "mode": "reduce-overhead"})
    with torch.no_grad():
        for seed in range(3):  # warm-up, capture, replay
            compiled(_x(seed))
        with turbo_fx.record_merges() as records:
            out = compiled(_x(7))
        after = compiled(_x(8))
        expected = reference_forward(model, _x(7), TurboConfig(r=R))
        expected_after = reference_forward(model, _x(8), TurboConfig(r=R))
    tokens = 16 * 4 + 1  # 32x32 images, patch 4, plus CLS
    assert [r.tokens_out for r in records] == [tokens - R * (i + 1) for i in range(DEPTH)]
    assert (out - expected).abs().max().item() < 1e-3
    assert (after - expected_after).abs().max().item() < 1e-3


def test_eager_and_compiled_merge_pieces_agree_in_bf16_with_padding():
    """A padded BERT batch in bf16: the opaque op's ATen calls and the compiled merge pieces
    merge to the same token counts and give outputs within bf16's rounding of each other."""
    from model_builders import padded_batch, small_hf

    bert = small_hf("bert").cuda().to(torch.bfloat16)
    ids, mask = padded_batch([12, 7, 3], 12)
    ids, mask = ids.cuda(), mask.cuda()
    outs, counts = [], []
    for compile_merge_step in (False, True):
        torch._dynamo.reset()
        compiled = torch.compile(bert, backend="turbo", options={"r": 2, "compile_merge_step": compile_merge_step})
        with turbo_fx.recording() as rec, torch.no_grad():
            outs.append(compiled(input_ids=ids, attention_mask=mask).last_hidden_state.float())
        report = rec.graphs[-1]
        assert report.merges > 0 and report.fallback_reason is None, report.fallback_reason
        counts.append(report.tokens_per_block)
    assert counts[0] == counts[1]
    valid = mask.bool()
    assert torch.isfinite(outs[1][valid]).all()
    assert (outs[0] - outs[1])[valid].abs().max().item() < 5e-2
