"""A reader with its own padding mask over a padded merged sequence (NaFlex: SigLIP 2's
attention-pooling head over variable-resolution patches): the key bias replaces the mask,
after a run-time check that both mask the same keys."""
from __future__ import annotations

import pytest
import torch

from turbo_fx import ops

tf = pytest.importorskip("transformers")

PATCHES = 64


def naflex_model() -> torch.nn.Module:
    config = tf.Siglip2VisionConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=3, intermediate_size=96,
                                    patch_size=4, num_patches=PATCHES)
    torch.manual_seed(0)
    model = tf.Siglip2VisionModel(config).eval()
    with torch.no_grad():
        model.embeddings.position_embedding.weight.zero_()  # no position: pairs stay duplicates
    return model


def naflex_inputs(duplicated: bool) -> dict:
    """Two images of 8x8 and 6x8 patches (the second padded by 16 patches); with
    ``duplicated`` every odd patch copies the patch before it."""
    pixels = torch.randn(2, PATCHES, 3 * 4 * 4, generator=torch.Generator().manual_seed(1))
    if duplicated:
        pixels[:, 1::2] = pixels[:, 0::2]
    mask = torch.ones(2, PATCHES, dtype=torch.long)
    mask[1, 48:] = 0
    return dict(pixel_values=pixels, pixel_attention_mask=mask, spatial_shapes=torch.tensor([[8, 8], [6, 8]]))


def test_duplicated_patches_give_the_unmerged_pooled_output(turbo):
    model = naflex_model()
    inputs = naflex_inputs(duplicated=True)
    with torch.no_grad():
        want = model(**inputs)
    compiled = turbo(model, r=4)
    got = compiled(**inputs)
    report = next(g for g in compiled.graphs if g.blocks)
    assert report.fallback_reason is None and report.padding
    assert report.tokens_per_block == [64, 60]
    assert [s.decision for s in report.sites] == ["merges", "merges", "reads merged"]
    torch.testing.assert_close(got.pooler_output, want.pooler_output, atol=1e-5, rtol=1e-4)
    real = inputs["pixel_attention_mask"].bool()
    torch.testing.assert_close(got.last_hidden_state[real], want.last_hidden_state[real], atol=1e-5, rtol=1e-4)


def test_padding_content_does_not_reach_the_pooled_output(turbo):
    model = naflex_model()
    inputs = naflex_inputs(duplicated=False)
    other = dict(inputs, pixel_values=inputs["pixel_values"].clone())
    other["pixel_values"][1, 48:] = 5.0
    compiled = turbo(model, r=4)
    first, second = compiled(**inputs).pooler_output, compiled(**other).pooler_output
    torch.testing.assert_close(first, second, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["additive", "bool masked", "bool allowed"])
def test_reader_mask_check_accepts_the_same_padding_and_refuses_another(kind):
    valid = torch.tensor([[True, True, True, False], [True, True, False, False]])
    bias = torch.randn(2, 1, 1, 3)

    def mask_for(allowed: torch.Tensor) -> torch.Tensor:
        rows = allowed[:, None, :].expand(2, 3, 4)  # [B, heads or queries, N]
        if kind == "additive":
            return torch.where(rows, 0.0, torch.finfo(torch.float32).min)
        return ~rows if kind == "bool masked" else rows

    masked_when_true = kind == "bool masked"
    out = ops.check_reader_padding(mask_for(valid), valid, bias, masked_when_true)
    assert torch.equal(out, bias)
    shifted = valid.clone()
    shifted[0, 3] = True
    with pytest.raises(RuntimeError, match="does not mask the same keys"):
        ops.check_reader_padding(mask_for(shifted), valid, bias, masked_when_true)


def padded_patches(duplicated: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Two images of 32 and 20 patches padded to 32; with ``duplicated`` every odd patch copies
    the one before it."""
    patches = torch.randn(2, 32, 48, generator=torch.Generator().manual_seed(3))
    if duplicated:
        patches[:, 1::2] = patches[:, 0::2]
    valid = torch.ones(2, 32, dtype=torch.long)
    valid[1, 20:] = 0
    return patches, valid


def test_a_padded_patch_encoder_written_here_gives_the_unmerged_pooled_output(turbo):
    from tests.model_builders import PaddedPatchEncoder

    model = PaddedPatchEncoder().eval()
    patches, valid = padded_patches(duplicated=True)
    with torch.no_grad():
        want = model(patches, valid)
    compiled = turbo(model, r=4)
    got = compiled(patches, valid)
    report = next(g for g in compiled.graphs if g.blocks)
    assert report.fallback_reason is None and report.padding
    assert report.tokens_per_block == [32, 28]
    assert [s.decision for s in report.sites] == ["merges", "merges", "reads merged"]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    other = patches.clone()
    other[1, 20:] = 7.0  # padding content must not reach the pooled output
    torch.testing.assert_close(compiled(other, valid), got, atol=1e-5, rtol=1e-4)
    torch._dynamo.reset()
    assert (turbo(model, r=4, prop_attn=False)(patches, valid) - want).abs().max() > 1e-4  # the oracle can fail
