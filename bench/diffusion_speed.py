"""``turbo-fx diffusion-speed``: eager vs Inductor vs tomesd (+ Inductor) vs turbo's
merge-and-restore mode on diffusion models.

Models (random weights, seeded; no Stable Diffusion or DiT weights install offline):
- ``unet``: an SD-1.5-sized ``UNet2DConditionModel`` (SD 1.5's config), inputs latents
  [2, 4, 64, 64] (batch 2 = classifier-free guidance), a timestep, text states [2, 77, 768];
- ``dit``: a DiT-XL/2-sized ``DiTTransformer2DModel`` (28 layers, 16 heads x 72, patch 2), inputs
  latents [2, 4, 32, 32], timesteps [2], class labels [2] (class 1000 is DiT's null class);
- ``sd3``: an ``SD3Transformer2DModel`` of SD3-medium's width (24 heads x 64 = 1536, patch 2,
  16 latent channels, its text and pooled projections) with ``--sd3-blocks`` of its 24 joint
  blocks (default 4: the full depth takes minutes per round on 2 cores), at 512 px: latents
  [2, 16, 64, 64] (1024 image tokens), text states [2, 333, 4096] (77 CLIP + 256 T5 tokens, the
  length SD3's pipeline always passes), pooled text [2, 2048], timesteps [2]. Its denoising loop
  runs ``FlowMatchEulerDiscreteScheduler`` (shift 3), SD3's own, in place of DDIM.
- ``flux``: a ``FluxTransformer2DModel`` of Flux's head shape (128-wide heads, the 16-56-56
  rotary axes) at half its width (12 heads = 1536; Flux.1 has 24) with ``--flux-blocks``
  double-stream and twice as many single-stream blocks (default 2 + 4; Flux.1 has 19 + 38), at
  512 px: packed latents [2, 1024, 64] (32 x 32 tokens of 2 x 2 patches of 16 channels), text
  states [2, 256, 4096] (T5, Flux-schnell's length), pooled text [2, 768], its position ids;
  flow-matching Euler steps. Flux-dev's guidance embedding is off (schnell's configuration).
``--small`` swaps each for a tiny configuration of the same class (a smoke test).

Configurations, each on its own ``fresh_copy`` of the same seeded model (the weights shared):
``eager`` (the reference every closeness figure is measured against), ``inductor``,
``tomesd r=R`` (``tomesd.apply_patch(model, ratio=R)`` with its defaults, then ``torch.compile``
through ``tomesd_compile_shim``; UNet only, see ``TOMESD_ON_DIT``), ``tomesd-eager r=R`` (opt in),
``turbo r=R`` (``options={"ratio": R, **--option}``), ``turbo-sa r=R`` (the same with
``merge_components=("self-attention",)``, tomesd's default) and ``turbo-all r=R`` (all three
components, as the paper merges; SD3 has no cross-attention, so there it adds the feed-forward).
Every compiled configuration gets
its own ``timing.GraphCounter`` backend, so none reuses another's frames and each counts its
graphs. ``--compiler eager`` replaces Inductor by Dynamo's eager backend everywhere.

tomesd 0.1.3 with diffusers 0.42: its patched ``BasicTransformerBlock.forward`` covers the
blocks SD 1.x/2.x and DiT build, and at ratio 0 it reproduces the unpatched UNet exactly
(tests/bench/test_diffusion_speed.py checks it). Under torch.compile it breaks the graph (its
torch.Generator), and the breaks make Dynamo skip the UNet's frames for every model in the
process: see ``tomesd_compile_shim``, which the tomesd rows use unless ``--no-tomesd-shim``.

Measurements, in one process:
1. FLOPs: ``FlopCounterMode`` on an eager call (with turbo_fx.flops' CPU SDPA formula) for
   ``eager`` (= ``inductor``) and tomesd's patched model, ``turbo_fx.explain`` for turbo.
2. Compile seconds: each compiled configuration's first two calls in an empty Inductor cache,
   minus two steady-state medians (two calls, so that a recompile on the second is counted).
3. Steady state: ``--rounds`` interleaved rounds, median and IQR; speed-up over Inductor.
4. Closeness to the unmerged model on the same inputs: relative L2 error and cosine of the output.
5. A DDIM loop (``--ddim-steps`` steps, guidance ``--guidance``, the same initial noise for every
   configuration): per step, the closeness of the guided noise prediction to the reference's at
   that step; at the end, the final latent's.
"""
from __future__ import annotations

import contextlib
import tempfile
import time
import types
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from turbo_fx.bench import output, timing
from turbo_fx.bench.stats import speedup_interval
from turbo_fx.bench.timing import fresh_copy

# turbo-sa merges what tomesd merges by default (self-attention only), for equal-FLOP comparisons;
# turbo-all merges every component the paper does.
TURBO_KINDS = ("turbo", "turbo-sa", "turbo-all")
KIND_COMPONENTS = {"turbo-sa": ("self-attention",), "turbo-all": ("self-attention", "cross-attention", "feed-forward")}
TOMESD_ON_DIT = ("tomesd does not apply to DiT: it is written for UNets (it infers each block's "
                 "downsampling from the latent size, so with patch size 2 every DiT block counts as "
                 "downsample 2 and, at its default max_downsample=1, merges nothing); not run")
TOMESD_ON_SD3 = ("tomesd does not apply to SD3: it patches diffusers' BasicTransformerBlock, and SD3's joint "
                 "blocks are JointTransformerBlock; not run")
TOMESD_ON_FLUX = ("tomesd does not apply to Flux: it patches diffusers' BasicTransformerBlock, and Flux's blocks "
                  "are FluxTransformerBlock and FluxSingleTransformerBlock; not run")

# --------------------------------------------------------------------------- model configs
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True,
    freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, downsample_padding=1,
    mid_block_scale_factor=1, act_fn="silu", norm_num_groups=32, norm_eps=1e-5,
    cross_attention_dim=768, attention_head_dim=8,
)
SMALL_UNET = dict(
    sample_size=16, in_channels=4, out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
    cross_attention_dim=32, attention_head_dim=8,
)
# SD3-medium's transformer config but for ``num_layers``, which the builder sets.
SD3_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                  num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                  pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192)
SD3_LATENT = 64  # 512 px through SD3's VAE (8x): 32 x 32 = 1024 patches of 2 x 2
SD3_TEXT_TOKENS = 77 + 256  # CLIP's 77 then T5's 256 (the pipeline's max_sequence_length)
SD3_BLOCKS = 4
SMALL_SD3 = dict(sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16,
                 num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=16,
                 out_channels=4, pos_embed_max_size=16)
DIT_XL2 = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
               sample_size=32, patch_size=2, num_embeds_ada_norm=1000)
SMALL_DIT = dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
                 sample_size=8, patch_size=2, num_embeds_ada_norm=1000)

# DDIM schedules: SD 1.5's (scaled linear betas) and DiT's (linear betas).
SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                   clip_sample=False, set_alpha_to_one=False, steps_offset=1)
DIT_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                    clip_sample=False, set_alpha_to_one=False, steps_offset=1)
SD3_SCHEDULE = dict(num_train_timesteps=1000, shift=3.0)  # rectified flow, for FlowMatchEulerDiscreteScheduler


@dataclass
class Case:
    """A model with its benchmark inputs and what a denoising step feeds it."""

    name: str
    kind: str  # "unet", "dit", "sd3" or "flux"
    description: str
    model: torch.nn.Module
    inputs: tuple  # positional inputs of one guided forward (batch 2: unconditional, conditional)
    cond: torch.Tensor  # text states [2, L, D] (UNet, SD3) or class labels [2] (DiT), uncond first
    latent_shape: tuple  # one latent, [1, C, H, W]
    schedule: dict
    tomesd_note: Optional[str] = None  # why tomesd is not run, when it is not
    scheduler: str = "DDIMScheduler"  # the diffusers scheduler class the denoising loop builds from ``schedule``

    def step_inputs(self, latents: torch.Tensor, t: torch.Tensor) -> tuple:
        """The forward's inputs at one denoising step: ``latents`` is the doubled batch [2, C, H, W]."""
        if self.kind == "unet":
            return (latents, t, self.cond)
        timesteps = t.reshape(1).expand(latents.shape[0]).contiguous()
        if self.kind == "sd3":  # the pooled text states ride along, in the forward's positional order
            return (latents, self.cond, self.inputs[2], timesteps.to(self.inputs[3].dtype))
        if self.kind == "flux":  # Flux takes the timestep in [0, 1] and its position ids
            return (latents, self.cond, self.inputs[2], timesteps.to(self.inputs[3].dtype) / 1000, *self.inputs[4:])
        return (latents, timesteps, self.cond)

    def noise_prediction(self, output: torch.Tensor) -> torch.Tensor:
        """The noise channels of an output (DiT also predicts its variance in channels 4-7)."""
        return output[:, : self.latent_shape[1]]


def build_unet(small: bool = False, seed: int = 0) -> Case:
    from diffusers import UNet2DConditionModel

    cfg = SMALL_UNET if small else SD15_UNET
    torch.manual_seed(seed)
    model = UNet2DConditionModel(**cfg).eval()
    size = cfg["sample_size"]
    text_len, text_dim = (7, cfg["cross_attention_dim"]) if small else (77, 768)
    gen = torch.Generator().manual_seed(seed + 1)
    latents = torch.randn(2, 4, size, size, generator=gen)
    text = torch.randn(2, text_len, text_dim, generator=gen)
    timestep = torch.tensor(500, dtype=torch.long)
    params = sum(p.numel() for p in model.parameters())
    name = "unet-small" if small else "sd15-unet"
    desc = (f"{'tiny' if small else 'SD-1.5-sized'} UNet2DConditionModel, {params / 1e6:.1f} M parameters, "
            f"RANDOM weights (seed {seed}); latents [2, 4, {size}, {size}], text [2, {text_len}, {text_dim}]")
    return Case(name, "unet", desc, model, (latents, timestep, text), text, (1, 4, size, size), SD_SCHEDULE)


def build_dit(small: bool = False, seed: int = 0) -> Case:
    from diffusers import DiTTransformer2DModel

    cfg = SMALL_DIT if small else DIT_XL2
    torch.manual_seed(seed)
    model = DiTTransformer2DModel(**cfg).eval()
    size = cfg["sample_size"]
    gen = torch.Generator().manual_seed(seed + 1)
    latents = torch.randn(2, 4, size, size, generator=gen)
    timesteps = torch.tensor([500, 500], dtype=torch.long)
    labels = torch.tensor([1000, 207], dtype=torch.long)  # 1000: DiT's null class (unconditional)
    params = sum(p.numel() for p in model.parameters())
    name = "dit-small" if small else "dit-xl-2"
    desc = (f"{'tiny' if small else 'DiT-XL/2-sized'} DiTTransformer2DModel, {params / 1e6:.1f} M parameters, "
            f"RANDOM weights (seed {seed}); latents [2, 4, {size}, {size}], class labels [2]")
    return Case(name, "dit", desc, model, (latents, timesteps, labels), labels, (1, 4, size, size), DIT_SCHEDULE,
                tomesd_note=TOMESD_ON_DIT)


def build_sd3(small: bool = False, seed: int = 0, blocks: int = SD3_BLOCKS) -> Case:
    from diffusers import SD3Transformer2DModel

    cfg = dict(SMALL_SD3) if small else {**SD3_MEDIUM, "num_layers": blocks}
    torch.manual_seed(seed)
    model = SD3Transformer2DModel(**cfg).eval()
    size = cfg["sample_size"] if small else SD3_LATENT
    channels, text_len = cfg["in_channels"], (7 if small else SD3_TEXT_TOKENS)
    gen = torch.Generator().manual_seed(seed + 1)
    latents = torch.randn(2, channels, size, size, generator=gen)
    text = torch.randn(2, text_len, cfg["joint_attention_dim"], generator=gen)
    pooled = torch.randn(2, cfg["pooled_projection_dim"], generator=gen)
    timesteps = torch.tensor([500.0, 500.0])
    params = sum(p.numel() for p in model.parameters())
    tokens = (size // cfg["patch_size"]) ** 2
    name = "sd3-small" if small else f"sd3-medium-{cfg['num_layers']}-blocks"
    what = ("tiny SD3Transformer2DModel" if small else
            f"SD3Transformer2DModel of SD3-medium's width ({cfg['num_attention_heads']} heads x "
            f"{cfg['attention_head_dim']}), {cfg['num_layers']} of its {SD3_MEDIUM['num_layers']} joint blocks")
    desc = (f"{what}, {params / 1e6:.1f} M parameters, RANDOM weights (seed {seed}); latents [2, {channels}, {size}, "
            f"{size}] ({tokens} image tokens), text [2, {text_len}, {cfg['joint_attention_dim']}], pooled text "
            f"[2, {cfg['pooled_projection_dim']}]; flow-matching Euler steps (shift {SD3_SCHEDULE['shift']:g})")
    return Case(name, "sd3", desc, model, (latents, text, pooled, timesteps), text, (1, channels, size, size),
                SD3_SCHEDULE, tomesd_note=TOMESD_ON_SD3, scheduler="FlowMatchEulerDiscreteScheduler")


FLUX_HALF = dict(patch_size=1, in_channels=64, num_attention_heads=12, attention_head_dim=128,
                 joint_attention_dim=4096, pooled_projection_dim=768, axes_dims_rope=(16, 56, 56))
FLUX_BLOCKS = 2
FLUX_SIDE, FLUX_TEXT = 32, 256  # 512 px: 64 x 64 latents packed in 2 x 2 patches; T5 tokens
SMALL_FLUX = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, num_attention_heads=2,
                  attention_head_dim=16, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6))


def flux_ids(side: int, text: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flux's position ids: (0, row, column) per image token in row-major order, zeros for text."""
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    image = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3).float()
    return image, torch.zeros(text, 3)


def build_flux(small: bool = False, seed: int = 0, blocks: int = FLUX_BLOCKS) -> Case:
    from diffusers import FluxTransformer2DModel

    cfg = dict(SMALL_FLUX) if small else {**FLUX_HALF, "num_layers": blocks, "num_single_layers": 2 * blocks}
    torch.manual_seed(seed)
    model = FluxTransformer2DModel(**cfg).eval()
    side, text_len = (8, 6) if small else (FLUX_SIDE, FLUX_TEXT)
    gen = torch.Generator().manual_seed(seed + 1)
    latents = torch.randn(2, side * side, cfg["in_channels"], generator=gen)
    text = torch.randn(2, text_len, cfg["joint_attention_dim"], generator=gen)
    pooled = torch.randn(2, cfg["pooled_projection_dim"], generator=gen)
    img_ids, txt_ids = flux_ids(side, text_len)
    params = sum(p.numel() for p in model.parameters())
    name = "flux-small" if small else f"flux-half-width-{cfg['num_layers']}+{cfg['num_single_layers']}-blocks"
    what = ("tiny FluxTransformer2DModel" if small else
            f"FluxTransformer2DModel with Flux's heads ({cfg['num_attention_heads']} x {cfg['attention_head_dim']}, "
            f"half Flux.1's width), {cfg['num_layers']} double-stream and {cfg['num_single_layers']} single-stream blocks")
    desc = (f"{what}, {params / 1e6:.1f} M parameters, RANDOM weights (seed {seed}); packed latents [2, {side * side}, "
            f"{cfg['in_channels']}], text [2, {text_len}, {cfg['joint_attention_dim']}], pooled text "
            f"[2, {cfg['pooled_projection_dim']}]; flow-matching Euler steps (shift {SD3_SCHEDULE['shift']:g})")
    inputs = (latents, text, pooled, torch.tensor([0.5, 0.5]), img_ids, txt_ids)
    return Case(name, "flux", desc, model, inputs, text, (1, side * side, cfg["in_channels"]), SD3_SCHEDULE,
                tomesd_note=TOMESD_ON_FLUX, scheduler="FlowMatchEulerDiscreteScheduler")


BUILDERS = {"unet": build_unet, "dit": build_dit, "sd3": build_sd3, "flux": build_flux}


# --------------------------------------------------------------------------- configurations
# tomesd under torch.compile. Each patched block, on every call, draws its random destination
# offsets with ``torch.randint(..., generator=tomesd's own torch.Generator)``, and on the first
# call creates that generator (``tomesd.utils.init_generator``, a fork of the global RNG state).
# Dynamo cannot put either in a graph (a Generator object has no graph form: "Missing
# `as_proxy()`"; "Opaque objects cannot be created inside the torch.compile region"). Each is
# a graph break inside the loops over blocks of UNet2DConditionModel, the Down/Up blocks and
# Transformer2DModel, so Dynamo runs those frames eagerly (17 graphs instead of 1 for the small
# UNet), AND marks their code objects "skip" for the whole process: a plain Inductor model of the
# same classes compiled before then runs as 18 pieces too. The shim below makes tomesd compile to
# one graph without changing what it computes: the generator is created (by tomesd's own
# init_generator) before compiling, and tomesd's module sees a ``torch`` whose ``randint``
# ignores ``generator=``, so the offsets come from the global RNG (same distribution, another
# random stream; seeded by torch.manual_seed). tomesd's files are not touched; the shim is the
# attribute ``tomesd.merge.torch``, set while a benchmark runs and put back after.


def _randint_from_global_rng(*args, generator=None, **kwargs):
    return torch.randint(*args, **kwargs)


@contextlib.contextmanager
def tomesd_compile_shim(enabled: bool = True):
    """While active, tomesd's merge module draws its random offsets from the global RNG."""
    import tomesd.merge

    if not enabled:
        yield
        return
    original = tomesd.merge.torch
    shim = types.ModuleType("torch_for_tomesd")
    shim.__dict__.update(vars(torch))
    shim.randint = _randint_from_global_rng
    tomesd.merge.torch = shim
    try:
        yield
    finally:
        tomesd.merge.torch = original


def apply_tomesd(model: torch.nn.Module, ratio: float) -> torch.nn.Module:
    """``tomesd.apply_patch(model, ratio=ratio)`` with tomesd's defaults, as its README shows, and
    its generator created up front (what its first call would do, outside any compiled region)."""
    import tomesd
    from tomesd.utils import init_generator

    tomesd.apply_patch(model, ratio=ratio)
    device = next(model.parameters()).device
    model._tome_info["args"]["generator"] = init_generator(device)
    return model


def forward(fn: Callable, inputs: tuple) -> torch.Tensor:
    """One call of a diffusers model (or its compiled wrapper) on positional inputs: the output tensor.
    Positional, because tomesd's forward pre-hook reads the latent size from ``args[0]``."""
    with torch.no_grad():
        return fn(*inputs, return_dict=False)[0]


@dataclass
class Config:
    name: str
    kind: str  # eager, inductor, tomesd, tomesd-eager, turbo, turbo-sa or turbo-all
    ratio: Optional[float] = None


def configurations(kinds: Sequence[str], ratios: Sequence[float], case: Case) -> tuple[list[Config], list[str]]:
    """The configurations to run, in order, and notes on those skipped."""
    configs, notes = [], []
    for kind in ("eager", "inductor"):
        configs.append(Config(kind, kind))
    for kind in ("tomesd", "tomesd-eager", *TURBO_KINDS):
        if kind not in kinds:
            continue
        if kind.startswith("tomesd") and case.tomesd_note:
            if case.tomesd_note not in notes:
                notes.append(case.tomesd_note)
            continue
        configs.extend(Config(f"{kind} r={r:g}", kind, r) for r in ratios)
    if "inductor" not in kinds:
        notes.append("inductor is always run: it is the speed-up baseline")
    return configs, notes


def make_model(config: Config, base: torch.nn.Module, compiler: str, turbo_options: dict):
    """The callable of one configuration, on its own copy of ``base``, and its GraphCounter
    (None for the eager configurations)."""
    model = fresh_copy(base)
    if config.kind in ("tomesd", "tomesd-eager"):
        apply_tomesd(model, config.ratio)
    if config.kind in ("eager", "tomesd-eager"):
        return model, None
    options = None
    if config.kind in TURBO_KINDS:
        options = {**turbo_options, "ratio": config.ratio}
        if config.kind in KIND_COMPONENTS:
            options["merge_components"] = KIND_COMPONENTS[config.kind]
    counter = timing.counted_backend(options, compiler)
    return torch.compile(model, backend=counter), counter


# --------------------------------------------------------------------------- metrics
def turbo_flops(base: torch.nn.Module, inputs: tuple, options: dict) -> dict:
    """FLOPs of turbo's rewritten graphs (``turbo_fx.explain``), or why they are unavailable."""
    import turbo_fx

    try:
        report = turbo_fx.explain(fresh_copy(base), *inputs, model_kwargs={"return_dict": False}, **options)
    except Exception as exc:  # a config the backend refuses: say so, measure the rest
        return {"flops": None, "why": f"explain failed: {type(exc).__name__}: {exc}", "graphs": 0}
    rewritten = [g for g in report.graphs if g.rewritten]
    info = {"graphs": len(report.graphs), "rewritten": len(rewritten), "fallbacks": report.fallbacks}
    if not rewritten or any(g.flops_after is None for g in report.graphs):
        why = "; ".join(sorted(set(report.fallbacks))) or "no graph was rewritten"
        return {**info, "flops": None, "why": f"unavailable: {why}"}
    return {**info, "flops": report.flops_after, "flops_before": report.flops_before, "why": None}


def _graph_breaks() -> int:
    """Graph breaks Dynamo has met so far in this process."""
    return sum(torch._dynamo.utils.counters["graph_break"].values())


def ddim_loop(fn: Callable, case: Case, noise: torch.Tensor, steps: int, guidance: float) -> tuple[list, torch.Tensor]:
    """``steps`` denoising steps (DDIM, or the case's own scheduler) with classifier-free guidance
    from ``noise``: (guided model prediction per step, final latent)."""
    import diffusers

    scheduler = getattr(diffusers, case.scheduler)(**case.schedule)
    scheduler.set_timesteps(steps)
    latent = noise * getattr(scheduler, "init_noise_sigma", 1.0)  # flow matching starts from plain noise
    predictions = []
    for t in scheduler.timesteps:
        both = torch.cat([latent, latent])
        out = case.noise_prediction(forward(fn, case.step_inputs(both, t)))
        uncond, cond = out.chunk(2)
        eps = uncond + guidance * (cond - uncond)
        predictions.append(eps)
        latent = scheduler.step(eps, t, latent).prev_sample
    return predictions, latent


# --------------------------------------------------------------------------- the run
def run_case(case: Case, ratios: Sequence[float], kinds: Sequence[str], rounds: int = 5, compiler: str = "inductor",
             turbo_options: Optional[dict] = None, ddim_steps: int = 10, guidance: float = 7.5, seed: int = 0,
             tomesd_shim: bool = True, log: Callable[[str], None] = timing.log) -> dict:
    """Every measurement for one model; returns the JSON-ready result."""
    configs, notes = configurations(kinds, ratios, case)
    uses_tomesd = any(c.kind.startswith("tomesd") for c in configs)
    if uses_tomesd:
        notes.append("tomesd: tomesd.apply_patch(model, ratio=r), default options; "
                     + ("compile shim on (its random offsets from the global RNG, its generator made before "
                        "compiling: see tomesd_compile_shim)" if tomesd_shim else
                        "compile shim OFF: tomesd's graph breaks make Dynamo skip the UNet's loop frames for "
                        "every configuration in this process, so the compiled rows after it are fragmented too"))
    with tomesd_compile_shim(uses_tomesd and tomesd_shim):
        result = _run_case(case, configs, notes, ratios, kinds, rounds, compiler, dict(turbo_options or {}),
                           ddim_steps, guidance, seed, log)
    result["settings"]["tomesd_shim"] = tomesd_shim if uses_tomesd else None
    return result


def _run_case(case, configs, notes, ratios, kinds, rounds, compiler, turbo_options, ddim_steps, guidance, seed, log):
    base, inputs = case.model, case.inputs
    log(f"{case.name}: {case.description}")
    log("configurations: " + ", ".join(c.name for c in configs))
    results: dict = {c.name: {"kind": c.kind, "ratio": c.ratio} for c in configs}

    # 1. FLOPs, before anything is compiled (turbo_fx.explain resets Dynamo).
    base_flops = timing.count_flops(forward, base, inputs)
    for c in configs:
        entry = results[c.name]
        if c.kind in ("eager", "inductor"):
            entry.update(flops=base_flops, flops_note=None)
        elif c.kind in ("tomesd", "tomesd-eager"):
            tomesd_model, _ = make_model(Config(c.name, "tomesd-eager", c.ratio), base, compiler, {})
            torch.manual_seed(seed)
            entry.update(flops=timing.count_flops(forward, tomesd_model, inputs),
                         flops_note="tomesd's patched model, eager")
        else:
            extra = {"merge_components": KIND_COMPONENTS[c.kind]} if c.kind in KIND_COMPONENTS else {}
            info = turbo_flops(base, inputs, {**turbo_options, "ratio": c.ratio, **extra})
            entry.update(flops=info.pop("flops"), flops_note=info.pop("why"), turbo_explain=info)
        log(f"FLOPs {c.name}: " + (f"{entry['flops'] / 1e9:.2f} G" if entry["flops"] else str(entry["flops_note"])))
    torch._dynamo.reset()

    # 2. Compile: the first two calls of each configuration, each with its own empty cache dir.
    if compiler == "inductor":
        timing.no_compile_caches()
        turbo = any(c.kind in TURBO_KINDS for c in configs)
        log(f"warming up the compilers (untimed): {timing.warm_up_compilers(turbo):.1f} s")
    timing.raise_recompile_limits()
    fns, first_calls, outputs = {}, {}, {}
    # Each compile in an empty cache dir, kept until the end: the compiled code stays loaded.
    with tempfile.TemporaryDirectory(prefix="turbo-fx-diffusion-") as cache_root:
        from turbo_fx.report import recording

        for c in configs:
            fn, counter = make_model(c, base, compiler, turbo_options)
            breaks_before = _graph_breaks()
            torch.manual_seed(seed)  # tomesd's random offsets (through the shim) come from the global RNG
            with timing.fresh_cache(cache_root, delete=False, enabled=compiler == "inductor"), recording() as rec:
                start = time.perf_counter()
                forward(fn, inputs)
                first = time.perf_counter() - start
                start = time.perf_counter()
                outputs[c.name] = forward(fn, inputs)
                second = time.perf_counter() - start
            breaks_after = _graph_breaks()
            fns[c.name] = fn
            first_calls[c.name] = (first, second)
            entry = results[c.name]
            entry.update(first_call_s=first, second_call_s=second)
            if c.kind not in ("eager", "tomesd-eager"):
                entry.update(dynamo_graphs=counter.graphs, graph_breaks=breaks_after - breaks_before)
            if c.kind in TURBO_KINDS:
                entry["turbo_report"] = [{"rewritten": g.rewritten, "merges": g.merges, "fallback": g.fallback_reason}
                                         for g in rec.graphs]
            log(f"first two calls {c.name}: {first:.1f} s + {second:.1f} s")

        # 3. Steady state, interleaved.
        log(f"timing: {rounds} interleaved rounds")
        calls = {name: (lambda fn=fn: forward(fn, inputs)) for name, fn in fns.items()}
        times = timing.interleaved(calls, (), rounds, warmup=0, progress=log)

        # 5. DDIM loops (4. closeness uses the second call's outputs).
        noise = torch.randn(case.latent_shape, generator=torch.Generator().manual_seed(seed + 2))
        trajectories = {}
        if ddim_steps > 0:
            for c in configs:
                torch.manual_seed(seed)
                start = time.perf_counter()
                trajectories[c.name] = ddim_loop(fns[c.name], case, noise, ddim_steps, guidance)
                log(f"DDIM {ddim_steps} steps {c.name}: {time.perf_counter() - start:.1f} s")

    inductor_median = timing.stats(times["inductor"])["median"]
    reference = outputs["eager"]
    for c in configs:
        entry = results[c.name]
        st = timing.stats(times[c.name])
        first, second = first_calls[c.name]
        entry["latency"] = st
        entry["latency_s"] = times[c.name]
        entry["speedup_vs_inductor"] = inductor_median / st["median"]
        interval = speedup_interval(times["inductor"], times[c.name])
        entry["speedup_interval"] = [interval["low"], interval["high"]]
        entry["compile_s"] = None if c.kind in ("eager", "tomesd-eager") else first + second - 2 * st["median"]
        entry["flop_ratio"] = entry["flops"] / base_flops if entry["flops"] else None
        entry["flop_ideal_speedup"] = 1 / entry["flop_ratio"] if entry["flop_ratio"] else None
        entry["output"] = timing.closeness(outputs[c.name], reference)
        if trajectories:
            ref_eps, ref_latent = trajectories["eager"]
            eps, latent = trajectories[c.name]
            entry["ddim"] = {"per_step": [timing.closeness(a, b) for a, b in zip(eps, ref_eps)],
                             "final_latent": timing.closeness(latent, ref_latent)}
        if c.kind in TURBO_KINDS and entry.get("turbo_report") is not None:
            reports = entry["turbo_report"]
            if not any(g["rewritten"] for g in reports):
                reasons = sorted({g["fallback"] for g in reports if g["fallback"]})
                note = f"{c.name} merged nothing (fell back: {'; '.join(reasons) or 'no merge site'})"
                if note not in notes:
                    notes.append(note)
    return {"model": case.name, "kind": case.kind, "description": case.description, "random_weights": True,
            "settings": {"ratios": list(ratios), "configs": list(kinds), "rounds": rounds, "compiler": compiler,
                         "turbo_options": turbo_options, "ddim_steps": ddim_steps, "guidance": guidance,
                         "seed": seed, "torch_threads": torch.get_num_threads()},
            "scheduler": case.scheduler, "baseline_flops": base_flops, "configs": results, "notes": notes}


# --------------------------------------------------------------------------- output
TABLE_HEADERS = ["config", "compile s", "median ms", "IQR ms", "speed-up vs Inductor", "95% interval",
                 "Dynamo graphs", "graph breaks", "GFLOPs", "FLOP ratio", "FLOP-ideal speed-up",
                 "output rel L2", "output cosine", "DDIM final rel L2", "DDIM final cosine"]


def _interval(e: dict) -> str:
    """The speed-up's 95% interval, '-' for Inductor itself or a run stored without one."""
    interval = e.get("speedup_interval")
    if not interval or e["kind"] == "inductor":
        return "-"
    return f"[{interval[0]:.2f}, {interval[1]:.2f}]"


def table_rows(run: dict) -> list[list[str]]:
    f, rows = output.f, []
    for name, e in run["configs"].items():
        final = (e.get("ddim") or {}).get("final_latent") or {}
        rows.append([name, f(e.get("compile_s"), ".1f"), f(e["latency"]["median"] * 1e3, ".1f"),
                     f(e["latency"]["iqr"] * 1e3, ".1f"), f"{e['speedup_vs_inductor']:.2f}x", _interval(e),
                     f(e.get("dynamo_graphs"), "d"), f(e.get("graph_breaks"), "d"),
                     f(e["flops"] / 1e9 if e["flops"] else None, ".3g", "unavailable"), f(e.get("flop_ratio"), ".3f"),
                     f(e.get("flop_ratio") and 1 / e["flop_ratio"], ".2f") + ("x" if e.get("flop_ratio") else ""),
                     f"{e['output']['rel_l2']:.2e}", f"{e['output']['cosine']:.6f}",
                     f(final.get("rel_l2"), ".2e"), f(final.get("cosine"), ".6f")])
    return rows


def ddim_rows(run: dict) -> list[list[str]]:
    rows = []
    for name, e in run["configs"].items():
        steps = (e.get("ddim") or {}).get("per_step")
        if steps and e["kind"] != "eager":
            rows.append([name] + [f"{s['rel_l2']:.2e} / {s['cosine']:.4f}" for s in steps])
    return rows


def markdown(payload: dict) -> str:
    lines = output.header("Diffusion speed: eager / Inductor / tomesd / turbo", payload)
    for run in payload["runs"]:
        s = run["settings"]
        lines += [f"## {run['model']}", "", f"{run['description']}.", "",
                  f"Compiler {s['compiler']}, {s['rounds']} timed rounds (median), {s['torch_threads']} torch threads; "
                  f"speed-up intervals: 95% bootstrap over the interleaved rounds; FLOP-ideal speed-up: 1 / FLOP "
                  f"ratio; closeness against the eager unmerged model on the same inputs; "
                  f"{'DDIM' if run.get('scheduler', 'DDIMScheduler') == 'DDIMScheduler' else run['scheduler']} "
                  f"{s['ddim_steps']} steps (the DDIM columns), "
                  f"guidance {s['guidance']}, the same initial noise. Compile s: the first two calls minus two "
                  f"medians, empty Inductor cache. Turbo options: {s['turbo_options'] or '{}'}.", "",
                  output.table(TABLE_HEADERS, table_rows(run))]
        steps = ddim_rows(run)
        if steps:
            lines += ["", "Guided noise prediction per DDIM step, against the eager model's at that step "
                      "(relative L2 / cosine):", "",
                      output.table(["config"] + [f"step {i + 1}" for i in range(len(steps[0]) - 1)], steps)]
        lines += [""] + [f"- {note}" for note in run["notes"]] + [""]
    return "\n".join(lines)


def run(args) -> dict:
    machine = timing.machine()
    timing.log(f"machine: {timing.machine_line(machine)}")
    payload = {"machine": machine, "command": args.command, "runs": []}
    for kind in args.model:
        extra = {"sd3": {"blocks": args.sd3_blocks}, "flux": {"blocks": args.flux_blocks}}.get(kind, {})
        case = BUILDERS[kind](small=args.small, seed=args.seed, **extra)
        payload["runs"].append(run_case(case, args.ratio, args.configs, rounds=args.rounds, compiler=args.compiler,
                                        turbo_options=args.options, ddim_steps=args.ddim_steps,
                                        guidance=args.guidance, seed=args.seed, tomesd_shim=args.tomesd_shim))
        del case
        torch._dynamo.reset()
    output.write(payload, args.out, args.name or ("diffusion_speed_small" if args.small else "diffusion_speed"),
                 markdown)
    return payload
