"""What proportional attention's per-key bias costs one attention call, in each exact form.

After a merge every key k carries ``log(size[k])`` in the attention logits. turbo passes it to
``scaled_dot_product_attention`` as an additive ``[B, 1, 1, N]`` mask in the model's dtype,
which keeps some fused kernels and rules out others (on a GPU, FlashAttention takes no mask).
This measures one attention call at a model's shapes, compiled by Inductor, in every form that
computes the same thing:

- ``no bias``: plain SDPA, the floor (it computes *different* numbers: the cost of nothing);
- ``mask, model dtype``: what turbo emits today (the bias cast and broadcast in the graph);
- ``mask, float32``: the same bias kept in float32 (only when the model's dtype is lower);
- ``boolean mask``: padding only, no ``log(size)``: what ``prop_attn=False`` costs;
- ``flex score_mod``: FlexAttention adding ``bias[b, kv]`` in its score function.

    python -m turbo_fx.bench.attention_bias_cost --tokens 101 --heads 6 --head-dim 64 --batch 8
    python -m turbo_fx.bench.attention_bias_cost --device cuda --dtype bf16 --batch 256 --heads 12 --tokens 98

Every form is checked against a float64 eager reference (max |difference| in the table), then
timed in interleaved rounds in one process (medians; speed-ups over ``mask, model dtype``
with round-bootstrap 95% intervals). Some key sizes are 0 (padding), as after merging a
padded batch.
"""
from __future__ import annotations

import argparse
import math
import os
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from turbo_fx.bench import timing
from turbo_fx.bench.stats import speedup_interval
from turbo_fx.ops.attention_bias import MASKED_BELOW

REFERENCE_FORM = "mask, model dtype"


def attention_inputs(batch: int, heads: int, tokens: int, head_dim: int, dtype: torch.dtype, device: str,
                     seed: int = 0) -> dict:
    """q, k, v ``[B, H, N, D]`` and key sizes ``[B, N]``: merged sizes 1-8, the last key of
    every other sequence padding (size 0)."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, tokens, head_dim, generator=g).to(device, dtype) for _ in range(3))
    size = torch.randint(1, 9, (batch, tokens), generator=g).float()
    size[::2, -1] = 0.0
    return {"q": q, "k": k, "v": v, "size": size.to(device)}


def log_size_bias(size: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``log(size)`` per key, the dtype's lowest value for padding (size 0)."""
    return torch.where(size > 0, size.clamp_min(1.0).log(), torch.finfo(dtype).min).to(dtype)


def reference(q, k, v, size) -> torch.Tensor:
    """Proportional attention in float64, eager: the numbers every exact form must give."""
    q, k, v = (t.double() for t in (q, k, v))
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    logits = logits + log_size_bias(size.double(), torch.float64)[:, None, None, :]
    return torch.softmax(logits, dim=-1) @ v


def forms(dtype: torch.dtype) -> dict[str, Callable]:
    """name -> f(q, k, v, bias): ``bias`` is the float32 ``[B, N]`` key bias, a graph input, as
    a block's compiled piece receives it from the merge before it (on CPU, Inductor's
    FlexAttention template takes no score_mod buffer computed inside the same graph:
    "NoValidChoicesError", torch 2.13)."""
    from torch.nn.attention.flex_attention import flex_attention

    def no_bias(q, k, v, bias):
        return F.scaled_dot_product_attention(q, k, v)

    def mask_in(mask_dtype):
        def attend(q, k, v, bias):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(mask_dtype)[:, None, None, :])
        return attend

    def boolean_mask(q, k, v, bias):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=(bias > MASKED_BELOW)[:, None, None, :])

    def flex(q, k, v, bias):
        def score_mod(score, b, h, q_idx, kv_idx):
            return score + bias[b, kv_idx]

        return flex_attention(q, k, v, score_mod=score_mod)

    chosen = {"no bias": no_bias, REFERENCE_FORM: mask_in(dtype)}
    if dtype != torch.float32:
        chosen["mask, float32"] = mask_in(torch.float32)
    chosen.update({"boolean mask": boolean_mask, "flex score_mod": flex})
    return chosen


def measure(inputs: dict, dtype: torch.dtype, rounds: int, log: Callable[[str], None] = timing.log) -> list[dict]:
    expected = reference(**inputs)
    compiled, rows = {}, []
    args = (inputs["q"], inputs["k"], inputs["v"], log_size_bias(inputs["size"], torch.float32))
    for name, fn in forms(dtype).items():
        row = {"form": name}
        try:
            with timing.fresh_cache():
                fn_c = torch.compile(fn, fullgraph=True, dynamic=False)
                row["compile_s"] = timing.time_first_call(fn_c, *args)
            with torch.no_grad():
                out = fn_c(*args)
        except Exception as exc:  # a form this torch or device cannot compile is a result too
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            log(f"{name}: {row['error']}")
            rows.append(row)
            continue
        row["max_abs_diff_to_reference"] = (out.double() - expected).abs().max().item()
        compiled[name] = timing.synchronised(fn_c, inputs["q"].device)
        rows.append(row)
        log(f"{name}: compiled in {row['compile_s']:.1f} s, max |diff| to float64 {row['max_abs_diff_to_reference']:.1e}")
    times = timing.interleaved(compiled, args, rounds)
    for row in rows:
        if row["form"] not in times:
            continue
        row["latency"] = timing.stats(times[row["form"]])
        row["latency_s"] = times[row["form"]]
        if REFERENCE_FORM in times:
            row["vs_mask"] = speedup_interval(times[REFERENCE_FORM], times[row["form"]])
    return rows


def render(payload: dict) -> str:
    s = payload["shape"]
    lines = [f"# Proportional attention's bias: one attention call, {payload['device']} {payload['dtype']}", "",
             timing.machine_line(payload["machine"]) + (f"; {payload['gpu']}" if payload.get("gpu") else ""), "",
             f"Shape [B, H, N, D] = [{s['batch']}, {s['heads']}, {s['tokens']}, {s['head_dim']}], "
             f"{payload['rounds']} interleaved rounds, Inductor (fullgraph, static shapes).", "",
             f"| form | median us (IQR) | speed-up over '{REFERENCE_FORM}' [95%] | max abs diff to float64 | compile s |",
             "|---|---|---|---|---|"]
    for row in payload["rows"]:
        if "error" in row:
            lines.append(f"| {row['form']} | failed: {row['error']} | - | - | - |")
            continue
        lat, vs = row["latency"], row.get("vs_mask")
        ratio = f"{vs['speedup']:.2f} [{vs['low']:.2f}, {vs['high']:.2f}]" if vs else "-"
        lines.append(f"| {row['form']} | {lat['median'] * 1e6:.0f} ({lat['q1'] * 1e6:.0f}-{lat['q3'] * 1e6:.0f}) | "
                     f"{ratio} | {row['max_abs_diff_to_reference']:.1e} | {row['compile_s']:.1f} |")
    lines += ["", "'no bias' computes attention without proportional weighting: its difference to the "
              "reference is the size of what the bias changes, not an error."]
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--tokens", type=int, default=101, help="key/query count after merging (DeiT-S r=8, block 6: 101)")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="fp32", choices=sorted(timing.DTYPES))
    p.add_argument("--rounds", type=int, default=50)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--name", default=None, help="result file stem (default: from device, dtype and shape)")
    p.add_argument("--out", default=os.path.join("bench", "results", "attention_bias"))
    args = p.parse_args(argv)
    if min(args.batch, args.heads, args.tokens, args.head_dim, args.rounds) < 1:
        p.error("--batch, --heads, --tokens, --head-dim and --rounds must be >= 1")
    if timing.device_error(args.device):
        p.error(timing.device_error(args.device))
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = timing.DTYPES[args.dtype]
    inputs = attention_inputs(args.batch, args.heads, args.tokens, args.head_dim, dtype, args.device)
    payload = {"device": args.device, "dtype": args.dtype, "rounds": args.rounds, "machine": timing.machine(),
               "shape": {"batch": args.batch, "heads": args.heads, "tokens": args.tokens, "head_dim": args.head_dim},
               "rows": measure(inputs, dtype, args.rounds)}
    if args.device == "cuda":
        payload["gpu"] = torch.cuda.get_device_name()
    name = args.name or f"{args.device}_{args.dtype}_b{args.batch}_h{args.heads}_n{args.tokens}_d{args.head_dim}"
    timing.write_and_print(payload, args.out, name, render)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
