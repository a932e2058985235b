"""Closeness to the unmerged output on one SD-1.5 64x64 transformer block with smooth input
features (bilinearly upsampled noise plus a little noise, seeded): tomesd against turbo at
tomesd's FLOPs (self-attention only), with and without the ``log(size)`` bias and the semantic
value. Random weights; relative L2 of the block's residual update.

``python -m turbo_fx.bench.block_closeness``
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from turbo_fx.bench.diffusion_speed import apply_tomesd, fresh_copy

VARIANTS = ({}, {"prop_attn": False}, {"semantic": False}, {"use_rand": False}, {"prop_attn": False, "semantic": False})


def sd_block(seed: int = 0) -> torch.nn.Module:
    import diffusers

    torch.manual_seed(seed)
    return diffusers.Transformer2DModel(num_attention_heads=8, attention_head_dim=40, in_channels=320, num_layers=1,
                                        cross_attention_dim=768, norm_num_groups=32).eval()


def smooth_features(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(2, 320, 16, 16, generator=g)
    x = F.interpolate(coarse, size=(64, 64), mode="bilinear") + 0.1 * torch.randn(2, 320, 64, 64, generator=g)
    return x, torch.randn(2, 77, 768, generator=g)


def update_error(model, x: torch.Tensor, text: torch.Tensor, reference: torch.Tensor) -> float:
    with torch.no_grad():
        update = model(x, encoder_hidden_states=text).sample - x
    return ((update - reference).norm() / reference.norm()).item()


def main(ratio: float = 0.5) -> dict:
    block = sd_block()
    x, text = smooth_features()
    with torch.no_grad():
        reference = block(x, encoder_hidden_states=text).sample - x
    results = {"tomesd": update_error(apply_tomesd(fresh_copy(block), ratio), x, text, reference)}
    for variant in VARIANTS:
        torch._dynamo.reset()
        options = {"ratio": ratio, "merge_components": ("self-attention",), "inner_backend": "eager", **variant}
        compiled = torch.compile(fresh_copy(block), backend="turbo", options=options)
        results["turbo-sa " + (", ".join(f"{k}={v}" for k, v in variant.items()) or "default")] = \
            update_error(compiled, x, text, reference)
    for name, value in results.items():
        print(f"{name}: relative L2 {value:.4f}")
    return results


if __name__ == "__main__":
    main()
