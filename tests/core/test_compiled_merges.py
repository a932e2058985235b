"""compile_merge_step with compile_blocks: each merge piece compiled by Inductor with its token
count symbolic, so one compiled step serves every merge (odd and even token counts alike),
against the reference implementation; a merge piece whose compile fails runs
the opaque op; the option's default resolves by device."""
from __future__ import annotations

import logging

import pytest
import torch
from torch._inductor.utils import fresh_cache

import turbo_fx
from model_builders import images, padded_batch, small_hf, small_vit
from turbo_fx import block_compile
from turbo_fx.config import TurboConfig, TurboConfigError
from turbo_fx.ops import merge_step
from turbo_fx.reference import reference_forward

DEPTH, R = 6, 3


def diff_to_reference(model, x, out, **options) -> float:
    with torch.no_grad():
        return (out - reference_forward(model, x, TurboConfig(r=R, **options))).abs().max().item()


@pytest.fixture(scope="module")
def model():
    return small_vit("vit", patch_size=4, depth=DEPTH)  # 65 tokens: 62, 59, 56, 53, 50, 47 after each block


def test_one_compiled_step_serves_every_merge_after_the_first(turbo, model, tmp_path):
    """In an empty compile cache one merge piece gets code of its own: the first (at the input's
    token count, its missing key bias given as zeros); the other five, at odd and even token
    counts, the last one included (whose later graph reads only the merged tokens), run its
    compiled code."""
    x = images(2)
    with fresh_cache(dir=str(tmp_path)):
        compiled = turbo(model, r=R, inner_backend="inductor", compile_merge_step=True)
        out = compiled(x)
    assert diff_to_reference(model, x, out) < 1e-4
    report = compiled.report
    assert report.fallback_reason is None and report.merges == DEPTH
    assert report.tokens_per_block == [65, 62, 59, 56, 53, 50]
    assert (f"{DEPTH} compiled merge pieces: 1 generated, {DEPTH - 1} shared with an earlier block, "
            "0 from Inductor's cache") in report.block_compile
    assert (f"{DEPTH + 1} compute pieces: 3 generated, {DEPTH - 2} shared with an earlier block, "
            "0 from Inductor's cache") in report.block_compile
    assert "failed" not in report.block_compile
    # Later calls (same shapes) run the compiled pieces: nothing more is compiled, no merge op runs.
    with turbo_fx.record_merges() as records:
        out2 = compiled(images(2, seed=5))
    assert len(compiled.graphs) == 1
    assert diff_to_reference(model, images(2, seed=5), out2) < 1e-4


def test_compiled_merge_pieces_are_recorded_like_the_eager_op(turbo, model):
    """record_merges sees the merges the compiled pieces ran: the same blocks, token counts,
    assignments and sizes as the eager op's records of the same input."""
    x = images(2, seed=4)
    compiled = turbo(model, r=R, inner_backend="inductor", compile_merge_step=True)
    compiled(x)
    assert "compiled merge pieces" in compiled.report.block_compile
    with turbo_fx.record_merges() as records:
        compiled(x)
    torch._dynamo.reset()
    eager = turbo(model, r=R, inner_backend="inductor", compile_merge_step=False)
    eager(x)
    with turbo_fx.record_merges() as expected:
        eager(x)
    assert [(r.block, r.tokens_in, r.tokens_out) for r in records] == [
        (r.block, r.tokens_in, r.tokens_out) for r in expected]
    assert [r.tokens_out for r in records] == [62, 59, 56, 53, 50, 47]
    assert sorted({r.block for r in records}) == list(range(DEPTH))
    for got, want in zip(records, expected):
        assert torch.equal(got.assign, want.assign) and torch.allclose(got.size, want.size)
    # Every original token lands in one merged token, and the sizes count them.
    last = records[-1]
    assert last.assign.max().item() == last.tokens_out - 1
    assert torch.equal(last.size.sum(dim=1), torch.full((2,), 65.0))


def test_merge_pieces_get_scalar_code_on_cpu(turbo, model, tmp_path):
    """On CPU the merge piece's C++ is scalar (its vectorised form cost most of its compile in
    sympy and gained nothing measurable); the compute pieces keep Inductor's vector code."""
    from torch._inductor.cpu_vec_isa import pick_vec_isa
    from torch._inductor.utils import run_and_get_code

    if not pick_vec_isa():
        pytest.skip("this CPU has no vector ISA Inductor uses: every kernel is scalar anyway")
    x = images(2)
    with fresh_cache(dir=str(tmp_path)):
        compiled = turbo(model, r=R, inner_backend="inductor", compile_merge_step=True)
        out, sources = run_and_get_code(compiled, x)
    assert diff_to_reference(model, x, out) < 1e-4
    merge_code = [src for src in sources if "aten.topk" in src]
    compute_code = [src for src in sources if "aten.topk" not in src]
    assert len(merge_code) == 1 and compute_code  # one merge piece generated
    assert "at::vec::" not in merge_code[0]
    assert any("at::vec::" in src for src in compute_code)
    import torch._inductor.config as inductor_config

    before = inductor_config.cpp.simdlen
    with block_compile.merge_codegen_options("cuda"):
        assert inductor_config.cpp.simdlen == before  # other devices: Inductor's own options


def test_the_eager_op_and_the_compiled_pieces_compute_the_same(turbo, model):
    x = images(3, seed=2)
    eager = turbo(model, r=R, inner_backend="inductor", compile_merge_step=False)(x)
    torch._dynamo.reset()
    compiled = turbo(model, r=R, inner_backend="inductor", compile_merge_step=True)
    out = compiled(x)
    assert "compiled merge pieces" in compiled.report.block_compile
    assert (out - eager).abs().max().item() < 1e-5


def test_padding_and_a_mask_cross_the_compiled_pieces(turbo):
    """BERT with padded sequences: the first merge reads the model's mask, the later ones the
    merged key bias with padding keys in it; same outputs as the eager merge op."""
    model = small_hf("bert", layers=4)
    ids, mask = padded_batch([16, 9], 16)
    eager = turbo(model, r=2, inner_backend="inductor", compile_merge_step=False)(input_ids=ids, attention_mask=mask)
    torch._dynamo.reset()
    compiled = turbo(model, r=2, inner_backend="inductor", compile_merge_step=True)
    out = compiled(input_ids=ids, attention_mask=mask)
    # Below torch 2.13 padded merges stay eager (test_padded_merges_compile_only_where...).
    assert ("4 compiled merge pieces" in compiled.report.block_compile) == merge_step.compiles_exactly(padding=True)
    assert (out.last_hidden_state - eager.last_hidden_state).abs().max().item() < 1e-5


def test_a_merge_piece_that_fails_to_compile_runs_the_opaque_op(turbo, model, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("no kernels today")

    monkeypatch.setattr(merge_step, "traced_merge_block", broken)
    x = images(2)
    with caplog.at_level(logging.INFO, logger="turbo_fx"):
        compiled = turbo(model, r=R, inner_backend="inductor", compile_merge_step=True)
        out = compiled(x)
    assert diff_to_reference(model, x, out) < 1e-4
    report = compiled.report
    assert report.fallback_reason is None and report.merges == DEPTH
    assert f"0 compiled merge pieces: 0 generated, 0 shared with an earlier block, 0 from Inductor's cache, {DEPTH} failed" in report.block_compile
    failures = [r for r in caplog.records if "runs as the opaque op" in r.getMessage()]
    assert len(failures) == DEPTH and all("no kernels today" in r.getMessage() for r in failures)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and r.name == "turbo_fx"]
    with turbo_fx.record_merges() as records:
        compiled(x)
    assert [r.tokens_out for r in records] == [62, 59, 56, 53, 50, 47]  # the eager op ran


@pytest.mark.parametrize("given, compiles", [(None, True), (True, True), (False, False)])
def test_the_default_compiles_merge_pieces(given, compiles):
    config = TurboConfig(compile_merge_step=given)
    assert config.strategy.uses_compile_merge_step is compiles


def test_by_default_a_cpu_model_runs_compiled_merge_pieces(turbo, model):
    x = images(2, seed=3)
    compiled = turbo(model, r=R, inner_backend="inductor")
    out = compiled(x)
    assert f"{DEPTH} compiled merge pieces" in compiled.report.block_compile
    assert diff_to_reference(model, x, out) < 1e-4


def test_the_option_is_validated():
    with pytest.raises(TurboConfigError, match="must be True, False or None"):
        TurboConfig(compile_merge_step=1)
    with pytest.raises(TurboConfigError, match="there is no such op"):
        TurboConfig(compile_merge_step=True, fuse_merges=True)
    assert TurboConfig(fuse_merges=True).strategy.compile_merge_step is None  # the default stays valid


def test_the_traced_merge_is_cached_under_a_digest_of_the_merge_code():
    import torch._inductor.config as inductor_config

    name = "turbo_fx.ops.merge_step.traced_merge_block"
    digest = merge_step.merge_source_hash()
    assert len(digest) == 16 and int(digest, 16) >= 0
    before = dict(inductor_config.unsafe_marked_cacheable_functions)
    with block_compile.caches_on():
        assert inductor_config.unsafe_marked_cacheable_functions[name] == digest
    assert inductor_config.unsafe_marked_cacheable_functions == before


def test_shared_arguments_zero_the_block_unless_the_fusion_reads_it():
    step = dict(merge_step._BLOCK_DEFAULTS)
    names = list(step)
    args = [object()] * merge_step._BLOCK_REQUIRED
    by_name = dict(zip(names, args))
    by_name.update(block=7, fusion="sub")
    shared = merge_step.shared_block_step(merge_step.block_arguments((), by_name))
    assert shared["block"] == 0 and shared["fusion"] == "sub" and list(shared) == names
    by_name["fusion"] = "layer"
    assert merge_step.shared_block_step(merge_step.block_arguments((), by_name))["block"] == 7


def test_the_layer_fusion_keeps_the_opaque_op(turbo, model):
    """The "layer" fusion weighs each block by its own float: compiled, no two merge pieces
    would share code, so they run the opaque op (not counted as failures)."""
    x = images(2)
    compiled = turbo(model, r=R, inner_backend="inductor", compile_merge_step=True, fusion="layer")
    with turbo_fx.record_merges() as records:
        out = compiled(x)
    assert "compiled merge pieces" not in compiled.report.block_compile
    # The compile's own run of the split graph merges once more before the call's run.
    assert [r.tokens_out for r in records] == 2 * [62, 59, 56, 53, 50, 47]
    assert diff_to_reference(model, x, out, fusion="layer") < 1e-4


def test_padded_merges_compile_only_where_torch_computes_them_exactly(monkeypatch):
    """torch 2.11's Inductor got the padded step's argmax wrong with a symbolic token count:
    below 2.13 padded merges run eagerly (the same check guards the opaque op's compiled step)."""
    monkeypatch.setattr(torch, "__version__", "2.11.0+cu130")
    assert not merge_step.compiles_exactly(padding=True) and merge_step.compiles_exactly(padding=False)
    monkeypatch.setattr(torch, "__version__", "2.13.0")
    assert merge_step.compiles_exactly(padding=True)
