"""jdiff.metrics: streaming statistics, Frechet distance, statistics files, KID, precision/recall."""

import os
import subprocess
import sys
import textwrap

import _train_worker as W
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
import scipy.spatial
from conftest import EPS64, NSIGMA

from jdiff.metrics import (
    StreamingStats,
    check_fid_sample_count,
    frechet_distance,
    gaussian_stats,
    kid,
    load_stats,
    precision_recall,
    save_stats,
)


def _random_orthogonal(rng, d):
    q, r = np.linalg.qr(rng.normal(size=(d, d)))
    return q * np.sign(np.diag(r))


# ---------------------------------------------------------------- Frechet distance


def test_frechet_distance_closed_forms():
    assert frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4.0 + 1.0, rel=1e-12)
    c = np.array([[2.0, 0.3], [0.3, 1.0]])
    # the factorization is exact to a few float64 ulps of tr(c) ~ 3
    assert frechet_distance([0, 0], c, [0, 0], c) == pytest.approx(0.0, abs=1e-12)
    # commuting covariances: tr((sqrt(c1) - sqrt(c2))^2)
    assert frechet_distance([0, 0], np.diag([4.0, 1.0]), [1, 0], np.diag([1.0, 9.0])) == pytest.approx(6, rel=1e-12)
    with pytest.raises(ValueError, match="shapes do not match"):
        frechet_distance([0, 0], c, [0, 0, 0], np.eye(3))


@pytest.mark.parametrize("rank", [32, 10])
def test_frechet_distance_of_identical_stats_is_zero(rank):
    # Full rank and rank 10 < d = 32: the singular values of L^T L are the eigenvalues of c,
    # so FD is tr(c) + tr(c) - 2 tr(c) up to roundoff: d eps tr(c) bounds it (measured <= 0.3x).
    rng, d = np.random.default_rng(rank), 32
    for _ in range(3):
        a = rng.normal(size=(d, rank))
        c, mu = a @ a.T, rng.normal(size=d) * 10
        fd = frechet_distance(mu, c, mu, c)
        assert isinstance(fd, float) and 0.0 <= fd <= d * EPS64 * np.trace(c)


def test_frechet_distance_commuting_covariances_closed_form():
    # Covariances diagonal in a common random basis Q: FD = |mu1 - mu2|^2 + sum (sqrt s1 - sqrt s2)^2.
    rng, d = np.random.default_rng(1), 32
    q = _random_orthogonal(rng, d)
    for _ in range(3):
        s1, s2 = rng.uniform(0.5, 2.0, d), rng.uniform(0.5, 2.0, d)
        mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
        want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)
        got = frechet_distance(mu1, q @ np.diag(s1) @ q.T, mu2, q @ np.diag(s2) @ q.T)
        # condition numbers <= 4: float64 rounding of O(d) operations on traces ~ 2d (measured <= 0.06x)
        assert got == pytest.approx(want, rel=0, abs=d * EPS64 * (s1.sum() + s2.sum()))


def test_frechet_distance_matches_scipy_sqrtm_reference():
    # General non-commuting pairs against pytorch-fid's formula, tr sqrtm(sigma1 sigma2) with
    # scipy's Schur method in float64. Its error grows with the conditioning (kappa(sigma1) up
    # to ~5e4 here): 1e-10 relative to the traces covers kappa * d * eps with margin (measured
    # <= 4 d eps relative).
    rng, d = np.random.default_rng(2), 32
    for _ in range(3):
        a, b = rng.normal(size=(d, d)), rng.normal(size=(d, d)) * 0.5 + np.eye(d)
        s1, s2 = a @ a.T / d, b @ b.T / d
        mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
        covmean = scipy.linalg.sqrtm(s1 @ s2)
        want = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real
        got = frechet_distance(mu1, s1, mu2, s2)
        assert got == pytest.approx(want, rel=0, abs=1e-10 * (np.trace(s1) + np.trace(s2)))
    # jax float32 inputs are accepted (and promoted to float64 on the host)
    got32 = frechet_distance(jnp.asarray(mu1, jnp.float32), jnp.asarray(s1, jnp.float32), mu2, s2)
    assert got32 == pytest.approx(got, rel=1e-4)


def test_frechet_distance_is_finite_and_real_for_rank_deficient_covariances():
    rng, d = np.random.default_rng(3), 32
    q = _random_orthogonal(rng, d)
    # (1) closed form with singular commuting covariances (ranks 20 and 18, different supports).
    # At a singular covariance FD is only Holder-1/2 in its inputs: the roundoff (~d eps |s|) of
    # a zero eigenvalue moves sqrt(s1 s2) terms by ~sqrt(d eps) |s|, hence d sqrt(eps) tr as the
    # bound (measured <= 0.015x).
    s1, s2 = rng.uniform(0.5, 2.0, d), rng.uniform(0.5, 2.0, d)
    s1[:12], s2[6:20] = 0.0, 0.0
    got = frechet_distance(np.zeros(d), q @ np.diag(s1) @ q.T, np.zeros(d), q @ np.diag(s2) @ q.T)
    want = np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)
    assert got == pytest.approx(want, rel=0, abs=d * np.sqrt(EPS64) * (s1.sum() + s2.sum()))
    # (2) both sample sets in a common 8-d subspace of R^32 (40 samples each): FD equals that of
    # the 8-d coordinates (full rank), to d eps of the traces (measured <= 0.05x).
    u = q[:, :8]
    a, b = rng.normal(size=(40, 8)), rng.normal(size=(40, 8)) * 1.3 + 0.2
    (ma, ca), (mb, cb) = gaussian_stats(a), gaussian_stats(b)
    want = frechet_distance(ma, ca, mb, cb)
    got = frechet_distance(*gaussian_stats(a @ u.T), *gaussian_stats(b @ u.T))
    assert got == pytest.approx(want, rel=0, abs=d * EPS64 * (np.trace(ca) + np.trace(cb)))
    # (3) fewer samples than dimensions (ranks 19 < 32, different spans): a finite real number
    # (scipy's sqrtm of the singular product is where pytorch-fid needs its eps offset). Both
    # sets come from N(0, I), so FD is pure small-sample bias: positive, below the trace sum.
    x, y = rng.normal(size=(20, d)), rng.normal(size=(20, d))
    (mx, cx), (my, cy) = gaussian_stats(x), gaussian_stats(y)
    fd = frechet_distance(mx, cx, my, cy)
    assert isinstance(fd, float) and np.isfinite(fd) and 0 < fd < np.sum((mx - my) ** 2) + np.trace(cx) + np.trace(cy)


def test_frechet_distance_rejects_bad_statistics():
    c = np.eye(3)
    with pytest.raises(ValueError, match=r"mu must be a vector"):
        frechet_distance(np.zeros((3, 1)), c, np.zeros(3), c)
    with pytest.raises(ValueError, match=r"sigma must have shape \(d, d\) = \(3, 3\)"):
        frechet_distance(np.zeros(3), np.eye(2), np.zeros(3), c)
    with pytest.raises(ValueError, match="non-finite"):
        frechet_distance(np.array([0, np.nan, 0]), c, np.zeros(3), c)
    with pytest.raises(ValueError, match="non-finite"):
        frechet_distance(np.zeros(3), c, np.zeros(3), np.full((3, 3), np.inf))
    with pytest.raises(ValueError, match="not symmetric"):
        frechet_distance(np.zeros(3), np.triu(np.ones((3, 3))), np.zeros(3), c)
    with pytest.raises(ValueError, match="negative diagonal"):
        frechet_distance(np.zeros(3), -c, np.zeros(3), c)
    with pytest.raises(TypeError, match="real numbers"):
        frechet_distance(np.zeros(3), c.astype(complex), np.zeros(3), c)


def test_check_fid_sample_count():
    check_fid_sample_count(2049, 2048)
    check_fid_sample_count(np.int64(50_000), 2048)
    for n in (2048, 100, 0):
        with pytest.raises(ValueError, match=rf"2048-dimensional features needs more samples.*got {n}"):
            check_fid_sample_count(n, 2048)
    with pytest.raises(TypeError, match="n must be an int"):
        check_fid_sample_count(5000.0, 2048)
    with pytest.raises(ValueError, match="must be positive"):
        check_fid_sample_count(10, 0)


# ---------------------------------------------------------------- statistics


def test_gaussian_stats_accumulate_in_float64_without_cancellation():
    # float32 samples c +- 1 with c = 1e4 (all exactly representable): mean c, unbiased
    # variance n / (n - 1). A float32 E[x^2] - E[x]^2 would lose everything (eps32 * c^2
    # ~ 12 >> 1); centered float64 sums are exact here up to ~n eps64 relative.
    n, c = 10_000, 1e4
    x = jnp.asarray(np.where(np.arange(n) % 2 == 0, c - 1, c + 1)[:, None] * np.ones((1, 2)), jnp.float32)
    mu, cov = gaussian_stats(x)
    assert mu.dtype == np.float64 and cov.shape == (2, 2)
    np.testing.assert_allclose(mu, [c, c], rtol=n * np.finfo(np.float64).eps)
    np.testing.assert_allclose(cov, np.full((2, 2), n / (n - 1)), rtol=n * np.finfo(np.float64).eps)
    # per-sample arrays are flattened
    assert gaussian_stats(np.zeros((5, 2, 3)))[1].shape == (6, 6)
    with pytest.raises(ValueError, match="at least 2 samples"):
        gaussian_stats(np.zeros((1, 3)))
    with pytest.raises(ValueError, match="non-finite"):
        gaussian_stats(np.array([[1.0], [np.nan]]))


@pytest.fixture(scope="module")
def offset_samples():
    # 1000 samples in 6-d, scales 0.5..2, correlated, with a common offset of 1e4: raw float64
    # sums E[x x^T] - E[x] E[x]^T lose ~eps * 1e8 relative to the unit variances (checked below).
    rng = np.random.default_rng(4)
    z = rng.normal(size=(1000, 6)) @ rng.normal(size=(6, 6)) * 0.5
    return z + 1e4


def _rel_err(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def test_streaming_stats_equal_one_shot_over_uneven_batches_and_merges(offset_samples):
    x = offset_samples
    mu, cov = x.mean(0), np.cov(x, rowvar=False)  # numpy's one-shot two-pass float64 statistics
    n = len(x)
    # the test can fail: the raw-sum formula misses 1e-10 by orders of magnitude at this offset
    raw = (x.T @ x - np.outer(x.sum(0), x.sum(0)) / n) / (n - 1)
    assert _rel_err(raw, cov) > 1e-8

    s = StreamingStats()
    edges = np.cumsum([0, 1, 0, 7, 300, 2, 690])
    for i, j in zip(edges[:-1], edges[1:]):  # uneven batches, an empty and a single-sample one
        s.update(x[i:j])
    assert s.count == n and s.dim == 6
    assert _rel_err(s.mean, mu) <= 1e-10 and _rel_err(s.cov, cov) <= 1e-10
    m, c = s.stats()
    np.testing.assert_array_equal(m, s.mean)

    # three accumulators, one fed JAX float32 batches of exactly representable values, merged
    # in two groupings
    parts = [x[:333], x[333:334], x[334:]]
    accs = [StreamingStats().update(p) for p in parts]
    left = accs[0].copy().merge(accs[1]).merge(accs[2])
    right = accs[2].copy().merge(accs[1].copy().merge(accs[0]))
    for t in (left, right):
        assert t.count == n and _rel_err(t.mean, mu) <= 1e-10 and _rel_err(t.cov, cov) <= 1e-10
    assert accs[0].count == 333  # merge leaves its argument alone
    assert StreamingStats().merge(StreamingStats()).count == 0

    # per-sample arrays are flattened; JAX float32 input promoted to float64
    xr = np.round(x[:50]).reshape(50, 2, 3)
    s32 = StreamingStats().update(jnp.asarray(xr, jnp.float32))
    np.testing.assert_allclose(s32.cov, np.cov(xr.reshape(50, 6), rowvar=False), rtol=1e-10)

    # allgather: single process, through process_allgather's encoding (bit-exact round trip)
    g = s.allgather()
    assert g is not s and g.count == n
    np.testing.assert_array_equal(g.mean, s.mean)
    np.testing.assert_array_equal(g.cov, s.cov)
    assert StreamingStats(dim=6).allgather().count == 0


def test_streaming_stats_rejects_bad_input():
    s = StreamingStats().update(np.ones((3, 4)))
    with pytest.raises(ValueError, match="dimension 5 does not match the accumulated 4"):
        s.update(np.ones((2, 5)))
    with pytest.raises(ValueError, match="does not match"):
        s.merge(StreamingStats().update(np.ones((2, 3))))
    with pytest.raises(ValueError, match="non-finite"):
        s.update(np.array([[0.0, 1, 2, np.inf]]))
    with pytest.raises(ValueError, match=r"shape \(n, d\)"):
        s.update(np.ones(4))
    with pytest.raises(ValueError, match="needs at least 2 samples, got 1"):
        _ = StreamingStats().update(np.ones((1, 4))).cov
    with pytest.raises(ValueError, match="no samples"):
        _ = StreamingStats().mean
    with pytest.raises(ValueError, match="dimension is unknown"):
        StreamingStats().allgather()
    with pytest.raises(TypeError, match="takes a StreamingStats"):
        s.merge((3, np.zeros(4), np.zeros((4, 4))))
    with pytest.raises(ValueError, match="positive int"):
        StreamingStats(dim=0)


SHARDED_SCRIPT = textwrap.dedent(
    """
    import jax, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from jdiff.metrics import StreamingStats
    assert jax.device_count() == 4
    x = (np.random.default_rng(0).normal(size=(24, 6)) + 100.0).astype(np.float32)  # what JAX holds (no x64)
    mu, cov = x.mean(0, dtype=np.float64), np.cov(x.astype(np.float64), rowvar=False)
    rel = lambda a, b: np.max(np.abs(a - b)) / np.max(np.abs(b))
    mesh = jax.make_mesh((2, 2), ("data", "rep"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    cases = {
        "rows over 4 devices": NamedSharding(mesh, P(("data", "rep"))),
        "rows over 2, replicated over 2": NamedSharding(mesh, P("data")),
        "replicated": NamedSharding(mesh, P()),
        "columns (read whole)": NamedSharding(mesh, P(None, "data")),
    }
    for name, sh in cases.items():
        xs = jax.device_put(x, sh)
        s = StreamingStats().update(xs)
        assert s.count == 24, (name, s.count)  # replicas counted once
        assert rel(s.mean, mu) < 1e-10 and rel(s.cov, cov) < 1e-10, name
    print("OK")
    """
)


def test_streaming_stats_read_sharded_arrays_shard_by_shard():
    env = W.subprocess_env(devices=4)
    r = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-2000:]


# ---------------------------------------------------------------- statistics files


def test_save_load_stats_round_trip(tmp_path):
    rng = np.random.default_rng(5)
    a = rng.normal(size=(7, 7))
    mu, sigma = rng.normal(size=7), a @ a.T
    path = save_stats(tmp_path / "ref", mu, sigma)
    assert path.endswith("ref.npz") and sorted(os.listdir(tmp_path)) == ["ref.npz"]
    with np.load(path, allow_pickle=False) as f:  # the pytorch-fid / clean-fid layout
        assert sorted(f.files) == ["mu", "sigma"] and f["mu"].dtype == np.float64
    m2, s2 = load_stats(path)
    np.testing.assert_array_equal(m2, mu)
    np.testing.assert_array_equal(s2, sigma)
    # a float32 file with extra keys (as some published files have) reads as float64
    np.savez(tmp_path / "f32.npz", mu=mu.astype(np.float32), sigma=sigma.astype(np.float32), note=np.arange(3))
    m3, s3 = load_stats(tmp_path / "f32.npz")
    assert m3.dtype == s3.dtype == np.float64
    np.testing.assert_allclose(s3, sigma, rtol=1e-6)
    with pytest.raises(ValueError, match="not symmetric"):
        save_stats(tmp_path / "bad.npz", mu, sigma + np.triu(np.ones((7, 7))))


def test_load_stats_rejects_bad_files(tmp_path):
    mu, sigma = np.zeros(3), np.eye(3)

    def npz(name, **arrays):
        p = tmp_path / name
        np.savez(p, **arrays)
        return p

    cases = [
        (tmp_path / "absent.npz", "does not exist"),
        (npz("keys.npz", m=mu, s=sigma), r"lacks key\(s\) \['mu', 'sigma'\].*has keys \['m', 's'\]"),
        (npz("nosigma.npz", mu=mu), r"lacks key\(s\) \['sigma'\]"),
        (npz("mu2d.npz", mu=mu[None], sigma=sigma), r"mu must be 1-D.*\(1, 3\)"),
        (npz("sig.npz", mu=mu, sigma=np.eye(4)), r"sigma must have shape \(d, d\) = \(3, 3\).*got \(4, 4\)"),
        (npz("sig1d.npz", mu=mu, sigma=np.ones(3)), r"sigma must have shape"),
        (npz("nan.npz", mu=np.array([0, np.nan, 0]), sigma=sigma), "non-finite"),
        (npz("inf.npz", mu=mu, sigma=np.diag([1, np.inf, 1])), "non-finite"),
        (npz("asym.npz", mu=mu, sigma=np.triu(np.ones((3, 3)))), "not symmetric"),
        (npz("complex.npz", mu=mu, sigma=sigma.astype(complex)), "real numbers"),
        (npz("text.npz", mu=np.array(["a", "b", "c"]), sigma=sigma), "real numbers"),
        (npz("pickle.npz", mu=np.array([{"x": 1}], dtype=object), sigma=sigma), "not a plain numeric array"),
    ]
    single = tmp_path / "single.npy"
    np.save(single, mu)
    cases.append((single, "single array"))
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"PK\x03\x04 not really a zip archive")
    cases.append((garbage, "not a readable .npz"))
    for path, msg in cases:
        with pytest.raises(ValueError, match=msg):
            load_stats(path)
    # the symmetry check can be waived (the matrix is then symmetrized)
    _, s = load_stats(
        npz("asym2.npz", mu=mu, sigma=np.eye(3) + np.triu(np.full((3, 3), 1e-3), 1)), check_symmetric=False
    )
    np.testing.assert_array_equal(s, s.T)


# ---------------------------------------------------------------- KID


def _kid_direct(x, y):
    """Unbiased MMD^2 with k(a, b) = (a.b/d + 1)^3 by explicit double loops."""
    m, d = len(x), x.shape[1]
    k = lambda a, b: (float(np.dot(a, b)) / d + 1.0) ** 3
    sxx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j)
    syy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
    sxy = sum(k(x[i], y[j]) for i in range(m) for j in range(m))
    return sxx / (m * (m - 1)) + syy / (m * (m - 1)) - 2 * sxy / m**2


def test_kid_matches_the_direct_unbiased_formula():
    rng = np.random.default_rng(6)
    x, y = rng.normal(size=(6, 3)), rng.normal(size=(6, 3)) + 0.3
    # subset_size is capped at 6, so the one subset is both whole sets (order does not matter)
    mean, std = kid(x, y, subsets=1, subset_size=1000, seed=0)
    assert mean == pytest.approx(_kid_direct(x, y), rel=1e-12, abs=1e-14) and std == 0.0


def test_kid_near_zero_for_one_distribution_and_positive_for_shifted():
    rng = np.random.default_rng(7)
    x, y = rng.normal(size=(400, 8)), rng.normal(size=(400, 8))
    mean, std = kid(x, y, subsets=20, subset_size=200, seed=1)
    # the mean of correlated subset estimates has a standard error of at most their std
    assert std > 0 and abs(mean) < NSIGMA * std
    mean_s, std_s = kid(x, y + 0.5, subsets=20, subset_size=200, seed=1)
    assert mean_s > NSIGMA * std_s and mean_s > 10 * abs(mean)
    # reproducible from the seed; a JAX key works too
    assert kid(x, y, subsets=3, subset_size=50, seed=2) == kid(x, y, subsets=3, subset_size=50, seed=2)
    k1 = kid(x, y, subsets=3, subset_size=50, seed=jax.random.key(3))
    assert k1 == kid(x, y, subsets=3, subset_size=50, seed=jax.random.key(3)) and np.isfinite(k1[0])


def test_kid_rejects_bad_input():
    x = np.zeros((5, 3))
    with pytest.raises(ValueError, match="feature dimensions differ"):
        kid(x, np.zeros((5, 4)))
    with pytest.raises(ValueError, match="at least 2 samples"):
        kid(x, np.zeros((1, 3)))
    with pytest.raises(ValueError, match="non-finite"):
        kid(x, np.full((5, 3), np.nan))
    with pytest.raises(ValueError, match="subsets must be a positive int"):
        kid(x, x, subsets=0)
    with pytest.raises(ValueError, match="subset_size must be an int >= 2"):
        kid(x, x, subset_size=1)
    with pytest.raises(TypeError, match="seed must be"):
        kid(x, x, seed="a")


# ---------------------------------------------------------------- precision / recall


def _precision_recall_direct(real, fake, k):
    dr = scipy.spatial.distance.cdist(real, real)
    df = scipy.spatial.distance.cdist(fake, fake)
    rr = np.sort(dr, axis=1)[:, k]  # index 0 is the point itself
    rf = np.sort(df, axis=1)[:, k]
    d = scipy.spatial.distance.cdist(fake, real)
    precision = np.mean(np.any(d <= rr[None, :], axis=1))
    recall = np.mean(np.any(d.T <= rf[None, :], axis=1))
    return precision, recall


def test_precision_recall_known_cases():
    rng = np.random.default_rng(8)
    x = rng.normal(size=(50, 4))
    assert precision_recall(x, x, k=3) == (1.0, 1.0)
    assert precision_recall(x, x + 100.0, k=3) == (0.0, 0.0)
    # 1-d: real = 0..9 (k = 1 radii all 1), fake = {0, 0.4, 20..23} (radii 0.4, 0.4, 1, 1, 1, 1).
    # Fake 0 and 0.4 lie in real balls, 20..23 do not: precision 2/6. Real 0 lies in fake 0's
    # ball, real 1 is 0.6 > 0.4 from fake 0.4: recall 1/10.
    real = np.arange(10.0)[:, None]
    fake = np.array([0.0, 0.4, 20, 21, 22, 23])[:, None]
    p, r = precision_recall(real, fake, k=1)
    assert p == pytest.approx(2 / 6, abs=1e-15) and r == pytest.approx(1 / 10, abs=1e-15)
    # partial overlap at random against a direct all-pairs computation; blocks of 7 exercise
    # the bounded-memory path (uneven last blocks, running k-nearest lists)
    real, fake = rng.normal(size=(60, 5)), rng.normal(size=(45, 5)) * 1.2 + 0.7
    want = _precision_recall_direct(real, fake, 3)
    got = precision_recall(real, fake, k=3, batch_size=7)
    assert 0 < want[0] < 1 and 0 < want[1] < 1
    assert got == pytest.approx(want, abs=1e-15)
    assert precision_recall(jnp.asarray(x, jnp.float32), np.asarray(x, np.float32)) == (1.0, 1.0)  # JAX input


def test_precision_recall_rejects_bad_input():
    x = np.zeros((5, 3))
    with pytest.raises(ValueError, match=r"k must be an int in \[1, 4\]"):
        precision_recall(x, x, k=5)
    with pytest.raises(ValueError, match="feature dimensions differ"):
        precision_recall(x, np.zeros((5, 2)))
    with pytest.raises(ValueError, match="batch_size"):
        precision_recall(x, x, k=1, batch_size=0)
    with pytest.raises(ValueError, match=r"shape \(n, d\)"):
        precision_recall(np.zeros(5), x)
