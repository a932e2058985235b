"""A small image captioner trained here on frozen DINOv2 ViT-S/14 features: a real-weight vision-language stand-in.

No CLIP or BLIP weights install offline, so turbo's "text reads merged image tokens" path is
measured on this model: the frozen, real-weight DINOv2 ViT-S/14 of
:func:`~turbo_fx.model_zoo.dinov2.load_dinov2_small` reads a Fashion-MNIST image (224 px, 257
tokens), and a small text decoder trained here (:class:`CaptionDecoder`: 2 layers of width 256,
4 heads; 2.3 M parameters, 9 MB) writes its caption, cross-attending to all 257 DINOv2 tokens.
:class:`FashionCaptioner` runs both in one ``forward(pixel_values, input_ids)``, so
``torch.compile(captioner, backend="turbo")`` sees one graph: the DINOv2 stream merges, and the
decoder's cross-attention sites read the merged tokens with their ``log(size)`` key bias.

* Captions are the class name in words, nothing else: "t-shirt top", "trouser", "pullover",
  "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot" (:data:`CAPTIONS`), over
  a word vocabulary of these 12 words plus PAD, BOS and EOS (:class:`Vocabulary`). A fixed
  prefix such as "a photo of a" would add positions whose next token never depends on the
  image: they would inflate per-token accuracy and the caption's log-likelihood with free
  tokens and measure nothing that merging can change. Every generated token here depends on
  the image: the first word (unique to each class) names the class, the second ("top",
  "boot") or EOS must be consistent with it.
* Sequences: ``[BOS] + words + [EOS]``, padded with PAD to :data:`SEQUENCE_LENGTH` (4);
  ``input_ids`` are the first 3 tokens and the targets the last 3 (:func:`teacher_forcing`).
  Self-attention is causal, so position i's logits see only tokens 0..i: the padding never
  changes an earlier position, and greedy decoding gives the true caption exactly when, fed
  the true caption, every non-padding position's argmax is its next true token (see
  ``bench/vlm_eval.py``, which scores captions that way).
* Training runs on unmerged tokens only: DINOv2's ``last_hidden_state`` of a stratified
  subset of the training split is computed once and cached (fp16) under the cache folder
  (:func:`training_features`), then the decoder is trained on it with fixed seeds
  (``python -m turbo_fx.model_zoo.fashion_captioner train``); :func:`load_fashion_captioner`
  reads the cached weights (``fashion_captioner_v1.safetensors``, the decoder only: DINOv2's
  weights come from its own loader) and trains only when they are absent. The training's
  time, loss and held-out accuracy are in the JSON next to the weights.
* Measured on a 2-core Intel Xeon shared with other jobs, one thread: features of 3000 training
  images (2500 to train on, 500 held out, class-balanced) 713 s, then 600 steps of batch 64 (15
  epochs, AdamW, lr 1e-3 with warm-up and cosine decay, dropout 0.1) 397 s; final training loss
  0.102, held-out loss 0.254 and exact match 0.828 (the same as its first-word class accuracy).
  A linear probe on these features gets 0.80-0.82.
* 224 px rather than a smaller multiple of 14: the project's r = 8, 12, 16 per block over 12
  blocks remove 96 to 192 tokens, which 257 tokens allow (257 -> 65 at r = 16); at 168 px (145
  tokens) r = 12 would already be clamped. The features took 12 of the 18.5 minutes.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import training
from .deps import default_cache_dir, read_weights, record_path, save_weights

# --------------------------------------------------------------------------- vocabulary and captions

PAD, BOS, EOS = 0, 1, 2
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>")
# Fashion-MNIST's classes in words, in label order (data.FASHION_MNIST_CLASSES lower-cased,
# "T-shirt/top" split at the slash). The first word of each is unique to its class.
CAPTIONS = ("t-shirt top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
MAX_WORDS = max(len(c.split()) for c in CAPTIONS)
SEQUENCE_LENGTH = MAX_WORDS + 2  # BOS, the words, EOS
INPUT_LENGTH = SEQUENCE_LENGTH - 1  # input_ids drop the last token, targets the first

IMAGE_SIZE = 224  # 16 x 16 patches of 14 px + CLS = 257 tokens, the project's usual DINOv2 input
IMAGE_TOKENS = (IMAGE_SIZE // 14) ** 2 + 1
IMAGE_DIM = 384  # DINOv2 ViT-S

# Decoder and training defaults (the module docstring says what they cost).
WIDTH, LAYERS, HEADS, MLP_RATIO = 256, 2, 4, 4
DROPOUT = 0.1
DEFAULT_TRAIN_IMAGES = 2500
DEFAULT_VALIDATION_IMAGES = 500
DEFAULT_STEPS = 600
DEFAULT_BATCH = 64
DEFAULT_LR = 1e-3
DEFAULT_SEED = 0
WARMUP_STEPS = 30
# Bump when the model, the data or the recipe changes, so that older cached weights are not read.
WEIGHTS_VERSION = 1
WEIGHTS_NAME = f"fashion_captioner_v{WEIGHTS_VERSION}.safetensors"


class Vocabulary:
    """Words <-> ids: PAD 0, BOS 1, EOS 2, then every caption word in order of first appearance."""

    def __init__(self, captions: Sequence[str] = CAPTIONS) -> None:
        words: list[str] = list(SPECIAL_TOKENS)
        for caption in captions:
            for word in caption.split():
                if word not in words:
                    words.append(word)
        self.words = tuple(words)
        self.index = {w: i for i, w in enumerate(self.words)}
        self.captions = tuple(captions)
        self.max_words = max(len(c.split()) for c in captions)
        # The first word of each class caption: the class a generated caption names.
        self.first_word_class = {self.index[c.split()[0]]: label for label, c in enumerate(captions)}
        if len(self.first_word_class) != len(captions):
            raise ValueError("every caption must start with a word of its own")

    def __len__(self) -> int:
        return len(self.words)

    @property
    def sequence_length(self) -> int:
        return self.max_words + 2

    def encode(self, caption: str) -> list[int]:
        """``"ankle boot"`` -> ``[BOS, id("ankle"), id("boot"), EOS, PAD...]`` of :attr:`sequence_length`."""
        words = caption.split()
        if not words or len(words) > self.max_words:
            raise ValueError(f"a caption has 1 to {self.max_words} words, got {caption!r}")
        unknown = [w for w in words if w not in self.index or self.index[w] < len(SPECIAL_TOKENS)]
        if unknown:
            raise ValueError(f"words not in the vocabulary: {unknown}")
        ids = [BOS] + [self.index[w] for w in words] + [EOS]
        return ids + [PAD] * (self.sequence_length - len(ids))

    def decode(self, ids: Sequence[int]) -> str:
        """Generated ids -> words: a leading BOS is skipped, reading stops at EOS; PAD and BOS
        elsewhere are written as ``<pad>`` / ``<bos>`` (a caption holding them is wrong, and shows it)."""
        ids = [int(i) for i in ids]
        if ids and ids[0] == BOS:
            ids = ids[1:]
        words = []
        for i in ids:
            if i == EOS:
                break
            words.append(self.words[i])
        return " ".join(words)

    def caption_ids(self, labels: Sequence[int] | np.ndarray | torch.Tensor) -> torch.Tensor:
        """Labels -> their encoded captions ``[n, sequence_length]`` (int64)."""
        table = torch.tensor([self.encode(c) for c in self.captions], dtype=torch.long)
        return table[torch.as_tensor(np.asarray(labels), dtype=torch.long)]

    def class_of(self, first_token: int) -> int:
        """The class whose caption starts with this token; -1 for a token that starts none."""
        return self.first_word_class.get(int(first_token), -1)


VOCAB = Vocabulary()


def teacher_forcing(sequences: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Encoded sequences ``[n, S]`` -> (``input_ids`` ``[n, S-1]``, targets ``[n, S-1]``; PAD targets are ignored)."""
    return sequences[:, :-1].contiguous(), sequences[:, 1:].contiguous()


# --------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class DecoderConfig:
    vocab_size: int = len(VOCAB)
    image_dim: int = IMAGE_DIM
    width: int = WIDTH
    layers: int = LAYERS
    heads: int = HEADS
    mlp_ratio: int = MLP_RATIO
    max_length: int = INPUT_LENGTH
    dropout: float = DROPOUT


class SelfAttention(nn.Module):
    """Causal multi-head self-attention over the caption tokens."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.heads, self.dropout = cfg.heads, cfg.dropout
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width)
        self.out = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(b, n, c))


class CrossAttention(nn.Module):
    """Caption tokens attend to every image token; no mask (merged image tokens get turbo's key bias)."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.heads, self.dropout = cfg.heads, cfg.dropout
        self.q = nn.Linear(cfg.width, cfg.width)
        self.kv = nn.Linear(cfg.image_dim, 2 * cfg.width)
        self.out = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        h = self.heads
        q = self.q(x).reshape(b, n, h, c // h).transpose(1, 2)
        # [B, tokens, 2C] -> k, v [B, heads, tokens, C/heads]; the token count is read from the
        # image, so the graph carries it as the image stream's size.
        k, v = self.kv(image).reshape(b, image.shape[1], 2, h, c // h).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(b, n, c))


class DecoderLayer(nn.Module):
    """Pre-norm: causal self-attention, cross-attention to the image, MLP; each a residual."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.norm1, self.self_attn = nn.LayerNorm(cfg.width), SelfAttention(cfg)
        self.norm2, self.cross_attn = nn.LayerNorm(cfg.width), CrossAttention(cfg)
        self.norm3 = nn.LayerNorm(cfg.width)
        self.mlp = nn.Sequential(nn.Linear(cfg.width, cfg.mlp_ratio * cfg.width), nn.GELU(),
                                 nn.Linear(cfg.mlp_ratio * cfg.width, cfg.width))
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.self_attn(self.norm1(x)))
        x = x + self.drop(self.cross_attn(self.norm2(x), image))
        return x + self.drop(self.mlp(self.norm3(x)))


class CaptionDecoder(nn.Module):
    """Caption ids ``[B, L]`` and image tokens ``[B, N, image_dim]`` -> next-token logits ``[B, L, vocab]``.

    Learned token and position embeddings; the output layer shares the token embedding's weights.
    """

    def __init__(self, cfg: DecoderConfig = DecoderConfig()) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position = nn.Parameter(torch.zeros(1, cfg.max_length, cfg.width))
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.width)
        self.drop = nn.Dropout(cfg.dropout)
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.position, std=0.02)

    def forward(self, input_ids: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        length = input_ids.shape[1]
        if length > self.cfg.max_length:
            raise ValueError(f"input_ids have {length} tokens, at most {self.cfg.max_length} fit")
        x = self.drop(self.embed(input_ids) + self.position[:, :length])
        for layer in self.layers:
            x = layer(x, image)
        return self.norm(x) @ self.embed.weight.t()


class FashionCaptioner(nn.Module):
    """The frozen image encoder and the caption decoder in one module (one graph under torch.compile).

    ``vision``: a transformers ``Dinov2Model`` (or anything returning ``last_hidden_state``
    ``[B, N, image_dim]``); its parameters are frozen.
    """

    def __init__(self, vision: nn.Module, decoder: CaptionDecoder) -> None:
        super().__init__()
        self.vision, self.decoder = vision, decoder
        for p in self.vision.parameters():
            p.requires_grad_(False)

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        image = self.vision(pixel_values=pixel_values).last_hidden_state
        return self.decoder(input_ids, image)


def caption_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the non-PAD targets."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=PAD)


def preprocess(images: np.ndarray | torch.Tensor, size: int = IMAGE_SIZE) -> torch.Tensor:
    """uint8 Fashion-MNIST ``[n, 28, 28]`` -> DINOv2 pixels ``[n, 3, size, size]`` (``dinov2_preprocess``)."""
    from .dinov2 import dinov2_preprocess

    return dinov2_preprocess(images, size)


# --------------------------------------------------------------------------- features of the frozen encoder


def features_path(n: int, seed: int, size: int = IMAGE_SIZE, split: str = "train",
                  cache_dir: Optional[str | os.PathLike] = None) -> Path:
    """Cache file of DINOv2's ``last_hidden_state`` for ``fashion_mnist(split, n, seed)`` at ``size`` px."""
    from .dinov2 import dinov2_onnx_path, onnx_stamp

    key = hashlib.sha1(f"{split}-{n}-{seed}-{size}-{onnx_stamp(dinov2_onnx_path())}".encode()).hexdigest()[:16]
    return default_cache_dir(cache_dir) / f"fashion-captioner-features-{split}-{key}.pt"


@torch.no_grad()
def encode_images(vision: nn.Module, images: np.ndarray, size: int = IMAGE_SIZE, batch_size: int = 32,
                  log: Callable[[str], None] = print) -> torch.Tensor:
    """``last_hidden_state`` of ``vision`` for uint8 images, as fp16 ``[n, tokens, dim]``."""
    out = []
    started = time.perf_counter()
    for start in range(0, len(images), batch_size):
        pixels = preprocess(images[start: start + batch_size], size)
        out.append(vision(pixel_values=pixels).last_hidden_state.to(torch.float16))
        done = start + len(pixels)
        if (start // batch_size) % 10 == 9 or done == len(images):
            elapsed = time.perf_counter() - started
            log(f"features {done}/{len(images)}  {elapsed:.0f} s (about {elapsed / done * (len(images) - done):.0f} s left)")
    return torch.cat(out)


def training_features(n: int = DEFAULT_TRAIN_IMAGES + DEFAULT_VALIDATION_IMAGES, seed: int = DEFAULT_SEED,
                      size: int = IMAGE_SIZE, cache_dir: Optional[str | os.PathLike] = None,
                      log: Callable[[str], None] = print) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(fp16 features ``[n, tokens, 384]``, labels ``[n]``, seconds spent computing them: 0 if cached)
    of a class-balanced sample of the training split, read from the cache or computed and cached."""
    from .data import fashion_mnist
    from .dinov2 import load_dinov2_small

    images, labels = fashion_mnist("train", limit=n, seed=seed)
    path = features_path(n, seed, size, "train", cache_dir)
    if path.is_file():
        cached = torch.load(path)
        if torch.equal(cached["labels"], torch.from_numpy(labels)):
            return cached["features"], cached["labels"], 0.0
    log(f"computing DINOv2 features of {n} training images at {size} px -> {path}")
    started = time.perf_counter()
    features = encode_images(load_dinov2_small(), images, size, log=log)
    seconds = time.perf_counter() - started
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"features": features, "labels": torch.from_numpy(labels), "seconds": seconds}, tmp)
    os.replace(tmp, path)
    return features, torch.from_numpy(labels), seconds


# --------------------------------------------------------------------------- training


def learning_rate(step: int, total: int, peak: float, warmup: int = WARMUP_STEPS) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 5% of ``peak`` at ``total``."""
    return training.learning_rate(step, total, peak, warmup)


@torch.no_grad()
def score_features(decoder: CaptionDecoder, features: torch.Tensor, labels: torch.Tensor,
                   batch_size: int = 100) -> dict:
    """Teacher-forced caption loss, exact-match and first-word accuracy of ``decoder`` on cached features."""
    was_training = decoder.training
    decoder.eval()
    input_ids, targets = teacher_forcing(VOCAB.caption_ids(labels))
    loss, exact, first = 0.0, 0, 0
    for start in range(0, len(labels), batch_size):
        sl = slice(start, start + batch_size)
        logits = decoder(input_ids[sl], features[sl].float())
        loss += float(caption_loss(logits, targets[sl])) * len(logits)
        predicted = logits.argmax(-1)
        exact += int(((predicted == targets[sl]) | (targets[sl] == PAD)).all(-1).sum())
        first += int((predicted[:, 0] == targets[sl][:, 0]).sum())
    decoder.train(was_training)
    n = max(1, len(labels))
    return {"loss": round(loss / n, 5), "exact_match": round(exact / n, 5), "first_word": round(first / n, 5), "n": len(labels)}


@dataclass
class TrainRecord:
    """What a training run did; written as JSON next to the weights."""

    steps: int
    batch_size: int
    seed: int
    lr: float
    threads: int
    train_images: int
    validation_images: int
    image_size: int = IMAGE_SIZE
    feature_seconds: float = 0.0  # computing the DINOv2 features (0: read from the cache)
    seconds: float = 0.0  # training the decoder
    final_loss: float = math.nan  # mean training loss over the last 50 steps (or all, if fewer)
    losses: list = field(default_factory=list)  # [step, mean loss of the steps since the last entry]
    validation: dict = field(default_factory=dict)  # score_features on held-out training-split images
    parameters: int = 0
    torch_version: str = torch.__version__
    weights_version: int = WEIGHTS_VERSION
    decoder_config: dict = field(default_factory=lambda: asdict(DecoderConfig()))


def init_decoder(seed: int = DEFAULT_SEED, cfg: DecoderConfig = DecoderConfig()) -> CaptionDecoder:
    """The untrained decoder :func:`train` starts from with this seed."""
    torch.manual_seed(seed)
    return CaptionDecoder(cfg)


def train(features: torch.Tensor, labels: torch.Tensor, steps: int = DEFAULT_STEPS, batch_size: int = DEFAULT_BATCH,
          lr: float = DEFAULT_LR, seed: int = DEFAULT_SEED, cfg: Optional[DecoderConfig] = None,
          validation: Optional[tuple[torch.Tensor, torch.Tensor]] = None, threads: Optional[int] = 1,
          warmup: int = WARMUP_STEPS, log_every: int = 50,
          log: Callable[[str], None] = print) -> tuple[CaptionDecoder, TrainRecord]:
    """Train a decoder on image tokens ``features`` ``[n, N, image_dim]`` (any float dtype) captioned by ``labels``.

    Deterministic in ``seed`` (the initial weights, the shuffling and the dropout). Returns
    the decoder in eval mode and the run's record. ``threads``: torch's intra-op threads while
    training (None keeps torch's setting), restored afterwards.
    """
    cfg = cfg or DecoderConfig(image_dim=features.shape[-1])
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        decoder = init_decoder(seed, cfg).train()
        optimizer = torch.optim.AdamW(decoder.parameters(), lr=lr, weight_decay=0.05)
        gen = torch.Generator().manual_seed(seed + 1)
        sequences = VOCAB.caption_ids(labels)
        record = TrainRecord(steps, batch_size, seed, lr, threads or old_threads, len(labels),
                             0 if validation is None else len(validation[1]),
                             parameters=sum(p.numel() for p in decoder.parameters()), decoder_config=asdict(cfg))
        batches = training.shuffled_batches(len(labels), batch_size, gen)
        losses = training.LossLog(steps, log_every, log)
        for step, idx in zip(range(steps), batches):
            input_ids, targets = teacher_forcing(sequences[idx])
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, steps, lr, warmup)
            loss = caption_loss(decoder(input_ids, features[idx].float()), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(decoder.parameters(), 1.0)
            optimizer.step()
            losses.add(step, loss)
        record.losses, record.seconds, record.final_loss = losses.losses, losses.seconds, losses.final_loss
        decoder.eval()
        if validation is not None:
            record.validation = score_features(decoder, *validation)
    finally:
        torch.set_num_threads(old_threads)
    return decoder, record


# --------------------------------------------------------------------------- saving and loading


def weights_path(cache_dir: Optional[str | os.PathLike] = None) -> Path:
    """Where the trained decoder is cached: ``<cache>/fashion_captioner_v<N>.safetensors`` (see ``default_cache_dir``)."""
    return default_cache_dir(cache_dir) / WEIGHTS_NAME


def save_decoder(decoder: CaptionDecoder, path: str | os.PathLike, record: Optional[TrainRecord] = None) -> Path:
    """The decoder's weights in a safetensors file (its config in the metadata), plus the record's JSON."""
    meta = {"weights_version": str(WEIGHTS_VERSION), "decoder_config": json.dumps(asdict(decoder.cfg)),
            "vocabulary": json.dumps(list(VOCAB.words))}
    return save_weights(decoder.state_dict(), meta, path, None if record is None else json.dumps(asdict(record), indent=1))


def read_decoder(path: str | os.PathLike) -> CaptionDecoder:
    """The decoder saved by :func:`save_decoder`, in eval mode."""
    tensors, meta = read_weights(path, WEIGHTS_VERSION)
    if json.loads(meta["vocabulary"]) != list(VOCAB.words):
        raise ValueError(f"{path} was trained with another vocabulary")
    decoder = CaptionDecoder(DecoderConfig(**json.loads(meta["decoder_config"])))
    decoder.load_state_dict(tensors, strict=True)
    return decoder.eval()


def train_and_save(path: Optional[str | os.PathLike] = None, train_images: int = DEFAULT_TRAIN_IMAGES,
                   validation_images: int = DEFAULT_VALIDATION_IMAGES, steps: int = DEFAULT_STEPS,
                   batch_size: int = DEFAULT_BATCH, lr: float = DEFAULT_LR, seed: int = DEFAULT_SEED,
                   threads: Optional[int] = 1, log: Callable[[str], None] = print) -> tuple[CaptionDecoder, TrainRecord]:
    """Features of ``train_images + validation_images`` training-split images (class-balanced; the
    last ``validation_images`` are held out, still balanced), then :func:`train`, then save."""
    path = Path(path) if path else weights_path()
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        features, labels, feature_seconds = training_features(train_images + validation_images, seed, log=log)
    finally:
        torch.set_num_threads(old_threads)
    # stratified_indices cycles through the classes, so every prefix and the tail are balanced.
    train_split = (features[:train_images], labels[:train_images])
    held_out = (features[train_images:], labels[train_images:]) if validation_images else None
    decoder, record = train(*train_split, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                            validation=held_out, threads=threads, log=log)
    record.feature_seconds = round(feature_seconds, 1)
    save_decoder(decoder, path, record)
    return decoder, record


def load_decoder(cache_dir: Optional[str | os.PathLike] = None, log: Callable[[str], None] = print) -> CaptionDecoder:
    """The trained decoder from the cache; trains and caches it first if absent (about 20 minutes on 2 cores)."""
    path = weights_path(cache_dir)
    if not path.is_file():
        log(f"{path} not found: training the Fashion-MNIST caption decoder (features, then "
            f"{DEFAULT_STEPS} steps; about 20 minutes on 2 CPU cores) ...")
        _, record = train_and_save(path, log=log)
        log(f"trained in {record.seconds:.0f} s (final loss {record.final_loss:.4f}); cached in {path}")
    return read_decoder(path)


def load_fashion_captioner(cache_dir: Optional[str | os.PathLike] = None,
                           log: Callable[[str], None] = print) -> FashionCaptioner:
    """The real-weight DINOv2 ViT-S/14 and the trained decoder as one :class:`FashionCaptioner`, in eval mode."""
    from .dinov2 import load_dinov2_small

    return FashionCaptioner(load_dinov2_small(cache_dir), load_decoder(cache_dir, log)).eval()


# --------------------------------------------------------------------------- decoding


@torch.no_grad()
def greedy_captions(model: Callable, pixel_values: torch.Tensor, max_new_tokens: int = INPUT_LENGTH) -> list[list[int]]:
    """Greedy decoding, one model call per step with the ids generated so far (a growing
    ``input_ids``: BOS, then BOS + the first token, ...), until every caption has EOS or
    ``max_new_tokens`` tokens. ``model(pixel_values, input_ids) -> logits``. Returns the
    generated ids per image, EOS included where one was generated."""
    ids = torch.full((len(pixel_values), 1), BOS, dtype=torch.long)
    done = torch.zeros(len(pixel_values), dtype=torch.bool)
    for _ in range(max_new_tokens):
        nxt = model(pixel_values, ids)[:, -1].argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, PAD), nxt)
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        done |= nxt == EOS
        if bool(done.all()):
            break
    out = []
    for row in ids[:, 1:].tolist():
        out.append(row[: row.index(EOS) + 1] if EOS in row else [t for t in row if t != PAD])
    return out


# --------------------------------------------------------------------------- command line


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = training.train_command(
        "fashion_captioner", "Train the Fashion-MNIST caption decoder on frozen DINOv2 features and cache its weights.",
        "compute (or read) the features, train, save the weights and a JSON of the run",
        DEFAULT_STEPS, DEFAULT_BATCH, DEFAULT_LR, DEFAULT_SEED, weights_path(),
        (DEFAULT_TRAIN_IMAGES, DEFAULT_VALIDATION_IMAGES))
    args = parser.parse_args(argv)
    out = Path(args.out) if args.out else weights_path()
    print(f"training on {args.train_images} images ({args.validation_images} held out), {args.steps} steps of batch "
          f"{args.batch} (seed {args.seed}, {args.threads} thread(s)) -> {out}", flush=True)
    _, record = train_and_save(out, args.train_images, args.validation_images, args.steps, args.batch, args.lr,
                               args.seed, args.threads, log=lambda s: print(s, flush=True))
    print(f"done: features {record.feature_seconds:.0f} s, training {record.seconds:.0f} s, final loss "
          f"{record.final_loss:.4f}, held out {record.validation}; wrote {out} ({out.stat().st_size / 1e6:.1f} MB) "
          f"and {record_path(out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
