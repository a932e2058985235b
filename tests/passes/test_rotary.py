"""Rotary position tables follow merged tokens (``passes/token_tables.py``)."""
from __future__ import annotations

import pytest
import torch

from model_builders import RotaryViT, images, row_duplicated_images


@pytest.mark.parametrize("rule", ["position", "rows"])
def test_duplicates_of_one_rotation_give_the_unmerged_output(turbo, rule):
    # Patches repeat along rows and the rotation depends on the row only: the tokens that merge
    # are exact duplicates with the same cos/sin rows, so with the size bias the output is the
    # unmerged model's. A table row taken from the wrong token (an offset past the class token,
    # another sample's map) would rotate a merged token by another row's angle.
    model = RotaryViT(axes="y").eval()
    x = row_duplicated_images()
    compiled = turbo(model, r=4, rotary=rule)
    out = compiled(x)
    with torch.no_grad():
        plain = model(x)
    report = compiled.report
    assert report.fallback_reason is None
    assert report.tokens_per_block == [17, 13, 9]
    assert report.token_tables and all(t.endswith(f": {rule}") for t in report.token_tables), report.token_tables
    assert torch.allclose(out, plain, atol=1e-5), (out - plain).abs().max()


def test_the_oracle_sees_rotations_that_differ(turbo):
    # The same duplicated patches, rotated by column too: merged duplicates now stand for
    # different rotations, and no rule can give the unmerged output.
    model = RotaryViT(axes="yx").eval()
    x = row_duplicated_images()
    out = turbo(model, r=4)(x)
    with torch.no_grad():
        plain = model(x)
    assert (out - plain).abs().max() > 1e-3


def test_position_rule_recomputes_rotations_and_rows_rule_averages_them(turbo):
    model = RotaryViT(axes="yx").eval()
    x = images(2, size=16)
    outs = {}
    for rule in ("position", "rows"):
        compiled = turbo(model, r=4, rotary=rule)
        outs[rule] = compiled(x)
        # one cos and one sin table per merged stage (two stages feed attention after a merge)
        assert len(compiled.report.token_tables) == 4
    assert not torch.allclose(outs["position"], outs["rows"], atol=1e-6)


def test_no_merge_leaves_rotary_models_bit_identical(turbo):
    model = RotaryViT().eval()
    x = images(2, size=16)
    compiled = turbo(model, r=0)
    out = compiled(x)
    with torch.no_grad():
        assert torch.equal(out, model(x))
    assert compiled.report.token_tables == []


def test_unknown_rule_is_refused():
    from turbo_fx.config import TurboConfig, TurboConfigError

    with pytest.raises(TurboConfigError, match="rotary"):
        TurboConfig(rotary="nearest")


@pytest.mark.parametrize("rule", ["rows", "position", "destination"])
def test_merge_and_restore_rotates_merged_image_tokens_by_their_members(turbo, rule):
    # A joint-attention DiT with 2D rotary positions on the image tokens: within a block the
    # tables follow that block's merge. Rotated by 2x2 cell, duplicated cells stay duplicates and
    # the output is the unmerged one's; rotated by token, the merged members differ.
    from model_builders import JointRotaryDiT, cell_duplicated_latents

    x, t, y = cell_duplicated_latents(), torch.tensor([3, 7]), torch.tensor([0, 2])
    for by_cell in (True, False):
        model = JointRotaryDiT(by_cell=by_cell).eval()
        with torch.no_grad():
            want = model(x, t, y)
        torch._dynamo.reset()
        compiled = turbo(model, ratio=0.5, rotary=rule)
        got = compiled(x, t, y)
        report = compiled.report
        assert report.fallback_reason is None
        merged = [(c.kind, c.tokens_in, c.tokens_merged) for c in report.components if c.decision == "merges"]
        assert merged == [("self-attention", 64, 32)] * 2
        assert len(report.token_tables) == 4  # cos and sin for each block's merge
        if by_cell:
            torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
        else:
            assert (got - want).abs().max() > 1e-3
    torch._dynamo.reset()
    assert torch.equal(turbo(model, ratio=0.0)(x, t, y), want)


def test_destination_rows_take_the_row_of_the_token_whose_place_each_merged_token_keeps():
    from turbo_fx import ops

    table = torch.arange(10.0).reshape(5, 2)  # rows: one text token, then four image tokens
    # Image tokens 0..3: destinations [2, 0]; token 1 merged into slot 0, token 3 kept in slot 2.
    assign, dst = torch.tensor([[1, 0, 0, 2]]), torch.tensor([2, 0])
    like = torch.zeros(1, 4, 2)  # text + 3 merged image tokens
    rows = ops.destination_token_rows(table, assign, dst, like, 1, lead=1)
    # text row 0; slot 0 -> image token 2 (table row 3); slot 1 -> token 0 (row 1); slot 2 -> token 3 (row 4)
    assert rows[0].tolist() == [[0.0, 1.0], [6.0, 7.0], [2.0, 3.0], [8.0, 9.0]]


def test_destination_rule_is_rows_in_merge_mode(turbo):
    model = RotaryViT(axes="y").eval()
    compiled = turbo(model, r=2, rotary="destination")
    compiled(row_duplicated_images())
    assert compiled.report.token_tables and all("merge-and-restore mode only" in t for t in compiled.report.token_tables)
