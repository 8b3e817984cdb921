"""The Gaussian-mixture head and its latent certificates: sufficient statistics and shrinkage
(``moments``), the classifier (``mixture``), exact and closed-form latent radii (``certificates``,
``dual``) and the ``.npz`` + JSON model format (``modelio``). Pure numpy and SciPy: no torch."""
from gmcert.latent.mixture import GaussianMixtureClassifier

__all__ = ["GaussianMixtureClassifier"]
