"""Tests of the reference Turbo implementation (turbo_fx/reference.py) on tiny random timm ViTs."""
from __future__ import annotations

import math

import pytest
import torch

from turbo_fx import ops
from turbo_fx.config import LinearSchedule, TurboConfig
from turbo_fx.reference import (
    apply_reference,
    head_positions,
    attention_probs,
    choose_merges,
    merge_count,
    merge_tokens,
    protected_count,
    reference_forward,
    reference_forward_tokens,
    remove_reference,
    semantic_value,
    sequence_config,
)

from model_builders import GRID, N_PATCHES, NUM_PREFIX, duplicated_pairs, images
from model_builders import small_vit as tiny_model

def restore(tokens: torch.Tensor, assign: torch.Tensor) -> torch.Tensor:
    """Each original token takes the value of the merged token it ended in: [B, N0, C]."""
    return tokens.gather(1, assign[..., None].expand(-1, -1, tokens.shape[-1]))




# ----------------------------------------------------------------------------------------
# r = 0 is the unmodified model
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["vit", "vit_avg", "vit_reg", "deit_distilled"])
def test_r0_gives_the_unpatched_logits(kind):
    model = tiny_model(kind)
    x = images(3)
    with torch.no_grad():
        expected = model(x)  # timm's own forward (fused SDPA)
        patched = apply_reference(model, TurboConfig(r=0))
        assert patched is model  # patched in place
        got = patched(x)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-5


def test_patch_is_in_place_and_removable():
    model = tiny_model("vit")
    x = images(2)
    with torch.no_grad():
        before = model(x)
        apply_reference(model, TurboConfig(r=4))
        merged = model(x)
        assert (merged - reference_forward(model, x, TurboConfig(r=4))).abs().max().item() == 0.0
        assert (merged - before).abs().max().item() > 1e-3  # merging does change the output
        remove_reference(model)
        assert torch.equal(model(x), before)


# ----------------------------------------------------------------------------------------
# Token counts
# ----------------------------------------------------------------------------------------

# (model, options, hand-computed final token count). Per block:
#   r_eff = max(0, min(r_i, (N - p) // 2, N - min_tokens)).
COUNT_CASES = [
    # p=1, N0=17. 17 -3-> 14 -5-> 9 -min(8,(9-1)//2=4)-> 5 -min(2,(5-1)//2=2)-> 3
    ("vit", dict(r=[3, 5, 8, 2]), 3),
    # min_tokens=8: 17 -4-> 13 -min(4,6,13-8=5)=4-> 9 -min(4,4,9-8=1)=1-> 8 -0-> 8
    ("vit", dict(r=4, min_tokens=8), 8),
    # p=2 (cls + dist), N0=18: 18 -5-> 13 -min(5,(13-2)//2=5)-> 8 -min(5,3)-> 5 -min(5,1)-> 4
    ("deit_distilled", dict(r=5), 4),
    # p=3 (cls + 2 registers), N0=19: 19 -8-> 11 -min(8,4)-> 7 -min(8,2)-> 5 -min(8,1)-> 4
    ("vit_reg", dict(r=8), 4),
    # protected=4 overrides auto: 17 -6-> 11 -min(6,(11-4)//2=3)-> 8 -2-> 6 -1-> 5
    ("vit", dict(r=6, protected=4), 5),
    # schedule 6 -> 0 over 4 blocks = [6, 4, 2, 0]: 17 -6-> 11 -4-> 7 -2-> 5 -0-> 5
    ("vit", dict(r=LinearSchedule(first=6, last=0)), 5),
]


@pytest.mark.parametrize("kind, options, expected", COUNT_CASES)
def test_final_token_count(kind, options, expected):
    model = tiny_model(kind)
    x = images(2)
    n0 = N_PATCHES + NUM_PREFIX[kind]
    with torch.no_grad():
        tokens, sizes, assign = reference_forward_tokens(model, x, TurboConfig(**options))
        logits = apply_reference(model, TurboConfig(**options))(x)
    assert tokens.shape == (2, expected, 48)
    assert sizes.shape == (2, expected)
    assert assign.shape == (2, n0)
    assert logits.shape == (2, 10)


def test_merge_count_clamps():
    assert merge_count(n=17, r=3, p=1, min_tokens=0) == 3
    assert merge_count(n=9, r=8, p=1, min_tokens=0) == 4  # half the mergeable tokens
    assert merge_count(n=9, r=4, p=1, min_tokens=8) == 1  # min_tokens
    assert merge_count(n=8, r=4, p=1, min_tokens=8) == 0
    assert merge_count(n=8, r=4, p=1, min_tokens=10) == 0  # never negative
    assert merge_count(n=3, r=4, p=2, min_tokens=0) == 0  # one mergeable token: nothing to pair


# ----------------------------------------------------------------------------------------
# Sizes and assignment
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["vit", "deit_distilled"])
def test_sizes_and_assign_are_consistent(kind):
    model = tiny_model(kind)
    x = images(3)
    n0 = N_PATCHES + NUM_PREFIX[kind]
    with torch.no_grad():
        tokens, sizes, assign = reference_forward_tokens(model, x, TurboConfig(r=[4, 3, 2, 1]))
    n_final = tokens.shape[1]
    assert n_final == n0 - 10
    assert torch.equal(sizes.sum(dim=1), torch.full((3,), float(n0)))
    assert torch.equal(sizes, sizes.round())  # sizes count original tokens
    assert assign.min() >= 0 and assign.max() < n_final
    for b in range(3):
        counts = torch.bincount(assign[b], minlength=n_final)
        assert torch.equal(counts.float(), sizes[b])
    # The samples merge differently (per-sample decisions).
    assert not torch.equal(assign[0], assign[1])


def test_avg_pool_is_a_size_weighted_mean_of_the_remaining_tokens():
    model = tiny_model("vit_avg")
    x = images(2)
    config = TurboConfig(r=3)
    with torch.no_grad():
        tokens, sizes, _ = reference_forward_tokens(model, x, config)
        weight = sizes[:, 1:, None]
        expected = model.head(model.fc_norm((tokens[:, 1:] * weight).sum(1) / weight.sum(1)))
        got = apply_reference(model, config)(x)
    assert (got - expected).abs().max().item() <= 1e-6


# ----------------------------------------------------------------------------------------
# Exact duplicates merge losslessly
# ----------------------------------------------------------------------------------------


# Why this is exact: a token duplicated d times in the unmerged sequence contributes
# d * exp(l) to every softmax denominator and d * exp(l) * v to every numerator; merged into
# one token of size d with bias log d it contributes exp(l + log d) = d * exp(l): the same.
# The twin rows of q and v are identical, so every attention output, the residual stream and
# the MLP are unchanged; the size-weighted average of two equal tokens is that token.
# For the merges to pair twins only, each block may only pick twins: twins lie in A and B
# (adjacent positions straddle the alternating split), have redundancy 1 and every other
# pair has redundancy < 1. So with E = R (alpha = 0) any r_i up to the number of remaining
# pairs merges twins; and in block 0, where every token of A has its twin in B, any fusion
# and alpha merge twins as long as r_0 <= 8.
DUPLICATE_CASES = [
    ("vit", dict(r=[3, 2, 2, 1], alpha=0.0)),
    ("vit", dict(r=[8, 0, 0, 0])),  # default fusion "sub", alpha 0.05
    ("vit", dict(r=[6, 0, 0, 0], fusion="div")),
    ("vit", dict(r=[5, 0, 0, 0], fusion="layer", alpha=2.0)),
    ("vit", dict(r=[6, 1, 1, 0], metric="queries", alpha=0.0)),
    ("deit_distilled", dict(r=[2, 2, 2, 2], alpha=0.0)),
    ("vit_reg", dict(r=[7, 0, 0, 0], fusion="mul", alpha=0.5)),
]


@pytest.mark.parametrize(
    "kind, options, dtype, tol",
    # float64: exact up to rounding; float32: the graph pass's working precision
    [(kind, options, torch.float64, 1e-10) for kind, options in DUPLICATE_CASES]
    + [(kind, options, torch.float32, 1e-5) for kind, options in DUPLICATE_CASES[:2]],
)
def test_merging_exact_duplicates_loses_nothing(kind, options, dtype, tol):
    model = tiny_model(kind).to(dtype)
    x = duplicated_pairs(model, images(2).to(dtype))
    p = model.num_prefix_tokens
    config = TurboConfig(**options)
    with torch.no_grad():
        expected_tokens = model.forward_features(x)  # timm's own, unmerged
        expected_logits = model(x)
        tokens, sizes, assign = reference_forward_tokens(model, x, config)
        logits = apply_reference(model, config)(x)

    n_merged = sum(config.r_per_block(4))
    assert tokens.shape[1] == p + N_PATCHES - n_merged  # merges did happen
    # Only twins merged: as many twin pairs share a token as there were merges, and no
    # token stands for more than two originals.
    twins = assign[:, p:].reshape(2, N_PATCHES // 2, 2)
    assert (sizes <= 2).all()
    assert int((twins[..., 0] == twins[..., 1]).sum()) == 2 * n_merged

    assert tokens.dtype == dtype
    assert (restore(tokens, assign) - expected_tokens).abs().max().item() <= tol
    assert (logits - expected_logits).abs().max().item() <= tol


def test_duplicates_without_proportional_attention_do_change_the_result():
    """Control for the test above: without the log-size bias the merged tokens are under-attended."""
    model = tiny_model("vit").double()
    x = duplicated_pairs(model, images(2).double())
    config = TurboConfig(r=[8, 0, 0, 0], prop_attn=False)
    with torch.no_grad():
        expected_tokens = model.forward_features(x)
        tokens, _, assign = reference_forward_tokens(model, x, config)
    assert (restore(tokens, assign) - expected_tokens).abs().max().item() > 1e-3


# ----------------------------------------------------------------------------------------
# Protected tokens
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind, options, p",
    [
        ("vit", dict(r=8), 1),
        ("deit_distilled", dict(r=8), 2),  # cls + distillation token
        ("vit_reg", dict(r=8), 3),  # cls + 2 registers
        ("vit", dict(r=8, protected=3), 3),
        ("deit_distilled", dict(r=8, fusion="div", semantic=True), 2),
    ],
)
def test_protected_tokens_never_merge_and_stay_first(kind, options, p):
    model = tiny_model(kind)
    x = images(3)
    with torch.no_grad():
        tokens, sizes, assign = reference_forward_tokens(model, x, TurboConfig(**options))
    n_final = tokens.shape[1]
    assert n_final < N_PATCHES  # heavy merging happened
    # Original token j < p is final token j, alone (size 1): neither a source nor a destination.
    assert torch.equal(assign[:, :p], torch.arange(p).expand(3, p))
    assert torch.equal(sizes[:, :p], torch.ones(3, p))
    assert (assign[:, p:] >= p).all()
    for b in range(3):
        assert torch.equal(torch.bincount(assign[b], minlength=n_final).float(), sizes[b])


@pytest.mark.parametrize("kind, protected, needed", [
    ("vit", 0, 1),  # "token" pooling reads the class token
    ("vit_avg", 0, 1),  # "avg" pooling skips the class token by position
    ("deit_distilled", 1, 2),  # the distillation head reads token 1
])
def test_a_head_that_finds_an_unprotected_token_by_position_is_refused(kind, protected, needed):
    model = tiny_model(kind)
    assert head_positions(model) == needed
    with pytest.raises(ValueError, match=f"the head finds the first {needed} token"):
        reference_forward(model, images(1), TurboConfig(r=4, protected=protected))


def test_a_head_over_an_unmerged_sequence_reads_any_token():
    model = tiny_model("vit")
    with torch.no_grad():
        got = reference_forward(model, images(2), TurboConfig(r=0, protected=0))
        assert (got - model(images(2))).abs().max().item() <= 1e-5


def test_the_head_needs_only_the_tokens_it_finds_by_position():
    token_pooled = tiny_model("vit_reg")  # reads the class token, not the registers after it
    avg_pooled = patch_only_vit(reg_tokens=2)  # skips both registers
    assert head_positions(token_pooled) == 1 and head_positions(avg_pooled) == 2
    with torch.no_grad():
        assert reference_forward(token_pooled, images(1), TurboConfig(r=4, protected=1)).shape == (1, 10)
        with pytest.raises(ValueError, match="protected=1 protects 1"):
            reference_forward(avg_pooled, images(1), TurboConfig(r=4, protected=1))


def test_distilled_head_reads_the_unmerged_prefix_tokens():
    model = tiny_model("deit_distilled")
    x = images(2)
    with torch.no_grad():
        tokens, _, _ = reference_forward_tokens(model, x, TurboConfig(r=8))
        expected = (model.head(tokens[:, 0]) + model.head_dist(tokens[:, 1])) / 2
        got = apply_reference(model, TurboConfig(r=8))(x)
    assert (got - expected).abs().max().item() <= 1e-6


# ----------------------------------------------------------------------------------------
# Sequences of patch tokens only (class_token=False, no registers)
# ----------------------------------------------------------------------------------------


def patch_only_vit(reg_tokens: int = 0) -> torch.nn.Module:
    """``tiny_model("vit_avg")``'s shape without a class token: the blocks see patches (and registers)."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=4, num_heads=3, num_classes=10,
                              class_token=False, reg_tokens=reg_tokens, global_pool="avg")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2 or "token" in name:
                param.normal_(0.0, 0.3 if "qkv" in name else 0.15)
    return model.eval()


def test_patch_only_sequence_protects_none_and_ranks_by_redundancy_alone():
    model = patch_only_vit()
    x = images(2)
    semantic = TurboConfig(r=[6, 4, 2, 2], alpha=1.0, keep_salient=2)
    redundancy_only = TurboConfig(r=[6, 4, 2, 2], semantic=False, protected=0)
    assert protected_count(model, semantic) == 0
    assert sequence_config(model, semantic) == TurboConfig(r=[6, 4, 2, 2], alpha=1.0, semantic=False)
    with torch.no_grad():
        assert torch.equal(reference_forward(model, x, semantic), reference_forward(model, x, redundancy_only))


def test_patch_only_sequence_ranks_by_redundancy_whatever_protected_says():
    model = patch_only_vit()
    x = images(2)
    with torch.no_grad():
        got = reference_forward(model, x, TurboConfig(r=4, alpha=1.0, protected=2))
        expected = reference_forward(model, x, TurboConfig(r=4, semantic=False, protected=2))
    assert torch.equal(got, expected)


def test_twin_patches_of_a_patch_only_sequence_merge_losslessly():
    """The twins 2k, 2k+1 straddle the split only when no token is protected: A = 0, 2, ...,
    B = 1, 3, .... Protecting token 0 would shift the split by one and pair strangers."""
    model = patch_only_vit().double()
    x = duplicated_pairs(model, images(2).double())
    with torch.no_grad():
        expected = model(x)
        tokens, sizes, _ = reference_forward_tokens(model, x, TurboConfig(r=[8, 0, 0, 0], alpha=1.0))
        got = reference_forward(model, x, TurboConfig(r=[8, 0, 0, 0], alpha=1.0))
    assert tokens.shape[1] == N_PATCHES - 8
    assert torch.equal(sizes, torch.full_like(sizes, 2.0))
    assert (got - expected).abs().max().item() <= 1e-10


def test_semantic_only_ranking_without_a_class_token_is_refused():
    model = patch_only_vit()
    with pytest.raises(ValueError, match="semantic-only ranking .* needs a class token"):
        reference_forward(model, images(1), TurboConfig(r=4, redundancy=False))


def test_registers_without_a_class_token_are_protected_and_rank_the_patches():
    """Register 0 leads the sequence, so its attention row gives the semantic values."""
    model = patch_only_vit(reg_tokens=2)
    config = TurboConfig(r=4, redundancy=False)
    assert protected_count(model, config) == 2
    assert sequence_config(model, config) is config
    with torch.no_grad():
        tokens, sizes, assign = reference_forward_tokens(model, images(2), config)
    assert torch.equal(assign[:, :2], torch.arange(2).expand(2, 2))
    assert torch.equal(sizes[:, :2], torch.ones(2, 2))


# ----------------------------------------------------------------------------------------
# Attention helpers
# ----------------------------------------------------------------------------------------


def test_log_size_bias_equals_duplicated_keys():
    """A key of size s gets the attention of s identical keys of size 1 (together)."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 5, 4, generator=g, dtype=torch.float64), torch.randn(2, 4, 4, generator=g, dtype=torch.float64)
    sizes = torch.tensor([1.0, 3.0, 1.0, 2.0])
    repeated = torch.repeat_interleave(k, sizes.long(), dim=1)  # keys 0, 1, 1, 1, 2, 3, 3
    probs_rep = attention_probs(q, repeated, 0.5)
    owner = torch.repeat_interleave(torch.arange(4), sizes.long())
    summed = torch.zeros(2, 5, 4, dtype=torch.float64).index_add(2, owner, probs_rep)
    probs = attention_probs(q, k, 0.5, sizes)
    assert torch.allclose(probs, summed, atol=1e-12, rtol=0)
    assert torch.allclose(probs.sum(-1), torch.ones(2, 5, dtype=torch.float64))
    # all sizes 1: the bias is exactly zero
    assert torch.equal(attention_probs(q, k, 0.5, torch.ones(4)), attention_probs(q, k, 0.5))


def test_semantic_value_is_the_cls_row_averaged_over_heads_times_n():
    probs = torch.rand(2, 4, 4, generator=torch.Generator().manual_seed(0))  # rows 1..3 are ignored
    probs[0, 0] = torch.tensor([0.1, 0.2, 0.3, 0.4])
    probs[1, 0] = torch.tensor([0.1, 0.1, 0.4, 0.4])
    expected = torch.tensor([0.4, 0.6, 1.4, 1.6])  # mean [0.1, 0.15, 0.35, 0.4] * 4
    assert torch.allclose(semantic_value(probs), expected, atol=1e-6, rtol=0)
    uniform = torch.full((3, 6, 6), 1 / 6)
    assert torch.allclose(semantic_value(uniform), torch.ones(6))


# ----------------------------------------------------------------------------------------
# Matching and fusion on a hand-made example
# ----------------------------------------------------------------------------------------


def handmade_sequence():
    """9 tokens: 0 protected; A = {1, 3, 5, 7}, B = {2, 4, 6, 8}.

    B tokens are the unit vectors e1..e4; A token k (W, X, Y, Z) is c*e_k + sqrt(1-c^2)*e5, so its
    best match is the B token right after it with cosine (redundancy) c:
        token   R     I     R-I    R/I    R*(1-I)   (alpha = 1)
        1 W    1.00  2.00  -1.00  0.50   -1.00
        3 X    0.95  0.60   0.35  1.58    0.38
        5 Y    0.60  0.30   0.30  2.00    0.42
        7 Z    0.30  0.10   0.20  3.00    0.27
    The B tokens and token 0 get large semantic values, which must be ignored.
    """
    R = {1: 1.0, 3: 0.95, 5: 0.6, 7: 0.3}
    metric = torch.zeros(9, 5, dtype=torch.float64)
    for k, (a, c) in enumerate(R.items()):
        metric[a + 1, k] = 1.0  # B token
        metric[a, k] = c
        metric[a, 4] = math.sqrt(1 - c * c)
    metric[0] = 1.0
    metric[1:] *= torch.arange(1, 9, dtype=torch.float64)[:, None]  # norms must not matter
    semantic = torch.tensor([9.0, 2.0, 9.0, 0.6, 9.0, 0.3, 9.0, 0.1, 9.0], dtype=torch.float64)
    return metric, semantic


@pytest.mark.parametrize(
    "options, block_index, source, destination",
    [
        (dict(semantic=False), 0, 1, 2),  # max R: W
        (dict(fusion="sub", alpha=1.0), 0, 3, 4),  # max R - I: X (0.35 > 0.30)
        (dict(fusion="mul", alpha=1.0), 0, 5, 6),  # max R(1 - I): Y (0.42 > 0.38)
        (dict(fusion="div"), 0, 7, 8),  # max R / I: Z (3.0)
        (dict(redundancy=False, alpha=0.0), 0, 7, 8),  # semantic only, max -I: Z (0.1); alpha irrelevant
        # layer: weight beta**|gamma - block|: 0.1**3 at block 0 (~ semantic off), 1 at block 3 (= sub)
        (dict(fusion="layer", alpha=1.0, beta=0.1, gamma=3.0), 0, 1, 2),
        (dict(fusion="layer", alpha=1.0, beta=0.1, gamma=3.0), 3, 3, 4),
    ],
)
def test_fusion_strategies_choose_the_hand_computed_token(options, block_index, source, destination):
    metric, semantic = handmade_sequence()
    src, dst = choose_merges(metric, semantic, p=1, r=1, config=TurboConfig(**options), block_index=block_index)
    assert src.tolist() == [source]
    assert dst.tolist() == [destination]


def test_top_r_sources_in_order_of_information_degree():
    metric, semantic = handmade_sequence()
    config = TurboConfig(fusion="sub", alpha=1.0)
    src, dst = choose_merges(metric, semantic, p=1, r=3, config=config, block_index=0)
    assert src.tolist() == [3, 5, 7]  # E = 0.35, 0.30, 0.20; W (-1.0) stays
    assert dst.tolist() == [4, 6, 8]


def test_protected_token_is_not_in_the_split():
    metric, semantic = handmade_sequence()
    # Tokens 1, 2 and 3 all point along e1. With p = 1, token 1 (in A) would merge into token 2
    # (cosine 1, the first of a tie). With p = 2, token 1 is protected, the split is
    # A = {2, 4, 6, 8}, B = {3, 5, 7}, and token 2 merges into token 3.
    metric[3] = metric[1]
    src, dst = choose_merges(metric, semantic, p=2, r=1, config=TurboConfig(semantic=False), block_index=0)
    assert src.tolist() == [2] and dst.tolist() == [3]


def test_several_sources_can_share_a_destination():
    metric = torch.tensor(
        [[1.0, 1.0], [1.0, 0.1], [1.0, 0.0], [0.9, 0.2], [0.0, 1.0]], dtype=torch.float64
    )  # A = {1, 3}, B = {2, 4}: both A tokens are closest to token 2
    semantic = torch.ones(5, dtype=torch.float64)
    src, dst = choose_merges(metric, semantic, p=1, r=2, config=TurboConfig(semantic=False), block_index=0)
    assert src.tolist() == [1, 3]  # cos 0.995 then 0.976
    assert dst.tolist() == [2, 2]


def test_merge_is_a_size_weighted_average_and_keeps_order():
    x = torch.tensor([[0.0, 1.0], [1.0, 1.0], [2.0, 1.0], [4.0, 1.0], [8.0, 1.0], [16.0, -1.0]])
    sizes = torch.tensor([1.0, 1.0, 2.0, 1.0, 3.0, 1.0])
    src, dst = torch.tensor([1, 3, 5]), torch.tensor([2, 2, 4])
    merged, new_sizes, new_index = merge_tokens(x, sizes, src, dst)
    # token 2: (2*2 + 1*1 + 1*4) / 4 = 2.25; token 4: (3*8 + 1*16) / 4 = 10, (3 - 1) / 4 = 0.5
    assert torch.equal(merged, torch.tensor([[0.0, 1.0], [2.25, 1.0], [10.0, 0.5]]))
    assert torch.equal(new_sizes, torch.tensor([1.0, 4.0, 4.0]))
    assert new_index.tolist() == [0, 1, 1, 1, 2, 2]


def test_merge_keeps_dtype_and_untouched_tokens_exactly():
    x = torch.randn(7, 4, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    sizes = torch.tensor([1.0, 3.0, 1.0, 2.0, 5.0, 1.0, 1.0])
    merged, new_sizes, _ = merge_tokens(x, sizes, torch.tensor([3]), torch.tensor([4]))
    assert merged.dtype == torch.bfloat16 and new_sizes.dtype == torch.float32
    assert torch.equal(merged[[0, 1, 2, 4, 5]], x[[0, 1, 2, 5, 6]])
    expected = (2 * x[3].float() + 5 * x[4].float()) / 7  # float32 average, rounded once
    assert torch.equal(merged[3], expected.to(torch.bfloat16))


def test_keep_salient_token_is_neither_source_nor_destination():
    # p = 1; A = {1, 3}, B = {2, 4}. Tokens 1 and 2 are identical (R = 1), 3 and 4 at
    # cosine 0.5, every other pair orthogonal. Token 2 has the highest semantic value.
    metric = torch.zeros(5, 3, dtype=torch.float64)
    metric[0] = torch.tensor([0.0, 0.0, 1.0])
    metric[1] = metric[2] = torch.tensor([1.0, 0.0, 0.0])
    metric[3] = torch.tensor([0.0, 1.0, 0.0])
    metric[4] = torch.tensor([0.0, 0.5, 0.75**0.5])
    semantic = torch.tensor([3.0, 0.5, 2.0, 0.5, 0.5], dtype=torch.float64)
    plain = TurboConfig(alpha=0.0)
    src, dst = choose_merges(metric, semantic, p=1, r=1, config=plain, block_index=0)
    assert (src.tolist(), dst.tolist()) == ([1], [2])
    kept = TurboConfig(alpha=0.0, keep_salient=1)
    src, dst = choose_merges(metric, semantic, p=1, r=1, config=kept, block_index=0)
    assert (src.tolist(), dst.tolist()) == ([3], [4])  # token 2 may not absorb token 1 any more

    # The graph's op decides the same (batch of one, semantic given as raw attention I / N).
    x = metric[None].float()
    size = torch.ones(1, 5)
    for k, expected_dest in ((0, [0, 1, 1, 2, 3]), (1, [0, 1, 2, 3, 3])):
        _, _, dest = ops.merge_tokens(x, size, x, (semantic / 5)[None].float(), r=1, protected=1, alpha=0.0,
                                      keep_salient=k)
        assert dest[0].tolist() == expected_dest


def test_keep_salient_reserves_room_in_merge_count():
    # 9 unprotected tokens: 4 merges at most, 3 when one salient token may not take part.
    assert merge_count(10, 8, 1, 0) == 4
    assert merge_count(10, 8, 1, 0, salient=1) == 3
    assert ops.merge_count(10, 1, 8, 0, reserved=1) == 3
