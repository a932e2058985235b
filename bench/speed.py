"""``turbo-fx bench``: eager vs Inductor vs turbo at each r, for any model_zoo model.

In one process: FLOPs per configuration (``turbo_fx.explain``), compile seconds (first call
after ``torch._dynamo.reset()`` with an empty Inductor cache and the FX graph / AOT caches
off, minus the steady-state median), then steady-state latency from interleaved rounds
(every configuration once per round, rotating order), median / min / IQR. Definitions as in
``bench/timing.py``; bench/bench_vit.py is the longer benchmark behind the README table.
``--device cuda --dtype bf16|fp16|fp32`` runs it on a GPU, every call synchronised.
"""
from __future__ import annotations

import json
import os

import torch
from tabulate import tabulate

import turbo_fx
from turbo_fx.bench import timing
from turbo_fx.bench.stats import speedup_interval


def run(args, command: str) -> int:
    from turbo_fx.model_zoo.registry import build_model, list_models

    if args.list_models:
        print("\n".join(list_models()))
        return 0
    zoo = build_model(args.model)
    device, dtype = args.device, timing.DTYPES[args.dtype]
    model = zoo.model.to(device, dtype)
    inputs = on_device(zoo.example_inputs(args.batch), device, dtype)
    weights = "real weights" if zoo.real_weights else "RANDOM weights"
    mode = getattr(args, "mode", None)
    where = (f"{device} {args.dtype}" + (f" ({torch.cuda.get_device_name()})" if device == "cuda" else "")
             + (f", mode {mode}" if mode else ""))
    timing.log(f"machine: {timing.machine_line()}; {where}")
    timing.log(f"{args.model}: {zoo.description} ({weights}), batch {args.batch}, r {args.r}, options {args.options}")
    r_values = sorted(set(args.r))

    flops = {}
    for r in r_values:
        report = turbo_fx.explain(model, *inputs, **{**args.options, "r": r})
        flops[f"turbo r={r}"] = (report.flops_before, report.flops_after, report.fallbacks,
                                 report.graphs[-1].tokens_per_block if report.graphs else None)
    baseline_flops = flops[f"turbo r={r_values[0]}"][0]

    timing.no_compile_caches()
    timing.log(f"warming up the compilers (untimed): {timing.warm_up_compilers():.1f} s")
    names = ["inductor"] + [f"turbo r={r}" for r in r_values]

    def compiled(name):
        if name == "inductor":
            fn = torch.compile(model, mode=mode)
        else:
            options = {**args.options, "r": int(name.split("=")[1]), **({"mode": mode} if mode else {})}
            fn = torch.compile(model, backend="turbo", options=options)
        return timing.synchronised(fn, torch.device(device))

    first = {}
    for name in names:
        torch._dynamo.reset()
        with timing.fresh_cache():
            first[name] = timing.time_first_call(compiled(name), *inputs)
        timing.log(f"compile {name}: first call {first[name]:.1f} s")
    torch._dynamo.reset()
    fns = {"eager": timing.synchronised(model, torch.device(device))}
    with timing.fresh_cache():
        for name in names:
            fns[name] = compiled(name)
            with torch.no_grad():
                fns[name](*inputs)
        times = timing.interleaved(fns, inputs, args.rounds, args.warmup, progress=timing.log)
    torch._dynamo.reset()

    rows, payload = [], {}
    for name in ["eager"] + names:
        st = timing.stats(times[name])
        before, after, fallbacks, tokens = flops.get(name, (baseline_flops, baseline_flops, [], None))
        compile_s = first[name] - st["median"] if name in first else None
        interval = speedup_interval(times["inductor"], times[name])
        payload[name] = {"latency": st, "latency_s": times[name], "flops": after, "compile_s": compile_s,
                         "fallbacks": fallbacks, "tokens_per_block": tokens,
                         "samples_per_s": args.batch / st["median"], "speedup_vs_inductor": interval,
                         "flop_ideal_speedup": baseline_flops / after}
        rows.append([name, f"{compile_s:.1f}" if compile_s is not None else "-",
                     f"{compile_s / payload['inductor']['compile_s']:.2f}" if compile_s is not None else "-",
                     f"{st['median'] * 1e3:.1f}", f"{st['iqr'] * 1e3:.1f}", f"{args.batch / st['median']:.1f}",
                     f"{interval['speedup']:.2f}x [{interval['low']:.2f}, {interval['high']:.2f}]",
                     f"{baseline_flops / after:.2f}x", f"{after / 1e9:.2f}",
                     f"{tokens[0]}→{tokens[-1]}" if tokens else "-"])
    table = tabulate(rows, headers=["config", "compile s", "compile vs Inductor", "median ms", "IQR ms",
                                    "samples/s", "speed-up vs Inductor [95%]", "FLOP-ideal speed-up", "GFLOPs",
                                    "tokens per block"], tablefmt="github")
    text = "\n".join([f"# turbo-fx bench: {args.model} ({weights}), batch {args.batch}, {where}", "",
                      f"Machine: {timing.machine_line()}.", f"Command: `{command}`", "", table, "",
                      f"{args.rounds} interleaved rounds after {args.warmup} warm-up calls; compile s = first call "
                      "after a reset with an empty Inductor cache minus the median call; speed-up intervals "
                      "resample the rounds; FLOP-ideal speed-up = Inductor's FLOPs / the row's.", ""])
    print("\n" + text)
    stem = f"bench_{args.model.replace(':', '_').replace('/', '_')}"
    with open(os.path.join(args.out, stem + ".md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.out, stem + ".json"), "w") as f:
        json.dump({"command": command, "machine": timing.machine(), "model": args.model, "device": device,
                   "dtype": args.dtype, "mode": mode, "real_weights": zoo.real_weights, "batch": args.batch,
                   "configs": payload}, f, indent=1)
    _plot(payload, baseline_flops, os.path.join(args.out, stem + ".png"), args.model)
    timing.log(f"wrote {stem}.md, .json and .png in {args.out}")
    return 0


def on_device(inputs: tuple, device: str, dtype: torch.dtype) -> tuple:
    """The example inputs on ``device``; floating ones in ``dtype`` (token ids and masks keep theirs)."""
    return tuple(t.to(device, dtype) if t.is_floating_point() else t.to(device) for t in inputs)


def flop_ideal_ms(payload: dict, baseline_flops: float) -> dict[str, float]:
    """Per turbo configuration, the time it would take if time followed FLOPs: Inductor's
    median ms times the configuration's FLOP ratio. Turbo hands its graphs to Inductor by
    default, so this is what merging could give if it cost nothing but the FLOPs it leaves."""
    inductor_ms = payload["inductor"]["latency"]["median"] * 1e3
    return {name: inductor_ms * c["flops"] / baseline_flops for name, c in payload.items() if name.startswith("turbo")}


def speed_figure(payload: dict, baseline_flops: float, title: str):
    """Measured median ms against GFLOPs per configuration, and the FLOP-ideal times
    (``flop_ideal_ms``) as a dashed line through the same GFLOPs."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4.2), dpi=110)
    ax = fig.add_subplot(1, 1, 1)
    for name, c in payload.items():
        ax.scatter(c["flops"] / 1e9, c["latency"]["median"] * 1e3, label=name,
                   marker="D" if name.startswith("turbo") else "o")
    ideal = flop_ideal_ms(payload, baseline_flops)
    if ideal:
        names = sorted(ideal, key=lambda n: payload[n]["flops"])
        ax.plot([payload[n]["flops"] / 1e9 for n in names], [ideal[n] for n in names], color="gray",
                linestyle="--", marker="D", markerfacecolor="none", label="FLOP-ideal (Inductor ms x FLOP ratio)")
    ax.set_xlabel("GFLOPs per call")
    ax.set_ylabel("median ms per call")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def _plot(payload: dict, baseline_flops: float, path: str, title: str) -> None:
    speed_figure(payload, baseline_flops, title).savefig(path)
