"""How many ATen ops one warm forward dispatches, plain Inductor against turbo's merge paths,
counted by the profiler. On a GPU each dispatched op costs a launch and host time, so
this count shows whether the merge step is host-bound before any GPU is at hand.

    python -m turbo_fx.bench.dispatch_count --model deit_tiny_patch16_224 --r 13 --batch 2
"""
from __future__ import annotations

import argparse
import collections
from typing import Callable, Optional, Sequence

import torch

from . import timing

# Ops that make the host wait for the device, or give outputs whose shape depends on data.
HOST_SYNCING = frozenset({
    "aten::item", "aten::_local_scalar_dense", "aten::nonzero", "aten::unique", "aten::_unique2",
    "aten::unique_consecutive", "aten::masked_select", "aten::is_nonzero", "aten::equal",
})


# The ways a merge step runs: the opaque op as ATen calls, the opaque op through one shared
# compile of the step (both with the merged graph compiled whole, as the default did until
# stop 20), the step traced into the model's own graph, the opaque op with the graph
# compiled block by block (the CPU default of stop 20-21, named for its option), and the same
# with the merge pieces compiled too (the default since stop 22, on CUDA since stop 21).
MERGE_PATHS = {
    "opaque op": {"compile_blocks": False},
    "compile_merge_step=True": {"compile_merge_step": True, "compile_blocks": False},
    "fuse_merges=True": {"fuse_merges": True},
    # Pinned both ways, so that a row keeps its meaning when a default changes.
    "compile_blocks=True": {"compile_blocks": True, "compile_merge_step": False},
    "compiled merge pieces": {"compile_blocks": True, "compile_merge_step": True},
}


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


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    timing.add_model_arguments(p, "deit_tiny_patch16_224", batch=2, threads=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, x = timing.seeded_timm_model(args.model, args.batch)

    torch._dynamo.reset()
    base = top_level_aten_ops(torch.compile(model, backend="inductor"), x)
    print(f"inductor: {sum(base.values())} ATen calls per forward")
    for label, options in MERGE_PATHS.items():
        counts, reports = turbo_aten_ops(model, x, r=args.r, **options)
        merges = sum(g.merges for g in reports)
        added = counts - base
        extra = sum(added.values())
        per_block = extra / merges if merges else float("nan")
        syncing = sorted(HOST_SYNCING & set(counts))
        print(f"turbo {label}: {sum(counts.values())} calls, {extra} over Inductor for {merges} "
              f"merging blocks ({per_block:.1f} per block); host-syncing: {syncing or 'none'}")
        print("  added: " + ", ".join(f"{name} x{n}" for name, n in added.most_common()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
