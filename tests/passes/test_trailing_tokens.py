"""Parameter tokens appended after the patches (YOLOS's detection tokens) never merge, and a
per-token constant added between blocks (YOLOS's mid-position embeddings) is merged with the
tokens: each merged token gets the mean of its members' rows."""
from __future__ import annotations

import pytest
import torch

from model_builders import images
from turbo_fx import ops, record_merges

tf = pytest.importorskip("transformers")

DETECTION = 5
PATCHES = 64  # 32 px images in 4 px patches


def yolos() -> torch.nn.Module:
    torch.manual_seed(0)
    config = tf.YolosConfig(image_size=[32, 32], patch_size=4, hidden_size=48, num_hidden_layers=3,
                            num_attention_heads=3, intermediate_size=96, num_detection_tokens=DETECTION,
                            use_mid_position_embeddings=True, initializer_range=0.1)
    model = tf.YolosForObjectDetection(config).eval()
    with torch.no_grad():
        for table in (model.vit.embeddings.position_embeddings, mid_positions(model)):
            table.normal_(0.0, 0.3)
    return model


def mid_positions(model: torch.nn.Module) -> torch.nn.Parameter:
    """YOLOS's mid-position table (transformers moved it between releases)."""
    return next(p for name, p in model.named_parameters() if name.endswith("mid_position_embeddings"))


def twin_patches(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Odd patch columns copy even ones, in the pixels and in every position table, so patch
    tokens 2k and 2k+1 (1 + 2k and 2 + 2k after the class token) are twins."""
    x = x.clone()
    for col in range(0, 32, 8):
        x[..., col + 4:col + 8] = x[..., col:col + 4]
    with torch.no_grad():
        for table in (model.vit.embeddings.position_embeddings, mid_positions(model)):
            patches = table[..., 1:1 + PATCHES, :]
            patches[..., 1::2, :] = patches[..., 0::2, :]
    return x


def test_merge_tokens_never_touches_the_tail():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 12, 4, generator=g)
    merged, size, dest = ops.merge_tokens(x, torch.ones(2, 12), x, None, r=3, protected=1, tail=3)
    assert merged.shape == (2, 9, 4)
    # The last three tokens keep their values and land in the last three places.
    assert torch.equal(merged[:, -3:], x[:, -3:])
    assert torch.equal(dest[:, -3:], torch.tensor([[6, 7, 8]] * 2))
    assert torch.equal(size[:, -3:], torch.ones(2, 3))
    # Only the 8 tokens between the class token and the tail pair up: 4 A tokens at most.
    assert ops.merge_count(12, 1, 10, 0, tail=3) == 4


def test_merge_token_rows_is_the_mean_over_members():
    constant = torch.arange(10.0).reshape(1, 5, 2)  # rows [0,1], [2,3], [4,5], [6,7], [8,9]
    assign = torch.tensor([[0, 1, 0, 2, 1]])
    out = ops.merge_token_rows(constant, assign, torch.zeros(1, 3, 2), 1)
    expected = torch.tensor([[[2.0, 3.0], [5.0, 6.0], [6.0, 7.0]]])  # (r0+r2)/2, (r1+r4)/2, r3
    assert torch.equal(out, expected)


def test_yolos_keeps_its_detection_tokens_and_merges_the_patches(turbo):
    model = yolos()
    with record_merges() as records:
        compiled = turbo(model, r=4)
        out = compiled(pixel_values=images(2))
    report = compiled.report
    assert report.fallback_reason is None
    assert (report.protected, report.protected_tail) == (1, DETECTION)
    assert report.tokens_per_block == [70, 66, 62]
    # Every detection token is alone at the end of every merged sequence.
    for record in records:
        assert torch.equal(record.assign[:, -DETECTION:],
                           torch.arange(record.tokens_out - DETECTION, record.tokens_out).expand(2, -1))
    assert out.logits.shape == (2, DETECTION, model.config.num_labels + 1)


def test_yolos_over_twin_patches_gives_the_unmerged_detections(turbo):
    model = yolos()
    x = twin_patches(model, images(2))
    with torch.no_grad():
        plain = model(pixel_values=x)
    compiled = turbo(model, r=[16, 0, 0])
    out = compiled(pixel_values=x)
    assert compiled.report.tokens_per_block == [70, 54, 54]
    assert (out.logits - plain.logits).abs().max().item() < 1e-5
    assert (out.pred_boxes - plain.pred_boxes).abs().max().item() < 1e-5
    # The agreement above is not vacuous: once the twins differ (here in their mid-position
    # rows only) the merged model departs from the unmerged one.
    with torch.no_grad():
        table = mid_positions(model)
        # Twins now differ in the mid-position rows only (not by a constant over channels,
        # which every LayerNorm would remove).
        table[..., 2:2 + PATCHES:2, :] += 0.5 * torch.randn(table[..., 2:2 + PATCHES:2, :].shape,
                                                             generator=torch.Generator().manual_seed(3))
        shifted = model(pixel_values=x)
    moved = turbo(model, r=[16, 0, 0])(pixel_values=x)
    assert (moved.logits - shifted.logits).abs().max().item() > 1e-4
