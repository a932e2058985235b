"""turbo_fx.calibrate: the largest FLOP saving whose drift on the user's batches stays in budget."""
from __future__ import annotations

import pytest
import torch

import turbo_fx
from model_builders import RotaryViT, images, row_duplicated_images, small_vit
from turbo_fx.calibrate import Calibration, upper_bound

BUDGETS = (0.9, 0.7, 0.5)


def batches(n: int = 3):
    return [images(2, seed=10 + i) for i in range(n)]


def test_the_largest_saving_within_the_drift_is_chosen_and_reproduces():
    model = small_vit("vit", patch_size=4)
    result = turbo_fx.calibrate(model, batches(), max_drift=0.1, budgets=BUDGETS, progress=False)
    assert [c.options["flops"] for c in result.candidates] == list(BUDGETS)
    within = [c for c in result.candidates if c.within]
    assert within, str(result)
    assert result.chosen.flop_ratio == min(c.flop_ratio for c in within)
    assert all(c.drift_upper <= 0.1 for c in within)
    assert all((c.drift_upper > 0.1) == (not c.within) for c in result.candidates)
    # The chosen options, compiled as a user would, give the drift that was measured.
    torch._dynamo.reset()
    fast = torch.compile(model, backend="turbo", options={**result.options, "inner_backend": "eager"})
    with torch.no_grad():
        drifts = [float((1 - torch.nn.functional.cosine_similarity(fast(b), model(b), dim=1)).mean()) for b in batches()]
    assert sum(drifts) / len(drifts) == pytest.approx(result.chosen.drift, abs=1e-6)


def test_a_drift_nothing_meets_turns_merging_off():
    result = turbo_fx.calibrate(small_vit("vit", patch_size=4), batches(2), max_drift=1e-12, budgets=(0.6,),
                                progress=False)
    assert result.options == {"r": 0} and "merging off" in result.note


def test_exact_duplicates_drift_nothing_at_any_budget():
    # Rows of identical patches under a rotation by row: merges are exact, so every budget
    # keeps the drift at zero and the smallest FLOP ratio wins.
    model = RotaryViT(axes="y").eval()
    result = turbo_fx.calibrate(model, [row_duplicated_images(seed=s) for s in (1, 2)], max_drift=1e-6,
                                budgets=(0.9, 0.8), progress=False)
    assert all(c.drift < 1e-6 and c.within for c in result.candidates), str(result)
    assert result.options == {"flops": 0.8}


def test_alphas_user_metrics_and_json(tmp_path):
    def worst_logit(merged, reference):
        return (merged - reference).abs().max()

    model = small_vit("vit", patch_size=4)
    result = turbo_fx.calibrate(model, batches(2), max_drift=1.0, metric=worst_logit, budgets=(0.7,),
                                alphas=(0.0, 0.5), progress=False)
    assert [c.options for c in result.candidates] == [{"flops": 0.7, "alpha": 0.0}, {"flops": 0.7, "alpha": 0.5}]
    assert result.metric == "worst_logit"
    path = tmp_path / "turbo.json"
    result.save(path)
    again = Calibration.load(path)
    assert again.options == result.options and again.candidates[1].per_batch == result.candidates[1].per_batch


def test_upper_bound_by_hand():
    assert upper_bound([0.1]) == 0.1
    # mean 0.2, sd 0.1, n 3: 0.2 + 2.920 * 0.1 / sqrt(3)
    assert upper_bound([0.1, 0.2, 0.3]) == pytest.approx(0.2 + 2.920 * 0.1 / 3 ** 0.5)


@pytest.mark.parametrize("kwargs, message", [
    (dict(batches=[]), "no batches"),
    (dict(max_drift=0.0), "max_drift"),
    (dict(max_drift=1.5), "max_drift"),
    (dict(metric="l1"), "metric must be one of"),
    (dict(budgets=(1.5,)), "budget 1.5"),
    (dict(r=4), "not r or flops"),
    (dict(metric=lambda a, b: 1 / 0), "metric failed on batch 0"),
    (dict(metric=lambda a, b: float("nan")), "metric failed on batch 0"),
])
def test_bad_input_is_refused(kwargs, message):
    arguments = dict(batches=batches(1), max_drift=0.1, budgets=(0.8,), progress=False)
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=message):
        turbo_fx.calibrate(small_vit("vit", patch_size=4), **arguments)
