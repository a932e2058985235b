"""``turbo-fx merge-paths``: the ways a merge step can run (``MERGE_PATHS``), side by side on one
model against plain Inductor: compile seconds, latency and ATen calls per forward.

Every configuration compiles in a fresh, empty Inductor cache with torch's default caches on
(empty at each start, they let no configuration reuse another's work; within one compile they
are what ``compile_blocks`` shares blocks through), then all run in interleaved rounds in one
process: medians with IQR, each speed-up with a 95% bootstrap interval over the rounds. ``--mode``
compiles every configuration, Inductor's too, in that mode: with "reduce-overhead" Inductor
captures its own CUDA graphs and turbo's split forward is captured as one. The timed calls reuse
one input tensor, so turbo's graph reads it in place while Inductor's copies it into its buffer.
"""
from __future__ import annotations

import copy
from typing import Optional, Sequence

import torch

from turbo_fx.bench import output, timing
from turbo_fx.bench.dispatch_count import top_level_aten_ops
from turbo_fx.bench.stats import speedup_interval

# The opaque op running ATen calls, the merged graph compiled whole; the op running one shared
# Inductor compile of the step; the step traced into the model's graph; the graph compiled block
# by block around the opaque op; block by block with the merge pieces compiled too (the default).
# Each path pinned both ways, so that a row keeps its meaning when a default changes.
MERGE_PATHS = {
    "opaque op": {"compile_blocks": False},
    "compile_merge_step=True": {"compile_merge_step": True, "compile_blocks": False},
    "fuse_merges=True": {"fuse_merges": True},
    "compile_blocks=True": {"compile_blocks": True, "compile_merge_step": False},
    "compiled merge pieces": {"compile_blocks": True, "compile_merge_step": True},
}


def check(args) -> None:
    from turbo_fx.bench.cli import UsageError

    unknown = [p for p in args.paths or () if p not in MERGE_PATHS]
    if unknown:
        raise UsageError(f"--paths: unknown path(s) {unknown}; choose from {list(MERGE_PATHS)}")


def run(args) -> dict:
    timing.warm_up_compilers()
    zoo, inputs = timing.load_model(args.model, args.batch, args.device, args.dtype)
    payload = {"model": args.model, "r": args.r, "batch": args.batch, "device": args.device, "dtype": args.dtype,
               "machine": timing.machine(), "command": args.command,
               **measure(zoo.model, inputs, args.r, args.rounds, args.paths, args.mode, args.options)}
    name = args.name or (f"{output.file_stem(args.model)}_r{args.r}_b{args.batch}"
                         + ("" if args.device == "cpu" else f"_{args.device}_{args.dtype}")
                         + (f"_{args.mode}" if args.mode else ""))
    output.write(payload, args.out, name, render)
    return payload


def measure(model: torch.nn.Module, inputs: tuple, r: int, rounds: int, paths: Optional[Sequence[str]] = None,
            mode: Optional[str] = None, options: Optional[dict] = None) -> dict:
    """Compile seconds, latency stats, ATen calls per forward and max |difference| to the first
    path, for Inductor and each of ``paths`` (default: all, "opaque op" first), every one
    compiled in Inductor's ``mode``."""
    from turbo_fx.report import recording

    chosen = list(dict.fromkeys(paths or MERGE_PATHS))
    reference = chosen[0]
    configs = {"Inductor, no merging": None,
               **{k: dict(options or {}, r=r, mode=mode, **MERGE_PATHS[k]) for k in chosen}}
    compiled, first, outputs, fallbacks, cuda_graphs = {}, {}, {}, {}, {}
    # Reset once, not per configuration: a reset drops the compiled code of the configurations
    # before it, which then recompile during the timed rounds' warm-up. Each torch.compile here
    # has its own backend, and Dynamo keys its cache entries by backend.
    torch._dynamo.reset()
    for label, opts in configs.items():
        fn = (torch.compile(copy.deepcopy(model), backend="inductor", mode=mode) if opts is None
              else torch.compile(copy.deepcopy(model), backend="turbo", options=opts))
        with timing.fresh_cache(), recording() as rec:
            first[label] = timing.time_first_call(fn, *inputs)
        with torch.no_grad():  # cloned: a CUDA-graph replay of Inductor's would overwrite it
            outputs[label] = torch.utils._pytree.tree_map_only(torch.Tensor, torch.clone, fn(*inputs))
        fallbacks[label] = [g.fallback_reason for g in rec.graphs if g.fallback_reason]
        cuda_graphs[label] = [g.cuda_graph for g in rec.graphs if g.cuda_graph]
        compiled[label] = fn
        timing.log(f"{label}: first call {first[label]:.1f} s")
    device = inputs[0].device
    times = timing.interleaved({k: timing.synchronised(fn, device) for k, fn in compiled.items()}, inputs, rounds)
    rows = []
    base = times["Inductor, no merging"]
    for label in configs:
        st = timing.stats(times[label])
        rows.append({
            "path": label, "compile_s": first[label] - st["median"], "median_ms": 1e3 * st["median"],
            "q1_ms": 1e3 * st["q1"], "q3_ms": 1e3 * st["q3"],
            "aten_calls": sum(top_level_aten_ops(compiled[label], *inputs).values()),
            "max_abs_diff_to_default": timing.max_abs_diff(outputs[label], outputs[reference]),
            "fallbacks": fallbacks[label], "cuda_graph": cuda_graphs[label],
            "speedup": speedup_interval(base, times[label]), "times_s": list(times[label]),
        })
    return {"rows": rows, "reference": reference, "mode": mode}


def render(payload: dict) -> str:
    mode = f", mode {payload['mode']}" if payload.get("mode") else ""
    title = (f"Merge paths: {payload['model']}, r={payload['r']}, batch {payload['batch']}, "
             f"{payload.get('device', 'cpu')} {payload.get('dtype', 'fp32')}{mode}")
    rows = [[row["path"], f"{row['compile_s']:.1f}",
             f"{row['median_ms']:.0f} ({row['q1_ms']:.0f}-{row['q3_ms']:.0f})",
             output.speedup(row.get("speedup"), unit=""), row["aten_calls"],
             f"{row['max_abs_diff_to_default']:.1e}"] for row in payload["rows"]]
    head = ["path", "compile s", "median ms (IQR)", "speed-up over Inductor [95%]", "ATen calls per forward",
            f"max abs diff to {payload.get('reference', 'opaque op')}"]
    return "\n".join(output.header(title, payload) + [output.table(head, rows)]) + "\n"
