"""gmcert: certified L2 robustness from Gaussian-mixture heads on pretrained encoders."""
from gmcert.errors import DataError, GmcertError, ModelFileError, WeightsUnavailableError
from gmcert.results import ABSTAIN, Certificate

__version__ = "0.1.0"

# Heavy modules (torch, timm) load only when their names are first used.
_LAZY = {
    "GaussianMixtureClassifier": "gmcert.latent.mixture",
    "load_encoder": "gmcert.encoders.cards",
    "Pipeline": "gmcert.pipeline",
    "Smoother": "gmcert.smoothing.smoother",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'gmcert' has no attribute {name!r}")


__all__ = [
    "ABSTAIN", "Certificate", "DataError", "GaussianMixtureClassifier", "GmcertError",
    "ModelFileError", "Pipeline", "Smoother", "WeightsUnavailableError", "load_encoder", "__version__",
]
