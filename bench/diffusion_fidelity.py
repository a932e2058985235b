"""Generation fidelity of a diffusion configuration: images generated from fixed noise, scored
against real Fashion-MNIST and against the unmerged model's images from the same noise, every
metric with a two-sided 95% interval.

* **Frechet distance** (FD) between DINOv2-S CLS features of the generated images and of N real
  test images (FID's formula in DINOv2's feature space, through symmetric eigen-decompositions;
  ``frechet_distance_sqrtm`` is scipy's ``sqrtm`` form, the same value). Interval: a seeded
  bootstrap over the *generated* images against the fixed real statistics. A resample repeats
  about a third of the images, which by itself raises FD (real images at n = 200: FD 35.6,
  replicates 53-69), so the replicates are re-centred on the estimate (``fd_bootstrap_bias``
  subtracted) and the interval is their central 95%. FD is biased upwards at small n too, so
  configurations are compared at the same n, from the same noise, against the same real set.
* **Class accuracy**: a linear probe fit on DINOv2 features of real training images, applied to
  the generated images with the labels they were generated for; Wilson interval, and per-image
  outcomes for paired McNemar tests between configurations.
* **Paired PSNR and SSIM** (scikit-image, data range 2) of each image against the unmerged
  model's image from the same noise: mean and percentile bootstrap interval; per-image PSNR is
  capped at ``PSNR_CAP`` dB (identical images have infinite PSNR).

Features take the vision evaluation's path (``dinov2_preprocess``, ``Dinov2Model``,
``suites.dinov2_features``: CLS and mean patch token); the probe uses all of it, FD the CLS half.
Images are float ``[N, 1, 32, 32]`` (or ``[N, 32, 32]``) in [-1, 1], the diffusion model's range
(``fashion_diffusion.to_model_range`` brings real images there, so both are featurised alike).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from turbo_fx.bench import fidelity, stats

CONFIDENCE = stats.CONFIDENCE
FD_RESAMPLES = 200  # each replicate is one eigen-decomposition of a 384x384 matrix (~20 ms)
PSNR_CAP = 100.0  # dB; an exact copy would otherwise have PSNR = inf
DATA_RANGE = 2.0  # pixels in [-1, 1]
CLS_DIM = 384  # DINOv2-S: the first 384 feature columns are the CLS token


# --------------------------------------------------------------------------- images


def as_images(images: Any) -> np.ndarray:
    """Images as float64 ``[N, H, W]`` in [-1, 1] (a channel dim of 1 dropped; values clipped)."""
    x = fidelity.as_numpy(images).astype(np.float64)
    if x.ndim == 4:
        if x.shape[1] != 1:
            raise ValueError(f"expected one channel, got shape {x.shape}")
        x = x[:, 0]
    if x.ndim != 3:
        raise ValueError(f"expected [N, 1, H, W] or [N, H, W] images, got shape {x.shape}")
    return np.clip(x, -1.0, 1.0)


def to_unit(images: Any) -> np.ndarray:
    """[-1, 1] images -> float32 ``[N, H, W]`` in [0, 1] (what ``dinov2_preprocess`` expects of floats)."""
    return ((as_images(images) + 1.0) / 2.0).astype(np.float32)


# --------------------------------------------------------------------------- features


def dinov2_image_features(images: Any, model: Any = None, batch_size: int = 32, resolution: int = 224) -> np.ndarray:
    """DINOv2-S features ``[N, 768]`` of [-1, 1] images: CLS token then mean patch token (see module docstring).

    ``model``: a ``Dinov2Model`` (default: ``load_dinov2_small()``, the real weights).
    """
    import torch

    from turbo_fx.bench import evaluation, suites
    from turbo_fx.model_zoo import dinov2

    model = dinov2.load_dinov2_small() if model is None else model
    unit = to_unit(images)
    out = []
    with torch.no_grad():
        for start, stop in evaluation.batched(len(unit), batch_size):
            pixels = dinov2.dinov2_preprocess(unit[start:stop], size=resolution)
            out.append(suites.dinov2_features(model(pixel_values=pixels)).float())
    return torch.cat(out).numpy().astype(np.float64) if out else np.zeros((0, 2 * CLS_DIM))


def cls_features(features: np.ndarray, dim: int = CLS_DIM) -> np.ndarray:
    """The CLS half of :func:`dinov2_image_features` (the features FD uses)."""
    return np.asarray(features)[:, :dim]


# --------------------------------------------------------------------------- Frechet distance


@dataclass(frozen=True)
class GaussianStats:
    """Mean and covariance (``ddof=1``) of a feature set, and how many rows it came from."""

    mean: np.ndarray
    cov: np.ndarray
    n: int


def gaussian_stats(features: Any) -> GaussianStats:
    x = fidelity.as_numpy(features).astype(np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"need [N >= 2, D] features, got shape {x.shape}")
    return GaussianStats(x.mean(axis=0), np.cov(x, rowvar=False), len(x))


def _psd_sqrt(cov: np.ndarray) -> np.ndarray:
    """Symmetric square root of a PSD matrix (negative eigenvalues from rounding set to 0)."""
    w, v = np.linalg.eigh((cov + cov.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def _trace_sqrt_product(sqrt_a: np.ndarray, b: np.ndarray) -> float:
    """``tr((A B)^1/2)`` = ``tr((A^1/2 B A^1/2)^1/2)``, from the eigenvalues of the symmetric middle matrix."""
    middle = sqrt_a @ b @ sqrt_a
    w = np.linalg.eigvalsh((middle + middle.T) / 2)
    return float(np.sum(np.sqrt(np.clip(w, 0.0, None))))


def frechet_distance(a: GaussianStats, b: GaussianStats, sqrt_b: Optional[np.ndarray] = None) -> float:
    """Frechet distance between the Gaussians N(a.mean, a.cov) and N(b.mean, b.cov) (``sqrt_b``: b.cov's root, if known)."""
    sqrt_b = _psd_sqrt(b.cov) if sqrt_b is None else sqrt_b
    diff = a.mean - b.mean
    value = diff @ diff + np.trace(a.cov) + np.trace(b.cov) - 2.0 * _trace_sqrt_product(sqrt_b, a.cov)
    return float(max(value, 0.0))


def frechet_distance_sqrtm(a: GaussianStats, b: GaussianStats) -> float:
    """The same distance with ``scipy.linalg.sqrtm(S_a S_b)`` (FID's reference implementation)."""
    from scipy import linalg

    covmean = linalg.sqrtm(a.cov @ b.cov)
    covmean = np.real(covmean)
    diff = a.mean - b.mean
    return float(max(diff @ diff + np.trace(a.cov) + np.trace(b.cov) - 2.0 * np.trace(covmean), 0.0))


def frechet_bootstrap(features: Any, reference: GaussianStats, resamples: int = FD_RESAMPLES, seed: int = stats.SEED,
                      confidence: float = CONFIDENCE) -> tuple[float, tuple[float, float], np.ndarray]:
    """FD of ``features`` to ``reference`` and its re-centred bootstrap interval over the rows of ``features``.

    Returns ``(fd, (low, high), replicates)``: the raw replicates (the reference statistics stay
    fixed); the interval is the central ``confidence`` share of ``replicates - (mean(replicates) - fd)``
    (see the module docstring for why they are re-centred).
    """
    x = fidelity.as_numpy(features).astype(np.float64)
    sqrt_ref = _psd_sqrt(reference.cov)
    fd = frechet_distance(gaussian_stats(x), reference, sqrt_ref)
    rng = np.random.default_rng(seed)
    replicates = np.array([frechet_distance(gaussian_stats(x[rng.integers(0, len(x), len(x))]), reference, sqrt_ref)
                           for _ in range(resamples)])
    return fd, stats.percentile_interval(replicates - (replicates.mean() - fd), confidence), replicates


# --------------------------------------------------------------------------- class accuracy


def class_accuracy(probe: fidelity.LinearProbe, features: Any, labels: Any,
                   confidence: float = CONFIDENCE) -> tuple[float, tuple[float, float], np.ndarray]:
    """Share of images the probe assigns to the class they were generated for: ``(accuracy, Wilson interval, correct[N])``."""
    labels = fidelity.as_numpy(labels).astype(np.int64)
    correct = probe.predict(features) == labels
    k, n = int(correct.sum()), len(correct)
    return k / n, stats.wilson_interval(k, n, confidence), correct


# --------------------------------------------------------------------------- paired pixel metrics


def psnr_per_image(images: Any, reference: Any, cap: float = PSNR_CAP) -> np.ndarray:
    """PSNR (dB) of each image against the reference image from the same noise; range 2, capped at ``cap``."""
    from skimage.metrics import peak_signal_noise_ratio

    x, ref = as_images(images), as_images(reference)
    _same_shape(x, ref)
    out = np.empty(len(x))
    for i in range(len(x)):
        if np.array_equal(x[i], ref[i]):
            out[i] = cap
        else:
            out[i] = min(cap, peak_signal_noise_ratio(ref[i], x[i], data_range=DATA_RANGE))
    return out


def ssim_per_image(images: Any, reference: Any) -> np.ndarray:
    """SSIM of each image against its reference (scikit-image defaults: 7x7 uniform window; range 2)."""
    from skimage.metrics import structural_similarity

    x, ref = as_images(images), as_images(reference)
    _same_shape(x, ref)
    return np.array([structural_similarity(ref[i], x[i], data_range=DATA_RANGE) for i in range(len(x))])


def _same_shape(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape != b.shape:
        raise ValueError(f"paired metrics need the same shapes, got {a.shape} and {b.shape}")


def mean_interval(values: Sequence[float], seed: int = stats.SEED,
                  confidence: float = CONFIDENCE) -> tuple[float, tuple[float, float]]:
    """Mean of per-image values and its percentile bootstrap interval (``stats.bootstrap_mean``)."""
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), stats.bootstrap_mean(v, seed=seed, confidence=confidence)


# --------------------------------------------------------------------------- the reference and the evaluation


@dataclass
class FidelityReference:
    """What every configuration is scored against: real-image FD statistics, the class probe and the featuriser.

    ``featurize(images) -> [N, D]`` features (default DINOv2-S); ``fd_dims`` the leading feature
    columns FD uses (the CLS token), None for all.
    """

    real_stats: GaussianStats
    probe: fidelity.LinearProbe
    featurize: Callable[[Any], np.ndarray]
    fd_dims: Optional[int] = CLS_DIM
    description: str = ""


def fd_part(features: np.ndarray, dims: Optional[int]) -> np.ndarray:
    return np.asarray(features) if dims is None else np.asarray(features)[:, :dims]


def make_reference(real_features: np.ndarray, train_features: np.ndarray, train_labels: Any,
                   featurize: Callable[[Any], np.ndarray], fd_dims: Optional[int] = CLS_DIM,
                   description: str = "") -> FidelityReference:
    """A reference from precomputed features: FD statistics of ``real_features``, a probe fit on the train ones."""
    return FidelityReference(gaussian_stats(fd_part(real_features, fd_dims)),
                             fidelity.fit_linear_probe(train_features, train_labels), featurize, fd_dims, description)


def fashion_reference(n_real: int = 1000, n_train: int = 2000, seed: int = 0, resolution: int = 224,
                      batch_size: int = 32, model: Any = None, cache_dir: Optional[str] = None,
                      log: Callable[[str], None] = print) -> FidelityReference:
    """The Fashion-MNIST reference: FD statistics of ``n_real`` test images, the probe fit on ``n_train``
    training images (both class-balanced samples, ``data.fashion_mnist(limit=, seed=)``), DINOv2-S
    features at ``resolution`` px. Their features are cached in the project's cache folder."""
    import torch

    from turbo_fx.model_zoo import data, dinov2
    from turbo_fx.model_zoo.fashion_diffusion import to_model_range

    model = dinov2.load_dinov2_small() if model is None else model

    def featurize(images: Any) -> np.ndarray:
        return dinov2_image_features(images, model, batch_size, resolution)

    test_x, _ = data.fashion_mnist("test", limit=n_real, seed=seed)
    train_x, train_y = data.fashion_mnist("train", limit=n_train, seed=seed)
    features = {}
    for name, images in (("test", test_x), ("train", train_x)):
        key = hashlib.sha256(np.ascontiguousarray(images).tobytes() + f"{resolution}".encode()).hexdigest()[:16]
        path = Path(dinov2.default_cache_dir(cache_dir)) / f"fashion-diffusion-real-{name}-{key}.pt"
        if path.is_file():
            features[name] = torch.load(path).numpy()
        else:
            log(f"DINOv2 features of {len(images)} real {name} images at {resolution} px ...")
            features[name] = featurize(to_model_range(images))
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(torch.from_numpy(features[name]), path)
    return make_reference(features["test"], features["train"], train_y, featurize, CLS_DIM,
                          f"Fashion-MNIST: FD against {n_real} test images, probe fit on {n_train} train images, "
                          f"DINOv2-S at {resolution} px")


def evaluate_images(reference: FidelityReference, images: Any, labels: Any, baseline: Any = None,
                    features: Optional[np.ndarray] = None, resamples: int = FD_RESAMPLES,
                    seed: int = stats.SEED) -> dict:
    """All metrics of one configuration's generated ``images`` (intended ``labels``); ``baseline``: the
    unmerged model's images from the same noise, for PSNR and SSIM (omitted when None).

    Returns plain numbers and lists: ``n``; ``fd`` with ``fd_ci`` (and ``fd_bootstrap_bias``); ``accuracy`` with ``accuracy_ci``
    and per-image ``correct``; and with a baseline ``psnr`` / ``ssim`` with ``_ci`` and per-image values.
    """
    feats = reference.featurize(images) if features is None else np.asarray(features)
    labels = fidelity.as_numpy(labels).astype(np.int64)
    if len(feats) != len(labels):
        raise ValueError(f"{len(feats)} images but {len(labels)} labels")
    fd, fd_ci, replicates = frechet_bootstrap(fd_part(feats, reference.fd_dims), reference.real_stats, resamples, seed)
    accuracy, accuracy_ci, correct = class_accuracy(reference.probe, feats, labels)
    out = {"n": int(len(labels)), "fd": fd, "fd_ci": list(fd_ci),
           "fd_bootstrap_bias": float(replicates.mean() - fd), "accuracy": accuracy,
           "accuracy_ci": list(accuracy_ci), "correct": [bool(c) for c in correct]}
    if baseline is not None:
        for name, fn in (("psnr", psnr_per_image), ("ssim", ssim_per_image)):
            values = fn(images, baseline)
            mean, ci = mean_interval(values, seed)
            out.update({name: mean, f"{name}_ci": list(ci), f"{name}_per_image": [float(v) for v in values]})
    return out


def summary_line(name: str, result: dict) -> str:
    """One line: FD, accuracy and (if present) PSNR / SSIM, each with its 95% interval."""
    parts = [f"{name}: FD {result['fd']:.1f} [{result['fd_ci'][0]:.1f}, {result['fd_ci'][1]:.1f}]",
             f"accuracy {result['accuracy']:.3f} [{result['accuracy_ci'][0]:.3f}, {result['accuracy_ci'][1]:.3f}]"]
    for key, unit in (("psnr", " dB"), ("ssim", "")):
        if key in result:
            parts.append(f"{key.upper()} {result[key]:.3f}{unit} [{result[f'{key}_ci'][0]:.3f}, {result[f'{key}_ci'][1]:.3f}]")
    return ", ".join(parts) + f" (n={result['n']})"


# --------------------------------------------------------------------------- picture


def image_grid(rows: Sequence[Any], columns: Optional[int] = None, pad: int = 2) -> np.ndarray:
    """A mosaic ``[rows*(H+pad)+pad, cols*(W+pad)+pad]`` in [0, 1]: one row of images per configuration."""
    sets = [to_unit(r) for r in rows]
    if not sets:
        raise ValueError("no rows")
    n = min(len(s) for s in sets) if columns is None else columns
    h, w = sets[0].shape[1:]
    grid = np.ones((len(sets) * (h + pad) + pad, n * (w + pad) + pad), dtype=np.float32)
    for i, s in enumerate(sets):
        for j in range(min(n, len(s))):
            top, left = pad + i * (h + pad), pad + j * (w + pad)
            grid[top: top + h, left: left + w] = s[j]
    return grid


def save_grid(rows: Mapping[str, Any], path: str, columns: Optional[int] = None,
              column_titles: Optional[Sequence[str]] = None, scale: float = 0.5) -> str:
    """A PNG of the samples: one row per configuration (labelled with its name), ``columns`` samples each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    grid = image_grid([rows[k] for k in names], columns)
    pad, h = 2, as_images(rows[names[0]]).shape[1]
    n_cols = (grid.shape[1] - pad) // (h + pad)
    fig, ax = plt.subplots(figsize=(1.2 + scale * n_cols, 0.3 + scale * len(names)), dpi=100)
    ax.imshow(grid, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_yticks([pad + i * (h + pad) + h / 2 for i in range(len(names))], names, fontsize=7)
    if column_titles is not None:
        ax.set_xticks([pad + j * (h + pad) + h / 2 for j in range(n_cols)], list(column_titles)[:n_cols],
                      fontsize=6, rotation=90)
    else:
        ax.set_xticks([])
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return str(path)


# --------------------------------------------------------------------------- sampling


def generate(unet: Any, class_tokens: Any, labels: Any, noise: Any, steps: int, guidance: float,
             batch_size: int = 50) -> np.ndarray:
    """``fashion_diffusion.sample`` over ``labels`` in chunks of ``batch_size`` (UNet batches of twice that)."""
    import torch

    from turbo_fx.model_zoo.fashion_diffusion import sample

    labels = torch.as_tensor(labels, dtype=torch.long)
    chunks = [sample(unet, class_tokens, labels[i: i + batch_size], noise[i: i + batch_size], steps=steps,
                     guidance=guidance) for i in range(0, len(labels), batch_size)]
    return torch.cat(chunks).numpy()
