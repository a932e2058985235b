"""Vision-language models at real sizes: CLIP image-text scoring and BLIP captioning with generate().

    .venv/bin/python -u -m turbo_fx.bench.vlm_speed --threads 1 --out bench/results/vlm
    .venv/bin/python -u -m turbo_fx.bench.vlm_speed --small --compiler eager --out build/vlm   # smoke, seconds
    .venv/bin/python -u -m turbo_fx.bench.vlm_speed --part blip --blip-batch 1 8 --r 13

Every model has RANDOM weights (seeded; no CLIP or BLIP weights install offline): the times and
FLOPs are those of the real architectures, the captions mean nothing.

(a) ``clip``: a whole transformers ``CLIPModel`` with its default configuration but a ViT-B/16
    image tower at 224 px (197 tokens, 12 blocks, 768 wide) and the default text tower (12 blocks,
    512 wide, causal). Inputs: ``pixel_values`` [B, 3, 224, 224] and ``input_ids`` [B, L] (B
    captions: BOS, random ids, EOS); the forward returns ``logits_per_image`` [B, B]. Rows:
    ``eager``, ``inductor`` (``torch.compile(model)``) and ``turbo r=R``
    (``torch.compile(model, backend="turbo", options={"r": R})``, Inductor inside), all with
    ``dynamic=False``. Turbo compiles both towers as one graph: the image sequence merges, the text
    sequence (causal attention) must stay untouched, and the table says whether it did.
(b) ``blip``: ``BlipForConditionalGeneration`` with the default ``BlipConfig`` (ViT-B/16 at 384 px,
    577 tokens; a BERT-base decoder with cross-attention), except the vision tower's
    ``initializer_range`` (0.02 instead of 1e-10, which makes every random image token the same).
    Timed: ``model.generate(pixel_values=..., max_new_tokens=T, min_new_tokens=T, do_sample=False,
    num_beams=1)``, greedy and exactly T new tokens (``min_new_tokens`` holds EOS back), so every row
    does the same decoding work. ``generate`` runs ``model.vision_model`` once and the decoder once
    per token, so compiling means compiling the two parts:
    - the vision tower: ``model.vision_model = torch.compile(model.vision_model, ..., dynamic=False)``
      with Inductor (row ``inductor``) or turbo (``turbo r=R``). Turbo restores the output to 577
      tokens (``restore_outputs=True``), so the decoder's cross-attention over the copies is
      proportional attention over the merged tokens (tests/core/test_vlm_generate.py);
    - the decoder: ``model.text_decoder.forward = torch.compile(model.text_decoder.forward)``
      (wrapping the module compiles nothing: ``generate`` calls the original module). One compiled
      decoder serves every compiled row (their decoders are the same module and read the same
      [B, 577, 768] states), so it is compiled once per batch size and its compile seconds are its
      own row, ``eager vision + compiled decoder``. With the default DynamicCache it compiles three
      graphs per batch size (step 1; step 2, when the cache has become an EncoderDecoderCache; step 3,
      when the self-attention cache length turns symbolic) and none after, which the table's
      ``decoder graphs`` column shows.
    Rows: ``eager``, ``eager vision + compiled decoder``, ``inductor``, ``turbo r=R``. Each batch
    size (``--blip-batch``, default 1) compiles every vision tower and the decoder again. The vision
    towers are also timed alone (called with generate's keywords, so no guard differs), which is
    the part turbo changes: at 577 tokens r=16 removes 18% of the tower's FLOPs.

Measurements, in one process, per model (and per batch size for BLIP):
1. FLOPs: ``FlopCounterMode`` on eager calls (with turbo_fx.flops' CPU SDPA formula) for the
   unmerged model; ``turbo_fx.explain`` (the rewritten graph counted) for turbo. CLIP: the whole
   forward. BLIP: the vision tower, and per caption (vision + the decoder's generate work, counted
   on the eager model at batch 1; merging leaves the decoder's FLOPs unchanged).
2. Compile seconds (bench/timing.py's definition): the first call of a freshly compiled model
   with an empty ``TORCHINDUCTOR_CACHE_DIR`` (FX-graph and AOT caches off) minus its
   steady-state median. For BLIP's vision rows the decoder is already compiled at that point.
3. Steady state: ``--rounds`` interleaved rounds (every configuration once per round, rotating
   order) after ``--warmup`` calls each; median and IQR; speed-up = Inductor's median / the row's,
   with a 95% percentile-bootstrap interval over the rounds (rounds resampled together, since a
   round's configurations ran back to back; with few rounds the interval is coarse).
4. Closeness to eager: CLIP, relative L2 and cosine of ``logits_per_image``; BLIP, the share of
   generated tokens equal to the eager model's and the number of identical captions.

Default run (``--threads 1``, both parts, CLIP batch 4, BLIP batch 1, r = 8, 13, 16): about 15
minutes on the project's 2 shared cores with other jobs on them (load average 2-3.5, 2026-12-02:
the CLIP part took 7 min, the BLIP batch-1 part 7.5 min with an extra r=32 row). Compiling takes
most of it: 55-75 s per CLIP configuration, 15-55 s per BLIP vision tower, 60 s for the decoder's
three graphs (110 s at batch 4, where they compile again); ``--part``, ``--r`` and ``--rounds``
shorten it, ``--small`` is a smoke run (under a minute).

Writes ``<out>/clip_speed_cpu.{md,json}`` and ``<out>/blip_generate_cpu.{md,json}``
(``_small`` instead of ``_cpu`` with ``--small``).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from tabulate import tabulate

from turbo_fx.bench import timing
from turbo_fx.bench.stats import speedup_interval
from turbo_fx.bench.diffusion_speed import GraphCounter, closeness, fresh_copy

DEFAULT_R = (8, 13, 16)
PARTS = ("clip", "blip")

# Tiny configurations of the same classes for --small (tests, smoke runs).
_TINY = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=3, intermediate_size=96)
SMALL_CLIP = dict(
    vision_config=dict(_TINY, image_size=32, patch_size=4),
    text_config=dict(_TINY, vocab_size=100, max_position_embeddings=32, bos_token_id=1, eos_token_id=2,
                     pad_token_id=0),
    projection_dim=16,
)
CLIP_B16 = dict(vision_config=dict(image_size=224, patch_size=16))  # the rest: CLIPConfig's defaults
SMALL_BLIP = dict(
    vision_config=dict(_TINY, image_size=32, patch_size=4, initializer_range=0.02),
    text_config=dict(_TINY, vocab_size=100, max_position_embeddings=64, encoder_hidden_size=48,
                     initializer_range=0.02, bos_token_id=1, eos_token_id=2, sep_token_id=3, pad_token_id=0),
    projection_dim=16,
)
BLIP_BASE = dict(vision_config=dict(initializer_range=0.02))  # the rest: BlipConfig's defaults


# --------------------------------------------------------------------------- models and inputs
@dataclass
class ClipCase:
    name: str
    description: str
    model: torch.nn.Module
    inputs: dict  # keyword inputs of one forward


@dataclass
class BlipCase:
    name: str
    description: str
    model: torch.nn.Module
    image_size: int
    vision_blocks: int
    seed: int = 0

    def pixels(self, batch: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed + 1000 + batch)
        return torch.randn(batch, 3, self.image_size, self.image_size, generator=gen)


def build_clip(small: bool = False, batch: int = 4, caption_tokens: int = 24, seed: int = 0) -> ClipCase:
    import transformers as tf

    config = tf.CLIPConfig(**(SMALL_CLIP if small else CLIP_B16))
    torch.manual_seed(seed)
    model = tf.CLIPModel(config).eval()
    vc, tc = config.vision_config, config.text_config
    if not 2 <= caption_tokens <= tc.max_position_embeddings:
        raise ValueError(f"caption tokens must be in [2, {tc.max_position_embeddings}], got {caption_tokens}")
    gen = torch.Generator().manual_seed(seed + 1)
    pixels = torch.randn(batch, 3, vc.image_size, vc.image_size, generator=gen)
    ids = torch.randint(3, min(tc.vocab_size, 49405), (batch, caption_tokens), generator=gen)
    ids[:, 0], ids[:, -1] = tc.bos_token_id, tc.eos_token_id
    tokens = (vc.image_size // vc.patch_size) ** 2 + 1
    params = sum(p.numel() for p in model.parameters())
    desc = (f"{'tiny' if small else 'ViT-B/16 at 224 px + default text tower'} CLIPModel, "
            f"{params / 1e6:.1f} M parameters, RANDOM weights (seed {seed}); image tower {vc.num_hidden_layers} "
            f"blocks x {vc.hidden_size}, {tokens} tokens; text tower {tc.num_hidden_layers} blocks x "
            f"{tc.hidden_size}; pixel_values [{batch}, 3, {vc.image_size}, {vc.image_size}], input_ids "
            f"[{batch}, {caption_tokens}]; output logits_per_image [{batch}, {batch}]")
    return ClipCase("clip-small" if small else "clip-vit-b16", desc, model,
                    {"pixel_values": pixels, "input_ids": ids})


def build_blip(small: bool = False, seed: int = 0) -> BlipCase:
    import transformers as tf

    config = tf.BlipConfig(**(SMALL_BLIP if small else BLIP_BASE))
    torch.manual_seed(seed)
    model = tf.BlipForConditionalGeneration(config).eval()
    vc, tc = config.vision_config, config.text_config
    tokens = (vc.image_size // vc.patch_size) ** 2 + 1
    params = sum(p.numel() for p in model.parameters())
    desc = (f"{'tiny' if small else 'BLIP-base-sized'} BlipForConditionalGeneration, {params / 1e6:.1f} M "
            f"parameters, RANDOM weights (seed {seed}; vision initializer_range 0.02); vision tower "
            f"{vc.num_hidden_layers} blocks x {vc.hidden_size} at {vc.image_size} px, {tokens} tokens; "
            f"decoder {tc.num_hidden_layers} blocks x {tc.hidden_size} with cross-attention, vocabulary "
            f"{tc.vocab_size}")
    return BlipCase("blip-small" if small else "blip-base", desc, model, vc.image_size, vc.num_hidden_layers, seed)


# --------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def compile_cache(root: str, compiler: str):
    """An empty Inductor cache dir under ``root`` for one compile, kept until ``root`` is removed
    (the compiled kernels stay loaded from it)."""
    if compiler != "inductor":
        yield
        return
    from torch._inductor.utils import fresh_cache

    with fresh_cache(dir=root, delete=False):
        yield


_WARMED_UP = False


def warm_up_once(log: Callable[[str], None]) -> None:
    """timing.warm_up_compilers, once per process (its one-time costs are paid by then)."""
    global _WARMED_UP
    if not _WARMED_UP:
        log(f"warming up the compilers (untimed): {timing.warm_up_compilers():.1f} s")
        _WARMED_UP = True


def _raise_recompile_limits(limit: int = 64) -> None:
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                 "accumulated_cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), limit))


def _backend(kind: str, compiler: str, turbo_options: dict, r: Optional[int] = None) -> GraphCounter:
    """A distinct backend callable per configuration (see diffusion_speed.GraphCounter)."""
    lookup = torch._dynamo.lookup_backend
    if kind == "turbo":
        options = {**turbo_options, "r": r}
        if compiler == "eager":
            options.setdefault("inner_backend", "eager")
        return GraphCounter(lookup("turbo"), options=options)
    return GraphCounter(lookup("inductor" if compiler == "inductor" else "eager"))


def eager_flops(fn: Callable, *args, **kwargs) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    import turbo_fx.flops  # noqa: F401  (the CPU SDPA formula)

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn(*args, **kwargs)
    return counter.get_total_flops()


def site_table(report) -> list[dict]:
    return [{"module": s.module, "kind": s.kind, "decision": s.decision, "reason": s.reason} for s in report.sites]


def graph_summary(report) -> dict:
    return {"rewritten": report.rewritten, "merges": report.merges, "tokens_per_block": report.tokens_per_block,
            "fallback": report.fallback_reason, "outputs_restored": report.outputs_restored,
            "flops_before": report.flops_before, "flops_after": report.flops_after,
            "sdpa_sites": list(report.sdpa_sites)}


def turbo_explain(model: torch.nn.Module, inputs: dict, options: dict) -> dict:
    """turbo_fx.explain on a copy of ``model``: the rewritten graphs' FLOPs and sites."""
    import turbo_fx

    report = turbo_fx.explain(fresh_copy(model), model_kwargs=inputs, **options)
    graphs = report.graphs
    info = {"graphs": [graph_summary(g) for g in graphs], "sites": [site_table(g) for g in graphs]}
    if len(graphs) == 1 and graphs[0].flops_after is not None:
        info.update(flops_before=graphs[0].flops_before, flops_after=graphs[0].flops_after)
    else:
        info.update(flops_before=None, flops_after=None)
    return info


def check_sites(sites: list[dict], merging_prefix: str, untouched_prefix: Optional[str], r: int) -> dict:
    """Whether every site under ``merging_prefix`` merges (r > 0) and every site under
    ``untouched_prefix`` is untouched; with the offenders."""
    merging = [s for s in sites if s["module"].startswith(merging_prefix)]
    others = [s for s in sites if untouched_prefix is not None and s["module"].startswith(untouched_prefix)]
    want = "merges" if r > 0 else None
    bad_merging = [s["module"] for s in merging if want and s["decision"] != want]
    bad_others = [f"{s['module']}: {s['decision']}" for s in others if s["decision"] != "untouched"]
    return {"merging_sites": len(merging), "merging_ok": bool(merging) and not bad_merging,
            "untouched_sites": len(others), "untouched_ok": not bad_others,
            "problems": bad_merging + bad_others}


# --------------------------------------------------------------------------- (a) CLIP
def clip_call(fn: Callable, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return fn(**inputs).logits_per_image


def run_clip(case: ClipCase, r_values: Sequence[int], rounds: int = 5, warmup: int = 1, compiler: str = "inductor",
             turbo_options: Optional[dict] = None, log: Callable[[str], None] = timing.log) -> dict:
    from turbo_fx.report import recording

    turbo_options = dict(turbo_options or {})
    base, inputs = case.model, case.inputs
    log(f"{case.name}: {case.description}")
    names = ["eager", "inductor"] + [f"turbo r={r}" for r in r_values]
    results: dict = {name: {} for name in names}

    # 1. FLOPs (before compiling: explain resets Dynamo).
    base_flops = eager_flops(clip_call, base, inputs)
    for name in ("eager", "inductor"):
        results[name].update(flops=base_flops, flop_ratio=1.0)
    for r in r_values:
        info = turbo_explain(base, inputs, {**turbo_options, "r": r})
        entry = results[f"turbo r={r}"]
        ratio = info["flops_after"] / info["flops_before"] if info["flops_before"] else None
        checks = check_sites(info["sites"][0] if info["sites"] else [], "vision_model.", "text_model.", r)
        entry.update(r=r, flops=info["flops_after"], flops_before_turbo=info["flops_before"], flop_ratio=ratio,
                     explain=info, checks=checks)
        log(f"FLOPs turbo r={r}: ratio {ratio}, checks {checks}")
    torch._dynamo.reset()

    # 2. Compile each configuration with an empty cache.
    if compiler == "inductor":
        timing.no_compile_caches()
        warm_up_once(log)
    _raise_recompile_limits()
    cache_root = tempfile.mkdtemp(prefix="turbo-fx-vlm-clip-")
    fns, outputs, first = {"eager": base}, {}, {}
    try:
        outputs["eager"] = clip_call(base, inputs)
        for name in names[1:]:
            r = results[name].get("r")
            counter = _backend("turbo" if r is not None else "inductor", compiler, turbo_options, r)
            fn = torch.compile(fresh_copy(base), backend=counter, dynamic=False)
            with compile_cache(cache_root, compiler), recording() as rec:
                start = time.perf_counter()
                clip_call(fn, inputs)
                first[name] = time.perf_counter() - start
                outputs[name] = clip_call(fn, inputs)
            fns[name] = fn
            results[name].update(first_call_s=first[name], dynamo_graphs=counter.graphs)
            if r is not None:
                results[name]["compiled_report"] = [graph_summary(g) for g in rec.graphs]
            log(f"first call {name}: {first[name]:.1f} s ({counter.graphs} graph(s))")

        # 3. Steady state.
        log(f"timing: {rounds} interleaved rounds after {warmup} warm-up call(s) each")
        calls = {name: (lambda fn=fn: clip_call(fn, inputs)) for name, fn in fns.items()}
        times = timing.interleaved(calls, (), rounds, warmup=warmup, progress=log)
    finally:
        shutil.rmtree(cache_root, ignore_errors=True)
    torch._dynamo.reset()

    for name in names:
        entry = results[name]
        st = timing.stats(times[name])
        entry.update(latency=st, latency_s=times[name], vs_inductor=speedup_interval(times["inductor"], times[name]),
                     compile_s=first[name] - st["median"] if name in first else None,
                     output=closeness(outputs[name], outputs["eager"]))
    return {"model": case.name, "description": case.description, "random_weights": True,
            "batch": int(inputs["pixel_values"].shape[0]), "caption_tokens": int(inputs["input_ids"].shape[1]),
            "settings": {"r": list(r_values), "rounds": rounds, "warmup": warmup, "compiler": compiler,
                         "turbo_options": turbo_options, "torch_threads": torch.get_num_threads()},
            "baseline_flops": base_flops, "configs": results}


# --------------------------------------------------------------------------- (b) BLIP generate
def caption(model: torch.nn.Module, pixels: torch.Tensor, new_tokens: int) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(pixel_values=pixels, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                              do_sample=False, num_beams=1)


def vision_forward(model: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """The vision tower called as ``generate`` calls it (the same keywords, so the same guards)."""
    with torch.no_grad():
        return model.vision_model(pixel_values=pixels, interpolate_pos_encoding=False)[0]


def compile_decoder_forward(decoder: torch.nn.Module, backend: Callable, dynamic: Optional[bool] = None):
    """Compile what ``generate`` calls: the decoder's forward (an OptimizedModule around the
    module would be bypassed, since ``generate`` calls ``self(...)`` on the original)."""
    decoder.forward = torch.compile(decoder.forward, backend=backend, dynamic=dynamic)
    return decoder


def token_agreement(ids: torch.Tensor, reference: torch.Tensor, prompt: int = 1) -> dict:
    new, ref = ids[:, prompt:], reference[:, prompt:]
    same = new == ref
    return {"tokens_equal": float(same.float().mean()), "captions_equal": int(same.all(dim=1).sum()),
            "captions": int(ids.shape[0])}


def run_blip(case: BlipCase, batches: Sequence[int], r_values: Sequence[int], new_tokens: int = 20,
             rounds: int = 3, warmup: int = 1, compiler: str = "inductor", decoder: str = "compiled",
             turbo_options: Optional[dict] = None, compare_explicit: bool = False,
             log: Callable[[str], None] = timing.log) -> dict:
    from turbo_fx.report import recording

    turbo_options = dict(turbo_options or {})
    base = case.model
    log(f"{case.name}: {case.description}")
    dec_name = "eager vision + compiled decoder"
    r_of = {f"turbo r={r}": r for r in r_values}
    # compare_explicit: each r once more with the tower's explicit attention kept explicit
    # (explicit_as_sdpa=False), in the same process, to measure what emitting SDPA buys.
    extra_of = {name: {} for name in r_of}
    if compare_explicit:
        for r in r_values:
            r_of[f"turbo r={r} explicit"] = r
            extra_of[f"turbo r={r} explicit"] = {"explicit_as_sdpa": False}
    vision_rows = ["inductor"] + list(r_of)
    names = ["eager"] + ([dec_name] if decoder == "compiled" else []) + vision_rows

    # 1. FLOPs at batch 1: the vision tower, and per caption.
    px1 = case.pixels(1)
    vision_flops = eager_flops(lambda: base.vision_model(pixel_values=px1))
    caption_flops = eager_flops(caption, base, px1, new_tokens)
    decoder_flops = caption_flops - vision_flops
    flops: dict = {}
    for name in names:
        if name in r_of:
            info = turbo_explain(base.vision_model, {"pixel_values": px1},
                                 {**turbo_options, **extra_of[name], "r": r_of[name]})
            after = info["flops_after"]
            checks = check_sites(info["sites"][0] if info["sites"] else [], "encoder.layers.", None, r_of[name])
            flops[name] = {"vision_flops": after, "vision_flop_ratio": after / info["flops_before"] if after else None,
                           "caption_flops": after + decoder_flops if after else None,
                           "caption_flop_ratio": (after + decoder_flops) / caption_flops if after else None,
                           "explain": info, "checks": checks}
            log(f"FLOPs {name}: vision ratio {flops[name]['vision_flop_ratio']}, checks {checks}")
        else:
            flops[name] = {"vision_flops": vision_flops, "vision_flop_ratio": 1.0, "caption_flops": caption_flops,
                           "caption_flop_ratio": 1.0}
    torch._dynamo.reset()

    # The models: every compiled row shares one decoder whose forward is compiled.
    if compiler == "inductor":
        timing.no_compile_caches()
        warm_up_once(log)
    _raise_recompile_limits()
    models, counters = {"eager": base}, {}
    shared = base.text_decoder
    if decoder == "compiled":
        counters["decoder"] = _backend("inductor", compiler, turbo_options)
        shared = compile_decoder_forward(fresh_copy(base.text_decoder), counters["decoder"])
        models[dec_name] = fresh_copy(base)
        models[dec_name].text_decoder = shared
    for name in vision_rows:
        model = fresh_copy(base)
        counters[name] = _backend("turbo" if name in r_of else "inductor", compiler,
                                  {**turbo_options, **extra_of.get(name, {})}, r_of.get(name))
        model.vision_model = torch.compile(model.vision_model, backend=counters[name], dynamic=False)
        model.text_decoder = shared
        models[name] = model

    per_batch = []
    cache_root = tempfile.mkdtemp(prefix="turbo-fx-vlm-blip-")
    try:
        for batch in batches:
            pixels = case.pixels(batch)
            log(f"batch {batch}: first calls")
            rows: dict = {name: {} for name in names}
            first, ids = {}, {}
            for name in names:
                before = {k: c.graphs for k, c in counters.items()}
                with compile_cache(cache_root, compiler), recording() as rec:
                    start = time.perf_counter()
                    caption(models[name], pixels, new_tokens)
                    first[name] = time.perf_counter() - start
                    ids[name] = caption(models[name], pixels, new_tokens)
                row = rows[name]
                row["first_call_s"] = first[name]
                if name in counters:
                    row["vision_graphs"] = counters[name].graphs - before[name]
                if "decoder" in counters and name != "eager":
                    row["decoder_graphs_compiled"] = counters["decoder"].graphs - before["decoder"]
                if name in r_of:
                    reports = [graph_summary(g) for g in rec.graphs]
                    row["compiled_report"] = reports
                    # r > 0: every vision graph merged; r = 0: none did, and none fell back.
                    if r_of[name] > 0:
                        row["merged"] = bool(reports) and all(g["rewritten"] for g in reports)
                    else:
                        row["merged"] = bool(reports) and not any(g["rewritten"] or g["fallback"] for g in reports)
                log(f"first call {name}: {first[name]:.1f} s")
            graphs_before_timing = counters["decoder"].graphs if "decoder" in counters else None
            log(f"batch {batch}: {rounds} interleaved rounds after {warmup} warm-up call(s) each")
            calls = {name: (lambda m=models[name]: caption(m, pixels, new_tokens)) for name in names}
            times = timing.interleaved(calls, (), rounds, warmup=warmup, progress=log)
            decoder_graphs = counters["decoder"].graphs if "decoder" in counters else None
            # The vision towers alone (the part turbo changes), interleaved the same way.
            towers = [name for name in names if name != dec_name]
            before = {name: counters[name].graphs for name in towers if name in counters}
            log(f"batch {batch}: vision towers alone, {rounds} interleaved rounds")
            vision_calls = {name: (lambda m=models[name]: vision_forward(m, pixels)) for name in towers}
            vision_times = timing.interleaved(vision_calls, (), rounds, warmup=warmup, progress=log)
            for name in names:
                row = rows[name]
                st = timing.stats(times[name])
                row.update(latency=st, latency_s=times[name], ms_per_caption=st["median"] * 1e3 / batch,
                           vs_inductor=speedup_interval(times["inductor"], times[name]),
                           agreement=token_agreement(ids[name], ids["eager"]), **flops[name])
                row["compile_s"] = first[name] - st["median"] if name != "eager" else None
                if name in vision_times:
                    row.update(vision_latency=timing.stats(vision_times[name]), vision_latency_s=vision_times[name],
                               vision_vs_inductor=speedup_interval(vision_times["inductor"], vision_times[name]))
                    if name in before:
                        row["vision_graphs_during_timing"] = counters[name].graphs - before[name]
            per_batch.append({"batch": batch, "configs": rows, "decoder_graphs_total": decoder_graphs,
                              "decoder_graphs_during_timing": (decoder_graphs - graphs_before_timing
                                                               if decoder_graphs is not None else None),
                              "caption_shape": list(ids["eager"].shape)})
    finally:
        shutil.rmtree(cache_root, ignore_errors=True)
    torch._dynamo.reset()
    return {"model": case.name, "description": case.description, "random_weights": True,
            "settings": {"batches": list(batches), "r": list(r_values), "new_tokens": new_tokens, "rounds": rounds,
                         "warmup": warmup, "compiler": compiler, "decoder": decoder, "turbo_options": turbo_options,
                         "compare_explicit": compare_explicit,
                         "torch_threads": torch.get_num_threads()},
            "flops": {"vision": vision_flops, "caption": caption_flops, "decoder_per_caption": decoder_flops},
            "vision_blocks": case.vision_blocks, "batches": per_batch}


# --------------------------------------------------------------------------- output
def _f(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def _speedup(v: dict) -> str:
    return f"{v['speedup']:.2f}x [{v['low']:.2f}, {v['high']:.2f}]"


CLIP_HEADERS = ["config", "compile s", "median ms / batch", "IQR ms", "speed-up vs Inductor [95%]", "GFLOPs",
                "FLOP ratio", "image tokens per block (first → last)", "image tower merges", "text tower untouched",
                "logits rel L2", "logits cosine"]


def clip_rows(run: dict) -> list[list[str]]:
    rows = []
    for name, e in run["configs"].items():
        checks = e.get("checks")
        tokens = (e.get("explain") or {}).get("graphs") or []
        tpb = tokens[0]["tokens_per_block"] if tokens else None
        rows.append([name, _f(e.get("compile_s"), ".1f"), f"{e['latency']['median'] * 1e3:.1f}",
                     f"{e['latency']['iqr'] * 1e3:.1f}", _speedup(e["vs_inductor"]),
                     _f(e["flops"] / 1e9 if e.get("flops") else None, ".4g", "unavailable"),
                     _f(e.get("flop_ratio"), ".3f"), f"{tpb[0]}→{tpb[-1]}" if tpb else "-",
                     "-" if checks is None else ("yes" if checks["merging_ok"] else "NO"),
                     "-" if checks is None else ("yes" if checks["untouched_ok"] else "NO"),
                     f"{e['output']['rel_l2']:.2e}", f"{e['output']['cosine']:.6f}"])
    return rows


BLIP_HEADERS = ["config", "compile s", "median ms / generate", "IQR ms", "ms / caption", "speed-up vs Inductor [95%]",
                "vision tower ms", "vision speed-up vs Inductor [95%]", "vision FLOP ratio", "caption FLOP ratio",
                "vision tokens per block (first → last)", "tokens equal to eager", "captions equal"]


def blip_rows(entry: dict) -> list[list[str]]:
    rows = []
    for name, e in entry["configs"].items():
        a = e["agreement"]
        reports = e.get("compiled_report") or []
        tpb = reports[0]["tokens_per_block"] if reports and reports[0]["rewritten"] else None
        vision = e.get("vision_latency")
        rows.append([name, _f(e.get("compile_s"), ".1f"), f"{e['latency']['median'] * 1e3:.0f}",
                     f"{e['latency']['iqr'] * 1e3:.0f}", f"{e['ms_per_caption']:.0f}", _speedup(e["vs_inductor"]),
                     _f(vision["median"] * 1e3 if vision else None, ".0f"),
                     _speedup(e["vision_vs_inductor"]) if vision else "-",
                     _f(e.get("vision_flop_ratio"), ".3f"), _f(e.get("caption_flop_ratio"), ".3f"),
                     f"{tpb[0]}→{tpb[-1]}" if tpb else "-", f"{a['tokens_equal']:.3f}",
                     f"{a['captions_equal']}/{a['captions']}"])
    return rows


def _header(title: str, machine: dict) -> list[str]:
    note = [f"Note: {machine['note']}", ""] if machine.get("note") else []
    return [f"# {title}", "", f"Machine: {timing.machine_line(machine)}; transformers {machine.get('transformers')}.",
            f"Command: `{machine['command']}`", ""] + note + [
            "RANDOM weights everywhere (no CLIP or BLIP weights install offline): times and FLOPs are the real "
            "architectures', outputs and captions mean nothing.", ""]


def clip_markdown(payload: dict) -> str:
    run = payload["run"]
    s = run["settings"]
    lines = _header("CLIP image-text scoring: eager / Inductor / turbo", payload["machine"])
    lines += [f"{run['description']}.", "",
              f"Compiler {s['compiler']}, dynamic=False; {s['rounds']} interleaved rounds after {s['warmup']} warm-up "
              f"call(s), {s['torch_threads']} torch thread(s). Compile s: the first call with an empty Inductor cache "
              "minus the median. Speed-up: Inductor's median / the row's, 95% bootstrap over the rounds. FLOPs: the "
              "whole forward (both towers); turbo's from its rewritten graph (turbo_fx.explain). Turbo options: "
              f"{s['turbo_options'] or '{}'}.", ""]
    lines.append(tabulate(clip_rows(run), headers=CLIP_HEADERS, tablefmt="github"))
    problems = [f"- {name}: {p}" for name, e in run["configs"].items() for p in (e.get("checks") or {}).get("problems", [])]
    lines += [""] + (["Site checks failed:"] + problems if problems else
                     ["Every turbo row: every image-tower attention site merges, every text-tower site is "
                      "untouched (causal attention), in one graph."]) + [""]
    return "\n".join(lines)


def blip_markdown(payload: dict) -> str:
    run = payload["run"]
    s = run["settings"]
    fl = run["flops"]
    lines = _header("BLIP captioning with generate(): eager / Inductor / turbo", payload["machine"])
    decoder_text = ("the decoder's forward compiled with Inductor (one compiled decoder shared by every compiled "
                    "row, dynamic shapes on, DynamicCache)" if s["decoder"] == "compiled" else "the decoder eager")
    lines += [f"{run['description']}.", "",
              f"`generate(pixel_values, max_new_tokens={s['new_tokens']}, min_new_tokens={s['new_tokens']}, "
              f"do_sample=False, num_beams=1)`: greedy, exactly {s['new_tokens']} new tokens per caption. Vision "
              f"tower compiled with dynamic=False ({s['compiler']} or turbo with it inside); {decoder_text}. "
              f"{s['rounds']} interleaved rounds after {s['warmup']} warm-up call(s), {s['torch_threads']} torch "
              "thread(s). Compile s: the first generate with an empty Inductor cache minus the median (vision rows: "
              "the vision tower's, the decoder being compiled already; the decoder's is in its own row). Speed-up: "
              "Inductor's median / the row's, 95% bootstrap over the rounds. Vision tower ms: the compiled tower "
              "alone on the same images (called as generate calls it), in rounds of its own. Tokens per block: "
              "the vision tower's tokens entering its first and last block. Tokens / captions equal to eager: "
              "with random weights one changed token changes every later one, so these only say whether a row "
              "is exact.", "",
              f"FLOPs per caption (batch 1, eager): vision tower {fl['vision'] / 1e9:.4g} G, decoder "
              f"{fl['decoder_per_caption'] / 1e9:.4g} G ({s['new_tokens']} steps plus the cross-attention keys and "
              f"values of every image token, which turbo does not reduce: the decoder reads the restored "
              f"tokens). Turbo options: {s['turbo_options'] or '{}'}.", ""]
    for entry in run["batches"]:
        lines += [f"## batch {entry['batch']}", "", tabulate(blip_rows(entry), headers=BLIP_HEADERS, tablefmt="github"), ""]
        notes = []
        if entry.get("decoder_graphs_total") is not None:
            notes.append(f"decoder graphs compiled so far: {entry['decoder_graphs_total']} "
                         f"({entry['configs'].get('eager vision + compiled decoder', {}).get('decoder_graphs_compiled')} "
                         f"at this batch size); during the timed rounds: {entry['decoder_graphs_during_timing']}")
        for name, e in entry["configs"].items():
            if e.get("vision_graphs_during_timing"):
                notes.append(f"{name}: the vision tower compiled {e['vision_graphs_during_timing']} graph(s) while "
                             "timed alone (a guard differed from generate's call)")
            if "merged" in e and not e["merged"]:
                notes.append(f"{name}: the vision tower's report is not as expected (r > 0: every graph merges; "
                             f"r = 0: none does and none falls back): {e.get('compiled_report')}")
            for p in (e.get("checks") or {}).get("problems", []):
                notes.append(f"{name}: site check failed: {p}")
        lines += [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)


def machine_info() -> dict:
    info = timing.machine()
    try:
        import transformers
        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = None
    return info


# --------------------------------------------------------------------------- command line
def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def _r(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"r must be >= 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m turbo_fx.bench.vlm_speed", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", nargs="+", choices=PARTS, default=list(PARTS))
    p.add_argument("--small", action="store_true", help="tiny configurations of the same classes (a smoke test)")
    p.add_argument("--r", nargs="+", type=_r, default=list(DEFAULT_R), help="turbo rows (tokens merged per block)")
    p.add_argument("--clip-batch", type=_positive, default=4, help="images and captions per CLIP call")
    p.add_argument("--caption-tokens", type=_positive, default=24, help="tokens per CLIP caption")
    p.add_argument("--blip-batch", nargs="+", type=_positive, default=[1],
                   help="BLIP batch sizes (each compiles every vision tower and the decoder again)")
    p.add_argument("--new-tokens", type=_positive, default=20, help="tokens per BLIP caption")
    p.add_argument("--rounds", type=_positive, default=None, help="timed rounds (default: CLIP 5, BLIP 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per configuration before the rounds")
    p.add_argument("--decoder", choices=("compiled", "eager"), default="compiled",
                   help="BLIP's decoder in the compiled rows: its forward compiled (shared), or eager")
    p.add_argument("--compiler", choices=("inductor", "eager"), default="inductor",
                   help="'eager': Dynamo's eager backend instead of Inductor (turbo inner_backend=eager)")
    p.add_argument("--option", action="append", type=timing.option_pair, default=[], metavar="KEY=VALUE",
                   help="a turbo option for every turbo row (repeatable)")
    p.add_argument("--compare-explicit", action="store_true",
                   help="BLIP: also a 'turbo r=R explicit' row per r (explicit_as_sdpa=False), to measure "
                        "emitting the tower's explicit attention as SDPA")
    p.add_argument("--threads", type=_positive, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join("build", "bench_vlm"))
    p.add_argument("--note", default=None, help="a line for the result files (e.g. which turbo-fx revision ran)")
    return p


def main(argv: Optional[Sequence[str]] = None, log: Callable[[str], None] = timing.log) -> dict:
    args = build_parser().parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.warmup < 0:
        raise SystemExit("--warmup must be >= 0")
    start = time.perf_counter()
    machine = machine_info()
    if args.note:
        machine["note"] = args.note
    log(f"machine: {timing.machine_line(machine)}")
    suffix = "small" if args.small else "cpu"
    options = dict(args.option)
    written: dict = {}
    if "clip" in args.part:
        case = build_clip(args.small, args.clip_batch, args.caption_tokens, args.seed)
        run = run_clip(case, args.r, rounds=args.rounds or 5, warmup=args.warmup, compiler=args.compiler,
                       turbo_options=options, log=log)
        payload = {"benchmark": "vlm_speed/clip", "machine": machine, "run": run}
        paths = timing.write_json_and_markdown(payload, args.out, f"clip_speed_{suffix}", clip_markdown)
        print(clip_markdown(payload))
        log(f"wrote {' and '.join(paths)}")
        written["clip"] = payload
        del case
    if "blip" in args.part:
        case = build_blip(args.small, args.seed)
        run = run_blip(case, args.blip_batch, args.r, new_tokens=args.new_tokens, rounds=args.rounds or 3,
                       warmup=args.warmup, compiler=args.compiler, decoder=args.decoder, turbo_options=options,
                       compare_explicit=args.compare_explicit, log=log)
        payload = {"benchmark": "vlm_speed/blip", "machine": machine, "run": run}
        paths = timing.write_json_and_markdown(payload, args.out, f"blip_generate_{suffix}", blip_markdown)
        print(blip_markdown(payload))
        log(f"wrote {' and '.join(paths)}")
        written["blip"] = payload
    log(f"total {time.perf_counter() - start:.0f} s")
    return written


if __name__ == "__main__":
    main()
    sys.exit(0)
