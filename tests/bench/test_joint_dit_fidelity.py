"""The joint-dit-fidelity study's pieces on hand-made inputs: its rows, FLOP shares, what it reads
from graph reports, paired rule comparisons, the tables, and its command line checks."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("scipy")
pytest.importorskip("diffusers")

from turbo_fx.bench import cli  # noqa: E402
from turbo_fx.bench import joint_dit_fidelity as jf  # noqa: E402


def test_rows_put_the_rules_side_by_side_at_each_ratio_after_the_unmerged_row():
    specs = jf.row_specs([0.25, 0.5], ["rows", "position"], extra={"alpha": 0.1, "ratio": 0.9, "rotary": "x"})
    assert [s.label for s in specs] == ["unmerged", "rows 0.25", "position 0.25", "rows 0.5", "position 0.5"]
    assert specs[0].rule is None and specs[0].options == {}
    assert specs[4].options == {"alpha": 0.1, "ratio": 0.5, "rotary": "position"}


def test_flop_ratio_is_a_share_of_the_unmerged_count_or_none():
    assert jf.flop_ratio(50.0, 200.0) == 0.25
    assert jf.flop_ratio(None, 200.0) is None and jf.flop_ratio(50.0, 0.0) is None


def test_graph_summary_sums_flops_and_reads_rules_merges_and_fallbacks():
    component = SimpleNamespace
    graphs = [
        SimpleNamespace(flops_before=100, flops_after=60, fallback_reason=None, run_time_failures=0,
                        token_tables=["cos (256 rows from token 0): position", "sin (256 rows from token 0): position"],
                        components=[component(kind="self-attention", tokens_in=256, tokens_merged=128, decision="merges"),
                                    component(kind="feed-forward", tokens_in=256, tokens_merged=0, decision="untouched")]),
        SimpleNamespace(flops_before=10, flops_after=None, fallback_reason="no grid", run_time_failures=1,
                        token_tables=None, components=[]),
    ]
    s = jf.graph_summary(graphs)
    assert s["flops_before"] == 110 and s["flops_after"] == 60
    assert s["rule_ran"] == ["position"] and s["token_tables"] == 2
    assert s["merges"] == [["self-attention", 256, 128]]
    assert s["fallbacks"] == ["no grid"] and s["run_time_failures"] == 1


def test_paired_fd_of_shifted_replicates_is_the_shift_with_no_spread():
    b = np.array([3.0, 4.0, 5.0, 6.0])
    out = jf.paired_fd(6.0, 4.0, b + 2.0, b)
    assert out["difference"] == 2.0 and out["low"] == pytest.approx(2.0) and out["high"] == pytest.approx(2.0)
    assert out["p"] == 0.0
    # re-centred on the estimate: replicate differences of mean 3 around an estimate of 2
    out = jf.paired_fd(6.0, 4.0, b + np.array([2.0, 3.0, 3.0, 4.0]), b)
    # numpy's linear percentiles of [1, 2, 2, 3]: 1 + 0.025 * 3 and 3 - 0.025 * 3
    assert out["low"] == pytest.approx(1.075) and out["high"] == pytest.approx(2.925)


def row(label, rule, ratio, psnr, ssim, correct, fd=10.0):
    return {"label": label, "rule": rule, "ratio": ratio, "psnr_per_image": psnr, "ssim_per_image": ssim,
            "correct": correct, "fd": fd, "fd_replicates": [fd] * 5}


def test_rules_are_compared_at_each_ratio_later_rule_minus_first():
    rows = [
        {"label": "unmerged", "rule": None, "ratio": 0.0},
        row("rows 0.5", "rows", 0.5, [20.0, 22.0, 24.0, 26.0], [0.5] * 4, [True, True, False, False], fd=12.0),
        row("position 0.5", "position", 0.5, [21.0, 23.0, 25.0, 27.0], [0.6] * 4, [True, True, True, False], fd=11.0),
        row("rows 0.75", "rows", 0.75, [18.0] * 4, [0.4] * 4, [False] * 4),
    ]
    comparisons = jf.compare_rules(rows)
    assert len(comparisons) == 1  # one rule alone at 0.75: nothing to compare
    c = comparisons[0]
    assert (c["ratio"], c["a"], c["b"]) == (0.5, "position 0.5", "rows 0.5")
    # every image 1 dB higher: the paired difference has no spread
    assert c["psnr"]["difference"] == pytest.approx(1.0)
    assert c["psnr"]["low"] == pytest.approx(1.0) and c["psnr"]["high"] == pytest.approx(1.0)
    assert c["ssim"]["difference"] == pytest.approx(0.1)
    assert c["fd"]["difference"] == -1.0
    assert c["accuracy"]["difference"] == 0.25 and (c["accuracy"]["a_only"], c["accuracy"]["b_only"]) == (1, 0)


def test_first_of_each_class_picks_one_index_per_present_class():
    assert jf.first_of_each_class([2, 0, 2, 1, 0]) == [1, 3, 0]
    assert jf.first_of_each_class([5, 5]) == [0]


def test_the_pixel_reference_featurises_images_by_pooling():
    ref = jf.pixel_reference(pool=4)
    images = np.zeros((3, 1, 16, 16))
    images[:, :, :4, :4] = 1.0
    feats = ref.featurize(images)
    assert feats.shape == (3, 16)
    assert feats[0, 0] == pytest.approx(1.0) and feats[0, 1] == pytest.approx(0.0)
    assert ref.fd_dims is None


def payload():
    base = {"label": "unmerged", "rule": None, "ratio": 0.0, "fd": 40.0, "fd_ci": [35.0, 45.0], "accuracy": 0.6,
            "accuracy_ci": [0.5, 0.7], "flop_ratio": 1.0, "sample_seconds": 10}
    merged = {"label": "position 0.5", "rule": "position", "ratio": 0.5, "fd": 42.0, "fd_ci": [37.0, 47.0],
              "accuracy": 0.55, "accuracy_ci": [0.45, 0.65], "psnr": 30.0, "psnr_ci": [29.0, 31.0], "ssim": 0.9,
              "ssim_ci": [0.88, 0.92], "flops_after": 0.5e9, "flop_ratio": 0.5, "rule_ran": ["position"],
              "fallbacks": []}
    comparison = {"ratio": 0.5, "a": "position 0.5", "b": "rows 0.5",
                  "psnr": {"difference": 1.0, "low": 0.5, "high": 1.5, "p": 0.0004},
                  "ssim": {"difference": 0.01, "low": -0.01, "high": 0.03, "p": 0.3},
                  "fd": {"difference": -1.0, "low": -2.0, "high": 0.5, "p": 0.2},
                  "accuracy": {"difference": 0.0, "low": -0.05, "high": 0.05, "p": 1.0, "a_only": 2, "b_only": 2}}
    return {"settings": {"samples": 4, "steps": 2, "guidance": 2.5, "ratios": [0.5], "rules": ["position"],
                         "seed": 0, "batch": 2, "tokens": 256,
                         "model_config": {"image_size": 32, "patch_size": 2, "depth": 4, "dim": 96, "heads": 3}},
            "machine": {"cpu": "AMD EPYC", "usable_cpus": 2, "torch_threads": 1, "torch": "2.13.0",
                        "date_utc": "-"},
            "command": "turbo-fx joint-dit-fidelity", "training": None, "reference": "ref",
            "unmerged_check": {"bit_identical": True, "max_abs_difference": 0.0, "flops": 1e9},
            "rows": [base, merged], "comparisons": [comparison]}


def test_the_tables_show_each_row_and_bold_only_differences_that_exclude_zero():
    text = jf.markdown(payload())
    assert "| unmerged " in text and "1.000 (1.000)" in text and "0.500 (0.500)" in text
    assert "30.00 [29.00, 31.00]" in text and "55.0 [45.0, 65.0]" in text
    assert "**+1.00 [+0.50, +1.50], p=<0.001**" in text
    assert "+0.0100 [-0.0100, +0.0300], p=0.300" in text and "(2:2)" in text
    assert "bit-identical True" in text


def parse(*argv):
    return cli.build_parser().parse_args(["joint-dit-fidelity", *argv])


def test_the_command_line_has_the_study_with_its_defaults_and_checks():
    args = parse()
    assert args.ratios == [0.1, 0.25, 0.5, 0.75] and args.rules == ["rows", "position"] and args.threads == 1
    assert args.samples % args.batch == 0
    with pytest.raises(cli.UsageError, match="multiple"):
        jf.check(parse("--samples", "30", "--batch", "20"))
    with pytest.raises(cli.UsageError, match="twice"):
        jf.check(parse("--rules", "rows", "rows"))
    with pytest.raises(cli.UsageError, match="rotary"):
        jf.check(parse("--rules", "rows", "nearest"))


def test_relative_errors_are_per_image_l2_ratios_averaged_over_calls():
    import torch

    ref = [torch.ones(2, 1, 2, 2), torch.ones(2, 1, 2, 2)]  # |ref| = 2 per image
    out = [ref[0] + torch.tensor([0.0, 1.0]).view(2, 1, 1, 1),  # image 1 off by 1 everywhere: |diff| = 2
           ref[1].clone()]
    errors = jf.relative_errors(out, ref)
    assert errors.tolist() == pytest.approx([0.0, 0.5])  # (1 + 0) / 2 for image 1


def test_the_control_has_the_same_weights_and_no_rotation():
    import torch

    model, _ = jf.small_model()
    control = jf.without_rotation(model)
    cos, sin = control.rotation(4, 4)
    assert torch.equal(cos, torch.ones_like(cos)) and torch.equal(sin, torch.zeros_like(sin))
    assert torch.equal(control.blocks[0].image.qkv.weight, model.blocks[0].image.qkv.weight)
    assert bool(model.frequencies.ne(0).any())  # the model itself keeps its rotation


def test_the_control_table_puts_each_rule_beside_the_rotation_free_error():
    p = payload()
    p["rows"][1]["call_error"] = {"mean": 0.2, "ci": [0.15, 0.25], "per_image": []}
    p["control"] = [{"ratio": 0.5, "mean": 0.02, "ci": [0.01, 0.03]}]
    assert jf.control_rows(p) == [["0.5", "0.200 [0.150, 0.250]", "0.020 [0.010, 0.030]"]]
    assert "no rotation (control)" in jf.markdown(p)
