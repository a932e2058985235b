"""compile_blocks: the merged graph compiled piece by piece, blocks sharing compiled code through
Inductor's FX graph cache, against the reference implementation; graphs it cannot take are
compiled whole with a warning that says why (an info record where the split was only the
default)."""
from __future__ import annotations

import logging
import operator

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

import turbo_fx
from turbo_fx import block_compile
from model_builders import images, padded_batch, small_hf, small_vit
from turbo_fx.config import TurboConfig, TurboConfigError
from turbo_fx.reference import reference_forward

DEPTH, R = 6, 3


@pytest.fixture(scope="module")
def model():
    return small_vit("vit", patch_size=4, depth=DEPTH)  # 65 tokens: 62, 59, ... after each block


@pytest.mark.parametrize("caches", ["default", "turned off"])
def test_blocks_share_compiled_code_and_compute_the_reference(turbo, model, caches):
    """Also with the caches turned off, as the speed benchmarks leave them in this process:
    the option turns them on for its own pieces."""
    import torch._functorch.config as functorch_config

    off = caches == "turned off"
    with torch._inductor.config.patch(fx_graph_cache=not off), functorch_config.patch(enable_autograd_cache=not off):
        check_blocks_share_compiled_code(turbo, model)


def check_blocks_share_compiled_code(turbo, model):
    x = images(2)
    compiled = turbo(model, r=R, inner_backend="inductor", compile_blocks=True)
    out = compiled(x)
    with torch.no_grad():
        expected = reference_forward(model, x, TurboConfig(r=R))
    assert (out - expected).abs().max().item() < 1e-4
    report = compiled.report
    assert report.fallback_reason is None and report.merges == DEPTH
    counts = {k: turbo_fx.counters[f"block_pieces_{k}"] for k in ("generated", "shared", "cached")}
    # One compute piece before the first merge and one after each: stem + block 0's attention,
    # then (MLP, next attention) five times, then the last MLP and the head.
    assert sum(counts.values()) == DEPTH + 1
    # The stem piece, the last piece and the first block piece are compiled (or come from
    # Inductor's cache, where an earlier test in this process compiled them); the other four
    # block pieces run the first one's compiled code, with no cache lookup.
    assert counts["shared"] == DEPTH - 2 and counts["generated"] + counts["cached"] == 3
    assert report.block_compile.startswith(f"{DEPTH + 1} compute pieces")
    assert "[None, 62, 59, 56, 53, 50, 47]" in report.block_compile
    # A second call runs the compiled pieces without compiling anything more.
    out2 = compiled(x)
    assert torch.equal(out, out2) and len(compiled.graphs) == 1


def test_a_dynamic_batch_is_compiled_whole_and_says_why(turbo, model, caplog):
    compiled = turbo(model, r=R, inner_backend="inductor", compile_blocks=True)
    compiled(images(2))
    with caplog.at_level(logging.WARNING, logger="turbo_fx"):
        out = compiled(images(3, seed=3))  # Dynamo recompiles with a symbolic batch
    with torch.no_grad():
        expected = reference_forward(model, images(3, seed=3), TurboConfig(r=R))
    assert (out - expected).abs().max().item() < 1e-4
    assert compiled.report.block_compile.startswith("compiled whole")
    assert "dynamic" in compiled.report.block_compile
    assert any("compiled whole, not block by block" in r.getMessage() for r in caplog.records)


def test_recorded_gradients_are_compiled_whole(model, caplog):
    """With gradients recorded the split is refused before anything runs; the whole graph
    then goes to Inductor, whose own fallback (the merge op has no backward) keeps the
    unmerged model: the user's model still computes what it computed before."""
    compiled = torch.compile(model, backend="turbo", options={"r": R, "compile_blocks": True})
    x = images(2)
    with caplog.at_level(logging.WARNING, logger="turbo_fx"):
        out = compiled(x)
    assert out.requires_grad
    assert any("gradients are recorded" in r.getMessage() for r in caplog.records)
    with torch.no_grad():
        assert (out.detach() - model(x)).abs().max().item() < 1e-4


@pytest.mark.parametrize("kind", ["bert", "dinov2"])
def test_models_it_was_not_written_for_compute_what_the_whole_graph_does(turbo, kind):
    """transformers encoders: BERT with padding (the merged-token mask crosses the pieces) and
    DINOv2 (layer scale), block by block against the same rewrite compiled whole."""
    model = small_hf(kind, layers=4)
    if kind == "bert":
        ids, mask = padded_batch([16, 9], 16)
        inputs = dict(input_ids=ids, attention_mask=mask)
    else:
        inputs = dict(pixel_values=images(2))
    blocks = turbo(model, r=2, inner_backend="inductor", compile_blocks=True)
    out = blocks(**inputs).last_hidden_state
    assert blocks.report.block_compile.startswith("5 compute pieces"), blocks.report.block_compile
    torch._dynamo.reset()
    whole = turbo(model, r=2, inner_backend="inductor", compile_blocks=False)(**inputs).last_hidden_state
    assert out.shape == whole.shape
    assert (out - whole).abs().max().item() < 1e-5


def test_the_default_splits_and_falls_back_without_a_warning(turbo, model, caplog):
    """Not asked for, the split still happens wherever it applies; a graph it cannot take
    (here Dynamo's recompile with a symbolic batch) is compiled whole with an info record
    only, since the user asked for nothing that did not happen."""
    compiled = turbo(model, r=R, inner_backend="inductor")
    x = images(2)
    with caplog.at_level(logging.INFO, logger="turbo_fx"):
        out = compiled(x)
        assert compiled.report.block_compile.startswith(f"{DEPTH + 1} compute pieces")
        out3 = compiled(images(3, seed=3))
    with torch.no_grad():
        assert (out - reference_forward(model, x, TurboConfig(r=R))).abs().max().item() < 1e-4
        assert (out3 - reference_forward(model, images(3, seed=3), TurboConfig(r=R))).abs().max().item() < 1e-4
    assert compiled.report.block_compile.startswith("compiled whole") and "dynamic" in compiled.report.block_compile
    whole = [r for r in caplog.records if "compiled whole, not block by block" in r.getMessage()]
    assert [r.levelno for r in whole] == [logging.INFO]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and r.name == "turbo_fx"]


@pytest.mark.parametrize("how", ["torch.compile's mode", "turbo's mode option"])
def test_a_cuda_graph_mode_splits_and_still_merges(model, caplog, how):
    """mode="reduce-overhead" asks for CUDA graphs: the graph is still split (the split forward
    is captured whole on a GPU, ``tests/core/test_cuda_graphs.py``), and on this CPU the report
    says why nothing is captured, with no warning. torch.compile takes a mode or options, not
    both: turbo's ``mode`` option carries it beside the others."""
    if how == "torch.compile's mode":
        compiled, config = torch.compile(model, backend="turbo", mode="reduce-overhead"), TurboConfig()
    else:
        compiled = torch.compile(model, backend="turbo", options={"r": R, "mode": "reduce-overhead"})
        config = TurboConfig(r=R)
    x = images(2)
    with caplog.at_level(logging.INFO, logger="turbo_fx"), turbo_fx.recording() as rec, torch.no_grad():
        out = compiled(x)
    report = rec.graphs[-1]
    assert report.merges == DEPTH and report.fallback_reason is None
    assert report.block_compile.startswith(f"{DEPTH + 1} compute pieces"), report.block_compile
    assert report.cuda_graph.startswith("not captured: inputs on cpu")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and r.name == "turbo_fx"]
    assert report.blocks[0].r_applied == config.r
    with torch.no_grad():
        assert (out - reference_forward(model, x, config)).abs().max().item() < 1e-4


def test_explain_accepts_the_option_and_reports_the_same_rewrite(model):
    x = images(2)
    with_option = turbo_fx.explain(model, x, r=R, compile_blocks=True)
    without = turbo_fx.explain(model, x, r=R)
    assert with_option.graphs[0].tokens_per_block == without.graphs[0].tokens_per_block == [65, 62, 59, 56, 53, 50]


@pytest.mark.parametrize("compile_blocks, mode", [(None, None), (False, None), (None, "reduce-overhead")],
                         ids=["split", "compiled whole", "CUDA-graph mode"])
def test_a_graph_for_the_split_is_built_once_with_its_sizes_read_from_the_tensors(model, monkeypatch, compile_blocks,
                                                                                   mode):
    """The split compiles its pieces from real values, so the rewrite skips the symbolic build
    and reads every rewritten token count from its tensor: no merged count is a literal of
    the graph, also in a CUDA-graph mode (whose split forward is captured whole). Compiled
    whole when asked, the graph is built concrete, then symbolic, as before."""
    from turbo_fx import rewrite
    from turbo_fx.report import recording

    builds = []
    real_build = rewrite.build

    def counting(*args, **kwargs):
        builds.append((kwargs["symbolic"], kwargs.get("read_sizes", False)))
        return real_build(*args, **kwargs)

    monkeypatch.setattr(rewrite, "build", counting)
    x = images(2)
    if mode is None:
        compiled = torch.compile(model, backend="turbo", options={"r": R, "compile_blocks": compile_blocks})
    else:  # torch.compile takes a mode or options, not both: turbo's defaults then
        compiled = torch.compile(model, backend="turbo", mode=mode)
    with recording(keep_graphs=True) as rec, torch.no_grad():
        out = compiled(x)
        expected = reference_forward(model, x, TurboConfig(r=R) if mode is None else TurboConfig())
    assert (out - expected).abs().max().item() < 1e-4
    (report,) = rec.graphs
    if compile_blocks is False:
        assert builds == [(False, False), (True, False)]
        return
    assert builds == [(False, True)]
    merged_counts = set(report.tokens_per_block[1:]) | {report.tokens_per_block[-1] - R}
    shape_nodes = [n for n in report.graph_module.graph.nodes
                   if n.op == "call_method" and n.target in ("reshape", "view", "expand")]
    literals = {a for n in shape_nodes for a in n.args[1:] if isinstance(a, int)}
    assert shape_nodes and not literals & merged_counts, literals
    assert any(n.target is torch.ops.aten.sym_size.int for n in report.graph_module.graph.nodes)


def test_a_split_that_fails_after_the_rewrite_compiles_the_concrete_graph_whole(turbo, model, monkeypatch, caplog):
    """The rewrite for the split skips the symbolic build; should the split then fail anyway,
    the graph it built (concrete counts, sizes read from the tensors) is compiled whole, and
    still computes the reference."""
    def refuse(gm):
        raise block_compile.CannotRewrite("no split today")

    monkeypatch.setattr(block_compile, "split_at_merges", refuse)
    x = images(2)
    with caplog.at_level(logging.INFO, logger="turbo_fx"):
        compiled = turbo(model, r=R, inner_backend="inductor")
        out = compiled(x)
    with torch.no_grad():
        assert (out - reference_forward(model, x, TurboConfig(r=R))).abs().max().item() < 1e-4
    assert compiled.report.block_compile == "compiled whole: no split today"
    assert compiled.report.fallback_reason is None and compiled.report.merges == DEPTH
