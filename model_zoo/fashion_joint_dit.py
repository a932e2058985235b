"""A class-conditional diffusion transformer in the MMDiT layout, trained here on Fashion-MNIST:
real weights for merge-and-restore under 2D rotary positions and joint attention.

No pretrained SD3 or Flux weights install offline, and the diffusion stand-in of
``fashion_diffusion`` is a UNet without rotary positions, so turbo's rotary rules on a
generation model are measured on this one, written in plain torch:

* Images: Fashion-MNIST padded to 32x32 in [-1, 1] (``fashion_diffusion.to_model_range``), cut
  into 2x2 patches: a 16x16 grid of 256 image tokens.
* Conditioning as in SD3: the class label becomes a few context tokens
  (``fashion_diffusion.ClassTokens``, label 10 the null label of classifier-free guidance),
  embedded into a second stream; their mean joins the timestep embedding as the vector that
  drives every AdaLN modulation (shift, scale and gate per sub-layer and per stream).
* Joint attention: per block each stream projects its own queries, keys and values, the image
  ones first and the context ones after are concatenated along the token axis of
  ``[B, heads, N, D]`` into one ``scaled_dot_product_attention``, and the output is split back.
* 2D rotary positions on the image queries and keys only (as in the RoPE ViT stand-in: half of
  each head's rotated pairs turn with the token's row, half with its column); the angles and
  their cos/sin are computed in ``forward`` from the grid coordinates, so a captured graph holds
  the angles (what turbo's ``rotary="position"`` rule needs). ``rotary_cell`` 2 rotates by the
  2x2 cell's coordinates instead, so the four tokens of a cell share one rotation (a test oracle:
  duplicated cells then stay duplicates).
* Output: a final AdaLN and a linear layer to 2x2x1 values per token, reshaped right after the
  last block to ``[B, 16, 16, 2, 2, 1]`` and unpatchified: the grid turbo's merge-and-restore finds.

The forward has the UNet's signature ``model(sample, timestep, encoder_hidden_states)``, so
``fashion_diffusion.sample`` (DDIM with classifier-free guidance) samples it as it is.

Training: ``python -m turbo_fx.model_zoo.fashion_joint_dit train [--steps N] [--out PATH]``
(the DDPM epsilon objective and the recipe of ``fashion_diffusion``); :func:`load_fashion_joint_dit`
reads the cached weights (``fashion_joint_dit_v<N>.safetensors`` under ``default_cache_dir``)
and trains only when they are absent. The run's record is the JSON beside the weights. The
default run (1.1 M parameters, width 96, 4 blocks, 3 heads of 32; 1000 steps of 48 images, 0.8
epoch, AdamW at 1e-3 with warm-up and cosine decay, EMA 0.995, one thread, ``nice -n 10``) took
1539 s on the shared 2-core AMD EPYC machine while other jobs ran (about 1 s per step alone),
final loss 0.071; the weights file is 4.4 MB. Tops, trousers, dresses and coats come out
recognisable; sandals, sneakers, bags and boots are rough.
"""
from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import training
from .deps import default_cache_dir, read_weights, record_path, save_weights
from .fashion_diffusion import (CROSS_ATTENTION_DIM, EMA, IMAGE_SIZE, LABEL_DROPOUT, NUM_CLASSES, TOKENS_PER_LABEL,
                                ClassTokens, ddpm_scheduler, diffusion_loss, drop_labels, fashion_training_set,
                                noise_scheduler_config)

DEFAULT_STEPS = 1000
DEFAULT_BATCH = 48
DEFAULT_LR = 1e-3
DEFAULT_SEED = 0
WARMUP_STEPS = 100
EMA_DECAY = 0.995
# Bump when the model, the data or the recipe changes, so that older cached weights are not read.
WEIGHTS_VERSION = 1
WEIGHTS_NAME = f"fashion_joint_dit_v{WEIGHTS_VERSION}.safetensors"


# --------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class JointDiTConfig:
    image_size: int = IMAGE_SIZE
    patch_size: int = 2
    channels: int = 1
    dim: int = 96
    depth: int = 4
    heads: int = 3
    mlp_ratio: int = 2
    context_dim: int = CROSS_ATTENTION_DIM
    rotary_base: float = 100.0  # frequencies run from 1 down to about 1/base radians per token
    rotary_cell: int = 1  # tokens per side that share one rotation (1: every token its own)

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[x1, x2] -> [-x2, x1]`` on the last axis: channel i pairs with channel i + D/2."""
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def grid_angles(rows: int, cols: int, frequencies: torch.Tensor, cell: int = 1) -> torch.Tensor:
    """Rotation angles ``[rows * cols, 2 * len(frequencies)]`` of a row-major grid: the row
    coordinate times the frequencies, then the column's; ``cell``: coordinates of ``cell`` x
    ``cell`` blocks, so that a block's tokens share their angles."""
    r = torch.arange(rows, device=frequencies.device) // cell
    c = torch.arange(cols, device=frequencies.device) // cell
    coords = torch.stack(torch.meshgrid(r, c, indexing="ij"), dim=-1).reshape(rows * cols, 2).float()
    return (coords[:, :, None] * frequencies).reshape(rows * cols, -1)


def timestep_embedding(timestep: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features ``[B, dim]`` of the (integer) diffusion timesteps: cosines then sines."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=timestep.device, dtype=torch.float32) / half)
    angles = timestep.float()[:, None] * freqs
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """AdaLN: ``x`` normalised without affine weights, then scaled and shifted per sample."""
    return F.layer_norm(x, x.shape[-1:]) * (1 + scale) + shift


class Stream(nn.Module):
    """One stream's weights in a joint block: its modulation, q/k/v, attention output and MLP."""

    def __init__(self, cfg: JointDiTConfig) -> None:
        super().__init__()
        self.mod = nn.Linear(cfg.dim, 6 * cfg.dim)
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.out = nn.Linear(cfg.dim, cfg.dim)
        self.mlp = nn.Sequential(nn.Linear(cfg.dim, cfg.mlp_ratio * cfg.dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(cfg.mlp_ratio * cfg.dim, cfg.dim))


class JointBlock(nn.Module):
    """Both streams attend jointly (image tokens first), then each runs its own MLP."""

    def __init__(self, cfg: JointDiTConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.image, self.context = Stream(cfg), Stream(cfg)

    def split_heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, c = t.shape
        return t.reshape(b, n, self.heads, c // self.heads).transpose(1, 2)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, cond: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = x.shape[1]
        mi = self.image.mod(cond)[:, None].chunk(6, dim=-1)
        mc = self.context.mod(cond)[:, None].chunk(6, dim=-1)
        qi, ki, vi = (self.split_heads(t) for t in self.image.qkv(modulate(x, mi[0], mi[1])).chunk(3, dim=-1))
        qc, kc, vc = (self.split_heads(t) for t in self.context.qkv(modulate(ctx, mc[0], mc[1])).chunk(3, dim=-1))
        qi, ki = qi * cos + rotate_half(qi) * sin, ki * cos + rotate_half(ki) * sin
        q, k, v = torch.cat([qi, qc], dim=2), torch.cat([ki, kc], dim=2), torch.cat([vi, vc], dim=2)
        attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        x = x + mi[2] * self.image.out(attn[:, :n])
        ctx = ctx + mc[2] * self.context.out(attn[:, n:])
        x = x + mi[5] * self.image.mlp(modulate(x, mi[3], mi[4]))
        ctx = ctx + mc[5] * self.context.mlp(modulate(ctx, mc[3], mc[4]))
        return x, ctx


class FashionJointDiT(nn.Module):
    """``model(sample [B, 1, 32, 32], timestep [B], encoder_hidden_states [B, T, 64])`` -> predicted noise."""

    def __init__(self, cfg: JointDiTConfig = JointDiTConfig()) -> None:
        super().__init__()
        if cfg.head_dim % 4:
            raise ValueError(f"2D RoPE needs a head width divisible by 4, got {cfg.head_dim}")
        self.cfg = cfg
        self.patch_embed = nn.Conv2d(cfg.channels, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.context_embed = nn.Linear(cfg.context_dim, cfg.dim)
        self.time_mlp = nn.Sequential(nn.Linear(cfg.dim, cfg.dim), nn.SiLU(), nn.Linear(cfg.dim, cfg.dim))
        self.pooled_mlp = nn.Sequential(nn.Linear(cfg.context_dim, cfg.dim), nn.SiLU(), nn.Linear(cfg.dim, cfg.dim))
        n = cfg.head_dim // 4
        self.register_buffer("frequencies", cfg.rotary_base ** (-torch.arange(n, dtype=torch.float32) / n),
                             persistent=False)
        self.blocks = nn.ModuleList(JointBlock(cfg) for _ in range(cfg.depth))
        self.final_mod = nn.Linear(cfg.dim, 2 * cfg.dim)
        self.final = nn.Linear(cfg.dim, cfg.patch_size ** 2 * cfg.channels)
        self._init_weights()

    def _init_weights(self) -> None:
        """DiT's adaLN-Zero start: every modulation and the output layer at zero, so each block
        begins as the identity and the model as a zero prediction."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        for block in self.blocks:
            for stream in (block.image, block.context):
                nn.init.zeros_(stream.mod.weight)
                nn.init.zeros_(stream.mod.bias)
        for layer in (self.final_mod, self.final):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def rotation(self, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin tables ``[rows * cols, head_dim]`` (each angle for both members of a pair)."""
        angles = grid_angles(rows, cols, self.frequencies, self.cfg.rotary_cell)
        angles = torch.cat([angles, angles], dim=-1)
        return angles.cos(), angles.sin()

    def unpatchify(self, out: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        """``[B, rows * cols, p * p * C]`` -> ``[B, C, rows * p, cols * p]``."""
        p, c = self.cfg.patch_size, self.cfg.channels
        grid = out.reshape(out.shape[0], rows, cols, p, p, c)
        return grid.permute(0, 5, 1, 3, 2, 4).reshape(out.shape[0], c, rows * p, cols * p)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embed(sample)  # [B, dim, rows, cols]
        rows, cols = patches.shape[-2:]
        x = patches.flatten(2).transpose(1, 2)
        ctx = self.context_embed(encoder_hidden_states)
        timestep = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(sample.shape[0])
        cond = self.time_mlp(timestep_embedding(timestep, self.cfg.dim))
        cond = F.silu(cond + self.pooled_mlp(encoder_hidden_states.mean(dim=1)))
        cos, sin = self.rotation(rows, cols)
        for block in self.blocks:
            x, ctx = block(x, ctx, cond, cos, sin)
        shift, scale = self.final_mod(cond)[:, None].chunk(2, dim=-1)
        return self.unpatchify(self.final(modulate(x, shift, scale)), rows, cols)


def build_fashion_joint_dit(seed: Optional[int] = DEFAULT_SEED,
                            cfg: JointDiTConfig = JointDiTConfig()) -> tuple[FashionJointDiT, ClassTokens]:
    """A freshly initialised (model, class tokens) pair (``seed``: seed torch's RNG first)."""
    if seed is not None:
        torch.manual_seed(seed)
    return FashionJointDiT(cfg), ClassTokens(NUM_CLASSES, TOKENS_PER_LABEL, cfg.context_dim)


# --------------------------------------------------------------------------- training


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
    parameters: int = 0
    torch_version: str = torch.__version__
    weights_version: int = WEIGHTS_VERSION
    scheduler: dict = field(default_factory=noise_scheduler_config)
    model_config: dict = field(default_factory=dict)


def train(steps: int = DEFAULT_STEPS, batch_size: int = DEFAULT_BATCH, lr: float = DEFAULT_LR,
          seed: int = DEFAULT_SEED, images: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None,
          cfg: JointDiTConfig = JointDiTConfig(), ema_decay: float = EMA_DECAY, warmup: int = WARMUP_STEPS,
          threads: Optional[int] = 1, log_every: int = 50,
          log: Callable[[str], None] = print) -> tuple[FashionJointDiT, ClassTokens, TrainRecord]:
    """Train the model and its class tokens with the DDPM epsilon objective; returns both (EMA
    weights, eval mode) and the run's record.

    ``images`` ``[n, 1, 32, 32]`` in [-1, 1] with ``labels`` default to the 60k training images.
    AdamW with warm-up and cosine decay, labels dropped to the null label 10% of the time.
    Deterministic in ``seed``. ``threads``: torch's intra-op threads while training (None keeps
    torch's setting), restored afterwards.
    """
    if images is None:
        images, labels = fashion_training_set()
    images, labels = torch.as_tensor(images, dtype=torch.float32), torch.as_tensor(labels, dtype=torch.long)
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        model, tokens = build_fashion_joint_dit(seed, cfg)
        record = TrainRecord(steps, batch_size, seed, lr, LABEL_DROPOUT, ema_decay, threads or old_threads,
                             len(images), model_config=asdict(cfg),
                             parameters=sum(p.numel() for m in (model, tokens) for p in m.parameters()))
        _train(model, tokens, record, images, labels, warmup, log_every, log)
    finally:
        torch.set_num_threads(old_threads)
    return model.eval(), tokens.eval(), record


def _train(model: FashionJointDiT, tokens: ClassTokens, record: TrainRecord, images: torch.Tensor,
           labels: torch.Tensor, warmup: int, log_every: int, log: Callable[[str], None]) -> None:
    model.train()
    tokens.train()
    scheduler = ddpm_scheduler()
    params = list(model.parameters()) + list(tokens.parameters())
    optimizer = torch.optim.AdamW(params, lr=record.lr, weight_decay=0.0)
    ema = EMA([model, tokens], record.ema_decay)
    gen = torch.Generator().manual_seed(record.seed + 1)
    batches = training.shuffled_batches(len(images), record.batch_size, gen)
    losses = training.LossLog(record.steps, log_every, log)
    for step, idx in zip(range(record.steps), batches):
        x0, y = images[idx], drop_labels(labels[idx], record.label_dropout, gen, tokens.null_label)
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(idx),), generator=gen)
        for group in optimizer.param_groups:
            group["lr"] = training.learning_rate(step, record.steps, record.lr, warmup)
        loss = diffusion_loss(model, tokens, scheduler, x0, y, noise, t)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        ema.update()
        losses.add(step, loss)
    record.losses, record.seconds, record.final_loss = losses.losses, losses.seconds, losses.final_loss
    ema.copy_to_model()


# --------------------------------------------------------------------------- saving and loading


def weights_path(cache_dir: Optional[str | os.PathLike] = None) -> Path:
    """Where the trained weights are cached: ``<cache>/fashion_joint_dit_v<N>.safetensors`` (see ``default_cache_dir``)."""
    return default_cache_dir(cache_dir) / WEIGHTS_NAME


def save_fashion_joint_dit(model: FashionJointDiT, tokens: ClassTokens, path: str | os.PathLike,
                           record: Optional[TrainRecord] = None) -> Path:
    """Model and class tokens in one safetensors file (keys ``model.*``, ``class_tokens.*``; the
    config in the metadata), plus the record's JSON."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update({f"class_tokens.{k}": v for k, v in tokens.state_dict().items()})
    meta = {"weights_version": str(WEIGHTS_VERSION), "model_config": json.dumps(asdict(model.cfg)),
            "tokens_per_label": str(tokens.tokens)}
    return save_weights(tensors, meta, path, None if record is None else json.dumps(asdict(record), indent=1))


def read_fashion_joint_dit(path: str | os.PathLike) -> tuple[FashionJointDiT, ClassTokens]:
    """The (model, class tokens) saved by :func:`save_fashion_joint_dit`, in eval mode."""
    tensors, meta = read_weights(path, WEIGHTS_VERSION)
    cfg = JointDiTConfig(**json.loads(meta["model_config"]))
    model = FashionJointDiT(cfg)
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, strict=True)
    tokens = ClassTokens(NUM_CLASSES, int(meta["tokens_per_label"]), cfg.context_dim)
    tokens.load_state_dict({k[13:]: v for k, v in tensors.items() if k.startswith("class_tokens.")}, strict=True)
    return model.eval(), tokens.eval()


def read_record(cache_dir: Optional[str | os.PathLike] = None) -> Optional[dict]:
    """The JSON of the run that trained the cached weights, or None."""
    path = record_path(weights_path(cache_dir))
    return json.loads(path.read_text()) if path.is_file() else None


def load_fashion_joint_dit(cache_dir: Optional[str | os.PathLike] = None, steps: int = DEFAULT_STEPS,
                           log: Callable[[str], None] = print) -> tuple[FashionJointDiT, ClassTokens]:
    """The trained (model, class tokens) in eval mode, from the cache; trains and caches them first if absent."""
    path = weights_path(cache_dir)
    if not path.is_file():
        log(f"{path} not found: training the Fashion-MNIST joint rotary DiT ({steps} steps, "
            f"about 20 minutes on 2 CPU cores) ...")
        model, tokens, record = train(steps=steps, log=log)
        save_fashion_joint_dit(model, tokens, path, record)
        log(f"trained in {record.seconds:.0f} s (final loss {record.final_loss:.4f}); cached in {path}")
    return read_fashion_joint_dit(path)


# --------------------------------------------------------------------------- command line


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = training.train_command(
        "fashion_joint_dit", "Train the Fashion-MNIST joint rotary DiT stand-in and cache its weights.",
        "train and save the weights (and a JSON of the run next to them)",
        DEFAULT_STEPS, DEFAULT_BATCH, DEFAULT_LR, DEFAULT_SEED, weights_path())
    args = parser.parse_args(argv)
    out = Path(args.out) if args.out else weights_path()
    print(f"training {args.steps} steps of batch {args.batch} (seed {args.seed}, {args.threads} thread(s)) -> {out}",
          flush=True)
    model, tokens, record = train(steps=args.steps, batch_size=args.batch, lr=args.lr, seed=args.seed,
                                  threads=args.threads, log=lambda s: print(s, flush=True))
    save_fashion_joint_dit(model, tokens, out, record)
    print(f"done in {record.seconds:.0f} s, final loss {record.final_loss:.4f}; wrote {out} "
          f"({out.stat().st_size / 1e6:.1f} MB) and {record_path(out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
