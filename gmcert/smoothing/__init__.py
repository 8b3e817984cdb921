"""Randomized smoothing: the smoother of any torch classifier (``smoother``), the anytime-valid
sequential engine (``sequential``) and the confidence bounds (``stats``).

``sequential`` and ``stats`` are pure numpy and SciPy; only ``smoother`` needs torch, so its names
load on first use and ``import gmcert.smoothing.stats`` stays torch-free.
"""
_SMOOTHER = ("Smoother", "Prior", "UniformPrior", "HeadPrior", "MetaPrior", "PilotDraws", "pilot_probit")

__all__ = list(_SMOOTHER)


def __getattr__(name):
    if name in _SMOOTHER:
        from gmcert.smoothing import smoother

        return getattr(smoother, name)
    raise AttributeError(f"module 'gmcert.smoothing' has no attribute {name!r}")
