"""A FLOP budget instead of r (``options={"flops": ...}``): the schedule is solved from the
graph and the merged graph's counted FLOPs land on the budget."""
from __future__ import annotations

import pytest
import torch

from model_builders import padded_batch
from turbo_fx import TurboConfig, TurboConfigError
from turbo_fx.passes.flop_budget import FlopModel, clamp, schedule_counts, solve
from turbo_fx.report import recording


def counted(model, options: dict, *args, **kwargs):
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="turbo", options={"inner_backend": "eager", **options})
    with recording(count_flops=True) as rec, torch.no_grad():
        compiled(*args, **kwargs)
    return next(g for g in rec.graphs if g.blocks or g.budget or g.fallback_reason)


def assert_on_budget(report, budget: float) -> None:
    assert report.fallback_reason is None, report.fallback_reason
    predicted = float(report.budget.split("predicts ")[1].split(";")[0])
    assert abs(report.flop_ratio - predicted) < 0.01, (report.flop_ratio, report.budget)  # the model is right
    assert abs(report.flop_ratio - budget) < 0.02, (report.flop_ratio, report.budget)  # and the budget is met


@pytest.mark.parametrize("budget, schedule", [(0.8, "constant"), (0.45, "constant"), (0.6, "decreasing")])
def test_timm_vit_lands_on_the_budget(budget, schedule):
    import timm

    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False).eval()
    report = counted(model, {"flops": budget, "schedule": schedule}, torch.randn(1, 3, 224, 224))
    assert_on_budget(report, budget)
    r = [b.r_requested for b in report.blocks]  # before clamping to half of what is left
    if schedule == "decreasing":
        assert r[0] > r[-1]
    else:
        assert max(r) - min(r) <= 1


@pytest.mark.parametrize("kind", ["dinov2", "clip_vision"])
def test_transformers_vision_towers_land_on_the_budget(kind):
    import transformers as tf

    torch.manual_seed(0)
    common = dict(hidden_size=64, num_hidden_layers=6, num_attention_heads=4)
    if kind == "dinov2":
        model = tf.Dinov2Model(tf.Dinov2Config(image_size=224, patch_size=14, mlp_ratio=2, **common))
    else:
        model = tf.CLIPVisionModel(tf.CLIPVisionConfig(image_size=224, patch_size=16, intermediate_size=128, **common))
    report = counted(model.eval(), {"flops": 0.6}, pixel_values=torch.randn(1, 3, 224, 224))
    assert_on_budget(report, 0.6)


def test_padded_bert_lands_on_the_budget():
    import transformers as tf

    torch.manual_seed(0)
    model = tf.BertModel(tf.BertConfig(hidden_size=64, num_hidden_layers=6, num_attention_heads=4,
                                       intermediate_size=128, vocab_size=100)).eval()
    ids, mask = padded_batch([128, 90], 128)
    report = counted(model, {"flops": 0.6}, input_ids=ids, attention_mask=mask)
    assert report.padding
    assert_on_budget(report, 0.6)


def test_a_budget_out_of_reach_merges_the_most_and_says_so():
    import timm

    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False).eval()
    report = counted(model, {"flops": 0.05, "min_tokens": 60}, torch.randn(1, 3, 224, 224))
    assert "below the" in report.budget and "merging the most" in report.budget
    assert report.tokens_per_block[-1] >= 60
    assert report.flop_ratio > 0.25


def small_unet():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    ).eval()


@pytest.mark.parametrize("budget, components", [
    (0.9, ("self-attention",)),
    (0.8, ("self-attention",)),
    (0.8, ("self-attention", "cross-attention", "feed-forward")),
])
def test_a_unet_lands_on_the_budget_through_its_merge_ratio(budget, components):
    inputs = (torch.randn(2, 4, 32, 32), torch.tensor([10, 10]))
    report = counted(small_unet(), {"flops": budget, "merge_components": components}, *inputs,
                     encoder_hidden_states=torch.randn(2, 7, 32))
    assert report.mode == "merge-and-restore" and "ratio=" in report.budget
    assert_on_budget(report, budget)


def test_a_unet_budget_out_of_reach_merges_the_most_and_says_so():
    inputs = (torch.randn(2, 4, 32, 32), torch.tensor([10, 10]))
    report = counted(small_unet(), {"flops": 0.3}, *inputs, encoder_hidden_states=torch.randn(2, 7, 32))
    assert "below the" in report.budget and "ratio=0.99" in report.budget
    assert report.flop_ratio > 0.5


def test_the_prediction_is_the_model_by_hand():
    # 10 tokens; segment 0 sees 10, segment 1 sees 10 - r. Linear FLOPs 100 per segment,
    # quadratic 50, fixed 20, and a merge's similarity costs 4 per (N/2)^2.
    model = FlopModel(10, 20.0, [100.0, 100.0], [50.0, 50.0], [4.0])
    assert model.total == 320.0
    # r = 4: segment 1 at 6 tokens: 20 + 100 + 50 + 100*0.6 + 50*0.36 + 4 * 25
    assert model.predict([10, 6], [True]) == pytest.approx(20 + 150 + 60 + 18 + 100)
    solution = solve(FlopModel(10, 0.0, [100.0, 100.0], [0.0, 0.0], [0.0]), 0.75, "constant", protected=0)
    assert solution.r == [5] and solution.predicted == pytest.approx(0.75)


def test_schedules_and_clamping():
    assert schedule_counts(3.5, 4, "constant") == [4, 4, 3, 3]
    assert schedule_counts(9.0, 4, "decreasing") == [9, 7, 5, 3]
    # at most half of the unprotected tokens: 10 -> 5, then 5 -> 2
    assert clamp([8, 8], 11, protected=1, min_tokens=0, keep_salient=0, tail=0) == ([5, 2], [11, 6, 4])


@pytest.mark.parametrize("options, message", [
    ({"flops": 0.0}, "in \\(0, 1\\]"),
    ({"flops": 1.2}, "in \\(0, 1\\]"),
    ({"flops": 0.5, "r": 4}, "both given"),
    ({"flops": 0.5, "schedule": "steps"}, "'schedule' must be one of"),
])
def test_bad_budgets_are_refused(options, message):
    with pytest.raises(TurboConfigError, match=message):
        TurboConfig(**options)
