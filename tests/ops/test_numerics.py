"""The merge ops in half precision and at the edges of a batch: zero metric rows, large
activations, an empty batch, and a NaN that must stay in the sample it came from.

"The float32 computation" below is the same op run on the half-precision inputs upcast to
float32: where it is well defined (no near-ties), the half-precision run must choose the same
merges."""
from __future__ import annotations

import logging

import pytest
import torch

from turbo_fx import ops

HALF = [torch.float16, torch.bfloat16]
PATHS = ["eager", "traced", "compiled"]


def upcast(t):
    return t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t


def merge_tokens_both_ways(x, size, metric, r, protected):
    """(half-precision result, float32 result) of ``ops.merge_tokens``."""
    half = ops.merge_tokens(x, size, metric, None, r=r, protected=protected)
    full = ops.merge_tokens(x.float(), size, metric.float(), None, r=r, protected=protected)
    return half, full


def zero_row_tokens(dtype, row: int):
    """Tokens [2, 17, 8] whose metric row ``row`` is all zeros, in ``dtype``."""
    g = torch.Generator().manual_seed(0)
    metric = torch.randn(2, 17, 8, generator=g)
    metric[:, row] = 0
    x = torch.randn(2, 17, 8, generator=g)
    return x.to(dtype), torch.ones(2, 17), metric.to(dtype)


def tokens_sharing_a_slot(dest, token: int) -> list[int]:
    """Per sample, how many old tokens went into the slot that ``token`` went into."""
    return [int((d == d[token]).sum()) for d in dest]


# With protected=1, odd tokens are sources (A) and even ones destinations (B).
@pytest.mark.parametrize("dtype", HALF)
def test_a_zero_source_row_merges_last_as_in_float32(dtype):
    x, size, metric = zero_row_tokens(dtype, row=3)
    (merged, new_size, dest), (ref_merged, ref_size, ref_dest) = merge_tokens_both_ways(x, size, metric, 3, 1)
    assert torch.isfinite(merged).all()
    assert torch.equal(dest, ref_dest) and torch.equal(new_size, ref_size)
    # Similarity 0 to everything: the least redundant source, kept on its own.
    assert tokens_sharing_a_slot(dest, 3) == [1, 1]
    torch.testing.assert_close(merged.float(), ref_merged, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("dtype", HALF)
def test_a_zero_destination_row_draws_no_merge_as_in_float32(dtype):
    x, size, metric = zero_row_tokens(dtype, row=4)
    (merged, new_size, dest), (ref_merged, ref_size, ref_dest) = merge_tokens_both_ways(x, size, metric, 3, 1)
    assert torch.isfinite(merged).all()
    assert torch.equal(dest, ref_dest) and torch.equal(new_size, ref_size)
    assert tokens_sharing_a_slot(dest, 4) == [1, 1]
    torch.testing.assert_close(merged.float(), ref_merged, atol=1e-2, rtol=1e-2)


def test_similarities_that_bfloat16_would_tie_are_ranked_as_in_float32():
    # Both sources' cosine to destination 1 rounds to 1.0 in bfloat16 (0.99822 and 0.99875 in
    # float32): only float32 scores see that source 2 is the closer one.
    metric = torch.tensor([[[1.0, 0.06], [1.0, 0.0], [1.0, 0.05], [0.0, 1.0]]], dtype=torch.bfloat16)
    x = torch.randn(1, 4, 3).to(torch.bfloat16)
    (_, _, dest), (_, _, ref_dest) = merge_tokens_both_ways(x, torch.ones(1, 4), metric, 1, 0)
    assert dest.tolist() == ref_dest.tolist() == [[0, 1, 1, 2]]


def test_float64_similarities_are_not_rounded_to_float32():
    # Cosines 1 - 2e-8 and 1 - 5e-9: both 1.0 in float32, where the first source would win the tie.
    metric = torch.tensor([[[1.0, 2e-4], [1.0, 0.0], [1.0, 1e-4], [0.0, 1.0]]], dtype=torch.float64)
    _, _, dest = ops.merge_tokens(torch.randn(1, 4, 3, dtype=torch.float64), torch.ones(1, 4), metric, None,
                                  r=1, protected=0)
    assert dest.tolist() == [[0, 1, 1, 2]]


def test_grid_merge_plan_with_a_zero_row_matches_float32():
    g = torch.Generator().manual_seed(1)
    metric = torch.randn(2, 16, 8, generator=g)
    metric[:, 5] = 0
    dst, src = ops.grid_partition(4, 4, 2, 2, seed=None)
    for dtype in HALF:
        assign, size = ops.grid_merge_plan(metric.to(dtype), dst, src, r=4)
        ref_assign, ref_size = ops.grid_merge_plan(metric.to(dtype).float(), dst, src, r=4)
        assert torch.equal(assign, ref_assign) and torch.equal(size, ref_size)


@pytest.mark.parametrize("dtype", HALF)
def test_weighted_mean_of_large_half_tokens_is_the_unmerged_mean(dtype):
    # 197 tokens of 400: their sum, 78800, is past float16's largest value (65504).
    y = torch.full((2, 197, 4), 400.0, dtype=dtype)
    size = torch.ones(2, 197)
    mean = ops.weighted_token_mean(y, size, 0)
    assert mean.dtype == dtype
    torch.testing.assert_close(mean, y.mean(dim=1))
    merged, merged_size = y[:, :100], torch.cat([torch.full((2, 97), 2.0), torch.ones(2, 3)], dim=1)
    torch.testing.assert_close(ops.weighted_token_mean(merged, merged_size, 0), y.mean(dim=1))
    # The sum itself is what torch's own sum gives: inf in float16, as unmerged.
    torch.testing.assert_close(ops.weighted_token_sum(y, size, 0), y.sum(dim=1))


def test_semantic_value_of_large_float16_queries_is_finite_and_as_in_float32():
    # q . k is about 64 * 40 * 40 = 102400, past float16's range; scaled by 1/8 it is not.
    g = torch.Generator().manual_seed(2)
    q = (40 + torch.rand(2, 2, 9, 64, generator=g)).to(torch.float16)
    k = (40 + 0.01 * torch.randn(2, 2, 9, 64, generator=g)).to(torch.float16)
    semantic = ops.cls_attention(q, k, None, None)
    assert torch.isfinite(semantic).all()
    torch.testing.assert_close(semantic, ops.cls_attention(q.float(), k.float(), None, None), atol=1e-2, rtol=1e-2)


# The merge op (``merge_block``), run three ways: eagerly, traced as ``fuse_merges`` traces it,
# and through the one compiled merge step (``compile_merge_step``).
def step_args(x, k, *, r, q=None, padding=False, size=None):
    """Keyword arguments of one ``merge_block`` call: metric from ``k`` [B, H, N, D], the
    semantic value from ``q`` and ``k`` (none without ``q``), one protected token."""
    return dict(
        x=x, size=torch.ones(x.shape[0], x.shape[1]) if size is None else size, assign=ops.initial_assign(x),
        metric_source=k, metric_token_axis=-2, semantic_q=q, semantic_k=k if q is not None else None,
        semantic_mask=None, semantic_probs=None, scale=None, r=r, protected=1, fusion="sub",
        alpha=0.05 if q is not None else 0.0, beta=1.0, gamma=0.0, block=0, padding=padding, prop_attn=True,
        bias_dtype=x.dtype, symbolic_tokens=False, use_redundancy=True, keep_salient=0, protected_tail=0,
        traced=False,
    )


def run_step(args: dict, path: str):
    if path == "eager":
        return ops.merge_block_op(*args.values())
    if path == "traced":
        return ops.merge_block(**{**args, "traced": True})
    return ops.merge_block(**args, compiled=True)


@pytest.fixture
def no_step_fallback(caplog):
    """Fails the test if the compiled merge step gave up (it would then run eagerly)."""
    with caplog.at_level(logging.WARNING, logger="turbo_fx"):
        yield
    assert "compiled merge step failed" not in caplog.text


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", HALF)
def test_the_merge_op_with_zero_metric_rows_chooses_as_in_float32(dtype, path, no_step_fallback):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 17, 16, generator=g).to(dtype)
    # One head: its head mean is the head itself, so both dtypes rank the same metric.
    k = torch.randn(2, 1, 17, 8, generator=g)
    k[:, :, 3] = 0  # a source
    k[:, :, 6] = 0  # a destination
    k = k.to(dtype)
    args = step_args(x, k, r=4)
    merged, size, assign, bias = run_step(args, path)
    ref_merged, ref_size, ref_assign, ref_bias = run_step({**{n: upcast(v) for n, v in args.items()},
                                                           "bias_dtype": torch.float32}, path)
    assert torch.isfinite(merged).all() and torch.isfinite(bias).all()
    assert torch.equal(assign, ref_assign) and torch.equal(size, ref_size)
    assert tokens_sharing_a_slot(assign, 3) == tokens_sharing_a_slot(assign, 6) == [1, 1]
    torch.testing.assert_close(merged.float(), ref_merged, atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(bias.float(), ref_bias, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("padding", [False, True])
def test_an_empty_batch_goes_through_the_merge_op(padding, path, no_step_fallback):
    x, k, q = torch.randn(0, 17, 16), torch.randn(0, 2, 17, 8), torch.randn(0, 2, 17, 8)
    merged, size, assign, bias = run_step(step_args(x, k, q=q, r=3, padding=padding), path)
    assert merged.shape == (0, 14, 16) and size.shape == (0, 14)
    assert assign.shape == (0, 17) and bias.shape == (0, 1, 1, 14)


def test_an_empty_batch_goes_through_the_grid_merge_and_the_reductions():
    dst, src = ops.grid_partition(4, 4, 2, 2, seed=None)
    merged, assign, size, bias = ops.grid_merge(torch.randn(0, 16, 8), dst, src, 4, None, 0.0, True, True,
                                                torch.float32)
    assert merged.shape == (0, 12, 8) and assign.shape == (0, 16) and bias.shape == (0, 1, 1, 12)
    assert ops.weighted_token_mean(torch.randn(0, 5, 3), torch.ones(0, 5), 0).shape == (0, 3)
    assert ops.restore_tokens(merged, assign, 1).shape == (0, 16, 8)


def batch_with_a_nan_sample(dtype, padding: bool):
    """(arguments for a batch of 3 whose sample 0 is NaN in its tokens, keys and queries;
    the same arguments for samples 1 and 2 alone)."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 17, 16, generator=g).to(dtype)
    k = torch.randn(3, 2, 17, 8, generator=g).to(dtype)
    q = torch.randn(3, 2, 17, 8, generator=g).to(dtype)
    size = torch.ones(3, 17)
    if padding:
        size[2, -5:] = 0
    for t in (x, k, q):
        t[0] = float("nan")
    args = step_args(x, k, q=q, r=3, padding=padding, size=size)
    rest = step_args(x[1:], k[1:], q=q[1:], r=3, padding=padding, size=size[1:])
    return args, rest


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype, padding", [(torch.float32, True), (torch.float16, False), (torch.bfloat16, True)])
def test_a_nan_sample_leaves_the_other_samples_as_they_are_alone(dtype, padding, path, no_step_fallback):
    args, rest = batch_with_a_nan_sample(dtype, padding)
    together, alone = run_step(args, path), run_step(rest, path)
    for out, ref in zip(together, alone):
        assert torch.equal(out[1:], ref)


def test_a_nan_sample_leaves_the_other_samples_of_a_grid_merge_as_they_are_alone():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 16, 8, generator=g)
    semantic = torch.rand(3, 16, generator=g)
    x[0, 2], semantic[0, 7] = float("nan"), float("nan")
    dst, src = ops.grid_partition(4, 4, 2, 2, seed=None)
    together = ops.grid_merge(x, dst, src, 4, semantic, 0.1, True, True, torch.float32)
    alone = ops.grid_merge(x[1:], dst, src, 4, semantic[1:], 0.1, True, True, torch.float32)
    for out, ref in zip(together, alone):
        assert torch.equal(out[1:], ref)
    size = torch.ones(3, 16)
    assert torch.equal(ops.weighted_token_mean(x, size, 0)[1:], ops.weighted_token_mean(x[1:], size[1:], 0))
