"""PCA projection: orthonormal rows, agreement with scikit-learn, torch module, array round trip."""
import numpy as np
import pytest
import torch
from sklearn.decomposition import PCA

from gmcert.errors import DataError, ModelFileError
from gmcert.encoders.projection import (IdentityProjection, PCAProjection, make_projection, projection_from_arrays)


@pytest.fixture(scope="module")
def latents():
    rng = np.random.default_rng(0)
    return rng.normal(size=(200, 12)) @ rng.normal(size=(12, 12)) + 3.0


def test_pca_matches_sklearn_with_orthonormal_rows(latents):
    pca = PCAProjection(5).fit(latents)
    assert np.abs(pca.components_ @ pca.components_.T - np.eye(5)).max() < 1e-12
    ref = PCA(5, svd_solver="full").fit(latents)
    signs = np.sign(np.sum(pca.components_ * ref.components_, axis=1))
    assert np.allclose(pca.components_, ref.components_ * signs[:, None], atol=1e-10)
    assert np.allclose(pca.explained_variance_, ref.explained_variance_)
    assert np.allclose(pca.transform(latents), ref.transform(latents) * signs, atol=1e-9)
    assert pca.transform(latents).dtype == np.float64
    # a sound upper bound on the rows' spectral norm: 1 up to rounding, never below it
    L = pca.lipschitz_constant()
    assert L >= 1.0 and L <= 1.0 + 1e-12 and pca.is_isometry()


def test_torch_module_and_arrays_round_trip(latents):
    pca = PCAProjection(4).fit(latents)
    layer = pca.to_torch(torch.float64)
    assert np.allclose(layer(torch.from_numpy(latents)).numpy(), pca.transform(latents), atol=1e-12)
    again = projection_from_arrays(pca.to_arrays())
    assert isinstance(again, PCAProjection) and np.array_equal(again.components_, pca.components_)
    assert np.allclose(again.transform(latents), pca.transform(latents))
    broken = dict(pca.to_arrays(), components=pca.components_ * 1.01)
    with pytest.raises(ModelFileError, match="orthonormal"):
        PCAProjection.from_arrays(broken)
    with pytest.raises(ModelFileError, match="missing"):
        PCAProjection.from_arrays({"mean": pca.mean_})


def test_identity_projection(latents):
    none = make_projection("none").fit(latents)
    assert isinstance(none, IdentityProjection) and np.array_equal(none.transform(latents), latents)
    assert isinstance(projection_from_arrays(none.to_arrays()), IdentityProjection)
    assert none.to_torch()(torch.ones(2, 3, 4)).shape == (2, 12)


def test_bad_input(latents):
    with pytest.raises(DataError, match="n_components"):
        PCAProjection(13).fit(latents)
    with pytest.raises(DataError, match="not fitted"):
        PCAProjection(2).transform(latents)
    bad = latents.copy()
    bad[0, 0] = np.nan
    with pytest.raises(DataError, match="NaN"):
        PCAProjection(2).fit(bad)
    with pytest.raises(DataError, match="features"):
        PCAProjection(2).fit(latents).transform(latents[:, :5])
    with pytest.raises(DataError, match="projection must be"):
        make_projection("lda")
