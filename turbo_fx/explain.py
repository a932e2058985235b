"""``turbo_fx.explain``: what the turbo backend would do to a model, in the spirit of ``torch._dynamo.explain``."""
from __future__ import annotations

from typing import Any, Optional

import torch

from turbo_fx.backend import turbo_backend
from turbo_fx.config import TurboConfig, resolve_config
from turbo_fx.report import TurboReport, recording
from turbo_fx.torch_compat import reset_compiler


def explain(model: torch.nn.Module, *inputs: Any, model_kwargs: Optional[dict] = None,
            config: Optional[TurboConfig] = None, **options: Any) -> TurboReport:
    """Compile ``model`` with the turbo backend, run it once on ``inputs`` and report, per
    graph: attention sites, merges, tokens per block, FLOPs before and after, and any
    fallback reason. Unless ``inner_backend`` is given, the rewritten graph runs eagerly
    (the report is about the rewrite, not Inductor's code); ``compile_blocks`` then has
    nothing to split for, and the rewrite it reports is the same either way."""
    if config is None and "inner_backend" not in options:
        options["inner_backend"] = "eager"
        options["compile_blocks"] = False
    config = resolve_config(config, **options)
    reset_compiler()
    compiled = torch.compile(model, backend=turbo_backend, options=config)
    with recording(count_flops=True) as recorder, torch.no_grad():
        compiled(*inputs, **(model_kwargs or {}))
    reset_compiler()
    return TurboReport(graphs=list(recorder.graphs))
