"""``turbo-fx llava-speed``: time to first token of a LLaVA-style model at a real shape (RANDOM
weights, seeded: times and FLOPs are the architecture's, outputs mean nothing).

The model is transformers' ``LlavaForConditionalGeneration`` with a CLIP ViT-L/14 tower at 336 px
(577 tokens, 24 layers, width 1024; features from the second-to-last layer, class token dropped:
576 visual tokens) and a Llama decoder of about 0.5B parameters (Qwen2-0.5B's shape: 24 layers,
width 896, 14 heads, 2 key/value heads, MLP 4864; a 32000-token vocabulary). The prompt holds a
few text tokens, the 576 placeholders and a question.

Time to first token is one forward of the prompt (``logits_to_keep=1``, as ``generate``'s prefill
computes it), per configuration: Inductor (``dynamic=False``) and turbo (the tower merges with
``r``, the language model's visual tokens are compacted by ``ratio``: keep ratio ``1 - ratio``).
``--rounds`` interleaved rounds after one warm-up call, median, and the speed-up over Inductor
with a 95% bootstrap interval over the rounds. FLOPs are counted on eager calls for Inductor and
by ``turbo_fx.explain`` for turbo; their ratio gives the FLOP-ideal speed-up.
"""
from __future__ import annotations

import copy
import statistics
import time

import torch
from tabulate import tabulate

from turbo_fx.bench import output, timing
from turbo_fx.bench.stats import speedup_interval
from turbo_fx.bench.timing import count_flops

IMAGE_TOKEN = 31999
TOWER = dict(image_size=336, patch_size=14, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
             num_attention_heads=16, projection_dim=768)
LANGUAGE = dict(vocab_size=32000, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=4096)
SMALL_TOWER = dict(image_size=32, patch_size=4, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=2)
SMALL_LANGUAGE = dict(vocab_size=32000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512)


def build_llava(small: bool = False, seed: int = 0) -> torch.nn.Module:
    import transformers as tf

    torch.manual_seed(seed)
    tower = tf.CLIPVisionConfig(**(SMALL_TOWER if small else TOWER))
    language = tf.LlamaConfig(**(SMALL_LANGUAGE if small else LANGUAGE))
    patches = (tower.image_size // tower.patch_size) ** 2
    config = tf.LlavaConfig(vision_config=tower, text_config=language, image_token_index=IMAGE_TOKEN,
                            image_seq_length=patches, vision_feature_layer=-2,
                            vision_feature_select_strategy="default")
    return tf.LlavaForConditionalGeneration(config).eval()


def prompt_inputs(model: torch.nn.Module, batch: int, lead: int = 5, question: int = 24, seed: int = 1) -> dict:
    vision = model.config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(1, IMAGE_TOKEN, (batch, lead + question), generator=g)
    ids = torch.cat([text[:, :lead], torch.full((batch, patches), IMAGE_TOKEN), text[:, lead:]], dim=1)
    pixels = torch.randn(batch, 3, vision.image_size, vision.image_size, generator=g)
    return dict(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids))


def prefill(fn, inputs: dict) -> torch.Tensor:
    """The logits of the prompt's last token, as generate()'s prefill computes them."""
    with torch.no_grad():
        return fn(**inputs, logits_to_keep=1).logits


def turbo_flop_ratio(model: torch.nn.Module, inputs: dict, options: dict) -> float:
    """FLOPs after / before of every graph turbo compiles for one prefill (``turbo_fx.explain``)."""
    import turbo_fx

    report = turbo_fx.explain(model, model_kwargs=inputs, **options)
    before = sum(g.flops_before or 0 for g in report.graphs)
    after = sum(g.flops_after or 0 for g in report.graphs)
    return after / before


def time_prefills(model: torch.nn.Module, inputs: dict, configs: dict, rounds: int) -> tuple[dict, dict]:
    """Compile seconds (the first call) and ``rounds`` interleaved prefill times per configuration."""
    fns, compile_s = {}, {}
    torch._dynamo.reset()
    for name, how in configs.items():
        fast = copy.deepcopy(model)
        fast.forward = torch.compile(fast.forward, dynamic=False, **how)
        start = time.perf_counter()
        prefill(fast.forward, inputs)
        compile_s[name] = time.perf_counter() - start
        prefill(fast.forward, inputs)  # warm-up
        fns[name] = fast.forward
    times: dict = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            prefill(fn, inputs)
            times[name].append(time.perf_counter() - start)
    return compile_s, times


def run(args) -> dict:
    machine = timing.machine()
    timing.log(f"machine: {timing.machine_line(machine)}")
    model = build_llava(args.small)
    options = dict(r=args.r, ratio=args.ratio, **args.options)
    turbo_name = f"turbo r={args.r} keep={1 - args.ratio:.2f}"
    rows = []
    for batch in args.batch:
        inputs = prompt_inputs(model, batch)
        flops = count_flops(lambda: prefill(model, inputs))
        flop_ratio = turbo_flop_ratio(model, inputs, options)
        configs = {"inductor": dict(backend="inductor"), turbo_name: dict(backend="turbo", options=options)}
        compile_s, times = time_prefills(model, inputs, configs, args.rounds)
        for name in configs:
            row = dict(batch=batch, config=name, tokens=inputs["input_ids"].shape[1], compile_s=compile_s[name],
                       median_s=float(statistics.median(times[name])), times=times[name],
                       flops=flops if name == "inductor" else flops * flop_ratio)
            if name != "inductor":
                row["speedup"] = speedup_interval(times["inductor"], times[name])
                row["ideal"] = 1 / flop_ratio
            rows.append(row)
            timing.log(f"batch {batch} {name}: {row['median_s']:.3f} s (compile {compile_s[name]:.0f} s)")
    payload = dict(machine=machine, command=args.command, options=options, rows=rows, small=args.small)
    output.write(payload, args.out, "llava_prefill_small" if args.small else "llava_prefill_cpu", markdown)
    return payload


def markdown(payload: dict) -> str:
    lines = [f"# LLaVA-style time to first token ({'small smoke shapes' if payload['small'] else 'CLIP ViT-L/14-336 + 0.5B Llama'}, random weights)",
             "", f"Machine: {timing.machine_line(payload['machine'])}. Command: `{payload['command']}`.", ""]
    table = []
    for row in payload["rows"]:
        speed = row.get("speedup")
        table.append([row["batch"], row["config"], row["tokens"], f"{row['median_s']:.3f}",
                      f"{speed['speedup']:.2f}x [{speed['low']:.2f}, {speed['high']:.2f}]" if speed else "1.00x",
                      f"{row['ideal']:.2f}x" if row.get("ideal") else "", f"{row['flops'] / 1e9:.0f}",
                      f"{row['compile_s']:.0f}"])
    lines.append(tabulate(table, headers=["batch", "config", "prompt tokens", "TTFT median s", "vs Inductor (95% CI)",
                                          "FLOP ideal", "GFLOP", "compile s"], tablefmt="github"))
    return "\n".join(lines) + "\n"
