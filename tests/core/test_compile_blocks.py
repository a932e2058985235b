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
def test_a_cuda_graph_mode_compiles_whole_and_still_merges(model, caplog, how):
    """mode="reduce-overhead" asks Inductor for CUDA graphs, which the split does not capture
    yet: the graph is compiled whole (an info record only, since the split was the default),
    and it still merges. On this CPU Inductor itself skips the CUDA graphs. torch.compile
    takes a mode or options, not both: turbo's ``mode`` option carries it beside the others."""
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
    assert report.block_compile.startswith("compiled whole") and "CUDA graphs" in report.block_compile
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and r.name == "turbo_fx"]
    assert report.blocks[0].r_applied == config.r
    with torch.no_grad():
        assert (out - reference_forward(model, x, config)).abs().max().item() < 1e-4


@pytest.mark.parametrize("options, splits", [
    ({}, True), ({"compile_blocks": False}, False), ({"compile_blocks": True}, True),
    ({"fuse_merges": True}, False), ({"inner_backend": "aot_eager"}, False),
])
def test_compile_blocks_resolves_to_where_it_applies(options, splits):
    config = TurboConfig(**options)
    assert config.compiles_by_block is splits
    assert config.compile_blocks is options.get("compile_blocks")  # kept as given, so replace() stays valid


def test_the_unresolved_defaults_survive_replace():
    assert TurboConfig().replace(fuse_merges=True).compiles_by_block is False
    # symbolic_tokens follows fuse_merges unless given, in a copy as in a fresh config
    assert TurboConfig().replace(fuse_merges=True).symbolic_tokens is TurboConfig(fuse_merges=True).symbolic_tokens \
        is False
    assert TurboConfig(symbolic_tokens=True).replace(fuse_merges=True).symbolic_tokens is True
    assert TurboConfig(fuse_merges=True).replace(r=4) == TurboConfig(fuse_merges=True, r=4)
    with pytest.raises(TurboConfigError, match="compile_blocks"):
        TurboConfig(compile_blocks="yes")


@pytest.mark.parametrize("options", [{"fuse_merges": True}, {"inner_backend": "eager"}])
def test_compile_blocks_needs_opaque_merges_and_inductor(options):
    with pytest.raises(TurboConfigError, match="compile_blocks"):
        TurboConfig(compile_blocks=True, **options)


@pytest.mark.parametrize("target, mutates", [
    (operator.and_, False), (operator.or_, False), (operator.getitem, False), (operator.is_, False),
    (operator.iadd, True), (operator.iand, True), (operator.setitem, True),
    (torch.relu, False), (torch.relu_, True),
    (torch.ops.aten.add.Tensor, False), (torch.ops.aten.add_.Tensor, True), (torch.ops.aten.copy_.default, True),
], ids=lambda v: getattr(v, "__name__", str(v)))
def test_in_place_updates_are_told_from_their_look_alikes(target, mutates):
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    assert block_compile._mutates(graph.call_function(target, (x, x))) is mutates


@pytest.mark.parametrize("method, mutates", [("add_", True), ("copy_", True), ("add", False), ("__len__", False)])
def test_in_place_methods_are_found_by_their_trailing_underscore(method, mutates):
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    assert block_compile._mutates(graph.call_method(method, (x, x))) is mutates


F = torch.nn.functional


@pytest.mark.parametrize("call, draws", [
    (lambda g, x: g.call_function(F.dropout, (x, 0.0, False, False)), False),  # nn.Dropout in eval, as Dynamo records it
    (lambda g, x: g.call_function(F.dropout, (x, 0.1, True, False)), True),
    (lambda g, x: g.call_function(F.dropout, (x,), {"p": 0.1}), True),  # training defaults to True
    (lambda g, x: g.call_function(F.dropout, (x, 0.0, True)), False),  # p = 0 draws nothing
    (lambda g, x: g.call_function(F.alpha_dropout, (x, 0.5)), False),  # training defaults to False here
    (lambda g, x: g.call_function(torch.rand_like, (x,)), True),
    (lambda g, x: g.call_function(torch.ops.aten.bernoulli.default, (x,)), True),  # by its tag
    (lambda g, x: g.call_method("bernoulli", (x,)), True),  # x.bernoulli()
    (lambda g, x: g.call_function(torch.relu, (x,)), False),
], ids=["eval-dropout", "train-dropout", "default-training", "p0", "alpha-eval", "rand_like", "aten-bernoulli",
        "method", "relu"])
def test_random_draws_are_found(call, draws):
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    assert block_compile._draws_random(call(graph, x)) is draws


def test_a_graph_that_draws_random_numbers_is_compiled_whole(turbo, caplog):
    """The compile run would consume random numbers, and the user's next draw would differ
    from the one plain Inductor leaves them: such graphs (here every dropout live, the model
    in training mode under no_grad) are compiled whole."""
    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=4, embed_dim=48, depth=2, num_heads=3, num_classes=10,
                              proj_drop_rate=0.1).train()
    compiled = turbo(model, r=R, inner_backend="inductor", compile_blocks=True)
    with caplog.at_level(logging.WARNING, logger="turbo_fx"):
        compiled(images(2))
    assert compiled.report.block_compile.startswith("compiled whole")
    assert "draws random numbers" in compiled.report.block_compile


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
    the graph. Compiled whole (asked for, or because a CUDA-graph mode rules the split out
    before the rewrite), the graph is built concrete, then symbolic, as before."""
    from turbo_fx import rewrite
    from turbo_fx.report import recording

    builds = []
    real_build = rewrite._build

    def counting(*args, **kwargs):
        builds.append((args[2].symbolic_tokens, kwargs.get("read_sizes", False)))
        return real_build(*args, **kwargs)

    monkeypatch.setattr(rewrite, "_build", counting)
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
    if compile_blocks is False or mode is not None:
        assert builds == [(False, False), (True, False)]
        assert mode is None or report.block_compile.startswith("compiled whole")
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
