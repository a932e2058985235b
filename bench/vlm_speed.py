"""``turbo-fx vlm-speed``: vision-language models at real sizes (RANDOM weights, seeded: no CLIP
or BLIP weights install offline, so times and FLOPs are the real architectures', outputs mean
nothing).

(a) ``clip``: a whole transformers ``CLIPModel``, ViT-B/16 image tower at 224 px (197 tokens) and
    the default causal text tower, returning ``logits_per_image``. Rows ``eager``, ``inductor``,
    ``turbo r=R``, all ``dynamic=False``. Turbo compiles both towers as one graph: the image
    sequence merges, the text sequence (causal attention) must stay untouched, and the table says
    whether it did.
(b) ``blip``: ``BlipForConditionalGeneration`` (ViT-B/16 at 384 px, 577 tokens; a BERT-base decoder
    with cross-attention; vision ``initializer_range`` 0.02, since 1e-10 makes every random image
    token the same), timed through ``generate(max_new_tokens=T, min_new_tokens=T, greedy)`` so that
    every row does the same decoding work. ``generate`` runs ``model.vision_model`` once and the
    decoder once per token, so the two parts are compiled apart: the vision tower with Inductor
    (``inductor``) or turbo (``turbo r=R``; it restores the output to 577 tokens, so the decoder's
    cross-attention over the copies is proportional attention over the merged tokens), and the
    decoder's forward (wrapping the module would compile nothing: ``generate`` calls the original)
    once, shared by every compiled row, its compile seconds in a row of its own (``eager vision +
    compiled decoder``; with the default DynamicCache it compiles three graphs per batch size).
    The vision towers are also timed alone, the part turbo changes.

Measurements, in one process, per model (and per batch size for BLIP): FLOPs (``FlopCounterMode``
on eager calls; ``turbo_fx.explain`` for turbo; BLIP per caption counts the decoder's work on the
eager model, which merging leaves unchanged); compile seconds (``bench/timing.py``); ``--rounds``
interleaved rounds after ``--warmup`` calls, median, IQR and the speed-up over Inductor with a 95%
bootstrap interval over the rounds; closeness to eager (CLIP: relative L2 and cosine of the
logits; BLIP: generated tokens equal to the eager model's). Compiling takes most of a run (about
a minute per CLIP configuration on 2 CPU cores); ``--small`` is a smoke run (under a minute).
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from turbo_fx.bench import output, timing
from turbo_fx.bench.stats import speedup_interval
from turbo_fx.bench.timing import closeness, count_flops, fresh_copy

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
    base_flops = count_flops(clip_call, base, inputs)
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
        log(f"warming up the compilers (untimed): {timing.warm_up_compilers():.1f} s")
    timing.raise_recompile_limits()
    fns, outputs, first = {"eager": base}, {}, {}
    with tempfile.TemporaryDirectory(prefix="turbo-fx-vlm-clip-") as cache_root:
        outputs["eager"] = clip_call(base, inputs)
        for name in names[1:]:
            r = results[name].get("r")
            counter = timing.counted_backend(None if r is None else {**turbo_options, "r": r}, compiler)
            fn = torch.compile(fresh_copy(base), backend=counter, dynamic=False)
            with timing.fresh_cache(cache_root, delete=False, enabled=compiler == "inductor"), recording() as rec:
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
    vision_flops = count_flops(lambda: base.vision_model(pixel_values=px1))
    caption_flops = count_flops(caption, base, px1, new_tokens)
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
        log(f"warming up the compilers (untimed): {timing.warm_up_compilers():.1f} s")
    timing.raise_recompile_limits()
    models, counters = {"eager": base}, {}
    shared = base.text_decoder
    if decoder == "compiled":
        counters["decoder"] = timing.counted_backend(None, compiler)
        shared = compile_decoder_forward(fresh_copy(base.text_decoder), counters["decoder"])
        models[dec_name] = fresh_copy(base)
        models[dec_name].text_decoder = shared
    for name in vision_rows:
        model = fresh_copy(base)
        counters[name] = timing.counted_backend(
            {**turbo_options, **extra_of[name], "r": r_of[name]} if name in r_of else None, compiler)
        model.vision_model = torch.compile(model.vision_model, backend=counters[name], dynamic=False)
        model.text_decoder = shared
        models[name] = model

    per_batch = []
    with tempfile.TemporaryDirectory(prefix="turbo-fx-vlm-blip-") as cache_root:
        for batch in batches:
            pixels = case.pixels(batch)
            log(f"batch {batch}: first calls")
            rows: dict = {name: {} for name in names}
            first, ids = {}, {}
            for name in names:
                before = {k: c.graphs for k, c in counters.items()}
                with timing.fresh_cache(cache_root, delete=False, enabled=compiler == "inductor"), recording() as rec:
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
    torch._dynamo.reset()
    return {"model": case.name, "description": case.description, "random_weights": True,
            "settings": {"batches": list(batches), "r": list(r_values), "new_tokens": new_tokens, "rounds": rounds,
                         "warmup": warmup, "compiler": compiler, "decoder": decoder, "turbo_options": turbo_options,
                         "compare_explicit": compare_explicit,
                         "torch_threads": torch.get_num_threads()},
            "flops": {"vision": vision_flops, "caption": caption_flops, "decoder_per_caption": decoder_flops},
            "vision_blocks": case.vision_blocks, "batches": per_batch}


# --------------------------------------------------------------------------- output
_f, _speedup = output.f, output.speedup
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


def _header(title: str, payload: dict) -> list[str]:
    note = [f"Note: {payload['note']}"] if payload.get("note") else []
    return output.header(title, payload, *note, "RANDOM weights everywhere (no CLIP or BLIP weights install "
                         "offline): times and FLOPs are the real architectures', outputs and captions mean nothing.")


def clip_markdown(payload: dict) -> str:
    run = payload["run"]
    s = run["settings"]
    lines = _header("CLIP image-text scoring: eager / Inductor / turbo", payload)
    lines += [f"{run['description']}.", "",
              f"Compiler {s['compiler']}, dynamic=False; {s['rounds']} interleaved rounds after {s['warmup']} warm-up "
              f"call(s), {s['torch_threads']} torch thread(s). Compile s: the first call with an empty Inductor cache "
              "minus the median. Speed-up: Inductor's median / the row's, 95% bootstrap over the rounds. FLOPs: the "
              "whole forward (both towers); turbo's from its rewritten graph (turbo_fx.explain). Turbo options: "
              f"{s['turbo_options'] or '{}'}.", ""]
    lines.append(output.table(CLIP_HEADERS, clip_rows(run)))
    problems = [f"- {name}: {p}" for name, e in run["configs"].items() for p in (e.get("checks") or {}).get("problems", [])]
    lines += [""] + (["Site checks failed:"] + problems if problems else
                     ["Every turbo row: every image-tower attention site merges, every text-tower site is "
                      "untouched (causal attention), in one graph."]) + [""]
    return "\n".join(lines)


def blip_markdown(payload: dict) -> str:
    run = payload["run"]
    s = run["settings"]
    fl = run["flops"]
    lines = _header("BLIP captioning with generate(): eager / Inductor / turbo", payload)
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
        lines += [f"## batch {entry['batch']}", "", output.table(BLIP_HEADERS, blip_rows(entry)), ""]
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


def run(args) -> dict:
    start = time.perf_counter()
    machine = timing.machine()
    timing.log(f"machine: {timing.machine_line(machine)}")
    suffix = "small" if args.small else "cpu"
    written: dict = {}
    if "clip" in args.part:
        case = build_clip(args.small, args.clip_batch, args.caption_tokens, args.seed)
        run = run_clip(case, args.r, rounds=args.rounds or 5, warmup=args.warmup, compiler=args.compiler,
                       turbo_options=args.options)
        written["clip"] = {"machine": machine, "command": args.command, "note": args.note, "run": run}
        output.write(written["clip"], args.out, f"clip_speed_{suffix}", clip_markdown)
        del case
    if "blip" in args.part:
        case = build_blip(args.small, args.seed)
        run = run_blip(case, args.blip_batch, args.r, new_tokens=args.new_tokens, rounds=args.rounds or 3,
                       warmup=args.warmup, compiler=args.compiler, decoder=args.decoder, turbo_options=args.options,
                       compare_explicit=args.compare_explicit)
        written["blip"] = {"machine": machine, "command": args.command, "note": args.note, "run": run}
        output.write(written["blip"], args.out, f"blip_generate_{suffix}", blip_markdown)
    timing.log(f"total {time.perf_counter() - start:.0f} s")
    return written
