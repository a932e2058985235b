"""Merge visualisation: patch groups from recorded merges, hand-made grids, the PNG, clear errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from model_builders import NUM_PREFIX, duplicated_pairs, images, small_vit

from turbo_fx.bench.visualize import (
    NoMergesError,
    group_borders,
    group_colours,
    group_sizes,
    infer_grid,
    merge_groups,
    visualize_merges,
)

# Duplicated adjacent patches (columns 0=1 and 2=3 of the 4x4 grid) merge pairwise in block 0.
PAIRS = np.array([[0, 0, 1, 1], [2, 2, 3, 3], [4, 4, 5, 5], [6, 6, 7, 7]])
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_merge_groups_on_a_hand_made_assign():
    # CLS stays at 0; patch tokens went to merged tokens 1..10.
    assign = [0, 1, 1, 2, 2, 3, 4, 4, 5, 6, 3, 7, 8, 9, 9, 9, 10]
    groups = merge_groups(torch.tensor(assign), protected=1, grid_hw=(4, 4))
    np.testing.assert_array_equal(groups, [[0, 0, 1, 1], [2, 3, 3, 4], [5, 2, 6, 7], [8, 8, 8, 9]])
    np.testing.assert_array_equal(group_sizes(groups), [2, 2, 2, 2, 1, 1, 1, 1, 3, 1])
    # Two protected tokens and a 2x3 grid; merged indices need not start at 0.
    np.testing.assert_array_equal(merge_groups([0, 1, 2, 2, 3, 3, 4, 2], 2, (2, 3)), [[0, 0, 1], [1, 2, 0]])
    with pytest.raises(ValueError, match="do not fill a 3x3 grid"):
        merge_groups(assign, 1, (3, 3))


def test_colours_and_borders_mark_only_groups_of_several_patches():
    groups = np.array([[0, 0, 1], [2, 3, 3]])
    rgba = group_colours(groups)
    assert rgba[0, 2, 3] == 0.0 and rgba[1, 0, 3] == 0.0  # single patches stay transparent
    assert rgba[0, 0, 3] > 0 and np.array_equal(rgba[0, 0], rgba[0, 1])
    assert not np.array_equal(rgba[0, 0, :3], rgba[1, 1, :3])  # two groups, two colours
    # Borders of 10x10 px cells: (0,1)|(0,2), (1,0)|(1,1), and the horizontal edges under
    # group 0 and above group 3; nothing between two single patches.
    segments = group_borders(groups, (10.0, 10.0))
    assert sorted(segments) == sorted([
        ((20.0, 0.0), (20.0, 10.0)),
        ((10.0, 10.0), (10.0, 20.0)),
        ((0.0, 10.0), (10.0, 10.0)),
        ((10.0, 10.0), (20.0, 10.0)),
        ((20.0, 10.0), (30.0, 10.0)),
    ])


def test_infer_grid():
    assert infer_grid(16, (32, 32)) == (4, 4)
    assert infer_grid(8, (16, 32)) == (2, 4)
    assert infer_grid(24, (32, 48), patch_size=8) == (4, 6)
    with pytest.raises(ValueError, match="patch_size"):
        infer_grid(15, (32, 32))


def test_duplicated_patches_merge_in_pairs_after_the_first_block(tmp_path):
    model = small_vit("vit")
    x = duplicated_pairs(model, images(1))
    picture = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    path = tmp_path / "pairs.png"
    result = visualize_merges(model, x[0], options={"r": 8}, blocks=[0], display_image=picture, path=str(path))
    assert result.panels == 1 and result.protected == 1 and result.grid == (4, 4)
    assert result.tokens == [9]
    np.testing.assert_array_equal(result.groups[0], PAIRS)
    assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 2000


def test_register_tokens_are_not_patches_and_default_panels_span_depth(tmp_path):
    model = small_vit("vit_reg")  # CLS + 2 registers
    x = duplicated_pairs(model, images(1))
    path = tmp_path / "reg.png"
    result = visualize_merges(model, x, options={"r": 8}, path=str(path))
    assert result.protected == NUM_PREFIX["vit_reg"] == 3
    assert result.blocks == [0, 1, 2, 3] and result.panels == 4
    np.testing.assert_array_equal(result.groups[0], PAIRS)
    for groups, tokens in zip(result.groups, result.tokens):
        assert len(np.unique(groups)) == tokens - result.protected
        assert group_sizes(groups).sum() == 16
    assert result.tokens == sorted(result.tokens, reverse=True) and result.tokens[0] == 11
    assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 5000


def test_no_merge_raises_with_the_reason(tmp_path):
    flat = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10)).eval()
    with pytest.raises(NoMergesError, match="no attention site"):
        visualize_merges(flat, images(1)[0], options={"r": 4}, path=str(tmp_path / "a.png"))
    with pytest.raises(NoMergesError, match="merge no token"):
        visualize_merges(small_vit("vit", depth=1), images(1)[0], options={"r": 0}, path=str(tmp_path / "b.png"))
    assert not (tmp_path / "a.png").exists() and not (tmp_path / "b.png").exists()
