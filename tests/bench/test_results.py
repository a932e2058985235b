"""Per-sample data in the results JSON, intervals and paired comparisons in the markdown and
plots, old JSON without samples."""
from __future__ import annotations

import gzip
import json
import math

import numpy as np
import pytest

from turbo_fx.bench import evaluation as ev
from turbo_fx.bench import fidelity, intervals, output, plots, results, stats

from test_evaluation import text_task, vision_task


def wilson_by_hand(k, n):
    z = 1.959963984540054
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


@pytest.fixture(scope="module")
def vision_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("vision")
    task = vision_task(n_train=16, n_test=30, batch=8)
    variants = ev.component_variants([2, 4], {}, ("redundancy-only", "semantic-only", "turbo"))
    run = ev.evaluate(task, variants, "small vit", progress=False, log=lambda _: None)
    paths = results.write_results(run, str(out), "t", {"cpu": "x"}, "test machine", "cmd", ["probe_top1", "knn_top1"])
    return task, run, paths


def test_format_interval():
    assert results.format_interval(0.8135, (0.79612, 0.83049)) == "0.8135 [0.796, 0.830]"
    assert results.format_interval(0.8135, None) == "0.8135 [-]"
    assert results.format_interval(0.99985, (0.99981, 0.99989)) == "0.9999 [0.9998, 0.9999]"
    assert output.p_value(0.0004) == "<0.001" and output.p_value(0.5234) == "0.523"


def test_vision_json_samples_reproduce_every_metric(vision_run):
    task, run, paths = vision_run
    payload = output.load_json(paths["json"])
    labels = task.data.test_labels.tolist()
    for row in payload["rows"]:
        s = row["samples"]
        assert s["label"] == labels
        assert all(isinstance(v, int) for v in s["probe"] + s["knn"])
        assert float(np.mean(np.array(s["probe"]) == labels)) == row["metrics"]["probe_top1"]
        assert float(np.mean(np.array(s["knn"]) == labels)) == row["metrics"]["knn_top1"]
        assert float(np.mean(s["cosine"])) == pytest.approx(row["metrics"]["cosine"], abs=1e-6)
    # The predictions are the probe's own on the baseline's features.
    base = payload["rows"][0]["samples"]
    assert base["probe"] == task.probe.predict(task.test_features).tolist()
    # One line per list: 30 images do not make 30 lines.
    assert len(gzip.open(paths["json"], "rt").read().splitlines()) < 60 * len(payload["rows"])


def test_markdown_shows_intervals_and_paired_comparisons(vision_run):
    task, run, paths = vision_run
    text = open(paths["markdown"]).read()
    base = run.rows[0]
    k = round(base["metrics"]["probe_top1"] * 30)
    low, high = wilson_by_hand(k, 30)
    assert f"{base['metrics']['probe_top1']:.4f} [{low:.3f}, {high:.3f}]" in text
    assert "## Paired comparisons on the same samples" in text
    lines = [line for line in text.splitlines() if line.startswith("| turbo r=4 ") and "redundancy-only r=4" in line]
    assert len(lines) == 1
    turbo, red = run.row("turbo r=4"), run.row("redundancy-only r=4")
    c = intervals.compare(turbo, red, "probe_top1")
    right_t = np.array(turbo["samples"]["probe"]) == task.data.test_labels
    right_r = np.array(red["samples"]["probe"]) == task.data.test_labels
    assert (c.a_only, c.b_only) == (int(np.sum(right_t & ~right_r)), int(np.sum(~right_t & right_r)))
    assert c.difference == pytest.approx(turbo["metrics"]["probe_top1"] - red["metrics"]["probe_top1"])
    assert f"({c.a_only}:{c.b_only})" in lines[0]
    pairs = [(a["label"], b["label"]) for a, b in intervals.comparison_pairs(run.rows)]
    assert pairs[:6] == [(r["label"], "baseline (no merging)") for r in run.rows[1:]]
    assert pairs[6:] == [("turbo r=2", "redundancy-only r=2"), ("turbo r=2", "semantic-only r=2"),
                         ("turbo r=4", "redundancy-only r=4"), ("turbo r=4", "semantic-only r=4")]


def test_old_json_without_samples_loads_and_renders(vision_run, tmp_path):
    _, run, paths = vision_run
    payload = output.load_json(paths["json"])
    for row in payload["rows"]:
        del row["samples"]
    old = tmp_path / "old.json"
    old.write_text(json.dumps(payload))
    loaded, machine, command = results.load_results(str(old))
    text = results.markdown(loaded, "m", command)
    base = loaded.rows[0]["metrics"]
    low, high = wilson_by_hand(round(base["probe_top1"] * 30), 30)  # n from the task description
    assert f"{base['probe_top1']:.4f} [{low:.3f}, {high:.3f}]" in text
    assert f"{base['cosine']:.4f} [-]" in text
    assert "None: these rows were written without per-sample data" in text
    written = results.write_results(loaded, str(tmp_path / "again"), "old", machine, "m", command, ["probe_top1"])
    assert open(written["tradeoff_probe_top1"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    no_count = {k: v for k, v in loaded.task.items() if k != "test_samples"}
    assert intervals.metric_interval(loaded.rows[0], "probe_top1", no_count) is None


def test_text_samples_reproduce_metrics_and_give_document_intervals():
    task = text_task(bucket=1)
    run = ev.evaluate(task, ev.component_variants([2], {}, ("redundancy-only", "turbo")), "small bert",
                      progress=False, log=lambda _: None)
    for row in run.rows:
        s = row["samples"]
        assert len(s["lee_cosine"]) == len(s["lee_human"]) == 6  # 4 documents
        assert fidelity.fold_mean_accuracy(s["polarity_prediction"], s["polarity_label"], s["polarity_fold"]) \
            == row["metrics"]["polarity_probe"]
        assert stats.spearman_of_pairs(s["lee_cosine"], s["lee_human"]) == pytest.approx(
            row["metrics"]["lee_spearman"], abs=1e-6)
        assert len(s["cosine"]) == 4 + 10
    base, _, tur = run.rows
    assert base["samples"]["polarity_prediction"] == fidelity.cross_validated_predictions(
        task.reference[4:], task.reference[4:], task.data.polarity_labels, folds=5)[0].tolist()
    lee = intervals.metric_interval(tur, "lee_spearman", run.task)
    assert lee == stats.document_spearman_bootstrap(tur["samples"]["lee_cosine"], tur["samples"]["lee_human"])
    comparison = intervals.compare(tur, base, "lee_spearman")
    assert comparison.test == "document bootstrap" and comparison.n == 4
    assert intervals.compare(base, base, "cosine").difference == 0.0
    text = results.markdown(run, "m", "cmd")
    line = next(x for x in text.splitlines() if x.startswith("| turbo r=2 ") and "| redundancy-only r=2 " in x)
    spearman_cell, p_cell = results.comparison_cell(intervals.compare(tur, run.rows[1], "lee_spearman"))
    assert f"| {spearman_cell} " in line and f"| {p_cell} " in line and "(" not in p_cell


def test_error_bars_are_the_intervals():
    rows = [{"metrics": {"probe_top1": 0.8}, "samples": {"label": [0] * 10, "probe": [0] * 8 + [1] * 2}},
            {"metrics": {"probe_top1": 0.5}}]
    bars = plots.error_bars(rows, "probe_top1", {})
    low, high = wilson_by_hand(8, 10)
    assert bars[:, 0] == pytest.approx([0.8 - low, high - 0.8])
    assert list(bars[:, 1]) == [0.0, 0.0]  # no samples, no count in the task: no bar
    assert plots.error_bars(rows[1:], "probe_top1", {}) is None
    assert plots.error_bars(rows[1:], "probe_top1", {"test_samples": 10})[:, 0] == pytest.approx(
        [0.5 - wilson_by_hand(5, 10)[0], wilson_by_hand(5, 10)[1] - 0.5])


def test_rerender_rewrites_markdown_and_plots_but_not_the_json(vision_run, tmp_path):
    _, run, paths = vision_run
    payload = output.load_json(paths["json"])
    for row in payload["rows"]:
        del row["samples"]
    json_path = tmp_path / "eval_old.json"
    json_path.write_text(json.dumps(payload, indent=1))
    (tmp_path / "eval_old.md").write_text("# Old\n\nMachine: a box, 2 cores; torch 2.\nno tables\n")
    before = json_path.read_bytes()
    written = results.rerender(str(json_path))
    assert json_path.read_bytes() == before
    assert sorted(written) == ["markdown", "tradeoff_knn_top1", "tradeoff_probe_top1"]
    text = open(written["markdown"]).read()
    assert "Machine: a box, 2 cores; torch 2.\n" in text and "no tables" not in text
    base = payload["rows"][0]["metrics"]["knn_top1"]
    low, high = wilson_by_hand(round(base * 30), 30)
    assert f"{base:.4f} [{low:.3f}, {high:.3f}]" in text
