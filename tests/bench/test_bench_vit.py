"""bench_vit's derived figures from a saved run: the speed-up intervals, recomputed here from the
raw round timings, and the rendered tables (nothing is measured)."""
from __future__ import annotations

import json
import os
import shutil
import statistics

import numpy as np

from turbo_fx.bench import bench_vit, stats

RUN = os.path.join(os.path.dirname(bench_vit.__file__), "results", "runs", "bench_vit_2026-12-03T1201.json")


def test_render_adds_round_bootstrap_intervals_to_a_saved_run(tmp_path):
    path = str(tmp_path / "run.json")
    shutil.copy(RUN, path)
    with open(RUN) as f:
        raw = json.load(f)
    text = bench_vit.render(path)
    with open(path) as f:
        rendered = json.load(f)
    assert (tmp_path / "run.md").read_text() == text + "\n"
    for before, after in zip(raw["results"], rendered["results"]):
        cfg = after["configs"]
        base = before["configs"]["inductor"]["latency_s"]
        turbo = before["configs"]["turbo r=13"]["latency_s"]
        # The point estimate is the ratio of medians; its interval resamples rounds, so it holds it.
        assert cfg["turbo r=13"]["speedup"] == statistics.median(base) / statistics.median(turbo)
        low, high = cfg["turbo r=13"]["speedup_interval"]
        assert low <= cfg["turbo r=13"]["speedup"] <= high
        # Independent recomputation: the same bootstrap by hand.
        a, b = np.array(base), np.array(turbo)
        idx = np.random.default_rng(0).integers(0, a.size, size=(stats.RESAMPLES, a.size))
        replicates = np.median(a[idx], axis=1) / np.median(b[idx], axis=1)
        assert (low, high) == stats.percentile_interval(replicates)
        ratio = cfg["turbo r=13"]["flop_ratio"]
        assert cfg["turbo r=13"]["flop_efficiency_interval"] == [low * ratio, high * ratio]
        assert cfg["inductor"]["speedup_interval"] == [1.0, 1.0]
        efficiency = next(t for t in after["targets"] if t["target"] == "FLOP efficiency at r=13")
        assert efficiency["interval"] == [low * ratio, high * ratio]
        assert f"[{low:.3f}, {high:.3f}]" in text
    assert text.count("| 95% interval ") == 2 * len(raw["results"])  # the config table and the targets
