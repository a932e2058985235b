"""Fidelity metrics: how close a merged model's outputs stay to the unmerged model's.

Pure functions over feature arrays (numpy or torch, rows are samples). The linear
probe is fit once on the *unmerged* model's features and then scores any model's
features, as an off-the-shelf classifier head trained on the original model would
be used in production; k-NN and cosine need no training at all.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch


def as_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy()
    return np.asarray(x)


def l2_normalise(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norm, 1e-12)


@dataclass
class LinearProbe:
    """A multinomial logistic regression on standardised features (scikit-learn)."""

    scaler: Any
    classifier: Any

    def predict(self, features: Any) -> np.ndarray:
        return self.classifier.predict(self.scaler.transform(as_numpy(features)))

    def top1(self, features: Any, labels: Any) -> float:
        return float(np.mean(self.predict(features) == as_numpy(labels)))


def fit_linear_probe(features: Any, labels: Any, c: float = 1.0, max_iter: int = 2000) -> LinearProbe:
    """Fit the probe on (unmerged) features; deterministic (lbfgs, no shuffling)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    x = as_numpy(features).astype(np.float64)
    scaler = StandardScaler().fit(x)
    classifier = LogisticRegression(C=c, max_iter=max_iter).fit(scaler.transform(x), as_numpy(labels))
    return LinearProbe(scaler, classifier)


def knn_predict(train_features: Any, train_labels: Any, features: Any, k: int = 20,
                temperature: float = 0.07) -> np.ndarray:
    """Weighted k-nearest-neighbour vote on cosine similarity, as DINO evaluates features:
    each of the k most similar training samples votes for its label with weight
    exp(similarity / temperature)."""
    train = torch.from_numpy(l2_normalise(as_numpy(train_features).astype(np.float32)))
    query = torch.from_numpy(l2_normalise(as_numpy(features).astype(np.float32)))
    labels = torch.from_numpy(as_numpy(train_labels).astype(np.int64))
    n_classes = int(labels.max()) + 1
    k = min(k, train.shape[0])
    predictions = []
    for chunk in query.split(512):
        sims, idx = (chunk @ train.T).topk(k, dim=1)
        votes = torch.zeros(chunk.shape[0], n_classes).scatter_add_(1, labels[idx], (sims / temperature).exp())
        predictions.append(votes.argmax(dim=1))
    return torch.cat(predictions).numpy()


def knn_top1(train_features: Any, train_labels: Any, features: Any, labels: Any, k: int = 20) -> float:
    return float(np.mean(knn_predict(train_features, train_labels, features, k) == as_numpy(labels)))


def rowwise_cosine(a: Any, b: Any) -> np.ndarray:
    """Cosine similarity between matching rows of a and b."""
    return np.sum(l2_normalise(as_numpy(a).astype(np.float64)) * l2_normalise(as_numpy(b).astype(np.float64)), axis=1)


def pairwise_cosine(x: Any) -> np.ndarray:
    u = l2_normalise(as_numpy(x).astype(np.float64))
    return u @ u.T


def upper_triangle(matrix: np.ndarray) -> np.ndarray:
    """The entries above the diagonal, row by row: one value per unordered pair."""
    rows, cols = np.triu_indices(matrix.shape[0], k=1)
    return matrix[rows, cols]


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(np.asarray(a), np.asarray(b)).statistic)


def similarity_spearman(embeddings: Any, human: np.ndarray) -> float:
    """Spearman correlation between the embeddings' pairwise cosine similarities and a
    symmetric matrix of human similarity scores, over all unordered pairs."""
    return spearman(upper_triangle(pairwise_cosine(embeddings)), upper_triangle(np.asarray(human)))


def cross_validated_probe(reference: Any, features: Any, labels: Any, folds: int = 5, c: float = 1.0) -> float:
    """Probe accuracy for a small labelled set: for each of ``folds`` stratified folds, fit the
    probe on the other folds' *reference* (unmerged) features and score the fold's ``features``;
    the mean over folds. Deterministic (fixed fold split)."""
    predictions, fold_of = cross_validated_predictions(reference, features, labels, folds, c)
    return fold_mean_accuracy(predictions, as_numpy(labels), fold_of)


def cross_validated_predictions(reference: Any, features: Any, labels: Any, folds: int = 5,
                                c: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Each sample's prediction by the probe fit without its fold (see ``cross_validated_probe``),
    and the fold it was held out in."""
    from sklearn.model_selection import StratifiedKFold

    reference, features, labels = as_numpy(reference), as_numpy(features), as_numpy(labels)
    predictions = np.zeros(len(labels), dtype=np.int64)
    fold_of = np.zeros(len(labels), dtype=np.int64)
    splits = StratifiedKFold(n_splits=folds, shuffle=True, random_state=0).split(reference, labels)
    for fold, (train, test) in enumerate(splits):
        probe = fit_linear_probe(reference[train], labels[train], c=c)
        predictions[test] = probe.predict(features[test])
        fold_of[test] = fold
    return predictions, fold_of


def fold_mean_accuracy(predictions: np.ndarray, labels: np.ndarray, fold_of: np.ndarray) -> float:
    """The mean over folds of each fold's accuracy (equal to the pooled accuracy only when the
    folds are of equal size)."""
    predictions, labels, fold_of = np.asarray(predictions), np.asarray(labels), np.asarray(fold_of)
    scores = [float(np.mean(predictions[fold_of == f] == labels[fold_of == f])) for f in np.unique(fold_of)]
    return float(np.mean(scores))
