"""``turbo-fx bench``: eager, Inductor and turbo at each r on any model_zoo model; ``make bench``
runs it on DeiT-S and ViT-B (random weights, CPU) into bench/results/bench_vit.*.

For each model, in one process:

1. FLOPs: ``turbo_fx.explain`` at every r (FlopCounterMode on the Dynamo graph before and after
   the rewrite), and FlopCounterMode on the eager model as a cross-check of the baseline.
2. Compile seconds (``bench/timing.py``'s definition): one untimed Inductor compile of the model,
   then every configuration compiled after ``torch._dynamo.reset()`` in an empty Inductor cache,
   ``--compile-repeats`` passes in a rotating order, median.
3. Steady state: every configuration compiled once more (all kept alive), ``--warmup`` untimed
   calls each, then ``--rounds`` interleaved rounds; median, min and IQR per configuration.

``--device cuda --dtype bf16|fp16|fp32`` runs it on a GPU, every call synchronised; ``--mode``
compiles Inductor and every turbo row in that Inductor mode. The targets below are printed as
PASS or MISS, never tuned for.
"""
from __future__ import annotations

import os
import time

import torch

import turbo_fx
from turbo_fx.bench import output, timing
from turbo_fx.bench.stats import speedup_interval

TARGET_FLOP_EFFICIENCY = 0.95  # at r=13
TARGET_R0_OVERHEAD = 0.03  # turbo r=0 median <= 1.03 x Inductor median
TARGET_COMPILE_RATIO = 1.3  # turbo compile seconds <= 1.3 x Inductor's, at every r

DEFINITIONS = {
    "compile_s": "wall time of the first call of a freshly wrapped torch.compile model after "
                 "torch._dynamo.reset(), with an empty Inductor cache dir and the FX graph and AOT "
                 "autograd caches off, minus the configuration's median steady-state latency; "
                 "median over --compile-repeats passes; a tiny untimed compile warms the process and "
                 "an untimed Inductor compile of the model precedes the timed ones",
    "latency": "seconds per forward call (no_grad), after --warmup untimed calls, --rounds "
               "interleaved rounds in a rotating order; median, min, IQR",
    "speedup": "Inductor median latency / configuration median latency",
    "speedup_interval": "95% percentile-bootstrap interval of the speed-up, resampling the interleaved "
                        "rounds (both configurations' times of a round stay paired); the FLOP efficiency's "
                        "interval is that interval times the FLOP ratio",
    "flop_ratio": "configuration FLOPs / baseline FLOPs (turbo_fx.explain: torch.utils.flop_counter on "
                  "the Dynamo graph after vs before the rewrite: matmuls, convolutions, SDPA (CPU "
                  "formula from turbo_fx/flops.py) and turbo's merge op (its similarity matrix and CLS "
                  "row); elementwise ops count zero); FLOP-ideal speed-up = 1 / FLOP ratio",
    "flop_efficiency": "speedup * flop_ratio: the fraction of the FLOP-ideal speed-up that was realised "
                       "(1.0: time fell exactly as much as FLOPs did)",
}


def check(args) -> None:
    from turbo_fx.bench.cli import UsageError

    others = [m for m in args.model if not m.startswith("timm:")]
    if args.image_size and others:
        raise UsageError(f"--image-size applies to timm models only, not {others}")


def run(args) -> dict:
    if args.list_models:
        from turbo_fx.model_zoo.registry import list_models

        print("\n".join(list_models()))
        return {}
    info = timing.machine()
    timing.log(f"machine: {timing.machine_line(info)}")
    settings = {"models": args.model, "r": sorted(set(args.r)), "batch": args.batch,
                "image_size": args.image_size, "rounds": args.rounds,
                "warmup": args.warmup, "compile_repeats": args.compile_repeats, "device": args.device,
                "dtype": args.dtype, "mode": args.mode, "options": args.options}
    timing.log(f"settings: {settings}")
    timing.no_compile_caches()
    timing.log(f"warming up the compilers (tiny ViT, untimed): {timing.warm_up_compilers():.1f} s")
    start = time.perf_counter()
    results = [measure(name, settings) for name in args.model]
    payload = {"machine": info, "command": args.command, "settings": settings, "definitions": DEFINITIONS,
               "seconds_total": time.perf_counter() - start, "results": results}
    stem = args.name or "bench_" + "_".join(output.file_stem(m) for m in args.model)
    output.write(payload, args.out, stem, markdown)
    write_figures(payload, os.path.join(args.out, stem))
    return payload


def write_figures(payload: dict, stem: str) -> None:
    """``<stem>.png`` (one model) or ``<stem>_<model>.png`` (each of several): ms against GFLOPs."""
    for res in payload["results"]:
        suffix = "" if len(payload["results"]) == 1 else "_" + output.file_stem(res["model"])
        speed_figure(res["configs"], res["model"]).savefig(stem + suffix + ".png")


def configurations(settings: dict) -> list[str]:
    return ["inductor"] + [f"turbo r={r}" for r in settings["r"]]


def measure(model_name: str, settings: dict) -> dict:
    """Every figure of one model (see the module docstring)."""
    size = settings.get("image_size")
    zoo, inputs = timing.load_model(model_name, settings["batch"], settings["device"], settings["dtype"],
                                    **({"img_size": size} if size else {}))
    model, device, mode = zoo.model, torch.device(settings["device"]), settings["mode"]
    timing.log(f"== {model_name}: {zoo.description}, batch {settings['batch']}")
    names = configurations(settings)
    result = {"model": model_name, "weights": "real" if zoo.real_weights else "random", "batch": settings["batch"],
              "input_shapes": [list(t.shape) for t in inputs], "configs": {name: {} for name in ["eager"] + names}}
    cfg = result["configs"]

    def compiled(name):
        if name == "inductor":
            fn = torch.compile(model, mode=mode)
        else:
            options = {**settings["options"], "r": int(name.split("=")[1]), **({"mode": mode} if mode else {})}
            fn = torch.compile(model, backend="turbo", options=options)
        return timing.synchronised(fn, device)

    def first_call(name):
        fn = compiled(name)
        with turbo_fx.recording(count_flops=False) as rec:
            seconds = timing.time_first_call(fn, *inputs)
        for g in rec.graphs:
            if g.fallback_reason:
                timing.log(f"  WARNING {name}: graph compiled without merging: {g.fallback_reason}")
        return fn, seconds, sum(g.rewrite_seconds for g in rec.graphs)

    # 1. FLOPs (explain resets Dynamo, so it runs before anything compiled must stay alive).
    result["eager_flops"] = timing.count_flops(model, *inputs)
    for r in settings["r"]:
        report = turbo_fx.explain(model, *inputs, **{**settings["options"], "r": r})
        graph = report.graphs[-1] if report.graphs else None
        cfg[f"turbo r={r}"].update(flops=report.flops_after, flops_baseline=report.flops_before,
                                   fallbacks=report.fallbacks, tokens_per_block=graph.tokens_per_block if graph else None)
        timing.log(f"  explain r={r}: {report.flops_before / 1e9:.2f} -> {report.flops_after / 1e9:.2f} GFLOPs, "
                   f"fallbacks: {report.fallbacks or 'none'}")
    baseline = result["baseline_flops"] = cfg[names[1]]["flops_baseline"]
    if baseline != result["eager_flops"]:
        timing.log(f"  note: explain's baseline {baseline} FLOPs != eager FlopCounterMode {result['eager_flops']}")
    cfg["eager"]["flops"] = cfg["inductor"]["flops"] = baseline

    # 2. Compile seconds: a reset and an empty cache before every compile, after one untimed
    # Inductor compile of the model (the process's first big compile may run slower).
    torch._dynamo.reset()
    with timing.fresh_cache():
        result["untimed_warmup_compile_s"] = timing.time_first_call(compiled("inductor"), *inputs)
    for name in names:
        cfg[name].update(first_call_reset_s=[], rewrite_reset_s=[])
    for rep in range(settings["compile_repeats"]):
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            torch._dynamo.reset()
            with timing.fresh_cache():
                _, seconds, rewrite = first_call(name)
            cfg[name]["first_call_reset_s"].append(seconds)
            cfg[name]["rewrite_reset_s"].append(rewrite)
            timing.log(f"  compile {name} (pass {rep + 1}): first call {seconds:.1f} s (turbo rewrite {rewrite:.1f} s)")
    torch._dynamo.reset()

    # 3. Steady state: everything compiled again (kept alive together), then interleaved rounds.
    fns = {"eager": timing.synchronised(model, device)}
    with timing.fresh_cache():
        for name in names:
            fns[name], cfg[name]["first_call_shared_s"], _ = first_call(name)
        with torch.no_grad():
            logits = {name: fn(*inputs) for name, fn in fns.items()}
        for name in fns:
            cfg[name]["max_abs_diff_vs_eager"] = timing.max_abs_diff(logits[name], logits["eager"])
            cfg[name]["max_abs_diff_vs_inductor"] = timing.max_abs_diff(logits[name], logits["inductor"])
        graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        result["load_average_before_timing"] = os.getloadavg()
        times = timing.interleaved(fns, inputs, settings["rounds"], settings["warmup"],
                                   progress=lambda line: timing.log("  " + line))
        result["recompiles_while_timing"] = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs_before
        result["load_average_after_timing"] = os.getloadavg()
    del fns
    torch._dynamo.reset()
    for name, samples in times.items():
        cfg[name]["latency_s"] = samples
    derive(result)
    return result


def derive(result: dict) -> None:
    """Every figure derived from the raw timings and FLOPs of one model: latency statistics,
    speed-ups with their intervals, FLOP ratio and efficiency, compile seconds, the targets."""
    cfg = result["configs"]
    inductor = cfg["inductor"]["latency_s"]
    for name, c in cfg.items():
        c["latency"] = timing.stats(c["latency_s"])
        interval = speedup_interval(inductor, c["latency_s"])
        c["speedup"], c["speedup_interval"] = interval["speedup"], [interval["low"], interval["high"]]
        c["samples_per_s"] = result["batch"] / c["latency"]["median"]
        c["flop_ratio"] = c["flops"] / result["baseline_flops"]
        c["flop_efficiency"] = c["speedup"] * c["flop_ratio"]
        c["flop_efficiency_interval"] = [v * c["flop_ratio"] for v in c["speedup_interval"]]
        if "first_call_reset_s" in c:
            c["compile_s"] = timing.stats(c["first_call_reset_s"])["median"] - c["latency"]["median"]
            c["rewrite_s"] = timing.stats(c["rewrite_reset_s"])["median"] if name != "inductor" else None
    targets = result["targets"] = []
    if "turbo r=13" in cfg:
        eff = cfg["turbo r=13"]["flop_efficiency"]
        targets.append({"target": "FLOP efficiency at r=13", "value": eff,
                        "interval": cfg["turbo r=13"]["flop_efficiency_interval"],
                        "threshold": f">= {TARGET_FLOP_EFFICIENCY}", "pass": eff >= TARGET_FLOP_EFFICIENCY})
    if "turbo r=0" in cfg:
        ratio = cfg["turbo r=0"]["latency"]["median"] / cfg["inductor"]["latency"]["median"]
        targets.append({"target": "turbo r=0 median / Inductor median", "value": ratio,
                        "threshold": f"<= {1 + TARGET_R0_OVERHEAD:.2f}", "pass": ratio <= 1 + TARGET_R0_OVERHEAD})
    for name in (n for n in cfg if n.startswith("turbo")):
        ratio = cfg[name]["compile_s"] / cfg["inductor"]["compile_s"]
        targets.append({"target": f"compile seconds {name} / Inductor", "value": ratio,
                        "threshold": f"<= {TARGET_COMPILE_RATIO}", "pass": ratio <= TARGET_COMPILE_RATIO})


def render(path: str) -> str:
    """Rebuild a saved run's derived figures, tables and plots (the JSON, .md and .png beside it)
    from its raw timings; nothing is measured. Returns the tables."""
    payload = output.load_json(path)
    for res in payload["results"]:
        derive(res)
    text = markdown(payload)
    output.save_json(payload, path)
    stem = path.removesuffix(".gz").removesuffix(".json")
    with open(stem + ".md", "w") as f:
        f.write(text)
    write_figures(payload, stem)
    return text


def markdown(payload: dict) -> str:
    s = payload["settings"]
    where = f"{s['device']} {s['dtype']}" + (f", mode {s['mode']}" if s.get("mode") else "")
    out = output.header(f"turbo vs Inductor: batch {s['batch']}, {where}", payload)
    head = ["config", "compile s", "compile vs Inductor", "of which rewrite s", "median ms", "min ms", "IQR ms",
            "samples/s", "speed-up vs Inductor", "95% interval", "GFLOPs", "FLOP ratio", "FLOP efficiency",
            "tokens per block", "max abs diff vs eager"]
    for res in payload["results"]:
        cfg = res["configs"]
        rows = []
        for name, c in cfg.items():
            lat, compile_s = c["latency"], c.get("compile_s")
            rows.append([name, output.f(compile_s, ".1f"),
                         output.f(compile_s and compile_s / cfg["inductor"]["compile_s"], ".2f"),
                         output.f(c.get("rewrite_s"), ".2f"), f"{lat['median'] * 1e3:.1f}",
                         f"{lat['min'] * 1e3:.1f}", f"{lat['iqr'] * 1e3:.1f}", f"{c['samples_per_s']:.1f}",
                         f"{c['speedup']:.3f}", fmt_interval(c["speedup_interval"]) if name != "inductor" else "-",
                         f"{c['flops'] / 1e9:.2f}", f"{c['flop_ratio']:.3f}",
                         f"{c['flop_efficiency']:.3f}" if name.startswith("turbo") else "-",
                         output.tokens(c.get("tokens_per_block")), f"{c['max_abs_diff_vs_eager']:.2e}"])
        shapes = "; inputs " + ", ".join(str(shape) for shape in res["input_shapes"]) if res.get("input_shapes") else ""
        out += [f"## {res['model']} ({res['weights']} weights{shapes})", "", output.table(head, rows), "",
                f"Latency: {s['rounds']} interleaved rounds after {s['warmup']} warm-up call(s), batch "
                f"{res['batch']}; load average before/after timing: {fmt_load(res['load_average_before_timing'])} / "
                f"{fmt_load(res['load_average_after_timing'])}. Compile s: {DEFINITIONS['compile_s']}. Speed-up: "
                f"{DEFINITIONS['speedup']}. FLOP ratio: {DEFINITIONS['flop_ratio']}. FLOP efficiency: "
                f"{DEFINITIONS['flop_efficiency']}.", ""]
        trows = [[t["target"], f"{t['value']:.3f}", fmt_interval(t["interval"]) if t.get("interval") else "-",
                  t["threshold"], "PASS" if t["pass"] else "MISS"] for t in res["targets"]]
        out += [output.table(["target", "value", "95% interval", "threshold", "result"], trows), "",
                f"Intervals: {DEFINITIONS['speedup_interval']}. A result is PASS or MISS by its value; "
                "where the interval straddles the threshold, this run cannot tell which.", ""]
    return "\n".join(out)


def fmt_interval(interval) -> str:
    return f"[{interval[0]:.3f}, {interval[1]:.3f}]"


def fmt_load(load) -> str:
    return "/".join(f"{v:.2f}" for v in load)


def flop_ideal_ms(configs: dict) -> dict[str, float]:
    """Per turbo configuration, the time it would take if time followed FLOPs: Inductor's median
    ms times the configuration's FLOP ratio (what merging could give if it cost nothing but the
    FLOPs it leaves)."""
    inductor_ms = configs["inductor"]["latency"]["median"] * 1e3
    baseline = configs["inductor"]["flops"]
    return {name: inductor_ms * c["flops"] / baseline for name, c in configs.items() if name.startswith("turbo")}


def speed_figure(configs: dict, title: str):
    """Measured median ms against GFLOPs per configuration, and the FLOP-ideal times
    (``flop_ideal_ms``) as a dashed line through the same GFLOPs."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4.2), dpi=110)
    ax = fig.add_subplot(1, 1, 1)
    for name, c in configs.items():
        ax.scatter(c["flops"] / 1e9, c["latency"]["median"] * 1e3, label=name,
                   marker="D" if name.startswith("turbo") else "o")
    ideal = flop_ideal_ms(configs)
    if ideal:
        names = sorted(ideal, key=lambda n: configs[n]["flops"])
        ax.plot([configs[n]["flops"] / 1e9 for n in names], [ideal[n] for n in names], color="gray",
                linestyle="--", marker="D", markerfacecolor="none", label="FLOP-ideal (Inductor ms x FLOP ratio)")
    ax.set_xlabel("GFLOPs per call")
    ax.set_ylabel("median ms per call")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    return fig
