"""The SD-UNet time-share and Amdahl-bound tool (bench/diffusion_time_shares.py) on the tiny UNet."""
from __future__ import annotations

import re

import pytest

pytest.importorskip("diffusers")

from turbo_fx.bench.diffusion_time_shares import amdahl, main  # noqa: E402


def test_amdahl_bound_by_hand():
    # Half of a 10 s run made 2x faster: 10 / (5 + 2.5); a part removed entirely is the limit.
    assert amdahl(10.0, [(5.0, 2.0)]) == pytest.approx(10.0 / 7.5)
    assert amdahl(10.0, [(2.0, 4.0), (3.0, 1.0)]) == pytest.approx(10.0 / 8.5)
    assert amdahl(10.0, []) == 1.0


def test_small_run_reports_shares_and_bounds(tmp_path, one_torch_thread):
    out = tmp_path / "shares.md"
    text = main(["--small", "--repeats", "1", "--micro-repeats", "1", "--ratios", "0.5", "--out", str(out)])
    assert out.read_text() == text
    shares = [float(m) for m in re.findall(r"\| ([0-9.]+)% \|", text)]
    assert shares and all(0.0 <= s <= 100.0 for s in shares)
    bounds = re.findall(r"\| 0\.5 \| ([0-9.]+)x \| ([0-9.]+)x \|", text)
    assert len(bounds) == 3
    for measured, removed in bounds:
        assert float(measured) <= float(removed) + 1e-3  # a faster part never beats removing it
