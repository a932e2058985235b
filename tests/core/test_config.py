"""Options are validated at the edge: clear errors that name the option and what it accepts."""
from __future__ import annotations

import pytest
import torch

from model_builders import images, small_vit
from turbo_fx import LinearSchedule, TurboConfig, TurboConfigError
from turbo_fx.config import resolve_config


@pytest.mark.parametrize(
    "options, message",
    [
        ({"rr": 3}, "unknown turbo option(s) ['rr']"),
        ({"r": -1}, "option 'r' must be >= 0"),
        ({"r": 2.5}, "option 'r' must be an int"),
        ({"r": [3, -1]}, "list entries must be ints >= 0"),
        ({"r": []}, "must not be empty"),
        ({"r": {"first": 2, "last": 5}}, "must decrease"),
        ({"r": {"first": 2}}, "schedule must be"),
        ({"alpha": -0.1}, "option 'alpha' must be >= 0"),
        ({"alpha": float("nan")}, "option 'alpha' must be a finite number"),
        ({"beta": 0}, "option 'beta' must be > 0"),
        ({"fusion": "max"}, "option 'fusion' must be one of"),
        ({"metric": "values"}, "option 'metric' must be one of ('keys', 'queries')"),
        ({"mode": "fast"}, "option 'mode' must be one of ('default',"),
        ({"semantic": "yes"}, "option 'semantic' must be True or False"),
        ({"explicit_as_sdpa": 1}, "option 'explicit_as_sdpa' must be True or False"),
        ({"semantic": False, "redundancy": False}, "nothing left to rank tokens by"),
        ({"keep_salient": 1, "semantic": False}, "it needs semantic=True"),
        ({"keep_salient": -1}, "option 'keep_salient' must be an int >= 0"),
        ({"min_tokens": -3}, "option 'min_tokens' must be an int >= 0"),
        ({"protected": "cls"}, "option 'protected' must be 'auto' or an int >= 0"),
        ({"inner_backend": "tvm"}, "option 'inner_backend' must be one of"),
        ({"compile_merge_step": "on"}, "option 'compile_merge_step' must be True, False or None"),
        ({"compile_merge_step": True, "fuse_merges": True}, "there is no such op"),
    ],
)
def test_bad_options_name_the_option(options, message):
    with pytest.raises(TurboConfigError) as info:
        resolve_config(options)
    assert message in str(info.value)
    assert isinstance(info.value, ValueError)


def test_bad_option_through_torch_compile_is_a_clear_error():
    compiled = torch.compile(small_vit(), backend="turbo", options={"rr": 3})
    with pytest.raises(Exception) as info, torch.no_grad():
        compiled(images(1))
    assert "unknown turbo option(s) ['rr']" in str(info.value)


def test_forms_of_r():
    assert TurboConfig(r=5).r_per_block(3) == [5, 5, 5]
    assert TurboConfig(r=[1, 2, 3]).r_per_block(3) == [1, 2, 3]
    assert TurboConfig(r={"first": 10, "last": 4}).r_per_block(4) == [10, 8, 6, 4]
    assert LinearSchedule(9, 0).counts(4) == [9, 6, 3, 0]
    with pytest.raises(TurboConfigError, match="lists 3 blocks but the graph has 4"):
        TurboConfig(r=[1, 2, 3]).r_per_block(4)


def test_fusion_aliases_and_typed_config():
    assert TurboConfig(fusion="R/I").fusion == "div"
    assert TurboConfig(fusion="R-beta**|gamma-block|*alpha*I").fusion == "layer"
    config = TurboConfig(r=4, alpha=0.1)
    assert resolve_config(config) is config
    assert resolve_config({"r": 4, "alpha": 0.1}) == config
    assert resolve_config(config, r=6).r == 6
    with pytest.raises(TurboConfigError, match="must be a dict or turbo_fx.TurboConfig"):
        resolve_config([("r", 3)])


def test_for_cuda_graphs_keeps_token_counts_concrete_unless_symbolic_ones_were_asked_for():
    """Inductor captures no graph with a data-dependent size: under a CUDA-graph mode the
    default (symbolic counts for the opaque op) turns concrete; a value the user gave stays."""
    assert TurboConfig().strategy.uses_symbolic_tokens is True
    assert TurboConfig().for_cuda_graphs().strategy.uses_symbolic_tokens is False
    assert TurboConfig(symbolic_tokens=True).for_cuda_graphs().strategy.uses_symbolic_tokens is True
    assert TurboConfig(fuse_merges=True).for_cuda_graphs().strategy.uses_symbolic_tokens is False
    assert TurboConfig(r=13, alpha=0.1).for_cuda_graphs() == TurboConfig(r=13, alpha=0.1, symbolic_tokens=False)
