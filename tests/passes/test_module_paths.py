"""Sites and fallback reasons name modules as a user writes them: keys of ``named_modules()``."""
from __future__ import annotations

import logging

import pytest
import torch

from model_builders import dynamo_graph
from turbo_fx.passes.find_attention import find_attention_sites
from turbo_fx.passes.graph_utils import readable_module_path
from turbo_fx.report import recording


@pytest.mark.parametrize(
    "dynamo_path, expected",
    [
        ("L['self'].blocks.0.attn", "blocks.0.attn"),
        ("L['self'].__dict__['_modules']['down_blocks'].0.attentions.0"
         ".__dict__['_modules']['transformer_blocks'].0.attn2",
         "down_blocks.0.attentions.0.transformer_blocks.0.attn2"),
        ("L['self']._modules['encoder']._modules['layer'][3].attention", "encoder.layer.3.attention"),
        ("L['mod'].layers[0].self_attn", "layers.0.self_attn"),
        ("L['self']", ""),
        # A flattened name that cannot be split back keeps its form.
        ("L__self___blocks_0", "L__self___blocks_0"),
    ],
)
def test_readable_module_path(dynamo_path, expected):
    assert readable_module_path(dynamo_path) == expected


def _sites_of(model, *args, **kwargs):
    return find_attention_sites(dynamo_graph(model, *args, **kwargs))


def _small_unet():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    ).eval()


UNET_ARGS = (torch.randn(2, 4, 8, 8), torch.tensor([10]))
UNET_KWARGS = {"encoder_hidden_states": torch.randn(2, 5, 32)}


def test_unet_sites_are_named_modules():
    unet = _small_unet()
    names = dict(unet.named_modules())
    sites = _sites_of(unet, *UNET_ARGS, **UNET_KWARGS)
    assert sites
    assert all(site.module in names for site in sites), [s.module for s in sites]
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn2" in {s.module for s in sites}


def test_timm_sites_are_named_modules():
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=64).eval()
    sites = _sites_of(model, torch.randn(1, 3, 64, 64))
    assert [s.module for s in sites] == [f"blocks.{i}.attn" for i in range(12)]


def test_fallback_reason_names_the_module_readably(caplog):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50, n_positions=16)
    model = transformers.GPT2Model(config).eval()
    compiled = torch.compile(model, backend="turbo", options={"r": 2, "inner_backend": "eager"})
    with caplog.at_level(logging.WARNING, logger="turbo_fx"), torch.no_grad():
        compiled(torch.randint(0, 50, (1, 12)))
    text = caplog.text
    assert "compiled without token merging" in text
    assert "h.0.attn" in text
    assert "__dict__" not in text and "L['self']" not in text


def test_unet_components_are_named_modules():
    unet = _small_unet()
    names = dict(unet.named_modules())
    with recording() as rec:
        compiled = torch.compile(unet, backend="turbo", options={"ratio": 0.5, "inner_backend": "eager"})
        with torch.no_grad():
            compiled(*UNET_ARGS, **UNET_KWARGS)
    components = rec.graphs[-1].components
    assert components and all(c.module in names for c in components), [c.module for c in components]
