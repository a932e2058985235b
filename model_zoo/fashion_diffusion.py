"""A small class-conditional diffusion UNet trained here on Fashion-MNIST: real weights for generation fidelity.

No pretrained Stable Diffusion weights install offline, so merge-and-restore on diffusion UNets
is measured on this stand-in: a diffusers ``UNet2DConditionModel`` with cross-attention
transformer blocks at 32x32 (1024 tokens) and 16x16 (256 tokens), trained with the DDPM
objective (epsilon prediction) on Fashion-MNIST, conditioned on the class label through
cross-attention to a few learned tokens per label (:class:`ClassTokens`; label 10 is the null
label of classifier-free guidance). Training (800 steps of 32 images, 0.43 epoch) took 1160 s
on the shared 2-core machine (one thread, ``nice -n 10``, final loss 0.066); the weights (0.8 M
parameters, 3.3 MB) are cached. The samples show their classes but are undertrained: noisy
textures and backgrounds. Measured on 200 samples (20 DDIM steps, guidance 2.5) by
``turbo-fx diffusion-fidelity``: a DINOv2-S linear probe assigns 0.395 [0.330, 0.464] of them
to their class (real held-out images: 0.765), FD to 1000 test images 323 [275, 370] (real
images at the same n: 36).

* Images: Fashion-MNIST 28x28 padded to 32x32 with the background value, pixels in [-1, 1],
  shape ``[B, 1, 32, 32]`` (:func:`to_model_range`).
* Training: ``python -m turbo_fx.model_zoo.fashion_diffusion train [--steps N] [--out PATH]``;
  :func:`load_fashion_diffusion` reads the cache and trains only when no cached file exists.
* Sampling: :func:`sample`, DDIM with classifier-free guidance, the conditional and null halves
  in one batch of 2B per UNet call (as Stable Diffusion pipelines do), from a given noise tensor.

Attention heads are 16 to 32 wide (one head at 32x32 and 16x16, two at 8x8): 8-wide heads made
the CPU flash-attention kernel several times slower per step (its cost goes with the number of
scores, heads x tokens^2, more than with the FLOPs).
Note that diffusers' ``attention_head_dim`` argument of this model is the number of heads.
"""
from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from . import training
from .deps import default_cache_dir, read_weights, record_path, require, save_weights

NUM_CLASSES = 10
NULL_LABEL = NUM_CLASSES  # the "no class" label of classifier-free guidance
TOKENS_PER_LABEL = 4
CROSS_ATTENTION_DIM = 64
IMAGE_SIZE = 32
BACKGROUND = -1.0  # the value of the 2-pixel border added around the 28x28 images

# Training defaults (see the module docstring for the time they take).
DEFAULT_STEPS = 800
DEFAULT_BATCH = 32
DEFAULT_LR = 2e-3
DEFAULT_SEED = 0
LABEL_DROPOUT = 0.1
EMA_DECAY = 0.999
WARMUP_STEPS = 50
# Bump when the model, the data or the recipe changes, so that older cached weights are not read.
WEIGHTS_VERSION = 1
WEIGHTS_NAME = f"fashion_diffusion_v{WEIGHTS_VERSION}.safetensors"


# --------------------------------------------------------------------------- the model


def fashion_unet_config() -> dict:
    """Keyword arguments of ``UNet2DConditionModel`` for 32x32 one-channel images.

    Down path: CrossAttn at 32x32 (16 channels, 1024 tokens), CrossAttn at 16x16 (32 channels,
    256 tokens), plain ResNet at 8x8 (64 channels); a cross-attention mid block at 8x8; the up
    path mirrors it (two transformer blocks at each of 16x16 and 32x32). 0.8 M parameters.
    A 16-channel top level trains twice as many steps in the CPU budget as a 32-channel one
    (1.65 s against 3.2 s per batch of 32 on the shared 2-core machine).
    """
    return dict(
        sample_size=IMAGE_SIZE,
        in_channels=1,
        out_channels=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        cross_attention_dim=CROSS_ATTENTION_DIM,
        attention_head_dim=(1, 1, 2),  # diffusers reads this as the number of heads (16, 32, 32 channels each)
        norm_num_groups=8,
    )


def build_fashion_unet(seed: Optional[int] = None) -> nn.Module:
    """A freshly initialised UNet of :func:`fashion_unet_config` (``seed``: seed torch's RNG first)."""
    require("diffusers")
    from diffusers import UNet2DConditionModel

    if seed is not None:
        torch.manual_seed(seed)
    return UNet2DConditionModel(**fashion_unet_config())


class ClassTokens(nn.Module):
    """Class labels -> ``encoder_hidden_states`` ``[B, tokens, dim]``: ``tokens`` learned vectors per label.

    Labels 0..num_classes-1 are the classes, ``num_classes`` (= :data:`NULL_LABEL`) the null label
    that classifier-free guidance uses for its unconditional half.
    """

    def __init__(self, num_classes: int = NUM_CLASSES, tokens: int = TOKENS_PER_LABEL,
                 dim: int = CROSS_ATTENTION_DIM) -> None:
        super().__init__()
        self.num_classes, self.tokens, self.dim = num_classes, tokens, dim
        # Unit-variance start, like nn.Embedding: the labels' keys differ from the first step on.
        self.table = nn.Parameter(torch.randn(num_classes + 1, tokens, dim))

    @property
    def null_label(self) -> int:
        return self.num_classes

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        labels = torch.as_tensor(labels, dtype=torch.long, device=self.table.device)
        if labels.ndim != 1:
            raise ValueError(f"labels must be 1-d, got shape {tuple(labels.shape)}")
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) > self.num_classes):
            raise ValueError(f"labels must lie in [0, {self.num_classes}] ({self.num_classes} is the null label)")
        return self.table[labels]


def noise_scheduler_config() -> dict:
    """The DDPM noise schedule of training; DDIM sampling uses the same betas."""
    return dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon")


def ddpm_scheduler():
    require("diffusers")
    from diffusers import DDPMScheduler

    return DDPMScheduler(**noise_scheduler_config(), clip_sample=True)


def ddim_scheduler():
    """DDIM on the training betas; "trailing" spacing so that the first step is t = 999 (pure noise)."""
    require("diffusers")
    from diffusers import DDIMScheduler

    return DDIMScheduler(**noise_scheduler_config(), clip_sample=True, set_alpha_to_one=True,
                         timestep_spacing="trailing")


# --------------------------------------------------------------------------- data


def to_model_range(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 Fashion-MNIST ``[n, 28, 28]`` (0..255) -> float32 ``[n, 1, 32, 32]`` in [-1, 1], background -1."""
    x = torch.as_tensor(np.asarray(images))
    if x.ndim != 3:
        raise ValueError(f"expected [n, H, W] uint8 images, got shape {tuple(x.shape)}")
    x = x.float() / 127.5 - 1.0
    pad_h, pad_w = IMAGE_SIZE - x.shape[1], IMAGE_SIZE - x.shape[2]
    if pad_h < 0 or pad_w < 0:
        raise ValueError(f"images larger than {IMAGE_SIZE}x{IMAGE_SIZE}: {tuple(x.shape[1:])}")
    x = nn.functional.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=BACKGROUND)
    return x[:, None].contiguous()


def fashion_training_set(limit: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST train split in model range ``[n, 1, 32, 32]`` and its labels (int64)."""
    from .data import fashion_mnist

    images, labels = fashion_mnist("train", limit=limit)
    return to_model_range(images), torch.from_numpy(labels)


# --------------------------------------------------------------------------- training


def unet_output(out: Any) -> torch.Tensor:
    """The predicted noise from a UNet call: ``.sample`` of diffusers' output, a tuple's first item, or the tensor."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "sample"):
        return out.sample
    if isinstance(out, (tuple, list)):
        return out[0]
    raise TypeError(f"cannot read the UNet's output from {type(out).__name__}")


def diffusion_loss(unet: Callable, class_tokens: ClassTokens, scheduler, x0: torch.Tensor, labels: torch.Tensor,
                   noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Mean squared error between ``noise`` and the UNet's prediction of it from ``x0`` noised to ``timesteps``."""
    noisy = scheduler.add_noise(x0, noise, timesteps)
    prediction = unet_output(unet(noisy, timesteps, class_tokens(labels)))
    return nn.functional.mse_loss(prediction, noise)


def drop_labels(labels: torch.Tensor, p: float, generator: torch.Generator, null_label: int = NULL_LABEL) -> torch.Tensor:
    """``labels`` with each one replaced by ``null_label`` with probability ``p`` (classifier-free guidance training)."""
    drop = torch.rand(len(labels), generator=generator) < p
    return torch.where(drop, torch.full_like(labels, null_label), labels)


def learning_rate(step: int, total: int, peak: float, warmup: int = WARMUP_STEPS) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 5% of ``peak`` at ``total``."""
    return training.learning_rate(step, total, peak, warmup)


class EMA:
    """Exponential moving average of parameters, with the usual warm-up ``min(decay, (1+n)/(10+n))``."""

    def __init__(self, modules: Sequence[nn.Module], decay: float = EMA_DECAY) -> None:
        self.params = [p for m in modules for p in m.parameters()]
        self.shadow = [p.detach().clone() for p in self.params]
        self.decay, self.updates = decay, 0

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for s, p in zip(self.shadow, self.params):
            s.mul_(d).add_(p.detach(), alpha=1 - d)

    @torch.no_grad()
    def copy_to_model(self) -> None:
        for s, p in zip(self.shadow, self.params):
            p.copy_(s)


@dataclass
class TrainRecord:
    """What a training run did; written as JSON next to the weights."""

    steps: int
    batch_size: int
    seed: int
    lr: float
    label_dropout: float
    ema_decay: float
    threads: int
    train_images: int
    seconds: float = 0.0
    final_loss: float = math.nan  # mean training loss over the last 50 steps (or all, if fewer)
    losses: list = field(default_factory=list)  # [step, mean loss of the steps since the last entry]
    torch_version: str = torch.__version__
    weights_version: int = WEIGHTS_VERSION
    scheduler: dict = field(default_factory=noise_scheduler_config)
    unet_config: dict = field(default_factory=fashion_unet_config)


def train(steps: int = DEFAULT_STEPS, batch_size: int = DEFAULT_BATCH, lr: float = DEFAULT_LR, seed: int = DEFAULT_SEED,
          images: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None,
          label_dropout: float = LABEL_DROPOUT, ema_decay: float = EMA_DECAY, warmup: int = WARMUP_STEPS,
          threads: Optional[int] = 1, log_every: int = 50,
          log: Callable[[str], None] = print) -> tuple[nn.Module, ClassTokens, TrainRecord]:
    """Train the UNet and the class tokens; returns them (EMA weights, eval mode) and the run's record.

    ``images`` ``[n, 1, 32, 32]`` in [-1, 1] with ``labels`` (default: the 60k Fashion-MNIST
    training images). Deterministic in ``seed``: the initial weights, the shuffling, the label
    dropout, the timesteps and the noise all come from generators seeded by it. ``ema_decay`` 0
    returns the last step's weights instead of their moving average. ``threads``:
    torch's intra-op threads while training (1 was fastest on the 2 shared cores; None keeps
    torch's setting), restored afterwards.
    """
    if images is None:
        images, labels = fashion_training_set()
    images, labels = torch.as_tensor(images, dtype=torch.float32), torch.as_tensor(labels, dtype=torch.long)
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        unet, tokens, record = _train(steps, batch_size, lr, seed, images, labels, label_dropout, ema_decay,
                                      warmup, log_every, log)
    finally:
        torch.set_num_threads(old_threads)
    record.threads = threads or old_threads
    return unet, tokens, record


def init_models(seed: int = DEFAULT_SEED) -> tuple[nn.Module, ClassTokens]:
    """The untrained (UNet, ClassTokens) that :func:`train` starts from with this seed."""
    unet = build_fashion_unet(seed=seed)
    return unet, ClassTokens()


def _train(steps, batch_size, lr, seed, images, labels, label_dropout, ema_decay, warmup, log_every, log):
    unet, tokens = init_models(seed)
    unet.train()
    tokens.train()
    scheduler = ddpm_scheduler()
    params = list(unet.parameters()) + list(tokens.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    ema = EMA([unet, tokens], ema_decay)
    gen = torch.Generator().manual_seed(seed + 1)
    record = TrainRecord(steps, batch_size, seed, lr, label_dropout, ema_decay, 0, len(images))
    batches, losses = training.shuffled_batches(len(images), batch_size, gen), training.LossLog(steps, log_every, log)
    for step, idx in zip(range(steps), batches):
        x0, y = images[idx], drop_labels(labels[idx], label_dropout, gen)
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(idx),), generator=gen)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps, lr, warmup)
        loss = diffusion_loss(unet, tokens, scheduler, x0, y, noise, t)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        ema.update()
        losses.add(step, loss)
    record.losses, record.seconds, record.final_loss = losses.losses, losses.seconds, losses.final_loss
    ema.copy_to_model()
    return unet.eval(), tokens.eval(), record


# --------------------------------------------------------------------------- saving and loading


def weights_path(cache_dir: Optional[str | os.PathLike] = None) -> Path:
    """Where the trained weights are cached: ``<cache>/fashion_diffusion_v<N>.safetensors`` (see ``default_cache_dir``)."""
    return default_cache_dir(cache_dir) / WEIGHTS_NAME


def save_fashion_diffusion(unet: nn.Module, class_tokens: ClassTokens, path: str | os.PathLike,
                           record: Optional[TrainRecord] = None) -> Path:
    """UNet and class tokens in one safetensors file (keys ``unet.*`` and ``class_tokens.*``), plus the record's JSON."""
    tensors = {f"unet.{k}": v for k, v in unet.state_dict().items()}
    tensors.update({f"class_tokens.{k}": v for k, v in class_tokens.state_dict().items()})
    meta = {"weights_version": str(WEIGHTS_VERSION), "tokens_per_label": str(class_tokens.tokens),
            "num_classes": str(class_tokens.num_classes)}
    text = None if record is None else json.dumps(record.__dict__, indent=1, default=list)
    return save_weights(tensors, meta, path, text)


def read_fashion_diffusion(path: str | os.PathLike) -> tuple[nn.Module, ClassTokens]:
    """The (UNet, ClassTokens) saved by :func:`save_fashion_diffusion`, in eval mode."""
    tensors, meta = read_weights(path, WEIGHTS_VERSION)
    unet = build_fashion_unet()
    unet.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("unet.")}, strict=True)
    tokens = ClassTokens(int(meta["num_classes"]), int(meta["tokens_per_label"]))
    tokens.load_state_dict({k[13:]: v for k, v in tensors.items() if k.startswith("class_tokens.")}, strict=True)
    return unet.eval(), tokens.eval()


def load_fashion_diffusion(cache_dir: Optional[str | os.PathLike] = None, steps: int = DEFAULT_STEPS,
                           log: Callable[[str], None] = print) -> tuple[nn.Module, ClassTokens]:
    """The trained (UNet, ClassTokens) in eval mode, from the cache; trains and caches them first if absent."""
    path = weights_path(cache_dir)
    if not path.is_file():
        log(f"{path} not found: training the Fashion-MNIST diffusion model ({steps} steps, "
            f"about 20 minutes on 2 CPU cores) ...")
        unet, tokens, record = train(steps=steps, log=log)
        save_fashion_diffusion(unet, tokens, path, record)
        log(f"trained in {record.seconds:.0f} s (final loss {record.final_loss:.4f}); cached in {path}")
    return read_fashion_diffusion(path)


# --------------------------------------------------------------------------- sampling


@torch.no_grad()
def sample(unet: Callable, class_tokens: ClassTokens, labels: Sequence[int] | torch.Tensor, noise: torch.Tensor,
           steps: int = 20, guidance: float = 2.5, scheduler: str = "ddim", return_steps: bool = False):
    """Images ``[B, 1, 32, 32]`` in [-1, 1] generated from the given initial ``noise`` ``[B, 1, 32, 32]``.

    DDIM (eta 0, deterministic) over ``steps`` steps on the training betas, with classifier-free
    guidance: every step calls ``unet`` once on a batch of 2B, the conditional half (``labels``)
    first and the null-label half second, and uses ``null + guidance * (cond - null)``.
    ``guidance`` 1 is plain conditional sampling (the null half is still computed, so every
    configuration runs the same batch). ``unet`` is any callable with the UNet's signature
    ``unet(sample, timestep, encoder_hidden_states)`` returning diffusers' output or a tensor,
    e.g. a ``torch.compile``'d UNet; the timestep is a long tensor ``[2B]`` every step, so a
    compiled UNet compiles once for all steps.

    ``return_steps``: also return the list of the UNet's raw outputs, one ``[2B, 1, 32, 32]``
    tensor per step (conditional half first), for per-step comparisons between configurations.
    """
    if scheduler != "ddim":
        raise ValueError(f"only scheduler='ddim' is implemented, not {scheduler!r}")
    labels = torch.as_tensor(labels, dtype=torch.long)
    x = noise.detach().clone().float()
    if x.ndim != 4 or len(labels) != len(x):
        raise ValueError(f"noise must be [B, C, H, W] with B = len(labels); got {tuple(x.shape)} and {len(labels)} labels")
    sched = ddim_scheduler()
    sched.set_timesteps(steps)
    b = len(labels)
    context = torch.cat([class_tokens(labels), class_tokens(torch.full_like(labels, class_tokens.null_label))])
    outputs = []
    for t in sched.timesteps:
        timestep = torch.full((2 * b,), int(t), dtype=torch.long)
        out = unet_output(unet(torch.cat([x, x]), timestep, context)).float()
        if return_steps:
            outputs.append(out.detach().clone())
        cond, null = out[:b], out[b:]
        eps = null + guidance * (cond - null)
        x = sched.step(eps, int(t), x, eta=0.0).prev_sample
    images = x.clamp(-1.0, 1.0)
    return (images, outputs) if return_steps else images


def noise_for(n: int, seed: int = 0) -> torch.Tensor:
    """Initial noise ``[n, 1, 32, 32]`` from a generator seeded by ``seed`` (the same for every configuration)."""
    return torch.randn((n, 1, IMAGE_SIZE, IMAGE_SIZE), generator=torch.Generator().manual_seed(seed))


def balanced_labels(n: int) -> torch.Tensor:
    """``0, 1, ..., 9, 0, 1, ...``: n labels, every class as often as possible."""
    return torch.arange(n) % NUM_CLASSES


# --------------------------------------------------------------------------- command line


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = training.train_command(
        "fashion_diffusion", "Train the Fashion-MNIST diffusion stand-in and cache its weights.",
        "train and save the weights (and a JSON of the run next to them)",
        DEFAULT_STEPS, DEFAULT_BATCH, DEFAULT_LR, DEFAULT_SEED, weights_path())
    args = parser.parse_args(argv)
    out = Path(args.out) if args.out else weights_path()
    print(f"training {args.steps} steps of batch {args.batch} (seed {args.seed}, {args.threads} thread(s)) -> {out}",
          flush=True)
    unet, tokens, record = train(steps=args.steps, batch_size=args.batch, lr=args.lr, seed=args.seed,
                                 threads=args.threads, log=lambda s: print(s, flush=True))
    save_fashion_diffusion(unet, tokens, out, record)
    print(f"done in {record.seconds:.0f} s, final loss {record.final_loss:.4f}; wrote {out} "
          f"({out.stat().st_size / 1e6:.1f} MB) and {record_path(out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
