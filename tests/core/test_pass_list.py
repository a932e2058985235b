"""The rewrite is one ordered list of named passes: each pass's time and change count reach the
report and the counters, and a pass can be switched off by name (``disabled_passes``)."""
from __future__ import annotations

import logging

import pytest
import torch

import turbo_fx
from model_builders import images, small_vit
from turbo_fx.config import PASS_NAMES, TurboConfigError
from turbo_fx.reference import reference_forward_tokens
from turbo_fx.rewrite import PASSES

R, DEPTH, TOKENS = 3, 4, 17  # small_vit: 16 patches of 8x8 on 32x32 images, plus CLS


class Features(torch.nn.Module):
    """The ViT's token outputs [B, N, C] (the pooled head would hide the token count)."""

    def __init__(self, vit: torch.nn.Module) -> None:
        super().__init__()
        self.vit = vit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit.forward_features(x)


def test_the_pass_list_and_the_option_name_the_same_passes_in_order():
    assert tuple(p.name for p in PASSES) == PASS_NAMES


def test_each_pass_reports_its_time_and_changes_and_bumps_its_counter():
    model = small_vit()
    report = turbo_fx.explain(model, images(2), r=R).graphs[0]
    assert [p.name for p in report.passes] == ["explicit_as_sdpa", "insert_merges", "propagate_shapes",
                                               "weight_token_means", "restore_outputs"]
    ran = {p.name: p for p in report.passes if p.status == "ran"}
    assert set(ran) == {p.name for p in report.passes}
    # timm's ViT calls SDPA: nothing to convert; one merge call and its 4 outputs per block.
    assert ran["explicit_as_sdpa"].changes == 0
    assert ran["insert_merges"].changes >= 5 * DEPTH
    assert ran["propagate_shapes"].changes > 0
    assert all(p.seconds > 0 for p in ran.values())
    assert turbo_fx.counters["pass.insert_merges"] == ran["insert_merges"].changes
    assert "insert_merges" in report.passes_table()


def test_switching_off_a_pass_the_graph_needs_falls_back_naming_it(caplog):
    model = small_vit()
    x = images(2)
    with caplog.at_level(logging.WARNING, logger="turbo_fx"):
        report = turbo_fx.explain(model, x, r=R, disabled_passes=["propagate_shapes"])
    (graph,) = report.graphs
    assert "propagate_shapes" in graph.fallback_reason and "disabled_passes" in graph.fallback_reason
    assert graph.merges == DEPTH and not graph.rewritten  # planned, then compiled unchanged
    assert any("propagate_shapes" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    compiled = torch.compile(model, backend="turbo", options={"r": R, "disabled_passes": ("propagate_shapes",)})
    with torch.no_grad():
        assert (compiled(x) - model(x)).abs().max().item() < 1e-5  # Inductor rounding, not merging


def test_switching_off_an_optional_pass_skips_only_that_pass():
    """Without ``restore_outputs`` the merged token axis reaches the output: exactly
    DEPTH * R tokens fewer; with it, the reference's restored output."""
    model = Features(small_vit())
    x = images(2)
    report = turbo_fx.explain(model, x, r=R, disabled_passes="restore_outputs").graphs[0]
    assert report.fallback_reason is None and report.outputs_restored == 0
    assert [(p.name, p.status) for p in report.passes][-1] == ("restore_outputs", "off (disabled_passes)")
    short = torch.compile(model, backend="turbo", options={"r": R, "disabled_passes": ["restore_outputs"]})
    with torch.no_grad():
        out_short = short(x)
        torch._dynamo.reset()
        out_full = torch.compile(model, backend="turbo", options={"r": R})(x)
        merged, _, assign = reference_forward_tokens(model.vit, x, turbo_fx.TurboConfig(r=R))
    assert out_short.shape == (2, TOKENS - DEPTH * R, 48)
    assert (out_short - merged).abs().max().item() < 1e-4
    restored = torch.gather(merged, 1, assign[..., None].expand(-1, -1, merged.shape[-1]))
    assert out_full.shape == (2, TOKENS, 48)
    assert (out_full - restored).abs().max().item() < 1e-4


def test_an_option_that_turns_a_pass_off_is_reported_as_such():
    report = turbo_fx.explain(small_vit(), images(2), r=R, explicit_as_sdpa=False).graphs[0]
    assert report.passes[0].name == "explicit_as_sdpa"
    assert report.passes[0].status == "off (an option turns it off)" and report.fallback_reason is None


def test_unknown_pass_names_are_refused_at_the_edge():
    with pytest.raises(TurboConfigError, match="disabled_passes"):
        turbo_fx.TurboConfig(disabled_passes=["propagate_shape"])
