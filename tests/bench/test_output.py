"""The shared helpers of every study: the closeness metric, the JSON writer (lists of plain
values on one line, gzip), and the formatted cells."""
from __future__ import annotations

import json

import pytest
import torch

from turbo_fx.bench import output, timing


def test_closeness_of_identical_outputs_is_exact():
    y = torch.randn(2, 4, 16, 16)
    c = timing.closeness(y, y.clone())
    assert c["rel_l2"] == 0.0 and c["cosine"] == 1.0


def test_closeness_matches_a_hand_computation():
    ref = torch.tensor([3.0, 0.0])
    y = torch.tensor([3.0, 4.0])  # |y - ref| = 4, |ref| = 3, <y, ref> = 9, |y| = 5
    c = timing.closeness(y, ref)
    assert c["rel_l2"] == pytest.approx(4 / 3, abs=1e-12)
    assert c["cosine"] == pytest.approx(9 / 15, abs=1e-12)
    assert timing.closeness(-ref, ref)["cosine"] == -1.0


def test_closeness_of_a_small_perturbation():
    gen = torch.Generator().manual_seed(0)
    ref = torch.randn(1000, generator=gen, dtype=torch.float64)
    noise = torch.randn(1000, generator=gen, dtype=torch.float64)
    y = ref + 0.01 * noise
    c = timing.closeness(y, ref)
    assert c["rel_l2"] == pytest.approx((0.01 * noise).norm().item() / ref.norm().item(), rel=1e-12)
    assert c["cosine"] == pytest.approx(torch.dot(y, ref).item() / (y.norm() * ref.norm()).item(), rel=1e-12)


def test_json_round_trips_with_plain_lists_on_one_line(tmp_path):
    payload = {"rows": [{"label": "a", "samples": {"x": [1, 2], "y": [0.5]}}, {"label": "b"}], "k": "@samples-0@",
               "empty": {}, "none": [], "nested": [[1, 2], {"t": (3, 4)}]}
    text = output.dumps(payload)
    assert json.loads(text) == {**payload, "nested": [[1, 2], {"t": [3, 4]}]}
    assert '"x": [1,2]' in text and '"t": [3,4]' in text
    for name in ("plain.json", "packed.json.gz"):
        path = output.save_json(payload, str(tmp_path / name))
        assert output.load_json(path) == json.loads(text)
    assert (tmp_path / "packed.json.gz").read_bytes()[:2] == b"\x1f\x8b"
    # No time stamp in the gzip header: the same payload gives the same bytes.
    again = output.save_json(payload, str(tmp_path / "again.json.gz"))
    assert open(again, "rb").read() == (tmp_path / "packed.json.gz").read_bytes()


def test_cells():
    assert output.speedup({"speedup": 1.5, "low": 1.25, "high": 1.75}) == "1.50x [1.25, 1.75]"
    assert output.speedup(None) == "-"
    assert output.f(None, ".1f") == "-" and output.f(2.25, ".1f") == "2.2"
    assert output.tokens([197, 185, 54]) == "197→54" and output.tokens([17]) == "17" and output.tokens(None) == "-"
    assert output.difference({"difference": 0.5, "low": -0.25, "high": 1.0}, 2) == "+0.50 [-0.25, +1.00]"
    assert output.file_stem("timm:vit/base") == "timm_vit_base"
