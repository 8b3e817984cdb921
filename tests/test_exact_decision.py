"""The head's predict is the exact head's class, down to float precision at a boundary (issue 25, part 3).

Points are bisected onto decision boundaries until adjacent floats straddle them; there the float
argmax of the scores is sometimes wrong. The reference is mpmath at 80 digits on the stored float
parameters, independent of gmcert's integer and decimal arithmetic.
"""
import mpmath
import numpy as np
import pytest

from gmcert.latent.mixture import GaussianMixtureClassifier


def _head(covariance_type, components, d=5, seed=0):
    rng = np.random.default_rng(seed)
    Z = np.concatenate([rng.normal(size=(150, d)) * rng.uniform(0.5, 2, size=d) + 1.5 * rng.normal(size=d)
                        for _ in range(3)])
    y = np.repeat([0, 1, 2], 150)
    return GaussianMixtureClassifier(covariance_type=covariance_type, n_components_per_class=components,
                                     shrinkage=0.1, random_state=0).fit(Z, y), Z, y


def _reference(clf, z):
    mpmath.mp.dps = 80
    geo = clf._geometry
    comp = []
    for m in range(len(geo.means)):
        v = [mpmath.mpf(float(a)) - mpmath.mpf(float(b)) for a, b in zip(z, geo.means[m])]
        P = geo.precisions[m]
        quad = mpmath.fsum(v[i] * mpmath.mpf(float(P[i, j])) * v[j] for i in range(len(v)) for j in range(len(v)))
        comp.append(-quad - mpmath.mpf(float(geo.log_dets[m])) + 2 * mpmath.mpf(float(geo.log_weights[m])))
    scores = [2 * mpmath.log(mpmath.fsum(mpmath.exp(comp[m] / 2) for m in members if m >= 0))
              for members in geo.class_components]
    return int(np.argmax([float(s - max(scores)) for s in scores])) if len(set(scores)) == len(scores) else None


def _boundary_points(clf, Z, y, n_lines=60, seed=1):
    """Adjacent float pairs straddling the head's decision boundary, along random lines."""
    rng = np.random.default_rng(seed)
    scores = clf.class_scores
    out = []
    for _ in range(n_lines):
        a, b = Z[rng.choice(np.flatnonzero(y == 0))], Z[rng.choice(np.flatnonzero(y != 0))]
        ca = scores(a[None]).argmax()
        lo, hi = 0.0, 1.0
        if scores(b[None]).argmax() == ca:
            continue
        for _ in range(200):  # bisect in t until the two ends are adjacent floats
            mid = (lo + hi) / 2
            if mid in (lo, hi):
                break
            if scores((a + mid * (b - a))[None]).argmax() == ca:
                lo = mid
            else:
                hi = mid
        for t in (lo, hi, np.nextafter(lo, -1), np.nextafter(hi, 2)):
            out.append(a + t * (b - a))
    return np.array(out)


@pytest.mark.parametrize("covariance_type,components", [("tied", 1), ("full", 1), ("diag", 1), ("full", 2)])
def test_predict_is_the_exact_heads_class_at_float_precision(covariance_type, components):
    clf, Z, y = _head(covariance_type, components)
    points = _boundary_points(clf, Z, y)
    assert len(points) >= 100
    reference = np.array([_reference(clf, p) for p in points])
    known = reference != None  # noqa: E711 (an exact tie has no reference class)
    predicted = clf.predict(points)
    np.testing.assert_array_equal(predicted[known], clf.classes_[reference[known].astype(int)])


def test_the_float_argmax_alone_is_wrong_somewhere_on_those_points():
    """The check above can fail: on the same kind of points the plain float argmax errs."""
    wrong = 0
    for covariance_type, components in [("tied", 1), ("full", 1), ("full", 2)]:
        clf, Z, y = _head(covariance_type, components)
        points = _boundary_points(clf, Z, y)
        reference = np.array([_reference(clf, p) for p in points])
        float_argmax = clf.class_scores(points).argmax(axis=1)
        wrong += int(sum(r is not None and r != f for r, f in zip(reference, float_argmax)))
    assert wrong > 0


def test_far_from_boundaries_predict_is_the_float_argmax():
    clf, Z, _ = _head("full", 2)
    np.testing.assert_array_equal(clf.predict(Z), clf.classes_[clf.class_scores(Z).argmax(axis=1)])
