"""The S-lemma dual near tangency, against an mpmath ground truth.

Near tangency (W > 0 and the margin m within a few ulps of a^T W^-1 a) the pair's flip set
shrinks to the single point W^-1 a and the dual optimum runs off to mu -> inf, where
``phi = (m - sum b2/(tau+lam)) / tau`` cancels catastrophically. Every radius must still be a
lower bound on the exact one, and a radius may only be labelled exact when it is.

The ground truth solves the same problems in mpmath at ``DPS`` digits: the sign of
``m - a^T W^-1 a`` decides unboundedness, then the root of ``phi'`` (increasing in tau) is found by
safeguarded Newton, and the exact squared radius is phi there (S-lemma: no duality gap).
"""
import mpmath as mp
import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from gmcert.latent import certificates
from gmcert.latent.certificates import MixtureGeometry
from gmcert.latent.mixture import GaussianMixtureClassifier

DPS = 50
EXACT_RTOL = 1e-8  # a radius labelled exact is within this of the truth (relative)


@pytest.fixture(autouse=True)
def _one_blas_thread():
    with threadpool_limits(1):
        yield


# ------------------------------------------------------------------ ground truth
def _truth_r2(m, b2, lam):
    """Exact ``sup phi`` (the squared pair radius) for inputs taken as exact; mp.inf if unbounded.

    ``m``, ``b2``, ``lam`` are floats or mpf. Assumes ``b2 > 0`` (no hard case) and ``lam != 0``.
    """
    with mp.workdps(DPS):
        m, b2, lam = mp.mpf(m), [mp.mpf(x) for x in b2], [mp.mpf(x) for x in lam]
        if m <= 0:
            return mp.mpf(0)
        lmin = min(lam)
        if lmin > 0:  # W > 0: the score difference is bounded below by m - a^T W^-1 a
            gap = m - mp.fsum(b / l for b, l in zip(b2, lam))
            if gap > mp.mpf(10) ** (10 - DPS) * m:
                return mp.inf
            if gap >= 0:  # tangent to DPS digits: the supremum is the limit tau -> 0
                return mp.fsum(b / l ** 2 for b, l in zip(b2, lam))
        edge = max(-lmin, mp.mpf(0))

        def parts(t):
            e = [1 / (t + l) for l in lam]
            w = mp.fsum(b * x for b, x in zip(b2, e))
            v = mp.fsum(b * x * x for b, x in zip(b2, e))
            y = mp.fsum(b * x ** 3 for b, x in zip(b2, e))
            return w, v, y

        def g(t):  # phi'(mu) at tau = t: increasing in t
            w, v, _ = parts(t)
            return m - w - t * v

        hi = mp.mpf(1)
        while g(edge + hi) <= 0:
            hi *= 4
        lo = hi
        while g(edge + lo) >= 0:
            lo /= 4
        t = edge + lo  # g(edge + lo) < 0 < g(edge + hi): safeguarded Newton on g in tau
        for _ in range(400):
            w, v, y = parts(t)
            gt = m - w - t * v
            if gt < 0:
                lo = t - edge
            else:
                hi = t - edge
            step = gt / (2 * t * y)
            new = t - step
            if not (edge + lo < new < edge + hi):
                new = edge + mp.sqrt(lo * hi)
            if abs(new - t) <= mp.mpf(10) ** (5 - DPS) * (t - edge):
                t = new
                break
            t = new
        w, _, _ = parts(t)
        return (m - w) / t


def _ulps(x, k):
    for _ in range(abs(k)):
        x = np.nextafter(x, np.inf if k > 0 else -np.inf)
    return x


def _tangent_problems(rng, n, d, max_ulps=4):
    """W > 0 with m within ``max_ulps`` ulps of the float value of a^T W^-1 a."""
    scale = 10.0 ** rng.uniform(-2, 2, size=(n, 1))
    lam = scale * np.exp(rng.uniform(np.log(1e-2), np.log(1e2), size=(n, d)))
    b2 = (rng.normal(size=(n, d)) * 10.0 ** rng.uniform(-1, 1, size=(n, 1))) ** 2 + 1e-6
    m = np.array([_ulps((b / l).sum(), int(k)) for b, l, k in
                  zip(b2, lam, rng.integers(-max_ulps, max_ulps + 1, size=n))])
    return m, b2, lam


def _approach_problems(rng, n, d):
    """W > 0 with m = a^T W^-1 a (1 - 10^-k), k from 2 to 15: from easy to tangent."""
    m, b2, lam = _tangent_problems(rng, n, d, max_ulps=0)
    return m * (1 - 10.0 ** -rng.uniform(2, 15, size=n)), b2, lam


def _general_problems(rng, n, d):
    """Indefinite or definite W, margins of every size, b spread over decades."""
    lam = rng.normal(size=(n, d)) * 10.0 ** rng.uniform(-2, 2, size=(n, 1))
    lam = np.where(np.abs(lam) < 1e-9, 1e-3, lam)
    b2 = (rng.normal(size=(n, d)) * 10.0 ** rng.uniform(-3, 1, size=(n, d))) ** 2 + 1e-12
    m = 10.0 ** rng.uniform(-4, 2, size=n)
    return m, b2, lam


def _truths(m, b2, lam):
    return [_truth_r2(mi, bi, li) for mi, bi, li in zip(m, b2, lam)]


def _assert_sound(r2, truth, what):
    """Every returned squared radius is at most the exact one (mpmath comparison, no tolerance
    beyond the truth's own 1e-40)."""
    with mp.workdps(DPS):
        over = [i for i, (r, t) in enumerate(zip(r2, truth)) if mp.mpf(r) > t * (1 + mp.mpf(10) ** -40)]
    assert not over, (f"{what}: {len(over)} of {len(r2)} overstated, e.g. r2 {r2[over[0]]!r} vs exact "
                      f"{mp.nstr(truth[over[0]], 17)}")


def _assert_settled_exact(r2, settled, truth, cutoff2=None):
    """Rows labelled settled carry the exact squared radius (2 EXACT_RTOL: r2 = r^2), or, where a
    cutoff was given, a value that proves the exact one is at least the cutoff."""
    bad = []
    with mp.workdps(DPS):
        for i in np.flatnonzero(settled):
            t = truth[i]
            if cutoff2 is not None and r2[i] >= cutoff2[i] and t >= cutoff2[i]:
                continue
            ok = (t == mp.inf and r2[i] == np.inf) or (
                t != mp.inf and abs(mp.mpf(r2[i]) - t) <= 2 * EXACT_RTOL * t)
            if not ok:
                bad.append(i)
    assert not bad, (f"{len(bad)} settled rows are not exact, e.g. r2 {r2[bad[0]]!r} vs "
                     f"{mp.nstr(truth[bad[0]], 17)}")


DIMS = [1, 2, 3, 5, 8, 16]


# --------------------------------------------------------------- solve_dual itself
@pytest.mark.parametrize("d", DIMS)
def test_solve_dual_never_overstates_near_tangency(d):
    rng = np.random.default_rng(100 + d)
    m, b2, lam = _tangent_problems(rng, 120, d, max_ulps=1)
    truth = _truths(m, b2, lam)
    _, r2 = certificates.solve_dual(m, b2, lam)
    _assert_sound(r2, truth, "no cutoff")
    # cutoffs between the exact value and what cancellation makes of it; and below the exact value
    finite = np.array([float(t) if t != mp.inf else (b / l ** 2).sum() for t, b, l in zip(truth, b2, lam)])
    u = rng.random(120)
    factor = np.where(u < 0.4, 1 + 10.0 ** rng.uniform(-5.5, -4, 120),
                      np.where(u < 0.8, 1 + 10.0 ** rng.uniform(-4, -0.3, 120), rng.uniform(0.5, 1.0, 120)))
    cutoff2 = finite * factor
    _, r2 = certificates.solve_dual(m, b2, lam, cutoff2=cutoff2)
    _assert_sound(r2, truth, "with cutoff")


# tangent problems on which the unrounded dual value, cancelled to noise, once ran past the cutoff
TANGENT_CASES = [
    (0.15069390271921676, [1.5083961542654047], [10.00966944943985]),
    (177.3012522939781,
     [140.6657165379519, 195.74643352832945, 83.46265254467392, 16.35455501038859, 0.03443284074023162,
      41.0682396662165, 246.3459550490729, 173.4907486579436],
     [439.501006469619, 1.1848225616378725, 2352.8736074889025, 69.54174987515405, 246.750222920559,
      4.412418574165919, 155.23125636632955, 287.0359557968393]),
    (3.967725125437327,
     [0.0002719622688662934, 0.43272719249611813, 0.29866293542903244, 0.07187591891193344,
      0.6295621827121569, 0.30457418113139156, 0.15711822074303902, 0.4805810919283597,
      0.20257744514876236, 0.15649946813779386, 1.2191387090453055e-05, 0.2903470979012465,
      0.0885200660857586, 0.053907071680952795, 0.03988452684218837, 0.0013495002639052616],
     [0.08207622609289551, 3.079108752629187, 2.35158301214147, 123.99930424089736, 25.026553731071974,
      0.7977045649487022, 0.6826946427900893, 1.3901143166482863, 3.131189176866146, 0.28344601789013996,
      0.03664071160915787, 0.14564492918163063, 29.99566028029484, 132.24797172840044,
      0.47603900289096046, 0.08632350552385536]),
]


@pytest.mark.parametrize("case", range(len(TANGENT_CASES)))
def test_cut_needs_the_rounded_down_value_to_reach_the_cutoff(case):
    m, b2, lam = (np.array([x], dtype=np.float64) for x in TANGENT_CASES[case])
    truth = _truth_r2(m[0], b2[0], lam[0])
    assert truth != mp.inf
    factors = np.array([1 + 2e-6, 1 + 1e-5, 1.001, 1.1, 1.4, 2.0])
    r2 = np.concatenate([certificates.solve_dual(m, b2, lam, cutoff2=np.array([float(truth) * f]))[1]
                         for f in factors])
    _assert_sound(r2, [truth] * len(factors), "cut")


@pytest.mark.parametrize("d", DIMS)
def test_settled_rows_are_exact_and_the_rest_sound(d):
    rng = np.random.default_rng(200 + d)
    families = [_tangent_problems(rng, 20, d), _approach_problems(rng, 30, d), _general_problems(rng, 30, d)]
    m, b2, lam = (np.concatenate(x) for x in zip(*families))
    truth = _truths(m, b2, lam)
    tau, r2, settled = certificates.solve_dual(m, b2, lam, return_settled=True)
    assert settled.dtype == bool and settled.shape == m.shape
    _assert_sound(r2, truth, "no cutoff")
    _assert_settled_exact(r2, settled, truth)
    assert settled[50:].mean() > 0.9  # well-conditioned problems do settle
    # the same with cutoffs around the exact values
    finite = np.array([float(t) if t != mp.inf else 1.0 for t in truth])
    cutoff2 = finite * rng.uniform(0.5, 1.5, len(m))
    _, r2c, settled_c = certificates.solve_dual(m, b2, lam, cutoff2=cutoff2, return_settled=True)
    _assert_sound(r2c, truth, "with cutoff")
    _assert_settled_exact(r2c, settled_c, truth, cutoff2)


def test_unsettled_when_tangent():
    rng = np.random.default_rng(7)
    m, b2, lam = _tangent_problems(rng, 60, 4, max_ulps=2)
    truth = _truths(m, b2, lam)
    _, r2, settled = certificates.solve_dual(m, b2, lam, return_settled=True)
    finite = np.array([t != mp.inf for t in truth])
    assert finite.any() and not settled[finite].any()  # few ulps from tangency: nothing to settle


# ------------------------------------------------------- through the mixture certificate
def _tangent_geometry(rng, d, k_ulps, third_class):
    """Class 0 broad, class 1 tighter in every direction (W = P1 - P0 > 0), log weights set so
    that min_y s_0(y) - s_1(y) is 0 to within ``k_ulps`` ulps: class 1 (almost) never wins."""
    def spd(lo, hi):
        Q, _ = np.linalg.qr(rng.normal(size=(d, d)))
        P = (Q * rng.uniform(lo, hi, d)) @ Q.T
        return (P + P.T) / 2

    P0 = spd(0.2, 1.0)
    P1 = P0 + spd(0.5, 3.0)
    mu = rng.normal(size=(3, d)) * 2
    log_dets = rng.normal(size=3)
    precisions = [P0, P1, spd(0.1, 2.0)]
    with mp.workdps(DPS):
        P0m, P1m = mp.matrix(P0.tolist()), mp.matrix(P1.tolist())
        m0, m1 = mp.matrix(mu[0].tolist()), mp.matrix(mu[1].tolist())
        y = mp.lu_solve(P1m - P0m, P1m * m1 - P0m * m0)  # minimiser of s_0 - s_1
        q = ((y - m1).T * P1m * (y - m1))[0] - ((y - m0).T * P0m * (y - m0))[0]
        lw0 = float((-q + mp.mpf(log_dets[0]) - mp.mpf(log_dets[1])) / 2)
    log_weights = np.array([_ulps(lw0, k_ulps), 0.0, -1.0])
    n = 3 if third_class else 2
    geo = MixtureGeometry(np.arange(n), log_weights[:n], mu[:n], np.array(precisions[:n]), log_dets[:n])
    return geo, np.array([float(v) for v in y])


def _geometry_truth(geo, Z, pred):
    """Exact latent radius of each row of Z (one component per class), as mpf."""
    n_comp, d = geo.means.shape
    with mp.workdps(DPS):
        P = [mp.matrix(p.tolist()) for p in geo.precisions]
        eig = {}
        out = []
        for z, c in zip(Z, pred):
            zm = mp.matrix(z.tolist())
            diffs = [zm - mp.matrix(mu.tolist()) for mu in geo.means]
            s = [-(diffs[k].T * P[k] * diffs[k])[0] - mp.mpf(geo.log_dets[k]) + 2 * mp.mpf(geo.log_weights[k])
                 for k in range(n_comp)]
            best = mp.inf
            for k in range(n_comp):
                if k == c:
                    continue
                if (c, k) not in eig:
                    eig[c, k] = mp.eigsy(P[k] - P[c])
                E, Q = eig[c, k]
                a = P[c] * diffs[c] - P[k] * diffs[k]
                b = Q.T * a
                r2 = _truth_r2(s[c] - s[k], [b[i] ** 2 for i in range(d)], [E[i] for i in range(d)])
                best = min(best, mp.sqrt(r2) if r2 != mp.inf else mp.inf)
            out.append(best)
    return out


@pytest.mark.parametrize("d,third_class", [(2, False), (3, True), (5, False), (5, True)])
def test_certify_near_tangent_pair_is_sound_and_labelled(d, third_class):
    rng = np.random.default_rng(300 + d + 10 * third_class)
    for k_ulps in (-3, -1, 0, 1, 3):
        geo, y = _tangent_geometry(rng, d, k_ulps, third_class)
        geo.precompute_pairs()
        Z = y + rng.normal(size=(12, d)) * rng.uniform(0.05, 3, size=(12, 1))
        pred, radius, exact = certificates.certify(geo, Z, "exact", return_exact=True)
        truth = _geometry_truth(geo, Z, pred)
        with mp.workdps(DPS):
            for r, t, e in zip(radius, truth, exact):
                assert mp.mpf(r) <= t, f"overstated: {r!r} vs exact {mp.nstr(t, 17)}"
                if e:
                    assert (t == mp.inf and r == np.inf) or abs(mp.mpf(r) - t) <= EXACT_RTOL * t


def test_certify_exact_labels_on_fitted_models_match_the_truth():
    rng = np.random.default_rng(5)
    Z = np.concatenate([rng.normal(size=(80, 4)) @ rng.normal(size=(4, 4)) + rng.normal(size=4) * 2
                        for _ in range(3)])
    y = np.repeat(np.arange(3), 80)
    clf = GaussianMixtureClassifier("full").fit(Z, y)
    X = Z[rng.choice(len(Z), 25, replace=False)]
    labels, radius, exact = clf.certify(X, "exact", return_exact=True)
    assert exact.mean() > 0.9
    pred = np.searchsorted(clf.classes_, labels)
    truth = _geometry_truth(clf._geometry, X, pred)
    with mp.workdps(DPS):
        for r, t, e in zip(radius, truth, exact):
            assert mp.mpf(r) <= t
            if e:
                assert abs(mp.mpf(r) - t) <= EXACT_RTOL * t


def _fitted(covariance_type, M=1, seed=0):
    rng = np.random.default_rng(seed)
    Z = np.concatenate([rng.normal(size=(60, 3)) + rng.normal(size=3) * 3 for _ in range(3 * M)])
    y = np.repeat(np.arange(3), 60 * M)
    clf = GaussianMixtureClassifier(covariance_type, n_components_per_class=M, random_state=0).fit(Z, y)
    return clf, Z[::9]


def test_return_exact_order_and_defaults():
    clf, X = _fitted("full")
    pred, radius = clf.certify(X)  # unchanged default
    out = clf.certify(X, "exact", return_direction=True, return_exact=True)
    assert len(out) == 4
    np.testing.assert_array_equal(out[0], pred)
    np.testing.assert_array_equal(out[1], radius)
    assert out[2].shape == (len(X), 3) and out[3].shape == (len(X),) and out[3].dtype == bool
    p2, r2, e2 = clf.certify(X, "exact", return_exact=True)
    np.testing.assert_array_equal(r2, radius)
    np.testing.assert_array_equal(e2, out[3])
    assert e2.mean() > 0.9


@pytest.mark.parametrize("covariance_type,M,method,expect", [
    ("tied", 1, "exact", True), ("tied", 1, "closed_form", True), ("full", 1, "closed_form", False),
    ("diag", 1, "closed_form", False), ("full", 2, "exact", False), ("tied", 2, "exact", False)])
def test_exact_label_by_structure_and_method(covariance_type, M, method, expect):
    clf, X = _fitted(covariance_type, M)
    _, radius, exact = clf.certify(X, method, return_exact=True)
    assert (exact == expect).all()


def test_zero_radius_from_a_negative_margin_is_exact():
    clf, _ = _fitted("full")
    # bisect to the boundary between classes 0 and 1 along the segment between their means:
    # the margin there is a few ulps, below the rounding slack, so the radius is 0
    lo, hi = clf.means_[0], clf.means_[1]
    for _ in range(200):
        mid = (lo + hi) / 2
        S = clf.class_scores(mid[None])[0]
        lo, hi = (mid, hi) if S[0] > S[1] else (lo, mid)
    _, radius, exact = certificates.certify(clf._geometry, lo[None], "exact", return_exact=True)
    assert radius[0] == 0 and exact[0]
