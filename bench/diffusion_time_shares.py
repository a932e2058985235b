"""Where an SD-1.5-sized UNet's eager CPU time goes, and the Amdahl bounds that gives merging.

    .venv/bin/python -u -m turbo_fx.bench.diffusion_time_shares --threads 1 --out bench/results/diffusion/sd15_time_shares_cpu.md
    .venv/bin/python -u -m turbo_fx.bench.diffusion_time_shares --small --repeats 1   # smoke, seconds

Builds the SD-1.5-sized UNet2DConditionModel (random weights) with bench/diffusion_speed.py's
``build_unet`` and its inputs (latents [2, 4, 64, 64], timestep 500, text [2, 77, 768]), runs it
eagerly (eval, no_grad) with forward pre/post hooks (time.perf_counter) on every
BasicTransformerBlock, its attn1 / attn2 / ff, and every Transformer2DModel, and reports the
median (over ``--repeats`` forwards after ``--warmup``) of the wall time each group takes, split
by the token count the block sees (64x64 latents: 4096 tokens at the top resolution, 1024 at the
second, 256 at the third, 64 in the mid block).

Then it times one attn1 / attn2 / ff module alone on [2, N, C] inputs with N the full token count
and N - int(N * r) (what a merge at ratio r leaves), which gives the per-component speed-up from
fewer tokens, and computes the Amdahl bound on the whole forward:
    bound = T / (T - sum_c t_c * (1 - 1 / s_c))
with T the whole forward, t_c the time of component c at the merged resolutions, s_c its
measured speed-up. The bound ignores the cost of merging and unmerging (similarity, argsort,
gather, scatter), so a real merge is slower than it.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from typing import Optional, Sequence

import torch

from turbo_fx.bench import timing

COMPONENTS = ("attn1", "attn2", "ff")


def _median_time(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


class HookTimer:
    """Accumulates, per (group, token count), the wall time spent inside the hooked modules."""

    def __init__(self) -> None:
        self.totals: dict = defaultdict(float)
        self.calls: dict = defaultdict(int)
        self._starts: dict = {}
        self.handles = []

    def hook(self, module: torch.nn.Module, group: str, tokens_of) -> None:
        def pre(mod, args, kwargs):
            self._starts[id(mod)] = (time.perf_counter(), tokens_of(args, kwargs))

        def post(mod, args, kwargs, output):
            start, tokens = self._starts.pop(id(mod))
            key = (group, tokens)
            self.totals[key] += time.perf_counter() - start
            self.calls[key] += 1

        self.handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        self.handles.append(module.register_forward_hook(post, with_kwargs=True))

    def reset(self) -> None:
        self.totals.clear()
        self.calls.clear()


def _seq_tokens(args, kwargs) -> int:
    x = args[0] if args else kwargs["hidden_states"]
    return int(x.shape[1])


def _grid_tokens(args, kwargs) -> int:
    x = args[0] if args else kwargs["hidden_states"]
    return int(x.shape[2] * x.shape[3])


def measure_shares(model, inputs, warmup: int, repeats: int) -> tuple[dict, float, list, dict]:
    """Median per-(group, tokens) seconds, median forward seconds, the raw forwards, calls per forward."""
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    timer = HookTimer()
    for module in model.modules():
        if isinstance(module, BasicTransformerBlock):
            timer.hook(module, "block", _seq_tokens)
            for name in COMPONENTS:
                timer.hook(getattr(module, name), name, _seq_tokens)
        elif isinstance(module, Transformer2DModel):
            timer.hook(module, "transformer2d", _grid_tokens)

    def call():
        with torch.no_grad():
            return model(*inputs, return_dict=False)[0]

    for _ in range(warmup):
        call()
    per_key = defaultdict(list)
    forwards = []
    calls = {}
    for _ in range(repeats):
        timer.reset()
        start = time.perf_counter()
        call()
        forwards.append(time.perf_counter() - start)
        for key, value in timer.totals.items():
            per_key[key].append(value)
        calls = dict(timer.calls)
    for h in timer.handles:
        h.remove()
    return {k: statistics.median(v) for k, v in per_key.items()}, statistics.median(forwards), forwards, calls


def first_blocks(model):
    """Hooks that fill {tokens: first BasicTransformerBlock that sees that many tokens} on the next forward."""
    from diffusers.models.attention import BasicTransformerBlock

    seen = {}

    def grab(mod, args, kwargs):
        seen.setdefault(_seq_tokens(args, kwargs), mod)

    handles = [m.register_forward_pre_hook(grab, with_kwargs=True)
               for m in model.modules() if isinstance(m, BasicTransformerBlock)]
    return handles, seen


def component_speedups(blocks: dict, text: torch.Tensor, token_counts: Sequence[int], ratios: Sequence[float],
                       repeats: int) -> dict:
    """{(component, N, ratio): (t_full, t_merged, speed-up)} for one block per token count."""
    out = {}
    gen = torch.Generator().manual_seed(123)
    for n in token_counts:
        block = blocks[n]
        channels = block.attn1.to_q.in_features
        for comp in COMPONENTS:
            module = getattr(block, comp)

            def run(m, module=module, comp=comp):
                x = torch.randn(2, m, channels, generator=gen)
                kwargs = {"encoder_hidden_states": text} if comp == "attn2" else {}

                def call():
                    with torch.no_grad():
                        return module(x, **kwargs)
                return call

            t_full = _median_time(run(n), repeats)
            for r in ratios:
                m = n - int(n * r)
                t_merged = _median_time(run(m), repeats)
                out[(comp, n, r)] = (t_full, t_merged, t_full / t_merged)
    return out


def amdahl(total: float, parts: Sequence[tuple[float, float]]) -> float:
    """Whole-run speed-up when parts (time, speed-up) get faster and the rest does not."""
    return total / (total - sum(t * (1 - 1 / s) for t, s in parts))


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--warmup", type=int, default=1, help="untimed forwards first")
    p.add_argument("--repeats", type=int, default=3, help="timed forwards (median)")
    p.add_argument("--micro-repeats", type=int, default=5, help="timed calls per single-module measurement")
    p.add_argument("--ratios", nargs="+", type=float, default=[0.3, 0.5, 0.6])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--small", action="store_true", help="diffusion_speed's tiny UNet of the same class (a smoke test)")
    p.add_argument("--out", default=None, help="markdown file to write (default: print only)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> str:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    from turbo_fx.bench.diffusion_speed import build_unet
    import diffusers

    uptime_before = _uptime()
    case = build_unet(small=args.small, seed=args.seed)
    model, inputs = case.model.eval(), case.inputs
    text = case.cond

    handles, blocks = first_blocks(model)
    with torch.no_grad():
        model(*inputs, return_dict=False)
    for h in handles:
        h.remove()
    token_counts = sorted(blocks, reverse=True)  # 4096, 1024, 256, 64
    print(f"transformer-block token counts: {token_counts}", flush=True)

    t0 = time.perf_counter()
    shares, total, forwards, calls = measure_shares(model, inputs, args.warmup, args.repeats)
    print(f"forwards (s): {[round(f, 2) for f in forwards]}; took {time.perf_counter() - t0:.0f} s", flush=True)
    for key in sorted(shares, key=lambda k: (k[0], -k[1])):
        print(f"  {key}: {shares[key]:.3f} s ({calls.get(key)} calls)", flush=True)

    t0 = time.perf_counter()
    speed = component_speedups(blocks, text, token_counts[:2], args.ratios, args.micro_repeats)
    print(f"single-module timings took {time.perf_counter() - t0:.0f} s", flush=True)
    for key, (a, b, s) in speed.items():
        print(f"  {key}: {a * 1e3:.1f} ms -> {b * 1e3:.1f} ms = {s:.2f}x", flush=True)
    uptime_after = _uptime()

    top, second = token_counts[0], token_counts[1]

    def t(group, n):
        return shares.get((group, n), 0.0)

    def pct(x):
        return f"{100 * x / total:.1f}%"

    title = "Tiny UNet (smoke test)" if args.small else "SD-1.5-sized UNet"
    lines = [f"# {title}: eager CPU time shares and Amdahl bounds for token merging", ""]
    lines += [f"Machine: {timing.cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch thread(s); "
              f"`uptime` before: `{uptime_before}`; after: `{uptime_after}`.",
              f"torch {torch.__version__}, diffusers {diffusers.__version__}, Python {platform.python_version()}.",
              f"Model: {case.description}; eval, no_grad, eager.",
              f"Command: `python -u -m turbo_fx.bench.diffusion_time_shares "
              f"{' '.join(list(argv if argv is not None else sys.argv[1:]))}`.", "",
              f"Method: forward pre/post hooks (time.perf_counter) on every BasicTransformerBlock, its attn1/attn2/ff, "
              f"and every Transformer2DModel; median over {args.repeats} forwards after {args.warmup} warm-up "
              f"(forwards: {', '.join(f'{f:.2f}' for f in forwards)} s). Times are eager; Inductor fuses the "
              f"pointwise work around these modules, so its shares can differ.", "",
              "## Where the time goes", "",
              "| part | tokens | modules per forward | median s | share of forward |",
              "|---|---|---|---|---|"]
    names = {"attn1": "(a/b/c) attn1 (self-attention)", "attn2": "attn2 (cross-attention)", "ff": "ff (GEGLU MLP)",
             "block": "BasicTransformerBlock (all of it)", "transformer2d": "Transformer2DModel (block + norm, proj_in/out)"}
    for n in token_counts:
        for group in ("attn1", "attn2", "ff", "block", "transformer2d"):
            if (group, n) in shares:
                label = names[group].replace("(a/b/c) ", "")
                lines.append(f"| {label} | {n} | {calls.get((group, n), '-')} | {t(group, n):.3f} | {pct(t(group, n))} |")
    all_blocks = sum(v for (g, _), v in shares.items() if g == "block")
    all_t2d = sum(v for (g, _), v in shares.items() if g == "transformer2d")
    lines += [f"| (e) all BasicTransformerBlocks | all | {sum(c for (g, _), c in calls.items() if g == 'block')} | "
              f"{all_blocks:.3f} | {pct(all_blocks)} |",
              f"| all Transformer2DModels | all | {sum(c for (g, _), c in calls.items() if g == 'transformer2d')} | "
              f"{all_t2d:.3f} | {pct(all_t2d)} |",
              f"| (f) whole forward | - | 1 | {total:.3f} | 100% |", ""]
    lines += [f"Summary at the top resolution ({top} tokens): "
              f"(a) attn1 {pct(t('attn1', top))}, (b) attn2 {pct(t('attn2', top))}, (c) ff {pct(t('ff', top))}, "
              f"(d) all blocks {pct(t('block', top))}; (e) blocks at every resolution {pct(all_blocks)}.", ""]

    lines += ["## One module alone, full vs merged token count", "",
              f"One block's module called directly on a random [2, N, C] input (attn2 with the [2, 77, 768] text "
              f"states), median of {args.micro_repeats} calls after 1 warm-up; merged N' = N - int(N * r).", "",
              "| component | N | C | ratio | N' | ms at N | ms at N' | speed-up |", "|---|---|---|---|---|---|---|---|"]
    for (comp, n, r), (a, b, s) in speed.items():
        ch = blocks[n].attn1.to_q.in_features
        lines.append(f"| {comp} | {n} | {ch} | {r:g} | {n - int(n * r)} | {a * 1e3:.1f} | {b * 1e3:.1f} | {s:.2f}x |")
    lines.append("")

    lines += ["## Amdahl bounds on the whole-UNet eager speed-up", "",
              "bound = T / (T - sum t_c (1 - 1/s_c)): t_c the hooked time of each merged component at the merged "
              "resolution(s), s_c its measured single-module speed-up at that ratio and token count. Merge/unmerge "
              "cost is not counted, so these are upper bounds. 'Component removed' is the limit s_c -> infinity. "
              "The issue's target is >= 1.6x over Inductor at ratio 0.5.", "",
              "| merged | ratio | bound (measured s_c) | bound (component removed) |", "|---|---|---|---|"]
    scenarios = [(f"attn1 at {top} tokens (default: self-attention, max_downsample=1)", ("attn1",), (top,)),
                 (f"attn1 + attn2 + ff at {top} tokens (max_downsample=1)", COMPONENTS, (top,)),
                 (f"attn1 + attn2 + ff at {top} and {second} tokens (max_downsample=2)", COMPONENTS, (top, second))]
    for label, comps, ns in scenarios:
        for r in args.ratios:
            parts = [(t(c, n), speed[(c, n, r)][2]) for c in comps for n in ns]
            removed = total / (total - sum(p for p, _ in parts))
            lines.append(f"| {label} | {r:g} | {amdahl(total, parts):.3f}x | {removed:.3f}x |")
    lines += ["", f"Whole transformer blocks removed entirely (upper limit for any merge inside them): at {top} tokens "
              f"{total / (total - t('block', top)):.3f}x; at {top} + {second} tokens "
              f"{total / (total - t('block', top) - t('block', second)):.3f}x; at every resolution "
              f"{total / (total - all_blocks):.3f}x.", ""]
    text_md = "\n".join(lines)
    print(text_md, flush=True)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text_md)
        print(f"wrote {args.out}", flush=True)
    return text_md


if __name__ == "__main__":
    main()
