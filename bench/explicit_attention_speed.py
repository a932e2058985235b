"""Explicit-attention towers: what emitting their attention as SDPA buys turbo.

    .venv/bin/python -u -m turbo_fx.bench.explicit_attention_speed --threads 1 --out bench/results/vlm
    .venv/bin/python -u -m turbo_fx.bench.explicit_attention_speed --small --compiler eager --out build/x   # smoke

Models whose attention is written out as ``matmul -> softmax -> matmul`` (BLIP's vision tower;
every transformers model with ``attn_implementation="eager"``) get Inductor's fused attention
kernel by pattern matching. Turbo's key bias and CLS row used to break that match; with
``explicit_as_sdpa`` (the default) turbo emits those sites as SDPA itself. This benchmark puts
the two side by side in one process, on the BLIP-base vision tower (ViT-B/16 at 384 px, 577
tokens, RANDOM weights with ``initializer_range`` 0.02) and, with ``--model vit``, a
transformers ViT-B/16 at 224 px with eager attention.

Rows: ``inductor``; per r, ``turbo r=R`` (the default) and ``turbo r=R explicit``
(``explicit_as_sdpa=False``). Each compiles with ``dynamic=False`` and an empty Inductor cache;
compile s = first call minus the steady-state median. ``--rounds`` interleaved rounds (rotating
order) after one warm-up call each. Speed-ups are ratios of medians with 95% bootstrap intervals
that resample rounds (a round's configurations ran back to back): each row against Inductor, and
each default row against its explicit row. The fused-attention calls per forward are counted with
the profiler (CPU: ``_scaled_dot_product_flash_attention_for_cpu`` and its siblings).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from typing import Callable, Optional, Sequence

import torch
from tabulate import tabulate

from turbo_fx.bench import timing
from turbo_fx.bench.stats import speedup_interval
from turbo_fx.bench.vlm_speed import compile_cache, warm_up_once

MODELS = ("blip", "vit")


def build_tower(kind: str, small: bool = False, seed: int = 0) -> tuple[torch.nn.Module, torch.Tensor, str]:
    """(model, pixels, description) for a tower with explicit attention, random weights."""
    import transformers as tf

    torch.manual_seed(seed)
    size = dict(hidden_size=48, num_hidden_layers=3, num_attention_heads=3, intermediate_size=96) if small else {}
    if kind == "blip":
        image = 32 if small else 384
        config = tf.BlipVisionConfig(image_size=image, patch_size=4 if small else 16, initializer_range=0.02, **size)
        model = tf.BlipVisionModel(config)
    elif kind == "vit":
        image = 32 if small else 224
        model = tf.ViTModel(tf.ViTConfig(image_size=image, patch_size=4 if small else 16, **size), add_pooling_layer=False)
        model.set_attn_implementation("eager")
    else:
        raise ValueError(f"unknown model {kind!r}; choose from {MODELS}")
    c = model.config
    tokens = (image // c.patch_size) ** 2 + 1
    desc = (f"{'tiny ' if small else ''}{type(model).__name__} with explicit attention, {c.num_hidden_layers} blocks "
            f"x {c.hidden_size}, {image} px = {tokens} tokens, RANDOM weights (seed {seed})")
    return model.eval(), torch.randn(1, 3, image, image, generator=torch.Generator().manual_seed(seed + 1)), desc


def fused_attention_calls(fn: Callable, x: torch.Tensor) -> int:
    """Fused SDPA kernel calls in one forward (the profiler's ATen events)."""
    from torch.profiler import profile

    with torch.no_grad(), profile() as prof:
        fn(x)
    return sum(1 for e in prof.events() if e.name.startswith("aten::_scaled_dot_product_")
               and e.name.endswith(("attention", "attention_for_cpu")))


def run(kind: str, r_values: Sequence[int], batch: int = 2, rounds: int = 9, compiler: str = "inductor",
        small: bool = False, log: Callable[[str], None] = timing.log) -> dict:
    model, pixels, desc = build_tower(kind, small)
    x = pixels.expand(batch, -1, -1, -1).contiguous()
    log(f"{kind}: {desc}; batch {batch}")
    configs = {"inductor": None}
    for r in r_values:
        configs[f"turbo r={r}"] = {"r": r}
        configs[f"turbo r={r} explicit"] = {"r": r, "explicit_as_sdpa": False}
    if compiler == "inductor":
        timing.no_compile_caches()
        warm_up_once(log)
    cache_root = tempfile.mkdtemp(prefix="turbo-fx-explicit-")
    try:
        rows, calls = _compile_rows(model, x, configs, compiler, cache_root, log)
        times = timing.interleaved(calls, x, rounds, warmup=1, progress=log)
    finally:
        shutil.rmtree(cache_root, ignore_errors=True)
    for name, row in rows.items():
        st = timing.stats(times[name])
        row.update(latency=st, latency_s=times[name], compile_s=row["first_call_s"] - st["median"],
                   vs_inductor=speedup_interval(times["inductor"], times[name]))
        if name.startswith("turbo") and not name.endswith("explicit"):
            row["vs_explicit"] = speedup_interval(times[f"{name} explicit"], times[name])
    torch._dynamo.reset()
    return {"model": kind, "description": desc, "batch": batch, "rounds": rounds, "compiler": compiler,
            "torch_threads": torch.get_num_threads(), "configs": rows}


def _compile_rows(model, x, configs: dict, compiler: str, cache_root: str, log) -> tuple[dict, dict]:
    """Compile every configuration (first call timed, fused-attention calls counted): rows and calls."""
    from turbo_fx.report import recording

    rows, calls = {}, {}
    for name, options in configs.items():
        torch._dynamo.reset()
        if options is None:
            fn = torch.compile(model, backend="inductor" if compiler == "inductor" else "eager", dynamic=False)
        else:
            opts = dict(options, **({"inner_backend": "eager"} if compiler == "eager" else {}))
            fn = torch.compile(model, backend="turbo", options=opts, dynamic=False)
        with compile_cache(cache_root, compiler), recording() as rec, torch.no_grad():
            start = time.perf_counter()
            out = fn(pixel_values=x).last_hidden_state
            first = time.perf_counter() - start
        report = rec.graphs[0] if rec.graphs else None
        call = (lambda t, fn=fn: fn(pixel_values=t).last_hidden_state)
        rows[name] = {"first_call_s": first, "fused_attention_calls": fused_attention_calls(call, x),
                      "tokens_per_block": report.tokens_per_block if report else None,
                      "sdpa_sites": list(report.sdpa_sites) if report else [],
                      "fallback": report.fallback_reason if report else None, "output_shape": list(out.shape)}
        calls[name] = call
        log(f"first call {name}: {first:.1f} s; fused attention calls {rows[name]['fused_attention_calls']}")
    return rows, calls


def _interval(v: Optional[dict]) -> str:
    return "-" if v is None else f"{v['speedup']:.2f}x [{v['low']:.2f}, {v['high']:.2f}]"


def markdown(payload: dict) -> str:
    machine = payload["machine"]
    lines = ["# Explicit-attention towers: turbo with and without emitting SDPA", "",
             f"Machine: {timing.machine_line(machine)}.", f"Command: `{machine['command']}`", ""]
    if machine.get("note"):
        lines += [f"Note: {machine['note']}", ""]
    for run_ in payload["runs"]:
        lines += [f"## {run_['model']}", "", f"{run_['description']}; batch {run_['batch']}, {run_['rounds']} "
                  f"interleaved rounds, {run_['torch_threads']} torch thread(s), compiler {run_['compiler']}.", ""]
        head = ["config", "compile s", "median ms", "IQR ms", "vs Inductor [95%]", "vs explicit [95%]",
                "fused attention calls", "SDPA sites emitted", "tokens (first → last block)"]
        rows = []
        for name, e in run_["configs"].items():
            tpb = e["tokens_per_block"]
            rows.append([name, f"{e['compile_s']:.1f}", f"{e['latency']['median'] * 1e3:.0f}",
                         f"{e['latency']['iqr'] * 1e3:.0f}", _interval(e["vs_inductor"]), _interval(e.get("vs_explicit")),
                         e["fused_attention_calls"], len(e["sdpa_sites"]), f"{tpb[0]}→{tpb[-1]}" if tpb else "-"])
        lines += [tabulate(rows, headers=head, tablefmt="github"), ""]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m turbo_fx.bench.explicit_attention_speed",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--model", nargs="+", choices=MODELS, default=["blip"])
    p.add_argument("--r", nargs="+", type=int, default=[8, 16])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--compiler", choices=("inductor", "eager"), default="inductor")
    p.add_argument("--small", action="store_true", help="tiny configurations of the same classes (a smoke test)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--out", default=os.path.join("build", "explicit_attention"))
    p.add_argument("--note", default=None, help="a line for the result files")
    return p


def main(argv: Optional[Sequence[str]] = None, log: Callable[[str], None] = timing.log) -> dict:
    args = build_parser().parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.batch < 1 or args.rounds < 1 or any(r < 0 for r in args.r):
        raise SystemExit("--batch and --rounds must be >= 1 and every --r >= 0")
    machine = timing.machine()
    if args.note:
        machine["note"] = args.note
    runs = [run(kind, args.r, args.batch, args.rounds, args.compiler, args.small, log) for kind in args.model]
    payload = {"benchmark": "explicit_attention_speed", "machine": machine, "runs": runs}
    name = "explicit_attention_" + ("small" if args.small else "cpu")
    paths = timing.write_json_and_markdown(payload, args.out, name, markdown)
    print(markdown(payload))
    log(f"wrote {' and '.join(paths)}")
    return payload


if __name__ == "__main__":
    main()
    sys.exit(0)
