"""A small ViT with 2D rotary position embeddings, trained here on Fashion-MNIST: a real-weight RoPE stand-in.

No pretrained RoPE ViT (DINOv3, EVA-02) installs offline, so merging under rotary embeddings is
measured on this classifier, written in plain torch:

* 28x28 grayscale images cut into 4x4 patches: a 7x7 grid of 49 patch tokens behind one CLS
  token (50 tokens). No absolute position embedding: position enters only through the rotation
  of queries and keys.
* 2D RoPE as DINOv3 applies it: half of each head's rotated pairs turn with the patch's row, the
  other half with its column (:class:`GridRotary`). The CLS token is not rotated: the attention
  splits q and k into the prefix (``q[:, :, :1]``) and the patches (``q[:, :, 1:]``), rotates the
  patches only, and concatenates them again (:func:`rotate_patches`).
* The cos/sin tables are computed inside ``forward`` from the grid coordinates (angles =
  coordinates times frequencies, then ``.cos()``/``.sin()``); only the frequencies are a buffer.
  A graph captured from this model therefore holds the angles, which is what a merge rule that
  averages positions (rather than cos/sin rows) needs.
* Pre-norm blocks (``x + attn(norm(x))``, ``x + mlp(norm(x))``) with
  ``F.scaled_dot_product_attention``; the class comes from the final CLS token.

Training: ``python -m turbo_fx.model_zoo.fashion_rope_vit train [--steps N] [--out PATH]``;
:func:`load_fashion_rope_vit` reads the cached weights (``fashion_rope_vit_v<N>.safetensors``
under ``default_cache_dir``) and trains only when they are absent. The run's time, loss and
test accuracy are written to the JSON next to the weights. The default run (0.45 M parameters,
width 96, 6 blocks, 4 heads of 24; 1200 steps of 128 images, 2.6 epochs, AdamW at 2e-3 with
warm-up and cosine decay, horizontal flips, one thread) took 613 s on the shared 2-core AMD EPYC
machine, final training loss 0.333, top-1 0.866 on the 10000 test images.
"""
from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import training
from .deps import default_cache_dir, read_weights, record_path, save_weights

NUM_CLASSES = 10
IMAGE_SIZE = 28
PATCH_SIZE = 4
PREFIX_TOKENS = 1  # the CLS token, never rotated
# Fashion-MNIST's pixel mean and standard deviation over the training split (0..1 scale).
PIXEL_MEAN, PIXEL_STD = 0.2860, 0.3530

DEFAULT_STEPS = 1200
DEFAULT_BATCH = 128
DEFAULT_LR = 2e-3
DEFAULT_SEED = 0
WARMUP_STEPS = 100
WEIGHT_DECAY = 0.05
# Bump when the model, the data or the recipe changes, so that older cached weights are not read.
WEIGHTS_VERSION = 1
WEIGHTS_NAME = f"fashion_rope_vit_v{WEIGHTS_VERSION}.safetensors"


# --------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class RopeViTConfig:
    image_size: int = IMAGE_SIZE
    patch_size: int = PATCH_SIZE
    dim: int = 96
    depth: int = 6
    heads: int = 4
    mlp_ratio: int = 2
    num_classes: int = NUM_CLASSES
    rotary: bool = True  # False: no rotation at all (the same weights, position-blind)
    rotary_base: float = 10.0  # frequencies run from 1 down to about 1/base radians per patch

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


def apply_rotation(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each channel pair (i, i + D/2) of ``x`` ``[..., N, D]`` by its angle (tables ``[N, D]``)."""
    return x * cos + rotate_half(x) * sin


def rotate_patches(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   prefix: int = PREFIX_TOKENS) -> torch.Tensor:
    """``x`` ``[B, heads, N, D]`` with its patch tokens (after the first ``prefix``) rotated and
    the prefix tokens left exactly as they are."""
    return torch.cat([x[:, :, :prefix], apply_rotation(x[:, :, prefix:], cos, sin)], dim=2)


class GridRotary(nn.Module):
    """cos/sin tables ``[rows * cols, head_dim]`` of 2D RoPE for a grid of patches, row-major.

    Each head has ``head_dim / 2`` rotated pairs: the first half turn with the row index, the
    second half with the column index, each half over the same ``head_dim / 4`` frequencies
    ``base ** (-j / (head_dim / 4))``. Angles are coordinates times frequencies, computed on
    every call; the tables repeat the angles for both members of a pair (see :func:`rotate_half`).
    """

    def __init__(self, head_dim: int, base: float = 10.0) -> None:
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"2D RoPE needs a head width divisible by 4, got {head_dim}")
        n = head_dim // 4
        self.register_buffer("frequencies", base ** (-torch.arange(n, dtype=torch.float32) / n), persistent=False)

    def angles(self, rows: int, cols: int) -> torch.Tensor:
        """Rotation angles ``[rows * cols, head_dim / 2]``: row angles, then column angles."""
        device = self.frequencies.device
        r = torch.arange(rows, dtype=torch.float32, device=device)
        c = torch.arange(cols, dtype=torch.float32, device=device)
        coords = torch.stack(torch.meshgrid(r, c, indexing="ij"), dim=-1).reshape(rows * cols, 2)
        return (coords[:, :, None] * self.frequencies).reshape(rows * cols, -1)

    def forward(self, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
        angles = self.angles(rows, cols)
        angles = torch.cat([angles, angles], dim=-1)
        return angles.cos(), angles.sin()


class RotaryAttention(nn.Module):
    """Multi-head self-attention whose patch queries and keys are rotated (the CLS token's are not)."""

    def __init__(self, cfg: RopeViTConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.proj = nn.Linear(cfg.dim, cfg.dim)

    def forward(self, x: torch.Tensor, cos: Optional[torch.Tensor], sin: Optional[torch.Tensor]) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        if cos is not None:
            q, k = rotate_patches(q, cos, sin), rotate_patches(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    def __init__(self, cfg: RopeViTConfig) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(cfg.dim), RotaryAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.dim)
        hidden = cfg.mlp_ratio * cfg.dim
        self.mlp = nn.Sequential(nn.Linear(cfg.dim, hidden), nn.GELU(), nn.Linear(hidden, cfg.dim))

    def forward(self, x: torch.Tensor, cos: Optional[torch.Tensor], sin: Optional[torch.Tensor]) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin)
        return x + self.mlp(self.norm2(x))


class FashionRopeViT(nn.Module):
    """Images ``[B, 1, 28, 28]`` (see :func:`preprocess`) -> class logits ``[B, 10]``."""

    def __init__(self, cfg: RopeViTConfig = RopeViTConfig()) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embed = nn.Conv2d(1, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.rotary = GridRotary(cfg.head_dim, cfg.rotary_base)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.num_classes)
        nn.init.normal_(self.cls_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embed(images)  # [B, dim, rows, cols]
        rows, cols = patches.shape[-2:]
        x = patches.flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        cos, sin = self.rotary(rows, cols) if self.cfg.rotary else (None, None)
        for block in self.blocks:
            x = block(x, cos, sin)
        return self.head(self.norm(x[:, 0]))


def build_fashion_rope_vit(seed: Optional[int] = DEFAULT_SEED, cfg: RopeViTConfig = RopeViTConfig()) -> FashionRopeViT:
    """A freshly initialised model (``seed``: seed torch's RNG first; None leaves it as it is)."""
    if seed is not None:
        torch.manual_seed(seed)
    return FashionRopeViT(cfg)


# --------------------------------------------------------------------------- data


def preprocess(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 Fashion-MNIST ``[n, 28, 28]`` -> float32 ``[n, 1, 28, 28]``, standardised."""
    x = torch.as_tensor(np.asarray(images))
    if x.ndim != 3:
        raise ValueError(f"expected [n, H, W] uint8 images, got shape {tuple(x.shape)}")
    return ((x.float() / 255.0 - PIXEL_MEAN) / PIXEL_STD)[:, None].contiguous()


def fashion_split(split: str, limit: Optional[int] = None, seed: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A Fashion-MNIST split in model form ``[n, 1, 28, 28]`` and its labels (int64); ``limit``: a class-balanced sample."""
    from .data import fashion_mnist

    images, labels = fashion_mnist(split, limit=limit, seed=seed)
    return preprocess(images), torch.from_numpy(labels)


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random horizontal flips (garments are mirror-symmetric classes)."""
    flip = torch.rand(len(x), generator=gen) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


# --------------------------------------------------------------------------- training


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500) -> float:
    """Top-1 accuracy of ``model`` (put in eval mode) on preprocessed ``images``."""
    model.eval()
    right = 0
    for start in range(0, len(images), batch_size):
        right += int((model(images[start: start + batch_size]).argmax(-1) == labels[start: start + batch_size]).sum())
    return right / max(1, len(images))


@dataclass
class TrainRecord:
    """What a training run did; written as JSON next to the weights."""

    steps: int
    batch_size: int
    seed: int
    lr: float
    weight_decay: float
    threads: int
    train_images: int
    seconds: float = 0.0
    final_loss: float = math.nan  # mean training loss over the last 50 steps (or all, if fewer)
    test_images: int = 0
    test_accuracy: Optional[float] = None  # top-1 on the test images after training
    losses: list = field(default_factory=list)  # [step, mean loss of the steps since the last entry]
    torch_version: str = torch.__version__
    weights_version: int = WEIGHTS_VERSION
    model_config: dict = field(default_factory=dict)


def train(steps: int = DEFAULT_STEPS, batch_size: int = DEFAULT_BATCH, lr: float = DEFAULT_LR,
          seed: int = DEFAULT_SEED, images: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None,
          cfg: RopeViTConfig = RopeViTConfig(), weight_decay: float = WEIGHT_DECAY, warmup: int = WARMUP_STEPS,
          threads: Optional[int] = 1, log_every: int = 100,
          test: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
          log: Callable[[str], None] = print) -> tuple[FashionRopeViT, TrainRecord]:
    """Train the classifier with cross-entropy; returns it in eval mode and the run's record.

    ``images`` ``[n, 1, 28, 28]`` (see :func:`preprocess`) with ``labels`` default to the 60k
    training images. AdamW with linear warm-up and cosine decay, random horizontal flips.
    Deterministic in ``seed`` (initial weights, shuffling and flips). ``test``: (images,
    labels) scored after training into the record. ``threads``: torch's intra-op threads while
    training (1 was fastest on the 2 shared cores; None keeps torch's setting), restored afterwards.
    """
    if images is None:
        images, labels = fashion_split("train")
    images, labels = torch.as_tensor(images, dtype=torch.float32), torch.as_tensor(labels, dtype=torch.long)
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        model = build_fashion_rope_vit(seed, cfg)
        record = TrainRecord(steps, batch_size, seed, lr, weight_decay, threads or old_threads, len(images),
                             model_config=asdict(cfg))
        _train(model, record, images, labels, warmup, log_every, log)
        if test is not None:
            record.test_images = len(test[1])
            record.test_accuracy = round(accuracy(model, *test), 5)
            log(f"test top-1 {record.test_accuracy:.4f} on {record.test_images} images")
    finally:
        torch.set_num_threads(old_threads)
    return model.eval(), record


def _train(model: FashionRopeViT, record: TrainRecord, images: torch.Tensor, labels: torch.Tensor, warmup: int,
           log_every: int, log: Callable[[str], None]) -> None:
    model.train()
    # No weight decay on biases, norms, the CLS token: the usual ViT recipe.
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "cls_token" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "cls_token" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": record.weight_decay},
                                   {"params": rest, "weight_decay": 0.0}], lr=record.lr)
    gen = torch.Generator().manual_seed(record.seed + 1)
    batches = training.shuffled_batches(len(images), record.batch_size, gen)
    losses = training.LossLog(record.steps, log_every, log)
    for step, idx in zip(range(record.steps), batches):
        for group in optimizer.param_groups:
            group["lr"] = training.learning_rate(step, record.steps, record.lr, warmup)
        loss = F.cross_entropy(model(augment(images[idx], gen)), labels[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.add(step, loss)
    record.losses, record.seconds, record.final_loss = losses.losses, losses.seconds, losses.final_loss


# --------------------------------------------------------------------------- saving and loading


def weights_path(cache_dir: Optional[str | os.PathLike] = None) -> Path:
    """Where the trained weights are cached: ``<cache>/fashion_rope_vit_v<N>.safetensors`` (see ``default_cache_dir``)."""
    return default_cache_dir(cache_dir) / WEIGHTS_NAME


def save_fashion_rope_vit(model: FashionRopeViT, path: str | os.PathLike, record: Optional[TrainRecord] = None) -> Path:
    """The weights as safetensors (the config in the metadata), plus the record's JSON."""
    meta = {"weights_version": str(WEIGHTS_VERSION), "model_config": json.dumps(asdict(model.cfg))}
    return save_weights(model.state_dict(), meta, path, None if record is None else json.dumps(asdict(record), indent=1))


def read_fashion_rope_vit(path: str | os.PathLike) -> FashionRopeViT:
    """The model saved by :func:`save_fashion_rope_vit`, in eval mode."""
    tensors, meta = read_weights(path, WEIGHTS_VERSION)
    model = FashionRopeViT(RopeViTConfig(**json.loads(meta["model_config"])))
    model.load_state_dict(tensors, strict=True)
    return model.eval()


def read_record(cache_dir: Optional[str | os.PathLike] = None) -> Optional[dict]:
    """The JSON of the run that trained the cached weights, or None."""
    path = record_path(weights_path(cache_dir))
    return json.loads(path.read_text()) if path.is_file() else None


def train_and_save(path: Optional[str | os.PathLike] = None, steps: int = DEFAULT_STEPS,
                   batch_size: int = DEFAULT_BATCH, lr: float = DEFAULT_LR, seed: int = DEFAULT_SEED,
                   threads: Optional[int] = 1, log: Callable[[str], None] = print) -> tuple[FashionRopeViT, TrainRecord]:
    """Train on the 60k training images, score the 10k test images, and save both to ``path`` (default: the cache)."""
    path = Path(path) if path else weights_path()
    model, record = train(steps=steps, batch_size=batch_size, lr=lr, seed=seed, threads=threads,
                          test=fashion_split("test"), log=log)
    save_fashion_rope_vit(model, path, record)
    return model, record


def load_fashion_rope_vit(cache_dir: Optional[str | os.PathLike] = None, steps: int = DEFAULT_STEPS,
                          log: Callable[[str], None] = print) -> FashionRopeViT:
    """The trained classifier in eval mode, from the cache; trains and caches it first if absent."""
    path = weights_path(cache_dir)
    if not path.is_file():
        log(f"{path} not found: training the Fashion-MNIST RoPE ViT ({steps} steps, a few minutes on 2 CPU cores) ...")
        _, record = train_and_save(path, steps=steps, log=log)
        log(f"trained in {record.seconds:.0f} s (final loss {record.final_loss:.4f}, test top-1 "
            f"{record.test_accuracy}); cached in {path}")
    return read_fashion_rope_vit(path)


# --------------------------------------------------------------------------- command line


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = training.train_command(
        "fashion_rope_vit", "Train the Fashion-MNIST RoPE ViT stand-in and cache its weights.",
        "train, score the test split, and save the weights (and a JSON of the run)",
        DEFAULT_STEPS, DEFAULT_BATCH, DEFAULT_LR, DEFAULT_SEED, weights_path())
    args = parser.parse_args(argv)
    out = Path(args.out) if args.out else weights_path()
    print(f"training {args.steps} steps of batch {args.batch} (seed {args.seed}) -> {out}", flush=True)
    _, record = train_and_save(out, steps=args.steps, batch_size=args.batch, lr=args.lr, seed=args.seed,
                               threads=args.threads, log=lambda s: print(s, flush=True))
    print(f"done in {record.seconds:.0f} s, final loss {record.final_loss:.4f}, test top-1 {record.test_accuracy}; "
          f"wrote {out} and {record_path(out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
