"""turbo-fx in one command (`make demo`): a timm ViT compiled with the turbo backend, next to
plain Inductor, on this machine's CPU. About 3 minutes on 2 cores.

    .venv/bin/python bench/demo.py [--r 13] [--batch 8] [--rounds 5] [--model deit_small_patch16_224]

The weights are random (timm pretrained=False; nothing is downloaded), so the figures are
about speed and FLOPs, not accuracy. For the full benchmark see bench/bench_vit.py.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from tabulate import tabulate

from turbo_fx import timing as common  # noqa: E402

import turbo_fx  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="turbo vs Inductor on a timm ViT (CPU, random weights)")
    p.add_argument("--model", default="deit_small_patch16_224", help="a timm ViT name")
    p.add_argument("--r", type=int, default=13, help="tokens merged per attention block (default 13)")
    p.add_argument("--batch", type=int, default=8, help="batch size (default 8)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (default 5)")
    args = p.parse_args(argv)
    started = time.perf_counter()

    import timm

    print(f"turbo-fx demo: {args.model}, RANDOM weights (timm pretrained=False, nothing downloaded), "
          f"batch {args.batch}, 224x224, r={args.r}")
    print(f"Machine: {common.machine_line()}\n", flush=True)
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False).eval()
    x = torch.randn(args.batch, 3, 224, 224)
    with torch.no_grad():
        eager_logits = model(x)

    # 1. What the rewrite does (runs the rewritten graph eagerly, counts FLOPs before and after).
    report = turbo_fx.explain(model, x, r=args.r)
    print("1. turbo_fx.explain(model, x, r=%d)\n" % args.r)
    print(report, "\n", flush=True)

    # 2. Compile: an empty Inductor cache each, FX graph / AOT autograd caches off. turbo goes
    # first: the first big compile of a process was seen to run slower, so this order can only
    # make turbo look worse, never better.
    common.no_compile_caches()
    common.log(f"warming up the compilers on a tiny ViT (untimed): {common.warm_up_compilers():.0f} s")
    torch._dynamo.reset()
    first = {}
    with common.fresh_cache():
        turbo = torch.compile(model, backend="turbo", options={"r": args.r})
        with turbo_fx.recording() as rec:
            first["turbo"] = common.time_first_call(turbo, x)
    common.log(f"compiled turbo r={args.r}: first call {first['turbo']:.1f} s")
    for g in rec.graphs:
        if g.fallback_reason:
            print(f"WARNING: turbo compiled a graph WITHOUT merging: {g.fallback_reason}")
    with common.fresh_cache():
        inductor = torch.compile(model)
        first["inductor"] = common.time_first_call(inductor, x)
    common.log(f"compiled plain Inductor: first call {first['inductor']:.1f} s")

    # 3. Steady state, interleaved rounds.
    fns = {"eager": model, "inductor": inductor, "turbo": turbo}
    times = common.interleaved(fns, x, args.rounds, warmup=2, progress=lambda line: common.log(line))
    with torch.no_grad():
        turbo_logits = turbo(x)
        inductor_logits = inductor(x)
    med = {name: common.stats(t)["median"] for name, t in times.items()}
    iqr = {name: common.stats(t)["iqr"] for name, t in times.items()}
    compile_s = {name: first[name] - med[name] for name in first}
    flops = {"eager": report.flops_before, "inductor": report.flops_before, "turbo": report.flops_after}
    diffs = {"eager": 0.0, "inductor": common.max_abs_diff(inductor_logits, eager_logits),
             "turbo": common.max_abs_diff(turbo_logits, eager_logits)}

    rows = []
    for name, label in [("eager", "eager"), ("inductor", "Inductor"), ("turbo", f"turbo r={args.r}")]:
        rows.append([label, f"{compile_s[name]:.1f}" if name in compile_s else "-",
                     f"{med[name] * 1e3:.1f}", f"{iqr[name] * 1e3:.1f}",
                     f"{med['inductor'] / med[name]:.2f}x", f"{flops[name] / 1e9:.2f}",
                     f"{flops[name] / report.flops_before:.3f}", f"{diffs[name]:.3g}"])
    print("\n2. turbo vs plain Inductor\n")
    print(tabulate(rows, headers=["", "compile s", "median ms", "IQR ms", "speed-up vs Inductor",
                                  "GFLOPs", "FLOP ratio", "max abs diff vs eager logits"],
                   tablefmt="github"))
    speedup = med["inductor"] / med["turbo"]
    ratio = report.flop_ratio
    print(f"\nMachine: {common.machine_line()}")
    print(f"Batch {args.batch}, {args.rounds} interleaved rounds after 2 warm-up calls each; median and "
          f"interquartile range per forward call.")
    print("Compile s: the first call after torch._dynamo.reset() (Inductor: without a reset, after turbo's),"
          " with an empty Inductor cache dir, minus the median steady-state call.")
    print(f"turbo r={args.r}: {speedup:.2f}x Inductor's speed at {ratio:.3f} of its FLOPs; FLOP efficiency "
          f"(speed-up / FLOP reduction) {speedup * ratio:.2f}, where 1.00 means time fell exactly as much "
          f"as FLOPs. Compile time {compile_s['turbo'] / compile_s['inductor']:.2f}x Inductor's.")
    print(f"Largest |eager logit|: {eager_logits.abs().max().item():.3g} (random weights; merging changes "
          f"the outputs, Inductor alone only by rounding).")
    print(f"Demo took {time.perf_counter() - started:.0f} s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
