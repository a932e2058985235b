"""The llava-fidelity study's pure parts: token counts, intervals, paired comparisons, batching and
the markdown, plus one tiny run through the command line (untrained model, random features)."""
from __future__ import annotations

import numpy as np
import pytest

from turbo_fx.bench import cli, llava_fidelity as lf, output, stats


def test_kept_token_counts_match_turbos_compaction():
    assert [lf.kept_tokens(r) for r in (0.0, 0.5, 0.75, 0.89)] == [256, 128, 64, 29]
    assert lf.kept_tokens(0.75, 16) == 4


def test_a_cell_is_the_proportion_with_its_wilson_interval():
    c = lf.cell([True] * 8 + [False] * 2)
    assert (c["value"], c["k"], c["n"]) == (0.8, 8, 10)
    assert (c["low"], c["high"]) == pytest.approx(stats.wilson_interval(8, 10))
    assert lf.cell([True, True])["high"] == 1.0


def test_paired_difference_counts_the_discordant_images():
    d = lf.paired([True, True, True, False], [True, False, False, False])
    assert d["difference"] == pytest.approx(0.5)
    assert (d["a_only"], d["b_only"]) == (2, 0)
    assert d["low"] < 0.5 < d["high"] and d["p"] == pytest.approx(0.5)


def test_metrics_score_exact_match_against_the_truth_and_agreement_against_the_reference():
    m = lf.row_metrics(["coat", "bag", "shirt"], ["coat", "bag", "coat"], ["coat", "dress", "shirt"])
    assert m["exact"]["k"] == 2 and m["agrees"]["k"] == 2


def test_batches_have_one_shape_the_last_padded_by_repetition():
    got = lf.batches(7, 3)
    assert [b.tolist() for b in got] == [[0, 1, 2], [3, 4, 5], [6, 6, 6]]


def fake_payload() -> dict:
    truth = ["coat", "bag", "shirt", "dress"]

    def row(method, ratio, answers, tokens, **extra):
        label = "unmerged (eager)" if method == "unmerged" else lf.label_of(method, ratio, tokens)
        r = {"method": method, "ratio": ratio, "keep": round(1 - ratio, 4), "label": label, "tokens": tokens,
             "answers": answers, "seconds": 1.0, **extra}
        r["metrics"] = lf.row_metrics(answers, truth, truth)
        return r

    graphs = [{"mode": "compact", "blocks": [["placeholders", "llama.layers.0.self_attn", 256, 128]],
               "fallback_reason": None, "run_time_failures": 0, "mode_note": ""}]
    rows = [row("unmerged", 0.0, truth, 256),
            row("turbo-compact", 0.0, truth, 256, graphs=graphs, compacted=True),
            row("turbo-compact", 0.5, ["coat", "bag", "coat", "dress"], 128, graphs=graphs, compacted=True),
            row("visionzip", 0.5, ["coat", "coat", "coat", "dress"], 128),
            row("pool", 0.5, truth, 128)]
    return {"settings": {"test_images": 4, "seed": 0, "batch_size": 2, "visual_tokens": 256, "feature_seconds": 0},
            "machine": {"cpu": "test cpu", "usable_cpus": 2, "torch_threads": 1, "torch": "2", "date_utc": "-"},
            "training": None, "rows": rows, "command": "turbo-fx llava-fidelity",
            "comparisons": lf.comparisons(rows, truth)}


def test_comparisons_pair_each_reduced_row_with_the_unmerged_one_and_turbo_with_each_baseline():
    kinds = [(c["kind"], c["a"].split()[0]) for c in fake_payload()["comparisons"]]
    assert kinds == [("vs unmerged", "turbo-compact"), ("vs unmerged", "visionzip"), ("vs unmerged", "pool"),
                     ("turbo-compact vs visionzip", "turbo-compact"), ("turbo-compact vs pool", "turbo-compact")]
    assert lf.METHODS == ("turbo-compact", "turbo-redundancy", "visionzip", "pool")


def test_markdown_puts_methods_down_and_keep_ratios_across():
    text = lf.markdown(fake_payload())
    head, body = lf.grid_table(fake_payload()["rows"], "exact")
    assert head == ["method", "keep 1", "keep 0.5"]
    assert body[0][0] == "unmerged (eager)" and body[0][1].startswith("1.000 [")
    assert body[1][0] == "turbo-compact" and body[1][2].startswith("0.750 [") and body[1][2].endswith("(128)")
    assert body[2][1] == "= unmerged"  # visionzip has no keep-1 row of its own
    assert "## exact match" in text and "## agrees with unmerged" in text
    assert ("turbo-compact keep 0.50 (128 tokens): compacted; 1 graphs (one per input length): 1 x mode compact, "
            "placeholders at llama.layers.0.self_attn 256 -> 128") in text


def test_a_tiny_run_through_the_command_line(tmp_path, capsys):
    code = cli.main(["llava-fidelity", "--small", "--test", "4", "--batch", "2", "--ratios", "0.75",
                     "--out", str(tmp_path)])
    assert code == 0
    payload = output.load_json(str(tmp_path / "llava_fidelity_small.json.gz"))
    labels = [r["label"] for r in payload["rows"]]
    assert labels == ["unmerged (eager)", "turbo-compact keep 1.00 (256 tokens)", "turbo-compact keep 0.25 (64 tokens)",
                      "turbo-redundancy keep 0.25 (64 tokens)", "visionzip keep 0.25 (64 tokens)",
                      "pool keep 0.25 (64 tokens)"]
    assert all(r["compacted"] for r in payload["rows"] if r["method"].startswith("turbo"))
    # ratio 0 through the compiled path answers as the eager model does
    assert payload["rows"][1]["answers"] == payload["rows"][0]["answers"]
    assert np.isclose(payload["rows"][1]["metrics"]["agrees"]["value"], 1.0)
    assert (tmp_path / "llava_fidelity_small.md").read_text() == lf.render(str(tmp_path / "llava_fidelity_small.json.gz"))
