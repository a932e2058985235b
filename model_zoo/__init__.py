"""Model builders used by the tests and benchmarks (installed as ``turbo_fx.model_zoo``).

Real weights (DINOv2 ViT-S/14, all-MiniLM-L6-v2), random-weight timm and transformers models,
and real offline data (Fashion-MNIST, digits, photos, Lee similarity, polarity). Heavy
optional packages (transformers, onnx, onnxruntime, timm, ...) are imported only when used.

Imports run one way (``tests/model_zoo/test_layers.py`` holds it): ``registry`` on top; the
trained stand-ins ``fashion_diffusion``, ``fashion_captioner`` and ``fashion_rope_vit`` below it; ``data``,
``dinov2`` and ``minilm`` below those; ``deps`` (optional imports, ``MissingDependency``, the
cache folder) and ``training`` at the bottom.
"""
from .data import (
    FASHION_MNIST_CLASSES,
    DatasetUnavailable,
    digits,
    fashion_mnist,
    lee_corpus,
    lee_pairs,
    polarity,
    sample_photos,
)
from .dinov2 import (
    convert_onnx_to_state_dict,
    dinov2_onnx_path,
    dinov2_preprocess,
    load_dinov2_small,
    onnx_backbone_features,
)
from .minilm import embed_texts, load_minilm, mean_pool
from .registry import MissingDependency, ZooModel, build_model, list_models

__all__ = [
    "FASHION_MNIST_CLASSES",
    "DatasetUnavailable",
    "MissingDependency",
    "ZooModel",
    "build_model",
    "convert_onnx_to_state_dict",
    "digits",
    "dinov2_onnx_path",
    "dinov2_preprocess",
    "embed_texts",
    "fashion_mnist",
    "lee_corpus",
    "lee_pairs",
    "list_models",
    "load_dinov2_small",
    "load_minilm",
    "mean_pool",
    "onnx_backbone_features",
    "polarity",
    "sample_photos",
]
