"""The one result type shared by every certification path.

Whether an input was certified in closed form from the Gaussian-mixture head or by randomized
smoothing, it ends up as a :class:`Certificate`. ``report.py`` and ``gmcert compare`` treat all
methods alike because of this.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

ABSTAIN = -1

#: How much an input-space radius can be trusted.
#: ``exact``: the true radius of the stated classifier, up to float rounding shaved downward.
#: ``bound``: a sound lower bound on the true radius (a certificate, maybe loose).
#: ``estimate``: NOT a certificate (e.g. a CLEVER-style local Lipschitz estimate).
#: ``probabilistic``: a smoothing certificate, sound with probability >= 1 - alpha.
RADIUS_KINDS = ("exact", "bound", "estimate", "probabilistic")
SOUND_KINDS = ("exact", "bound", "probabilistic")
#: Which route served an input: the closed form, smoothing, or (hybrid only) both, where the
#: arithmetic could not tell the route (see gmcert.hybrid).
PATHS = ("closed_form", "smoothing", "band")


@dataclass
class Certificate:
    """One input's certified prediction.

    Attributes
    ----------
    prediction : int
        Predicted class index, or ``ABSTAIN`` (-1).
    radius : float
        Certified input-space L2 radius; 0.0 when abstaining or not certified.
    radius_kind : str
        One of ``RADIUS_KINDS``.
    path : str
        ``closed_form``, ``smoothing`` or ``band``.
    samples : int
        Model evaluations spent on this input (1 for the closed form).
    stop_reason : str
        Why the procedure stopped (``closed_form``, ``fixed_n``, ``target_certified``, ...).
    latent_radius : float
        Certified latent radius for the closed form; NaN for smoothing.
    time : float
        Wall-clock seconds spent on this input.
    """

    prediction: int
    radius: float
    radius_kind: str
    path: str
    samples: int = 1
    stop_reason: str = "closed_form"
    latent_radius: float = math.nan
    time: float = 0.0
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.radius_kind not in RADIUS_KINDS:
            raise ValueError(f"radius_kind must be one of {RADIUS_KINDS}, got {self.radius_kind!r}")
        if self.path not in PATHS:
            raise ValueError(f"path must be one of {PATHS}, got {self.path!r}")

    @property
    def abstained(self) -> bool:
        return self.prediction == ABSTAIN

    @property
    def sound(self) -> bool:
        """True when ``radius`` is a certificate rather than an estimate."""
        return self.radius_kind in SOUND_KINDS

    def in_image_units(self, scale: float) -> "Certificate":
        """This certificate with its radius (and ``extra["radius_upper"]``) on the images the user
        gave rather than on the model's input: ``scale`` is :attr:`gmcert.inputs.Inputs.radius_scale`
        (1 / sqrt(3) for grey images repeated to RGB). A no-op at 1."""
        if scale == 1.0:
            return self
        extra = dict(self.extra)
        if "radius_upper" in extra:
            extra["radius_upper"] = float(extra["radius_upper"]) * scale
        extra["radius_scale"] = scale
        return replace(self, radius=float(self.radius) * scale, extra=extra)

    def as_dict(self) -> dict:
        return asdict(self)
