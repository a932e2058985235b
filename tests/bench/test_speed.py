"""``turbo-fx bench``'s derived figures from a saved run (the speed-up intervals, recomputed here
from the raw round timings, and the rendered tables; nothing is measured) and its speed plot."""
from __future__ import annotations

import os
import shutil
import statistics

import numpy as np
import pytest

from turbo_fx.bench import cli, output, speed, stats

RUN = os.path.join(os.path.dirname(speed.__file__), "results", "bench_vit.json")


def test_render_adds_round_bootstrap_intervals_to_a_saved_run(tmp_path):
    path = str(tmp_path / "run.json")
    shutil.copy(RUN, path)
    raw = output.load_json(RUN)
    assert cli.main(["bench", "--render", path]) == 0
    text = (tmp_path / "run.md").read_text()
    assert text == speed.render(path)
    rendered = output.load_json(path)
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


def test_speed_plot_draws_the_flop_ideal_line():
    def config(ms, gflops):
        return {"latency": {"median": ms / 1e3}, "flops": gflops * 1e9}

    configs = {"eager": config(120, 100), "inductor": config(100, 100), "turbo r=0": config(101, 100),
               "turbo r=8": config(80, 60), "turbo r=16": config(70, 40)}
    ideal = speed.flop_ideal_ms(configs)
    assert ideal == pytest.approx({"turbo r=0": 100.0, "turbo r=8": 60.0, "turbo r=16": 40.0})
    fig = speed.speed_figure(configs, "t")
    (line,) = [l for l in fig.axes[0].get_lines() if l.get_label().startswith("FLOP-ideal")]
    assert list(line.get_xdata()) == [40.0, 60.0, 100.0]
    assert list(line.get_ydata()) == pytest.approx([40.0, 60.0, 100.0])


def test_a_timm_model_loads_at_another_image_size():
    from turbo_fx.bench import timing

    zoo, (images,) = timing.load_model("timm:test_vit", 2, img_size=96)
    assert zoo.image_size == 96 and images.shape == (2, 3, 96, 96)
