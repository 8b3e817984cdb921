"""Latent certificates: sound (an independent attack finds nothing inside), tight (exact is
attained), and the attack itself strong enough to catch an overestimate."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from threadpoolctl import threadpool_limits

from gmcert.latent import certificates
from gmcert.latent.mixture import GaussianMixtureClassifier


@pytest.fixture(autouse=True)
def _one_blas_thread():
    # the attack makes many small matmuls; threaded BLAS only slows them down
    with threadpool_limits(1):
        yield


def _mixture(seed, K, d, cond, covariance_type="full", M=1, offset=0.0, n_test=30):
    """Fit on synthetic classes (each M Gaussians with condition number ~cond); test points."""
    rng = np.random.default_rng(seed)
    n_per = max(4 * d, 60)
    Z, y = [], []
    for k in range(K):
        for _ in range(M):
            Q, _ = np.linalg.qr(rng.normal(size=(d, d)))
            ev = np.exp(rng.uniform(0, np.log(cond), d))
            mean = rng.normal(size=d) * 2.5 + offset
            Z.append(mean + (rng.normal(size=(n_per // M, d)) * np.sqrt(ev / ev.mean())) @ Q.T)
            y.append(np.full(n_per // M, k))
    Z, y = np.concatenate(Z), np.concatenate(y)
    clf = GaussianMixtureClassifier(covariance_type, n_components_per_class=M, random_state=seed).fit(Z, y)
    return clf, Z[rng.choice(len(Z), n_test, replace=False)], rng


def _scores_and_gradients(clf, X):
    """Class scores (N, K) and their gradients (N, K, d), straight from the fitted components."""
    mu, P = clf.component_means_, clf.component_precisions_
    PD = np.stack([(X - mu[m]) @ P[m] for m in range(len(mu))], axis=1)
    s = (-np.einsum("nmd,nmd->nm", X[:, None, :] - mu[None], PD) - clf.component_log_dets_
         + 2 * clf.component_log_weights_)
    K = len(clf.classes_)
    S, grad = np.empty((len(X), K)), np.empty((len(X), K, X.shape[1]))
    for k in range(K):
        half = s[:, clf.component_class_ == k] / 2
        top = half.max(axis=1, keepdims=True)
        w = np.exp(half - top)
        S[:, k] = 2 * (top[:, 0] + np.log(w.sum(axis=1)))
        grad[:, k] = np.einsum("nm,nmd->nd", w / w.sum(axis=1, keepdims=True),
                               -2 * PD[:, clf.component_class_ == k])
    return S, grad


def _attack(clf, X, radius, rng, n_random=4, n_rivals=3, iters=150):
    """Projected gradient descent on ``S_c - S_k`` over the ball of ``radius`` around each row,
    from the linearised direction and random starts, against the top rivals.

    Returns the best perturbation per row and its margin ``S_c - max_k S_k`` (< 0: flipped).
    """
    n, d = X.shape
    S0, G0 = _scores_and_gradients(clf, X)
    c, K = S0.argmax(axis=1), S0.shape[1]
    rivals = np.argsort(-np.where(np.eye(K, dtype=bool)[c], -np.inf, S0), axis=1)[:, :min(n_rivals, K - 1)]
    rows, targets, delta = [], [], []
    for k in rivals.T:
        g = G0[np.arange(n), c] - G0[np.arange(n), k]
        for u in [-g] + [rng.normal(size=(n, d)) for _ in range(n_random)]:
            rows.append(np.arange(n))
            targets.append(k)
            delta.append(u / np.linalg.norm(u, axis=1, keepdims=True) * radius[:, None] * 0.5)
    rows, targets, delta = np.concatenate(rows), np.concatenate(targets), np.concatenate(delta)
    keep = np.isfinite(radius[rows]) & (radius[rows] > 0)
    rows, targets, delta = rows[keep], targets[keep], delta[keep]
    rho, cr, ar = radius[rows], c[rows], np.arange(len(rows))
    best_margin, best_delta = np.full(len(rows), np.inf), delta.copy()
    for it in range(iters):
        S, grad = _scores_and_gradients(clf, X[rows] + delta)
        margin = S[ar, cr] - np.where(np.eye(K, dtype=bool)[cr], -np.inf, S).max(axis=1)
        better = margin < best_margin
        best_margin[better], best_delta[better] = margin[better], delta[better]
        g = grad[ar, cr] - grad[ar, targets]
        step = rho * 0.3 * 0.01 ** (it / iters)
        delta = delta - step[:, None] * g / np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-300)
        delta *= np.minimum(1.0, rho / np.maximum(np.linalg.norm(delta, axis=1), 1e-300))[:, None]
    out_margin, out_delta = np.full(n, np.inf), np.zeros((n, d))
    for i in np.argsort(-best_margin):  # the smallest margin of each row is written last
        out_margin[rows[i]], out_delta[rows[i]] = best_margin[i], best_delta[i]
    return out_delta, out_margin


CONFIGS = [  # K, d, condition number, covariance type, components per class
    (2, 2, 10, "full", 1), (3, 2, 1e4, "full", 1), (5, 8, 1e3, "full", 1), (10, 64, 1e4, "full", 1),
    (10, 16, 3, "full", 1), (4, 16, 1e3, "diag", 1), (6, 32, 1e4, "tied", 1), (3, 8, 1e3, "spherical", 1),
    (3, 8, 100, "full", 2), (4, 4, 1e3, "diag", 2), (3, 6, 100, "tied", 2),
]


@pytest.mark.parametrize("K,d,cond,covariance_type,M", CONFIGS)
def test_attack_finds_no_flip_inside_the_radius_and_flips_just_outside(K, d, cond, covariance_type, M):
    clf, X, rng = _mixture(K * 100 + d, K, d, cond, covariance_type, M)
    radii = {}
    for method in certificates.METHODS:
        pred, radius = clf.certify(X, method)
        assert radius.dtype == np.float64 and radius.shape == (len(X),) and (radius >= 0).all()
        np.testing.assert_array_equal(pred, clf.predict(X))
        delta, margin = _attack(clf, X, radius * (1 - 1e-6), rng)
        assert (margin > 0).all(), f"{method}: flip inside the certified radius"
        np.testing.assert_array_equal(clf.predict(X + delta), pred)
        radii[method] = radius
    assert (radii["closed_form"] <= radii["exact"]).all()
    # the same attack must succeed just outside the exact radius, else it could miss an overestimate
    # (with several components per class the radius is a bound, within 1.5x here)
    ok = np.isfinite(radii["exact"]) & (radii["exact"] > 0)
    assert ok.mean() > 0.8
    delta, margin = _attack(clf, X[ok], radii["exact"][ok] * (1.05 if M == 1 else 1.5), rng)
    assert (margin < 0).mean() >= 0.9
    flipped = margin < 0
    assert (clf.predict(X[ok][flipped] + delta[flipped]) != pred[ok][flipped]).all()


def test_radii_stay_sound_far_from_the_origin():
    clf, X, rng = _mixture(7, 4, 8, 1e3, "full", offset=1e4)
    pred, radius = clf.certify(X, "exact")
    _, margin = _attack(clf, X, radius * (1 - 1e-6), rng)
    assert (margin > 0).all()
    _, margin = _attack(clf, X, radius * 1.05, rng)
    assert (margin < 0).mean() >= 0.9


@pytest.mark.parametrize("K,d,cond,covariance_type", [
    (3, 2, 1e4, "full"), (5, 8, 1e3, "full"), (10, 64, 1e4, "full"), (4, 16, 1e3, "diag"),
    (6, 32, 1e4, "tied"), (3, 8, 1e3, "spherical")])
def test_exact_radius_is_attained_along_the_returned_direction(K, d, cond, covariance_type):
    clf, X, _ = _mixture(K + d, K, d, cond, covariance_type, n_test=60)
    pred, radius, u = clf.certify(X, "exact", return_direction=True)
    ok = np.isfinite(radius) & (radius > 0)
    assert ok.mean() > 0.8
    np.testing.assert_allclose(np.linalg.norm(u[ok], axis=1), 1.0, rtol=1e-12)
    step = radius[ok, None] * u[ok]
    assert (clf.predict(X[ok] + (1 + 1e-6) * step) != pred[ok]).all()
    np.testing.assert_array_equal(clf.predict(X[ok] + (1 - 1e-6) * step), pred[ok])
    _, closed = clf.certify(X, "closed_form")
    assert (closed <= radius).all()


@pytest.mark.parametrize("covariance_type", ["full", "diag"])
def test_exact_radius_matches_brute_force_in_two_dimensions(covariance_type):
    clf, X, _ = _mixture(11, 3, 2, 1e3, covariance_type, n_test=20)
    pred, radius = clf.certify(X, "exact")
    theta = np.linspace(0, 2 * np.pi, 100_000, endpoint=False)
    U = np.c_[np.cos(theta), np.sin(theta)]
    for i, z in enumerate(X):
        # along a ray each score difference is a quadratic in t, read off from t = 0, 1, -1
        f0 = clf.class_scores(z[None])[0]
        f1, fm = clf.class_scores(z + U), clf.class_scores(z - U)
        c = np.flatnonzero(clf.classes_ == pred[i])[0]
        g0, g1, gm = f0[c] - f0, f1[:, [c]] - f1, fm[:, [c]] - fm
        qa, qb = (g1 + gm) / 2 - g0, (g1 - gm) / 2
        with np.errstate(all="ignore"):
            root = np.sqrt(qb ** 2 - 4 * qa * g0)
            linear = np.abs(qa) <= 1e-12 * (np.abs(qb) + np.abs(g0))
            t = np.stack([(-qb - root) / (2 * qa), (-qb + root) / (2 * qa)])
            t = np.where(linear, -g0 / qb, t)
        t[:, :, c] = np.inf
        t = np.where((t > 0) & np.isfinite(t), t, np.inf).min(axis=(0, 2))
        assert radius[i] <= t.min() * (1 + 1e-9)
        assert radius[i] >= t.min() * (1 - 1e-6)


def _inf_case(log_prior_ratio):
    """A broad class 0 and a narrow class 1 inside it, with prior ratio exp(log_prior_ratio)."""
    rng = np.random.default_rng(3)
    Z = np.concatenate([rng.normal(size=(400, 3)) * 3, rng.normal(size=(400, 3)) * 0.5 + 0.5])
    y = np.repeat([0, 1], 400)
    p1 = 1 / (1 + np.exp(log_prior_ratio))
    return GaussianMixtureClassifier(priors=[1 - p1, p1]).fit(Z, y), Z


def test_infinite_radius_only_when_the_rival_can_never_win():
    never, Z = _inf_case(30.0)  # class 1 cannot beat class 0 anywhere
    probe = np.random.default_rng(0).normal(size=(20000, 3)) * 2
    assert (never.predict(probe) == 0).all()
    pred, radius = never.certify(Z[:50], "exact")
    assert (pred == 0).all() and np.isinf(radius).all()
    _, closed = never.certify(Z[:50], "closed_form")
    assert (closed <= radius).all()
    sometimes, _ = _inf_case(0.0)  # class 1 wins near its mean, so every radius is finite
    pred, radius = sometimes.certify(Z[:50], "exact")
    assert np.isfinite(radius).all() and set(pred) == {0, 1}


def test_tied_radius_is_the_hyperplane_distance():
    clf, X, _ = _mixture(5, 4, 6, 100, "tied")
    pred, exact = clf.certify(X, "exact")
    _, closed = clf.certify(X, "closed_form")
    S = clf.class_scores(X)
    P, mu = clf.component_precisions_[0], clf.means_
    c = np.searchsorted(clf.classes_, pred)
    expect = np.full(len(X), np.inf)
    for k in range(len(clf.classes_)):
        a_norm = np.linalg.norm((mu[k] - mu[c]) @ P, axis=1)  # a = P (mu_k - mu_c) for tied
        with np.errstate(divide="ignore", invalid="ignore"):
            expect = np.minimum(expect, np.where(c == k, np.inf, (S[np.arange(len(X)), c] - S[:, k]) / (2 * a_norm)))
    np.testing.assert_allclose(exact, expect, rtol=1e-8)
    np.testing.assert_array_equal(exact, closed)


@settings(max_examples=60, deadline=None, database=None)
@given(st.integers(1, 6), st.integers(0, 2 ** 32 - 1))
def test_dual_solver_reaches_the_supremum_and_never_exceeds_it(d, seed):
    rng = np.random.default_rng(seed)
    m = rng.uniform(0.05, 5, size=1)
    b = rng.normal(size=(1, d)) * rng.choice([1.0, 1e-3], size=(1, d))
    lam = rng.normal(size=(1, d)) * rng.uniform(0.1, 3)
    tau, r2 = certificates.solve_dual(m, b * b, lam)
    if np.isinf(r2[0]):  # claimed unbounded: only allowed when W > 0 and m > a^T W^-1 a
        assert (lam > 0).all() and m[0] > (b * b / lam).sum()
        return
    mu_max = 1 / max(0.0, -lam.min()) if lam.min() < 0 else 1e4
    mu = np.linspace(0, mu_max, 200_001)[:-1]
    phi = mu * m - mu ** 2 * (b * b / (1 + mu[:, None] * lam)).sum(axis=1)
    at_tau = m[0] / tau[0] - (b * b / (tau[0] + lam)).sum() / tau[0]  # phi at the solver's mu
    assert r2[0] <= at_tau * (1 + 1e-12) + 1e-300
    assert r2[0] >= phi.max() * (1 - 1e-7)


def test_closed_form_bound_cases():
    m, a2 = np.array([1.0, 1.0, 1.0, -0.5]), np.array([1.0, 1.0, 0.25, 1.0])
    lam = np.array([0.0, -3.0, 5.0, 0.0])
    r = certificates.closed_form_radius(m, a2, lam)
    np.testing.assert_allclose(r[:2], [0.5, 1 / 3], rtol=1e-8)  # hyperplane; 1/(1 + sqrt(4))
    assert r[2] == np.inf and r[3] == 0.0  # ||a||^2 < lam m: never flips; negative margin: 0
    assert (r[:2] < [0.5, 1 / 3]).all()  # rounded down, never up


def test_certify_rejects_unknown_method():
    clf, X, _ = _mixture(1, 2, 2, 10)
    with pytest.raises(ValueError, match="method"):
        clf.certify(X, "bogus")
