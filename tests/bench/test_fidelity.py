"""Fidelity metrics against hand-computed values."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from turbo_fx.bench import fidelity


def test_rowwise_cosine_by_hand():
    a = np.array([[1.0, 0.0], [3.0, 4.0], [1.0, 1.0]])
    b = np.array([[0.0, 2.0], [6.0, 8.0], [-1.0, -1.0]])
    assert fidelity.rowwise_cosine(a, b) == pytest.approx([0.0, 1.0, -1.0])


def test_upper_triangle_is_row_major_pairs():
    m = np.arange(16).reshape(4, 4)
    assert fidelity.upper_triangle(m).tolist() == [1, 2, 3, 6, 7, 11]


def test_spearman_is_rank_correlation():
    assert fidelity.spearman([1, 2, 3, 4], [10, 20, 30, 1000]) == pytest.approx(1.0)
    assert fidelity.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # one swapped pair out of 4: rho = 1 - 6 * (1 + 1) / (4 * 15) = 0.8
    assert fidelity.spearman([1, 2, 3, 4], [1, 2, 4, 3]) == pytest.approx(0.8)


def test_similarity_spearman_against_human_matrix():
    # Three unit vectors at 0, 60 and 180 degrees: cosines (0,1)=0.5, (0,2)=-1, (1,2)=-0.5.
    angles = np.radians([0.0, 60.0, 180.0])
    emb = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    human_same_order = np.array([[1, 0.9, 0.1], [0.9, 1, 0.5], [0.1, 0.5, 1]])
    human_reversed = np.array([[1, 0.1, 0.9], [0.1, 1, 0.5], [0.9, 0.5, 1]])
    assert fidelity.similarity_spearman(emb, human_same_order) == pytest.approx(1.0)
    # pairs (0,1),(0,2),(1,2): model ranks 3,1,2, human 1,3,2 -> rho = 1 - 6 * 8 / 24 = -1
    assert fidelity.similarity_spearman(emb, human_reversed) == pytest.approx(-1.0)


def test_knn_weighted_vote_by_hand():
    train = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    labels = np.array([0, 0, 1])
    # Query near class 1's single point: with k=3 two class-0 votes are weaker than the near one.
    query = np.array([[0.05, 1.0], [1.0, 0.02]])
    assert fidelity.knn_predict(train, labels, query, k=3).tolist() == [1, 0]
    assert fidelity.knn_top1(train, labels, query, np.array([1, 1]), k=3) == pytest.approx(0.5)


def test_probe_fit_on_reference_scores_other_features():
    rng = np.random.default_rng(0)
    centres = np.array([[4.0, 0.0], [0.0, 4.0], [-4.0, -4.0]])
    labels = np.repeat(np.arange(3), 50)
    ref = centres[labels] + rng.normal(0, 0.5, (150, 2))
    probe = fidelity.fit_linear_probe(ref, labels)
    assert probe.top1(ref, labels) == 1.0
    # Features moved onto the wrong class centres lose exactly those samples.
    moved = ref.copy()
    moved[:10] = centres[1]
    assert probe.top1(moved, labels) == pytest.approx(140 / 150)
    assert probe.top1(torch.from_numpy(ref), torch.from_numpy(labels)) == 1.0


def test_cross_validated_probe_uses_reference_for_fitting():
    rng = np.random.default_rng(1)
    labels = np.repeat([0, 1], 20)
    ref = np.stack([labels * 6.0 - 3.0, rng.normal(0, 1, 40)], axis=1)
    assert fidelity.cross_validated_probe(ref, ref, labels) == 1.0
    flipped = ref * np.array([-1.0, 1.0])  # the class direction reversed: every prediction wrong
    assert fidelity.cross_validated_probe(ref, flipped, labels) == 0.0
