"""bench/attention_bias_cost: its float64 reference against attention over repeated keys, and
a tiny end-to-end run whose exact forms all give the reference."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from turbo_fx.bench import attention_bias_cost as abc


def test_the_reference_is_attention_over_each_key_repeated_size_times():
    """A key of size s stands for s identical tokens: plain attention over the expanded keys
    must give the same output (padding, size 0, is simply absent)."""
    inputs = abc.attention_inputs(batch=2, heads=2, tokens=5, head_dim=4, dtype=torch.float64, device="cpu")
    expected = abc.reference(**inputs)
    for b in range(2):
        counts = inputs["size"][b].long()
        k = inputs["k"][b].repeat_interleave(counts, dim=1)
        v = inputs["v"][b].repeat_interleave(counts, dim=1)
        plain = F.scaled_dot_product_attention(inputs["q"][b], k, v)
        assert (plain - expected[b]).abs().max().item() < 1e-12
    assert (inputs["size"][::2, -1] == 0).all() and (inputs["size"][1::2] >= 1).all()


def test_a_tiny_run_times_every_form_and_the_exact_ones_match(tmp_path):
    assert abc.main(["--batch", "2", "--heads", "2", "--tokens", "9", "--head-dim", "8", "--rounds", "3",
                     "--out", str(tmp_path), "--name", "tiny"]) == 0
    payload = json.loads((tmp_path / "tiny.json").read_text())
    rows = {row["form"]: row for row in payload["rows"]}
    assert list(rows) == ["no bias", "mask, model dtype", "boolean mask", "flex score_mod"]  # fp32: no float32 copy
    for form in ("mask, model dtype", "flex score_mod"):
        assert "error" not in rows[form], rows[form]
        assert rows[form]["max_abs_diff_to_reference"] < 1e-5
        assert len(rows[form]["latency_s"]) == 3
    # The inexact forms really differ: the bias changes the output, so leaving it out shows.
    assert rows["no bias"]["max_abs_diff_to_reference"] > 1e-3
    assert rows["boolean mask"]["max_abs_diff_to_reference"] > 1e-3
    assert rows["mask, model dtype"]["vs_mask"] == {"speedup": 1.0, "low": 1.0, "high": 1.0}
    text = (tmp_path / "tiny.md").read_text()
    assert "| flex score_mod |" in text and "[2, 2, 9, 8]" in text


@pytest.mark.parametrize("argv", [["--tokens", "0"], ["--dtype", "fp64"], ["--device", "cuda"]])
def test_bad_arguments_exit_with_code_2(argv):
    if argv == ["--device", "cuda"] and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(SystemExit) as exc:
        abc.main(argv)
    assert exc.value.code == 2
