"""Offline data sets: exact counts, dtypes, ranges, deterministic samples and the errors when data is missing."""
from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest

from turbo_fx.model_zoo import (
    FASHION_MNIST_CLASSES,
    DatasetUnavailable,
    digits,
    fashion_mnist,
    lee_corpus,
    lee_pairs,
    polarity,
    sample_photos,
)
from turbo_fx.model_zoo import data as zd


@pytest.fixture(scope="module")
def fashion_available():
    if not (zd.fashion_mnist_dir() / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")


# --------------------------------------------------------------------------- Fashion-MNIST


def test_fashion_mnist_test_split(fashion_available):
    images, labels = fashion_mnist("test")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10000,) and labels.dtype == np.int64
    assert np.array_equal(np.bincount(labels), np.full(10, 1000))
    assert images.min() == 0 and images.max() == 255
    assert len(FASHION_MNIST_CLASSES) == 10 and FASHION_MNIST_CLASSES[9] == "Ankle boot"


def test_fashion_mnist_train_split(fashion_available):
    images, labels = fashion_mnist("train")
    assert images.shape == (60000, 28, 28) and labels.shape == (60000,)
    assert np.array_equal(np.bincount(labels), np.full(10, 6000))


def test_fashion_mnist_sample_is_balanced_and_deterministic(fashion_available):
    images, labels = fashion_mnist("test", limit=100, seed=3)
    again_images, again_labels = fashion_mnist("test", limit=100, seed=3)
    assert np.array_equal(images, again_images) and np.array_equal(labels, again_labels)
    assert images.shape == (100, 28, 28)
    assert np.array_equal(np.bincount(labels, minlength=10), np.full(10, 10))
    assert np.array_equal(np.bincount(labels[:20], minlength=10), np.full(10, 2))  # prefixes are balanced too
    other, _ = fashion_mnist("test", limit=100, seed=4)
    assert not np.array_equal(images, other)
    default, _ = fashion_mnist("test", limit=100)
    assert np.array_equal(default, fashion_mnist("test", limit=100, seed=0)[0])

    # Each sampled image really is the dataset image with that label.
    full_images, full_labels = fashion_mnist("test")
    idx = zd.stratified_indices(full_labels, 100, 3)
    assert np.array_equal(full_images[idx], images) and np.array_equal(full_labels[idx], labels)


def test_fashion_mnist_missing_names_the_debian_package(tmp_path, monkeypatch):
    monkeypatch.setenv(zd.FASHION_MNIST_ENV, str(tmp_path))
    with pytest.raises(DatasetUnavailable, match="apt-get install dataset-fashion-mnist") as err:
        fashion_mnist("test")
    assert isinstance(err.value, FileNotFoundError)
    with pytest.raises(ValueError, match="split"):
        fashion_mnist("validation")


def test_fashion_mnist_reads_idx_files_from_the_env_folder(tmp_path, monkeypatch):
    # A hand-written 3-image data set in the idx layout: the header offsets are 16 and 8 bytes.
    pixels = np.arange(3 * 2 * 2, dtype=np.uint8).reshape(3, 2, 2)
    for name, header, body in [
        ("t10k-images-idx3-ubyte.gz", struct.pack(">4I", 0x803, 3, 2, 2), pixels.tobytes()),
        ("t10k-labels-idx1-ubyte.gz", struct.pack(">2I", 0x801, 3), bytes([7, 0, 7])),
    ]:
        with gzip.open(tmp_path / name, "wb") as f:
            f.write(header + body)
    monkeypatch.setenv(zd.FASHION_MNIST_ENV, str(tmp_path))
    images, labels = fashion_mnist("test")
    assert np.array_equal(images, pixels) and labels.tolist() == [7, 0, 7]
    with pytest.raises(ValueError, match="magic"):
        zd.parse_idx(struct.pack(">2I", 0x801, 3) + bytes(3), 0x803)
    with pytest.raises(ValueError, match="body"):
        zd.parse_idx(struct.pack(">2I", 0x801, 4) + bytes(3), 0x801)


def test_stratified_indices():
    labels = np.array([0] * 6 + [1] * 3 + [2] * 1)
    idx = zd.stratified_indices(labels, 7, seed=1)
    assert len(set(idx.tolist())) == 7
    assert np.bincount(labels[idx]).tolist() == [3, 3, 1]  # class 2 runs out, the others share the rest
    assert np.array_equal(idx, zd.stratified_indices(labels, 7, seed=1))
    with pytest.raises(ValueError):
        zd.stratified_indices(labels, 11)


# --------------------------------------------------------------------------- scikit-learn, scikit-image


def test_digits():
    pytest.importorskip("sklearn")
    images, labels = digits()
    assert images.shape == (1797, 8, 8) and images.dtype == np.float32
    assert labels.shape == (1797,) and labels.dtype == np.int64
    assert images.min() == 0 and images.max() == 16
    assert set(labels.tolist()) == set(range(10))


def test_sample_photos():
    pytest.importorskip("skimage")
    pytest.importorskip("sklearn")
    photos = sample_photos()
    assert list(photos) == list(zd.DEFAULT_PHOTOS)
    assert {"chelsea", "coffee", "astronaut", "rocket", "china", "flower"} <= set(photos)
    for name, image in photos.items():
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3, name
        assert image.shape[0] >= 200 and image.std() > 10, name  # a real picture, not a blank
    assert photos["chelsea"].shape == (300, 451, 3) and photos["china"].shape == (427, 640, 3)

    camera = sample_photos(["camera"])["camera"]
    assert camera.shape == (512, 512, 3) and np.array_equal(camera[..., 0], camera[..., 2])

    photos["chelsea"][:] = 0  # callers get copies
    assert sample_photos(["chelsea"])["chelsea"].max() > 0
    with pytest.raises(ValueError, match="available offline"):
        sample_photos(["brain"])


# --------------------------------------------------------------------------- gensim's test data


def test_lee_corpus_and_human_similarities():
    pytest.importorskip("gensim")  # find_spec only: gensim itself is never imported
    docs, sims = lee_corpus()
    assert len(docs) == 50 and all(isinstance(d, str) and len(d) > 100 for d in docs)
    assert any("£" in d for d in docs)  # latin-1 byte 0xA3, decoded
    assert sims.shape == (50, 50) and sims.dtype == np.float64
    assert np.array_equal(sims, sims.T) and np.all(np.diag(sims) == 1.0)
    pairs, values = lee_pairs(sims)
    assert pairs.shape == (1225, 2) and values.shape == (1225,)
    assert np.all(pairs[:, 0] < pairs[:, 1])
    assert values.min() >= 0.2 and values.max() <= 1.0

    # The file's layout: the upper triangle holds the ratings, below the diagonal is 0.
    raw = np.loadtxt(zd.gensim_test_data_dir() / "similarities0-1.txt")
    assert np.all(np.tril(raw, -1) == 0)
    assert np.array_equal(values, raw[np.triu_indices(50, 1)])


def test_symmetric_from_upper():
    upper = np.array([[1.0, 0.3, 0.5], [9.0, 1.0, 0.7], [9.0, 9.0, 1.0]])
    assert np.array_equal(zd.symmetric_from_upper(upper), [[1.0, 0.3, 0.5], [0.3, 1.0, 0.7], [0.5, 0.7, 1.0]])


def test_polarity():
    pytest.importorskip("gensim")
    sentences, labels = polarity()
    assert len(sentences) == 200 and labels.shape == (200,) and labels.dtype == np.int64
    assert np.bincount(labels).tolist() == [100, 100]
    assert not any(s.startswith("__label__") or not s for s in sentences)
    assert sentences[0] == "simplistic , silly and tedious ."
    assert sum("—" in s for s in sentences) >= 1 and not any("\x97" in s for s in sentences)  # cp1252 em dash


def test_missing_gensim_names_the_package(monkeypatch):
    import sys

    from turbo_fx.model_zoo import MissingDependency

    monkeypatch.setitem(sys.modules, "gensim", None)
    with pytest.raises(MissingDependency, match="pip install gensim"):
        lee_corpus()
