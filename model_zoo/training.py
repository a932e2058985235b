"""What the stand-ins trained here share: the learning-rate schedule, seeded reshuffling
batches, the loss log (mean loss per ``log_every`` steps, time left, the final mean) and the
``train`` command line."""
from __future__ import annotations

import argparse
import math
import time
from typing import Callable, Iterator

import numpy as np
import torch


def learning_rate(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 5% of ``peak`` at ``total``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def shuffled_batches(n: int, batch_size: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    """Index batches of a fresh permutation of ``range(n)``, reshuffled when the rest of an
    epoch is shorter than a batch. The permutations draw from ``gen`` only when a batch is
    asked for, so other draws from ``gen`` in the loop keep their order."""
    order, cursor = torch.randperm(n, generator=gen), 0
    while True:
        if cursor + batch_size > n:
            order, cursor = torch.randperm(n, generator=gen), 0
        yield order[cursor: cursor + batch_size]
        cursor += batch_size


class LossLog:
    """Losses of a run of ``steps`` steps: every ``log_every`` steps (and at the last) the mean
    since the previous entry goes to ``losses`` as [step, mean] and to ``log`` with the time left."""

    def __init__(self, steps: int, log_every: int, log: Callable[[str], None]) -> None:
        self.steps, self.log_every, self.log = steps, log_every, log
        self.losses: list[list] = []
        self.all: list[float] = []
        self.recent: list[float] = []
        self.started = time.perf_counter()

    def add(self, step: int, loss: torch.Tensor) -> None:
        value = float(loss.detach())
        self.recent.append(value)
        self.all.append(value)
        if (step + 1) % self.log_every == 0 or step + 1 == self.steps:
            elapsed = time.perf_counter() - self.started
            mean = float(np.mean(self.recent))
            self.losses.append([step + 1, round(mean, 5)])
            self.log(f"step {step + 1}/{self.steps}  loss {mean:.4f}  {elapsed:.0f} s "
                     f"(about {elapsed / (step + 1) * (self.steps - step - 1):.0f} s left)")
            self.recent = []

    @property
    def seconds(self) -> float:
        return round(time.perf_counter() - self.started, 1)

    @property
    def final_loss(self) -> float:
        """The mean of the last 50 losses (NaN before any step)."""
        return round(float(np.mean(self.all[-50:])), 5) if self.all else math.nan


def train_command(module: str, description: str, help: str, steps: int, batch: int, lr: float, seed: int,
                  weights: object, images: tuple[int, int] | None = None) -> argparse.ArgumentParser:
    """``python -m turbo_fx.model_zoo.<module> train``: the parser with the options every stand-in
    takes (steps, batch, lr, seed, threads, out: ``weights`` by default), and for a stand-in trained on
    cached image features, ``images``: the default training and held-out image counts."""
    parser = argparse.ArgumentParser(prog=f"python -m turbo_fx.model_zoo.{module}", description=description)
    train = parser.add_subparsers(dest="command", required=True).add_parser("train", help=help)
    train.add_argument("--steps", type=int, default=steps)
    train.add_argument("--batch", type=int, default=batch)
    train.add_argument("--lr", type=float, default=lr)
    train.add_argument("--seed", type=int, default=seed)
    train.add_argument("--threads", type=int, default=1, help="torch threads while training (default 1)")
    train.add_argument("--out", default=None, help=f"weights file (default: the cache, {weights})")
    if images is not None:
        train.add_argument("--train-images", type=int, default=images[0])
        train.add_argument("--validation-images", type=int, default=images[1])
    return parser
