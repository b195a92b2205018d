"""FID, KID and IS (evaluation/fid.py, evaluation/sample_quality.py): closed forms, an independent
sqrtm, unbiasedness, and behaviour on real digits under the MNIST classifier's features."""

import math

import numpy as np
import pytest
import scipy.linalg

import input_pipeline
import train_lib
from evaluation import fid, sample_quality


def _pytorch_fid_formula(mu1, sigma1, mu2, sigma2):
    """The reference implementation (pytorch-fid / TTUR): scipy.linalg.sqrtm of Σ1 Σ2."""
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2).real
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2)
                 - 2 * np.trace(covmean))


def _gaussian_stats(rng, n, d, scale):
    mixing = rng.standard_normal((d, d)) * scale
    x = rng.standard_normal((n, d)) @ mixing + rng.standard_normal(d)
    return x.mean(0), np.cov(x, rowvar=False)


@pytest.fixture(scope="module")
def mnist():
    """MNIST-classifier features of the 4,500 training digits (shuffled) and the net."""
    net = sample_quality.make_feature_net("mnist_classifier", batch_size=512,
                                          mesh=train_lib.make_mesh())
    train = input_pipeline.load_mnist_5k("train")
    images = train.images[np.random.default_rng(0).permutation(len(train))]
    features, logits = net(images)
    return net, images, features, logits


def test_frechet_distance_equals_the_scipy_sqrtm_formula():
    rng = np.random.default_rng(0)
    for d, scale in [(8, 1.0), (64, 0.3)]:
        mu1, s1 = _gaussian_stats(rng, 1000, d, scale)
        mu2, s2 = _gaussian_stats(rng, 700, d, 0.7 * scale)
        expected = _pytorch_fid_formula(mu1, s1, mu2, s2)
        assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)
        assert fid.frechet_distance(mu2, s2, mu1, s1) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_of_gaussians_in_closed_form():
    """Commuting covariances: FD = ‖μ1 − μ2‖² + Σ_i (√a_i − √b_i)²."""
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.standard_normal((16, 16)))
    a, b = rng.uniform(0.1, 4, 16), rng.uniform(0.1, 4, 16)
    mu1, mu2 = rng.standard_normal(16), rng.standard_normal(16)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    value = fid.frechet_distance(mu1, (q * a) @ q.T, mu2, (q * b) @ q.T)
    assert value == pytest.approx(expected, rel=1e-10)


def test_fid_of_a_set_with_itself_is_zero(mnist):
    _, images, features, logits = mnist
    stats = fid.FeatureStats(len(features))
    stats.update(features, logits)
    s = stats.finalize()
    assert abs(fid.frechet_distance(s.mu, s.sigma, s.mu, s.sigma)) < 1e-9 * np.trace(s.sigma)


def test_streaming_statistics_equal_the_batch_computation(mnist):
    _, _, features, logits = mnist
    n = 1000
    f, lg = features[:n], logits[:n]
    acc = fid.FeatureStats(n, num_splits=4, kid_max_features=300, seed=3)
    for lo, hi in [(0, 7), (7, 400), (400, 401), (401, 1000)]:  # uneven batches
        acc.update(f[lo:hi], lg[lo:hi])
    s = acc.finalize()
    np.testing.assert_allclose(s.mu, f.astype(np.float64).mean(0), rtol=1e-10, atol=1e-9)
    np.testing.assert_allclose(s.sigma, np.cov(f.astype(np.float64), rowvar=False),
                               rtol=1e-9, atol=1e-8)
    # IS over 4 splits of consecutive rows, written out directly
    p = np.exp(lg - lg.max(1, keepdims=True))
    p = p / p.sum(1, keepdims=True)
    scores = [np.exp(np.mean(np.sum(q * (np.log(q) - np.log(q.mean(0))), 1)))
              for q in np.split(p.astype(np.float64), 4)]
    assert s.is_mean == pytest.approx(np.mean(scores), rel=1e-6)
    assert s.is_std == pytest.approx(np.std(scores), rel=1e-5)
    # the KID reservoir is 300 distinct rows of the input
    assert s.kid_features.shape == (300, f.shape[1])
    rows = {r.tobytes() for r in f}
    assert len({r.tobytes() for r in s.kid_features} & rows) == 300


def test_kid_is_unbiased_on_two_halves_of_the_same_set(mnist):
    """Disjoint random halves are exchangeable, so E[MMD²_u] = 0 exactly; the biased
    V-statistic (diagonals kept) has a clearly positive mean, which shows the test has power."""
    _, _, features, _ = mnist
    rng = np.random.default_rng(0)
    unbiased, biased = [], []
    for _ in range(100):
        perm = rng.permutation(len(features))[:400]
        x, y = features[perm[:200]], features[perm[200:]]
        unbiased.append(fid.mmd2_unbiased(x, y))
        kxx, kyy = fid.polynomial_kernel(x, x), fid.polynomial_kernel(y, y)
        biased.append(kxx.mean() + kyy.mean() - 2 * fid.polynomial_kernel(x, y).mean())
    se = np.std(unbiased) / math.sqrt(len(unbiased))
    assert abs(np.mean(unbiased)) < 3 * se
    assert np.mean(biased) > 10 * np.std(biased) / math.sqrt(len(biased))
    mean, std = fid.kernel_inception_distance(features[:2000], features[2000:],
                                              num_subsets=20, subset_size=500)
    assert abs(mean) < 3 * std / math.sqrt(20)


def test_mnist_fid_and_kid_rise_and_is_falls_as_noise_is_added(mnist):
    """Real digits plus Gaussian noise of increasing σ (then 8-bit quantised), against the same
    clean digits: FID 0 at σ = 0, then strictly increasing (measured 0.04, 0.4, 2.2, 11.6, 65,
    356 for σ = 0.02 ... 0.8); MNIST-IS of the clean digits is ≈ 9.6 of a possible 10."""
    net, images, features, logits = mnist
    images, features, logits = images[:2000], features[:2000], logits[:2000]
    real = fid.FeatureStats(len(images))
    real.update(features, logits)
    real = real.finalize()
    assert 9.0 < real.is_mean < 10.0
    rng = np.random.default_rng(0)
    fids, kids, scores = [], [], []
    for sigma in (0.0, 0.02, 0.05, 0.1, 0.2, 0.4, 0.8):
        x = input_pipeline.preprocess(images, None) + sigma * rng.standard_normal(images.shape)
        noisy = np.clip(np.round((x + 1) * 127.5), 0, 255).astype(np.uint8)
        metrics = fid.compare(real, sample_quality.stats_of_images(net, noisy),
                              kid_num_subsets=10, kid_subset_size=1000)
        fids.append(metrics["fid"])
        kids.append(metrics["kid"])
        scores.append(metrics["is"])
    assert abs(fids[0]) < 1e-6 and np.all(np.diff(fids) > 0), fids
    assert np.all(np.diff(kids[2:]) > 0), kids  # KID's subset noise hides the smallest σ
    assert np.all(np.diff(scores) < 0), scores


def test_metric_names_say_mnist(mnist):
    net = mnist[0]
    named = sample_quality.named_metrics(net, {"fid": 1.0, "kid": 2.0, "kid_std": 3.0,
                                               "is": 4.0, "is_std": 5.0})
    assert set(named) == {"MNIST-FID", "MNIST-KID", "MNIST-KID_std", "MNIST-IS", "MNIST-IS_std"}
    assert "not comparable" in net.note
