"""The ways a merge step can run, side by side on one timm model: compile seconds, steady
latency and ATen calls per forward, against plain Inductor.

- the opaque op running ATen calls, the merged graph compiled whole (``compile_blocks=False``;
  the default until stop 20);
- ``compile_merge_step=True``: the opaque op running one shared Inductor compile of the step
  (compiled whole too);
- ``fuse_merges=True``: the step traced into the model's own graph;
- ``compile_blocks=True``: the opaque op running ATen calls, the graph compiled block by block
  (blocks share compiled code through Inductor's FX graph cache; ``compile_merge_step=False``):
  the CPU default of stops 20-21;
- "compiled merge pieces" (``compile_merge_step=True`` with the split): block by block, the
  merge pieces compiled too (scalar C++ on CPU), one compile shared by the merges after the
  first: the default since stop 22.

    python -m turbo_fx.bench.merge_paths --model deit_tiny_patch16_224 --r 13 --batch 8 --threads 1
    python -m turbo_fx.bench.merge_paths --model vit_base_patch16_224 --r 13 --batch 256 --device cuda --dtype bf16
    python -m turbo_fx.bench.merge_paths ... --mode reduce-overhead --paths "compiled merge pieces"

``--mode`` compiles every configuration, Inductor's too, in that Inductor mode: with
"reduce-overhead" Inductor captures its own CUDA graphs and turbo's split forward is
captured as one (``turbo_fx.cuda_graphs``). The timed calls reuse one input tensor, so
turbo's graph reads it in place while Inductor's copies it into its own buffer (one copy of
the images per call).

Every configuration compiles in a fresh, empty Inductor cache (compile seconds as
``bench.timing`` defines them), with Inductor's FX graph and AOT-autograd caches on, as torch
has them by default: empty at each configuration's start, they let no configuration reuse
another's work, and within one compile they are what ``compile_blocks`` shares blocks through.
Latencies are interleaved rounds in one process, medians with IQR; each speed-up over Inductor
has a 95% bootstrap interval that resamples the rounds (``bench.stats.speedup_interval``).
"""
from __future__ import annotations

import argparse
import copy
from typing import Optional, Sequence

import torch

from . import timing
from .dispatch_count import MERGE_PATHS, top_level_aten_ops
from .stats import speedup_interval


def measure(model: torch.nn.Module, x: torch.Tensor, r: int, rounds: int,
            paths: Optional[Sequence[str]] = None, mode: Optional[str] = None) -> dict:
    """Compile seconds, latency stats, ATen calls per forward and max |difference| to the
    first path, for Inductor and each of ``paths`` (default: all of ``MERGE_PATHS``, "opaque
    op" first), every one compiled in Inductor's ``mode``."""
    from turbo_fx.report import recording

    chosen = list(dict.fromkeys(paths or MERGE_PATHS))
    reference = chosen[0]
    configs = {"Inductor, no merging": None, **{k: dict(r=r, mode=mode, **MERGE_PATHS[k]) for k in chosen}}
    compiled, first, outputs, fallbacks, cuda_graphs = {}, {}, {}, {}, {}
    # Reset once, not per configuration: a reset drops the compiled code of the configurations
    # before it, which then recompile during the timed rounds' warm-up. Each torch.compile here
    # has its own backend, and Dynamo keys its cache entries by backend.
    torch._dynamo.reset()
    for label, options in configs.items():
        fn = (torch.compile(copy.deepcopy(model), backend="inductor", mode=mode) if options is None
              else torch.compile(copy.deepcopy(model), backend="turbo", options=options))
        with timing.fresh_cache(), recording() as rec:
            first[label] = timing.time_first_call(fn, x)
        with torch.no_grad():  # cloned: a CUDA-graph replay of Inductor's would overwrite it
            outputs[label] = torch.utils._pytree.tree_map_only(torch.Tensor, torch.clone, fn(x))
        fallbacks[label] = [g.fallback_reason for g in rec.graphs if g.fallback_reason]
        cuda_graphs[label] = [g.cuda_graph for g in rec.graphs if g.cuda_graph]
        compiled[label] = fn
        timing.log(f"{label}: first call {first[label]:.1f} s")
    times = timing.interleaved({k: timing.synchronised(fn, x.device) for k, fn in compiled.items()}, x, rounds)
    rows = []
    base = times["Inductor, no merging"]
    for label in configs:
        st = timing.stats(times[label])
        calls = sum(top_level_aten_ops(compiled[label], x).values())
        rows.append({
            "path": label, "compile_s": first[label] - st["median"], "median_ms": 1e3 * st["median"],
            "q1_ms": 1e3 * st["q1"], "q3_ms": 1e3 * st["q3"], "aten_calls": calls,
            "max_abs_diff_to_default": timing.max_abs_diff(outputs[label], outputs[reference]),
            "fallbacks": fallbacks[label], "cuda_graph": cuda_graphs[label],
            "speedup": speedup_interval(base, times[label]),
            "times_s": list(times[label]),
        })
    return {"rows": rows, "reference": reference, "mode": mode}




def render(payload: dict) -> str:
    mode = f", mode {payload['mode']}" if payload.get("mode") else ""
    lines = [f"# Merge paths: {payload['model']}, r={payload['r']}, batch {payload['batch']}, "
             f"{payload.get('device', 'cpu')} {payload.get('dtype', 'fp32')}{mode}", "",
             timing.machine_line(payload["machine"]), "",
             "| path | compile s | median ms (IQR) | speed-up over Inductor [95%] | ATen calls per forward "
             f"| max abs diff to {payload.get('reference', 'opaque op')} |",
             "|---|---|---|---|---|---|"]
    for row in payload["rows"]:
        sp = row.get("speedup")  # runs saved before the intervals existed have none
        speedup = f"{sp['speedup']:.2f} [{sp['low']:.2f}, {sp['high']:.2f}]" if sp else "-"
        lines.append(f"| {row['path']} | {row['compile_s']:.1f} | {row['median_ms']:.0f} "
                     f"({row['q1_ms']:.0f}-{row['q3_ms']:.0f}) | {speedup} | {row['aten_calls']} | "
                     f"{row['max_abs_diff_to_default']:.1e} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    timing.add_model_arguments(p, "deit_tiny_patch16_224", batch=8, threads=1)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="fp32", choices=sorted(timing.DTYPES))
    p.add_argument("--paths", nargs="+", choices=list(MERGE_PATHS), default=None,
                   help="merge paths to measure, the first the reference of the differences (default: all, "
                        "the opaque op first); Inductor always runs")
    p.add_argument("--mode", default=None, choices=list(torch._inductor.list_mode_options()),
                   help="Inductor's compile mode for every configuration (reduce-overhead: CUDA graphs)")
    p.add_argument("--name", default=None, help="result file stem (default: model, r and batch)")
    p.add_argument("--out", default="bench/results/merge_paths")
    args = p.parse_args(argv)
    if timing.device_error(args.device):
        p.error(timing.device_error(args.device))
    torch.set_num_threads(args.threads)
    timing.warm_up_compilers()
    model, x = timing.seeded_timm_model(args.model, args.batch, args.device, timing.DTYPES[args.dtype])
    payload = {"model": args.model, "r": args.r, "batch": args.batch, "device": args.device, "dtype": args.dtype,
               "machine": timing.machine(), **measure(model, x, args.r, args.rounds, args.paths, args.mode)}
    if args.device == "cuda":
        payload["gpu"] = torch.cuda.get_device_name()
    name = args.name or (f"{args.model}_r{args.r}_b{args.batch}"
                         + ("" if args.device == "cpu" else f"_{args.device}_{args.dtype}")
                         + (f"_{args.mode}" if args.mode else ""))
    timing.write_and_print(payload, args.out, name, render)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
