"""How many ATen ops one warm forward dispatches, counted by the profiler. On a GPU each
dispatched op costs a launch and host time, so this count shows whether a merge step is
host-bound before any GPU is at hand (``merge_paths`` reports it per path;
tests/ops/test_aten_overhead.py holds every path to it)."""
from __future__ import annotations

import collections
from typing import Callable

import torch

# Ops that make the host wait for the device, or give outputs whose shape depends on data.
HOST_SYNCING = frozenset({
    "aten::item", "aten::_local_scalar_dense", "aten::nonzero", "aten::unique", "aten::_unique2",
    "aten::unique_consecutive", "aten::masked_select", "aten::is_nonzero", "aten::equal",
})


def top_level_aten_ops(fn: Callable, *args) -> collections.Counter:
    """ATen ops of one warm call ``fn(*args)``, each counted once where user or compiled code
    called it; ops that another ATen op dispatches inside itself are not counted again."""
    with torch.no_grad():
        fn(*args)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            fn(*args)
    counts: collections.Counter = collections.Counter()
    for event in prof.events():
        parent = event.cpu_parent
        if event.name.startswith("aten::") and (parent is None or not parent.name.startswith("aten::")):
            counts[event.name] += 1
    return counts


def turbo_aten_ops(model: torch.nn.Module, *args, **options) -> tuple[collections.Counter, list]:
    """``top_level_aten_ops`` of ``model`` compiled with turbo and ``options``, and the
    ``GraphReport`` of every graph that compile made."""
    from turbo_fx.report import recording

    torch._dynamo.reset()
    compiled = torch.compile(model, backend="turbo", options=options)
    with recording() as rec:
        counts = top_level_aten_ops(compiled, *args)
    return counts, rec.graphs
