"""A LLaVA-style stand-in trained here: frozen real DINOv2 ViT-S/14 patch tokens, a projector and a
small Llama decoder that answers with the Fashion-MNIST class name.

No LLaVA weights install offline, so turbo's placeholder compaction (a language model's image
tokens merged once, before its first layer) is measured for fidelity on this model:

* Vision: the frozen, real-weight DINOv2 ViT-S/14 of
  :func:`~turbo_fx.model_zoo.dinov2.load_dinov2_small` at 224 px; its 256 patch tokens of
  ``last_hidden_state`` (the CLS token dropped) are the visual tokens. The features are computed
  once and cached (fp16) by ``fashion_captioner.training_features`` / ``encode_images``: the
  training images are the captioner's (the same file serves both).
* Projector: ``Linear(384, W) - GELU - Linear(W, W)`` (LLaVA-1.5's MLP projector).
* Language model: transformers' ``LlamaModel`` (rotary positions, RMSNorm, SwiGLU, causal), tiny
  (:class:`LlavaConfig`: 3 layers of width 128, 4 heads), over a 17-token vocabulary: the
  captioner's (PAD, BOS, EOS and the 12 caption words), the IMAGE placeholder and ANSWER; a
  linear head.
* :class:`FashionLlava` ``.forward(input_ids, image_features)`` is LLaVA's pattern, so that turbo
  finds it by structure: the token embeddings, ``masked_scatter`` of the projected features into
  the IMAGE placeholders, the decoder over ``inputs_embeds``, the head.
* Prompt: ``[BOS] + 256 x IMAGE + [ANSWER] + answer + [EOS]``, the answer being the class caption
  (``fashion_captioner.CAPTIONS``: "ankle boot", "trouser", ...). ANSWER is one text token between
  the image and the answer (LLaVA's "ASSISTANT:"), so that the first word is predicted at a text
  token, as in LLaVA's prompts. Read at the last placeholder instead, the first word would come
  from a token that compaction merges: its slot sits at its members' mean position and, under the
  causal mask, sees only the image before it. No question text: the only task is the class.
  Trained with teacher forcing; the loss reads the answer tokens only. Greedy decoding
  (:func:`greedy_answers`) reruns the growing input at each step, without a cache.
* ``python -m turbo_fx.model_zoo.fashion_llava train`` trains and caches the weights
  (``fashion_llava_v1.safetensors`` with its record, the training time, loss and held-out exact
  match, in the JSON beside it); :func:`load_fashion_llava` trains only when they are absent.
  ``docs/llava-standin.md`` gives the recorded numbers.
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

from . import fashion_captioner as fc
from . import training
from .deps import default_cache_dir, read_weights, record_path, require, save_weights

# --------------------------------------------------------------------------- tokens and prompts

PAD, BOS, EOS = fc.PAD, fc.BOS, fc.EOS
VOCAB = fc.VOCAB
IMAGE = len(VOCAB)  # the placeholder id, after the captioner's words
ANSWER = IMAGE + 1  # the text token between the image and the answer (LLaVA's "ASSISTANT:")
VOCAB_SIZE = ANSWER + 1
GRID = fc.IMAGE_SIZE // 14  # 16 x 16 patches at 224 px
VISUAL_TOKENS = GRID * GRID
ANSWER_TOKENS = fc.MAX_WORDS + 1  # the words and EOS
# The longest input a step of greedy decoding (or teacher forcing) reads: BOS, the image, ANSWER,
# the answer without its last token.
INPUT_LENGTH = 1 + VISUAL_TOKENS + 1 + ANSWER_TOKENS - 1

WIDTH, LAYERS, HEADS, MLP = 128, 3, 4, 384
DEFAULT_TRAIN_IMAGES = fc.DEFAULT_TRAIN_IMAGES
DEFAULT_VALIDATION_IMAGES = fc.DEFAULT_VALIDATION_IMAGES
DEFAULT_STEPS = 360
DEFAULT_BATCH = 32
DEFAULT_LR = 1e-3
DEFAULT_SEED = 0
WARMUP_STEPS = 20
WEIGHTS_VERSION = 1
WEIGHTS_NAME = f"fashion_llava_v{WEIGHTS_VERSION}.safetensors"


def prompt_ids(n: int, visual_tokens: int = VISUAL_TOKENS, answer_slots: int = 0) -> torch.Tensor:
    """``[n, 2 + visual_tokens + answer_slots]``: BOS, the IMAGE placeholders, ANSWER, then PAD answer slots."""
    ids = torch.full((n, 2 + visual_tokens + answer_slots), PAD, dtype=torch.long)
    ids[:, 0] = BOS
    ids[:, 1: 1 + visual_tokens] = IMAGE
    ids[:, 1 + visual_tokens] = ANSWER
    return ids


def answer_ids(labels: Sequence[int] | np.ndarray | torch.Tensor) -> torch.Tensor:
    """The class captions as answer tokens ``[n, ANSWER_TOKENS]``: the words, EOS, PAD after it."""
    return VOCAB.caption_ids(labels)[:, 1:]


def teacher_forcing(labels: Sequence[int] | np.ndarray | torch.Tensor,
                    visual_tokens: int = VISUAL_TOKENS) -> tuple[torch.Tensor, torch.Tensor]:
    """(``input_ids`` ``[n, INPUT_LENGTH]``, targets of the same shape): the full prompt minus its last
    token, and the next token at each position, PAD (ignored by the loss) wherever the next token
    is not part of the answer."""
    answers = answer_ids(labels)
    n = len(answers)
    sequence = torch.cat([prompt_ids(n, visual_tokens, 0), answers], dim=1)
    targets = sequence[:, 1:].clone()
    targets[:, : visual_tokens + 1] = PAD  # the placeholders and ANSWER follow from the prompt: nothing to learn
    return sequence[:, :-1].contiguous(), targets


# --------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class LlavaConfig:
    vocab_size: int = VOCAB_SIZE
    image_token: int = IMAGE
    image_dim: int = fc.IMAGE_DIM
    width: int = WIDTH
    layers: int = LAYERS
    heads: int = HEADS
    mlp: int = MLP
    rope_theta: float = 10000.0
    max_positions: int = 512


def llama_config(cfg: LlavaConfig):
    require("transformers")
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.width, intermediate_size=cfg.mlp,
                         num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads,
                         max_position_embeddings=cfg.max_positions, rope_theta=cfg.rope_theta,
                         pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    return config


class FashionLlava(nn.Module):
    """``forward(input_ids [B, L], image_features [B, N, 384])`` -> next-token logits ``[B, L, vocab]``.

    ``image_features`` are the vision tower's tokens, one row of N per image, N the number of
    IMAGE placeholders in each row of ``input_ids``. ``position_ids`` (optional, ``[B, L]``, may
    be fractional) place the tokens for the rotary embedding: the baselines that shorten the image
    span keep the text at its original positions with them.
    """

    def __init__(self, cfg: LlavaConfig = LlavaConfig()) -> None:
        super().__init__()
        from transformers import LlamaModel

        self.cfg = cfg
        self.image_token = cfg.image_token
        self.projector = nn.Sequential(nn.Linear(cfg.image_dim, cfg.width), nn.GELU(), nn.Linear(cfg.width, cfg.width))
        self.llama = LlamaModel(llama_config(cfg))
        self.head = nn.Linear(cfg.width, cfg.vocab_size, bias=False)

    def forward(self, input_ids: torch.Tensor, image_features: torch.Tensor,
                position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        embeds = self.llama.embed_tokens(input_ids)
        visual = self.projector(image_features).to(embeds.dtype)
        embeds = embeds.masked_scatter((input_ids == self.image_token).unsqueeze(-1), visual)
        if position_ids is None:
            hidden = self.llama(inputs_embeds=embeds).last_hidden_state
        else:
            # An explicit all-ones mask: without one, transformers reads gaps in position_ids as
            # packed sequences and would cut the text off from the image.
            mask = torch.ones(input_ids.shape, dtype=torch.long, device=input_ids.device)
            hidden = self.llama(inputs_embeds=embeds, position_ids=position_ids, attention_mask=mask).last_hidden_state
        return self.head(hidden)


def answer_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the answer tokens (PAD targets ignored)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=PAD)


def patch_tokens(features: torch.Tensor) -> torch.Tensor:
    """DINOv2 ``last_hidden_state`` ``[n, 1 + 256, 384]`` -> the 256 patch tokens (CLS dropped)."""
    if features.shape[1] == VISUAL_TOKENS + 1:
        return features[:, 1:]
    if features.shape[1] != VISUAL_TOKENS:
        raise ValueError(f"expected {VISUAL_TOKENS} or {VISUAL_TOKENS + 1} tokens, got {features.shape[1]}")
    return features


# --------------------------------------------------------------------------- decoding


@torch.no_grad()
def greedy_answers(step: Callable[[torch.Tensor], torch.Tensor], prompt: torch.Tensor,
                   max_new_tokens: int = ANSWER_TOKENS) -> list[list[int]]:
    """Greedy decoding without a cache: each step runs ``step(ids) -> logits`` on the prompt
    (``[B, P]``: BOS, the image, ANSWER) and the tokens generated so far, and appends the argmax at
    the last position (PAD to rows that are done, so the batch keeps one shape). The first step
    reads the prompt alone, as ``generate()``'s prefill does: a compaction that ranks placeholders
    by the text after them sees only the prompt's text, never padding. Returns each row's
    generated ids, EOS included where one was generated."""
    ids = prompt
    done = torch.zeros(len(ids), dtype=torch.bool)
    out = torch.full((len(ids), max_new_tokens), PAD, dtype=torch.long)
    for t in range(max_new_tokens):
        nxt = step(ids)[:, -1].argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, PAD), nxt)
        out[:, t] = nxt
        done |= nxt == EOS
        if bool(done.all()):
            break
        ids = torch.cat([ids, nxt[:, None]], dim=1)
    answers = []
    for row in out.tolist():
        answers.append(row[: row.index(EOS) + 1] if EOS in row else [t for t in row if t != PAD])
    return answers


WORDS = VOCAB.words + ("<image>", "<answer>")


def answer_text(ids: Sequence[int]) -> str:
    """Generated ids -> words, up to EOS (``<no eos>`` appended where decoding stopped without one;
    a generated special token is written out, so that an answer holding one is visibly wrong)."""
    ids = [int(i) for i in ids]
    words = []
    for i in ids:
        if i == EOS:
            break
        words.append(WORDS[i])
    return " ".join(words) + ("" if EOS in ids else " <no eos>")


# --------------------------------------------------------------------------- features


class ClsAttention(nn.Module):
    """Wraps DINOv2 so that ``encode_images`` also collects, per image, the last layer's attention
    of CLS to the patch tokens (mean over heads), which VisionZip-style selection ranks by."""

    def __init__(self, vision: nn.Module) -> None:
        super().__init__()
        self.vision = vision
        self.rows: list[torch.Tensor] = []
        # Attention weights exist only on the eager path; sdpa never materialises them.
        vision.set_attn_implementation("eager")

    def forward(self, pixel_values: torch.Tensor):
        out = self.vision(pixel_values=pixel_values, output_attentions=True)
        self.rows.append(out.attentions[-1][:, :, 0, 1:].mean(1).float())
        return out


def evaluation_features_path(split: str, n: int, seed: int, cache_dir: Optional[str | os.PathLike] = None) -> Path:
    from .dinov2 import dinov2_onnx_path, onnx_stamp

    key = hashlib.sha1(f"{split}-{n}-{seed}-{fc.IMAGE_SIZE}-cls-{onnx_stamp(dinov2_onnx_path())}".encode()).hexdigest()[:16]
    return default_cache_dir(cache_dir) / f"fashion-llava-features-{split}-{key}.pt"


def evaluation_features(n: int = 1000, seed: int = 0, split: str = "test", cache_dir: Optional[str | os.PathLike] = None,
                        log: Callable[[str], None] = print) -> dict:
    """A class-balanced sample of ``split``: ``features`` (fp16 patch tokens ``[n, 256, 384]``),
    ``cls_attention`` (``[n, 256]``, rows sum to 1 minus CLS's attention to itself), ``labels``
    and ``seconds`` (0 when read from the cache)."""
    from .data import fashion_mnist
    from .dinov2 import load_dinov2_small

    images, labels = fashion_mnist(split, limit=n, seed=seed)
    path = evaluation_features_path(split, n, seed, cache_dir)
    if path.is_file():
        cached = torch.load(path)
        if torch.equal(cached["labels"], torch.from_numpy(labels)):
            return {**cached, "seconds": 0.0}
    log(f"computing DINOv2 features and CLS attention of {n} {split} images -> {path}")
    started = time.perf_counter()
    vision = ClsAttention(load_dinov2_small(cache_dir))
    features = fc.encode_images(vision, images, fc.IMAGE_SIZE, log=log)
    payload = {"features": patch_tokens(features).contiguous(), "cls_attention": torch.cat(vision.rows),
               "labels": torch.from_numpy(labels), "seconds": time.perf_counter() - started}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return payload


# --------------------------------------------------------------------------- training


@torch.no_grad()
def score_features(model: FashionLlava, features: torch.Tensor, labels: torch.Tensor, batch_size: int = 50) -> dict:
    """Teacher-forced answer loss, exact match and first-word accuracy on cached features. Under
    the causal mask the greedy answer is the true one exactly when, fed the true answer, every
    answer position's argmax is its next true token, so exact match here is greedy exact match."""
    was_training = model.training
    model.eval()
    loss, exact, first = 0.0, 0, 0
    for start in range(0, len(labels), batch_size):
        sl = slice(start, start + batch_size)
        input_ids, targets = teacher_forcing(labels[sl])
        logits = model(input_ids, patch_tokens(features[sl]).float())
        loss += float(answer_loss(logits, targets)) * len(input_ids)
        answer = slice(VISUAL_TOKENS + 1, None)
        predicted, wanted = logits[:, answer].argmax(-1), targets[:, answer]
        exact += int(((predicted == wanted) | (wanted == PAD)).all(-1).sum())
        first += int((predicted[:, 0] == wanted[:, 0]).sum())
    model.train(was_training)
    n = max(1, len(labels))
    return {"loss": round(loss / n, 5), "exact_match": round(exact / n, 5), "first_word": round(first / n, 5),
            "n": len(labels)}


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
    image_size: int = fc.IMAGE_SIZE
    visual_tokens: int = VISUAL_TOKENS
    feature_seconds: float = 0.0  # the DINOv2 features (0: read from the cache)
    seconds: float = 0.0  # training the projector and the language model
    final_loss: float = math.nan  # mean training loss over the last 50 steps
    losses: list = field(default_factory=list)  # [step, mean loss of the steps since the last entry]
    validation: dict = field(default_factory=dict)  # score_features on held-out training-split images
    parameters: int = 0
    torch_version: str = torch.__version__
    weights_version: int = WEIGHTS_VERSION
    config: dict = field(default_factory=lambda: asdict(LlavaConfig()))


def init_model(seed: int = DEFAULT_SEED, cfg: LlavaConfig = LlavaConfig()) -> FashionLlava:
    """The untrained model :func:`train` starts from with this seed."""
    torch.manual_seed(seed)
    return FashionLlava(cfg)


def train(features: torch.Tensor, labels: torch.Tensor, steps: int = DEFAULT_STEPS, batch_size: int = DEFAULT_BATCH,
          lr: float = DEFAULT_LR, seed: int = DEFAULT_SEED, cfg: Optional[LlavaConfig] = None,
          validation: Optional[tuple[torch.Tensor, torch.Tensor]] = None, threads: Optional[int] = 1,
          warmup: int = WARMUP_STEPS, log_every: int = 20,
          log: Callable[[str], None] = print) -> tuple[FashionLlava, TrainRecord]:
    """Train on visual tokens ``features`` (``[n, 256 or 257, image_dim]``, any float dtype) answered
    by ``labels``; deterministic in ``seed``. Returns the model in eval mode and the run's record."""
    cfg = cfg or LlavaConfig(image_dim=features.shape[-1])
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        model = init_model(seed, cfg).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
        gen = torch.Generator().manual_seed(seed + 1)
        record = TrainRecord(steps, batch_size, seed, lr, threads or old_threads, len(labels),
                             0 if validation is None else len(validation[1]),
                             visual_tokens=patch_tokens(features[:1]).shape[1],
                             parameters=sum(p.numel() for p in model.parameters()), config=asdict(cfg))
        batches = training.shuffled_batches(len(labels), batch_size, gen)
        losses = training.LossLog(steps, log_every, log)
        for step, idx in zip(range(steps), batches):
            input_ids, targets = teacher_forcing(labels[idx], record.visual_tokens)
            for group in optimizer.param_groups:
                group["lr"] = training.learning_rate(step, steps, lr, warmup)
            loss = answer_loss(model(input_ids, patch_tokens(features[idx]).float()), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            losses.add(step, loss)
        record.losses, record.seconds, record.final_loss = losses.losses, losses.seconds, losses.final_loss
        model.eval()
        if validation is not None:
            record.validation = score_features(model, *validation)
    finally:
        torch.set_num_threads(old_threads)
    return model, record


# --------------------------------------------------------------------------- saving and loading


def weights_path(cache_dir: Optional[str | os.PathLike] = None) -> Path:
    """``<cache>/fashion_llava_v<N>.safetensors`` (see ``default_cache_dir``)."""
    return default_cache_dir(cache_dir) / WEIGHTS_NAME


def save_model(model: FashionLlava, path: str | os.PathLike, record: Optional[TrainRecord] = None) -> Path:
    meta = {"weights_version": str(WEIGHTS_VERSION), "config": json.dumps(asdict(model.cfg)),
            "vocabulary": json.dumps(list(VOCAB.words))}
    return save_weights(model.state_dict(), meta, path, None if record is None else json.dumps(asdict(record), indent=1))


def read_model(path: str | os.PathLike) -> FashionLlava:
    """The model saved by :func:`save_model`, in eval mode."""
    tensors, meta = read_weights(path, WEIGHTS_VERSION)
    if json.loads(meta["vocabulary"]) != list(VOCAB.words):
        raise ValueError(f"{path} was trained with another vocabulary")
    model = FashionLlava(LlavaConfig(**json.loads(meta["config"])))
    model.load_state_dict(tensors, strict=True)
    return model.eval()


def train_and_save(path: Optional[str | os.PathLike] = None, train_images: int = DEFAULT_TRAIN_IMAGES,
                   validation_images: int = DEFAULT_VALIDATION_IMAGES, steps: int = DEFAULT_STEPS,
                   batch_size: int = DEFAULT_BATCH, lr: float = DEFAULT_LR, seed: int = DEFAULT_SEED,
                   threads: Optional[int] = 1, log: Callable[[str], None] = print) -> tuple[FashionLlava, TrainRecord]:
    """The captioner's cached training features (``train_images + validation_images``, class-balanced,
    the last ``validation_images`` held out), then :func:`train`, then save."""
    path = Path(path) if path else weights_path()
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        features, labels, feature_seconds = fc.training_features(train_images + validation_images, seed, log=log)
    finally:
        torch.set_num_threads(old_threads)
    held_out = (features[train_images:], labels[train_images:]) if validation_images else None
    model, record = train(features[:train_images], labels[:train_images], steps=steps, batch_size=batch_size, lr=lr,
                          seed=seed, validation=held_out, threads=threads, log=log)
    record.feature_seconds = round(feature_seconds, 1)
    save_model(model, path, record)
    return model, record


def load_fashion_llava(cache_dir: Optional[str | os.PathLike] = None, log: Callable[[str], None] = print) -> FashionLlava:
    """The trained model from the cache; trains and caches it first if absent (on one thread,
    about 10 minutes of DINOv2 features unless the captioner's are cached, then 5 of training)."""
    path = weights_path(cache_dir)
    if not path.is_file():
        log(f"{path} not found: training the Fashion-MNIST LLaVA stand-in ({DEFAULT_STEPS} steps) ...")
        _, record = train_and_save(path, log=log)
        log(f"trained in {record.seconds:.0f} s (final loss {record.final_loss:.4f}); cached in {path}")
    return read_model(path)


# --------------------------------------------------------------------------- command line


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = training.train_command(
        "fashion_llava", "Train the Fashion-MNIST LLaVA stand-in on frozen DINOv2 patch tokens and cache its weights.",
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
