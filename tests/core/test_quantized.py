"""Quantised weights under the turbo backend: a timm ViT whose linear layers hold torchao's int8
or float8 weight-only tensor subclasses computes the quantised model at r=0, and merges at r>0
compiled block by block, its quantised blocks sharing compiled code only with each other."""
from __future__ import annotations

import pytest
import torch

import turbo_fx
from model_builders import images, small_vit
from turbo_fx.config import TurboConfig
from turbo_fx.reference import reference_forward

pytest.importorskip("torchao")

CONFIGS = ["Int8WeightOnlyConfig", "Float8WeightOnlyConfig"]
DEPTH, R = 4, 3


@pytest.fixture(autouse=True)
def inductor_settings_kept():
    """torchao's configs set process-wide Inductor options (coordinate descent tuning, ...) by
    default, as a user gets them; the tests after these must not inherit them."""
    saved = torch._inductor.config.save_config()
    yield
    torch._inductor.config.load_config(saved)


def quantised_vit(config_name: str, depth: int, from_block: int = 0) -> torch.nn.Module:
    """``small_vit`` with the linear layers of block ``from_block`` on quantised by
    ``config_name``, its default options."""
    import torchao.quantization as ao

    model = small_vit(depth=depth)
    first = f"blocks.{from_block}."

    def chosen(module: torch.nn.Module, name: str) -> bool:
        return isinstance(module, torch.nn.Linear) and name.startswith("blocks.") and name >= first

    ao.quantize_(model, getattr(ao, config_name)(), filter_fn=chosen)
    return model


def check_quantised(model: torch.nn.Module, quantised_blocks: range) -> None:
    """The chosen blocks hold tensor subclasses, the others plain weights."""
    for i, block in enumerate(model.blocks):
        weight = block.attn.qkv.weight
        assert (type(weight) is not torch.nn.Parameter) == (i in quantised_blocks), i


@pytest.mark.parametrize("config_name", CONFIGS)
def test_at_r0_the_compiled_model_computes_the_quantised_model(turbo, config_name):
    model, x = quantised_vit(config_name, depth=2), images(2)
    check_quantised(model, range(2))
    with torch.no_grad():
        expected, unquantised = model(x), small_vit(depth=2)(x)
    assert (expected - unquantised).abs().max().item() > 1e-3  # the weights are really quantised
    compiled = turbo(model, r=0, inner_backend="inductor")
    out = compiled(x)
    assert compiled.report.fallback_reason is None
    assert (out - expected).abs().max().item() < 1e-5


@pytest.mark.parametrize("config_name", CONFIGS)
def test_a_partly_quantised_model_merges_block_by_block_as_eager_turbo_does(turbo, config_name):
    """Block 0 keeps plain weights: the piece after it (block 0's MLP, block 1's attention)
    has the same code as the next two pieces but mixes plain and quantised weights, so only
    the last of those three runs an earlier piece's compiled code."""
    model, x = quantised_vit(config_name, depth=DEPTH, from_block=1), images(2)
    check_quantised(model, range(1, DEPTH))
    compiled = turbo(model, r=R, inner_backend="inductor")
    out = compiled(x)
    report = compiled.report
    assert report.fallback_reason is None and report.merges == DEPTH
    assert report.block_compile.startswith(f"{DEPTH + 1} compute pieces"), report.block_compile
    assert turbo_fx.counters["block_pieces_shared"] == 1
    assert turbo_fx.counters["block_pieces_generated"] + turbo_fx.counters["block_pieces_cached"] == DEPTH
    eager = turbo(model, r=R)(x)
    assert (out - eager).abs().max().item() < 1e-4
    with torch.no_grad():
        expected = reference_forward(model, x, TurboConfig(r=R))
    assert (out - expected).abs().max().item() < 1e-4
