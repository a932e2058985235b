"""The studies that measure compile seconds (bench/speed.py, diffusion_speed.py, vlm_speed.py)
turn Inductor's FX graph and AOT autograd caches off and raise Dynamo's recompile limits for
the whole process (timing.no_compile_caches). Left that way, every later test module on the
same pytest worker compiles each graph from scratch, even one it compiled a moment before:
this puts the settings back after each module of tests/bench."""
from __future__ import annotations

import pytest
import torch
import torch._functorch.config as functorch_config
import torch._inductor.config as inductor_config

SETTINGS = (
    (inductor_config, ("fx_graph_cache", "fx_graph_remote_cache", "autotune_local_cache", "autotune_remote_cache")),
    (functorch_config, ("enable_autograd_cache",)),
    (torch._dynamo.config, ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                            "accumulated_cache_size_limit")),
)


@pytest.fixture(scope="module", autouse=True)
def restore_compile_settings():
    saved = [(config, name, getattr(config, name)) for config, names in SETTINGS for name in names
             if hasattr(config, name)]
    yield
    for config, name, value in saved:
        setattr(config, name, value)
