"""Real data that installs offline: Fashion-MNIST (Debian), sklearn digits and photos, skimage photos, gensim's text sets.

Nothing here touches the network. Each loader raises :class:`DatasetUnavailable` (data files
absent) or :class:`~turbo_fx.model_zoo.deps.MissingDependency` (Python package absent)
with the command that fixes it.
"""
from __future__ import annotations

import functools
import gzip
import os
from pathlib import Path

import numpy as np

from .deps import package_path, require

FASHION_MNIST_ENV = "TURBO_FX_FASHION_MNIST"
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
_FASHION_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_IDX_IMAGES_MAGIC, _IDX_LABELS_MAGIC = 0x00000803, 0x00000801


class DatasetUnavailable(FileNotFoundError):
    """A data set's files are not on this machine; the message says how to install them."""


# --------------------------------------------------------------------------- Fashion-MNIST


def fashion_mnist_dir() -> Path:
    """``$TURBO_FX_FASHION_MNIST`` if set, else Debian's /usr/share/datasets/fashion-mnist."""
    return Path(os.environ.get(FASHION_MNIST_ENV) or FASHION_MNIST_DIR)


def parse_idx(raw: bytes, magic: int) -> np.ndarray:
    """Decode an idx file (big-endian header: magic, then one uint32 per dim; uint8 data after it).

    Images (magic 0x803) have a 16-byte header and give ``[n, rows, cols]``; labels (0x801) an
    8-byte header and give ``[n]``. Raises ValueError on a wrong magic or a truncated body.
    """
    ndim = magic & 0xFF
    if len(raw) < 4 * (1 + ndim) or int.from_bytes(raw[:4], "big") != magic:
        raise ValueError(f"not an idx file with magic {magic:#x}")
    header = np.frombuffer(raw[: 4 * (1 + ndim)], dtype=">u4")
    shape = tuple(int(d) for d in header[1:])
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 * (1 + ndim))
    if body.size != int(np.prod(shape)):
        raise ValueError(f"idx body has {body.size} bytes, header says {shape}")
    return body.reshape(shape)


@functools.lru_cache(maxsize=2)
def _read_fashion(folder: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """The whole split, read once per folder (read-only arrays; callers copy)."""
    arrays = []
    for name, magic in zip(_FASHION_FILES[split], (_IDX_IMAGES_MAGIC, _IDX_LABELS_MAGIC)):
        path = Path(folder) / name
        if not path.is_file():
            raise DatasetUnavailable(
                f"Fashion-MNIST file {path} not found; install it with: apt-get install dataset-fashion-mnist "
                f"(or set {FASHION_MNIST_ENV} to a folder holding {', '.join(_FASHION_FILES[split])})"
            )
        with gzip.open(path, "rb") as f:
            arrays.append(parse_idx(f.read(), magic))
    images, labels = arrays
    if len(images) != len(labels):
        raise ValueError(f"{folder}: {len(images)} images but {len(labels)} labels")
    return images, labels.astype(np.int64)


def stratified_indices(labels: np.ndarray, limit: int, seed: int = 0) -> np.ndarray:
    """``limit`` distinct indices into ``labels``, the classes taken in turn, each class shuffled by ``seed``.

    Deterministic in (labels, limit, seed). Classes differ in count by at most one as long as
    every class has enough members, and so does every prefix of the result (the order cycles
    through the classes), so ``sample[:k]`` is itself balanced.
    """
    if not 0 <= limit <= len(labels):
        raise ValueError(f"limit {limit} outside [0, {len(labels)}]")
    rng = np.random.default_rng(seed)
    per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    rounds = max((len(p) for p in per_class), default=0)
    # Round r takes the r-th member of every class that still has one.
    order = [p[r] for r in range(rounds) for p in per_class if r < len(p)]
    return np.asarray(order[:limit], dtype=np.int64)


def fashion_mnist(split: str = "test", limit: int | None = None, seed: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST ``(images uint8 [n, 28, 28], labels int64 [n])``; labels index FASHION_MNIST_CLASSES.

    ``split`` "test" has 10000 images, "train" 60000. With ``limit`` the result is a
    class-balanced sample of that size (see :func:`stratified_indices`; ``seed`` None means 0),
    identical on every call; without it, the whole split in file order. Raises
    DatasetUnavailable naming ``apt-get install dataset-fashion-mnist`` when the files are missing.
    """
    if split not in _FASHION_FILES:
        raise ValueError(f"split must be one of {sorted(_FASHION_FILES)}, not {split!r}")
    images, labels = _read_fashion(str(fashion_mnist_dir()), split)
    if limit is None:
        return images.copy(), labels.copy()
    idx = stratified_indices(labels, limit, 0 if seed is None else seed)
    return images[idx], labels[idx]


# --------------------------------------------------------------------------- scikit-learn and scikit-image


def digits() -> tuple[np.ndarray, np.ndarray]:
    """sklearn's 1797 handwritten digits: ``(images float32 [1797, 8, 8] with values 0..16, labels int64)``.

    Divide by 16 for [0, 1] images (what :func:`~turbo_fx.model_zoo.dinov2.dinov2_preprocess` expects of floats).
    """
    datasets = require("sklearn.datasets")
    bunch = datasets.load_digits()
    return bunch.images.astype(np.float32), bunch.target.astype(np.int64)


# skimage.data photos that ship inside the wheel (the others need pooch and a download).
SKIMAGE_COLOR_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina")
SKIMAGE_GRAY_PHOTOS = ("camera", "coins", "moon", "page", "text", "clock", "brick", "grass", "gravel", "cell")
SKLEARN_PHOTOS = ("china", "flower")
DEFAULT_PHOTOS = SKIMAGE_COLOR_PHOTOS + SKLEARN_PHOTOS


def _as_rgb(image: np.ndarray) -> np.ndarray:
    """uint8 ``[H, W, 3]``: grayscale repeated over 3 channels, an alpha channel dropped."""
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    return np.ascontiguousarray(image[:, :, :3], dtype=np.uint8)


@functools.lru_cache(maxsize=None)
def _load_photo(name: str) -> np.ndarray:
    if name in SKLEARN_PHOTOS:
        datasets = require("sklearn.datasets")
        bunch = datasets.load_sample_images()
        stems = [Path(f).stem for f in bunch.filenames]
        return _as_rgb(bunch.images[stems.index(name)])
    data = require("skimage.data")
    return _as_rgb(getattr(data, name)())


def sample_photos(names: list[str] | tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    """Real photos by name -> uint8 ``[H, W, 3]`` (a fresh copy each call), in the order of ``names``.

    Default: the colour photos of skimage.data that need no download (astronaut, chelsea,
    coffee, rocket, hubble_deep_field, immunohistochemistry, retina) plus sklearn's china and
    flower. The grayscale ones in SKIMAGE_GRAY_PHOTOS can be asked for by name (repeated to
    3 channels). Raises ValueError for any other name.
    """
    names = list(DEFAULT_PHOTOS if names is None else names)
    known = DEFAULT_PHOTOS + SKIMAGE_GRAY_PHOTOS
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown photos {unknown}; available offline: {list(known)}")
    return {n: _load_photo(n).copy() for n in names}


# --------------------------------------------------------------------------- gensim's test data


def gensim_test_data_dir() -> Path:
    """gensim's ``test/test_data`` folder, found without importing gensim (which is slow to import)."""
    path = package_path("gensim", "test/test_data")
    if path is not None and path.is_dir():
        return path
    raise DatasetUnavailable("gensim is installed without its test/test_data folder; reinstall it with: pip install gensim")


def _gensim_file(name: str) -> Path:
    path = gensim_test_data_dir() / name
    if not path.is_file():
        raise DatasetUnavailable(f"{path} not found; reinstall gensim with: pip install --force-reinstall gensim")
    return path


def symmetric_from_upper(upper: np.ndarray) -> np.ndarray:
    """The symmetric matrix whose upper triangle (diagonal included) is that of ``upper``."""
    tri = np.triu(upper)
    return tri + np.triu(tri, 1).T


def lee_corpus() -> tuple[list[str], np.ndarray]:
    """The Lee (2005) corpus: ``(50 news documents, human similarity float64 [50, 50])``.

    ``lee.cor`` holds one document per line (latin-1). ``similarities0-1.txt`` holds 50 rows of
    50 tab-separated numbers: row i, column j >= i is the mean human similarity of documents i
    and j (about ten raters each, 1..5 scale divided by 5, so in [0.2, 1]; 1 on the diagonal);
    below the diagonal it is 0. The returned matrix is that upper triangle mirrored, hence
    symmetric; its 1225 distinct pairs are :func:`lee_pairs`.
    """
    text = _gensim_file("lee.cor").read_text(encoding="latin-1")
    docs = [line.strip() for line in text.splitlines() if line.strip()]
    sims = symmetric_from_upper(np.loadtxt(_gensim_file("similarities0-1.txt"), dtype=np.float64))
    if len(docs) != sims.shape[0] or sims.shape[0] != sims.shape[1]:
        raise ValueError(f"lee.cor has {len(docs)} documents but the similarity matrix is {sims.shape}")
    return docs, sims


def lee_pairs(sims: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(pairs int64 [P, 2] with i < j in row-major order, similarity [P])``: P = n(n-1)/2, 1225 for Lee."""
    i, j = np.triu_indices(sims.shape[0], 1)
    return np.stack([i, j], axis=1).astype(np.int64), sims[i, j]


_POLARITY_LABELS = {"__label__neg": 0, "__label__pos": 1}


def polarity() -> tuple[list[str], np.ndarray]:
    """200 movie-review sentences (Pang & Lee) with labels int64 (0 negative, 1 positive; 100 each).

    ``pang_lee_polarity.cor`` is fastText's format: ``__label__neg`` or ``__label__pos``, a
    space, then the lowercased, space-tokenised sentence. The bytes are Windows-1252 (latin-1
    plus three em dashes at 0x97), decoded as such.
    """
    sentences, labels = [], []
    for line in _gensim_file("pang_lee_polarity.cor").read_text(encoding="cp1252").splitlines():
        if not line.strip():
            continue
        tag, _, sentence = line.partition(" ")
        if tag not in _POLARITY_LABELS:
            raise ValueError(f"unexpected polarity label {tag!r}")
        sentences.append(sentence.strip())
        labels.append(_POLARITY_LABELS[tag])
    return sentences, np.asarray(labels, dtype=np.int64)
