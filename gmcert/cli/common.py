"""What the ``gmcert`` commands share: defaults, option parsers, the accuracy table."""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np

from gmcert.errors import DataError

DEFAULT_MODEL = "runs/default"
DEFAULT_TRAINED = "runs/trained"
DEFAULT_RADII = "0,0.05,0.1,0.25,0.5,0.75,1,1.5,2"
DEFAULT_CACHE = str(Path("~/.cache/gmcert/latents").expanduser())
#: what a certify TSV's rows depend on: a resumed run (or another rank) must share them
CERTIFY_SETTINGS = ("method", "lipschitz", "fallback", "target_radius", "mismatch_threshold", "route_threshold",
                    "calibrate", "sigma", "alpha", "max_samples", "seed", "n0", "n_samples", "serialized", "steps",
                    "warmup_interval", "audit_size", "verify", "data", "latents")


def _radii(text: str) -> list[float]:
    try:
        radii = [float(r) for r in text.split(",") if r.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"radii must be comma-separated numbers: {err}") from None
    if not radii or any(not np.isfinite(r) or r < 0 for r in radii):
        raise argparse.ArgumentTypeError(f"radii must be finite and >= 0, got {text!r}")
    return radii


def _shrinkage(text: str):
    if text in ("ledoit_wolf", "oas"):
        return text
    if text == "none":
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"shrinkage must be ledoit_wolf, oas, none or a float in [0, 1], got {text!r}")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line, like gmcert's own, and the same exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


from gmcert.data.sources import DATA_HELP, DATA_ROOT_HELP  # noqa: E402  (beside the specs they describe)


def _add_data_args(p, latents_help):
    group = p.add_mutually_exclusive_group()
    group.add_argument("--latents", help=latents_help)
    group.add_argument("--data", help=DATA_HELP)
    p.add_argument("--data-root", default=None, help=DATA_ROOT_HELP)
    p.add_argument("--download", action="store_true", help="allow downloading CIFAR-10 or Fashion-MNIST via torchvision")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--cache-dir", default=DEFAULT_CACHE, help="latent cache directory ('' to disable)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N inputs")


def _integers(text: str, option: str) -> list[int]:
    try:
        return [int(float(n)) for n in text.split(",") if n.strip()]
    except (ValueError, OverflowError):
        raise DataError(f"{option} must be comma-separated integers like 1e3,1e4, got {text!r}") from None


def _accuracy_table(radii, latent_acc, input_acc, kind) -> str:
    """Certified accuracy per radius; ``latent_acc`` None: smoothing only, no latent column."""
    latent = f"  {'certified acc (latent)':>22}" if latent_acc is not None else ""
    lines = [f"{'radius':>8}{latent}  {'certified acc (input, ' + kind + ')':>30}"]
    lines += [f"{r:>8.3g}" + (f"  {a:>22.4f}" if latent else "") + f"  {b:>30.4f}"
              for r, a, b in zip(radii, latent_acc if latent else input_acc, input_acc)]
    return "\n".join(lines)


def _encoder_channels(encoder: str):
    """The channels an encoder takes: its card's (gmcert_cnn: 1), none to convert for raw pixels."""
    if encoder in ("identity", "none"):
        return None
    from gmcert.encoders.cards import load_card

    return load_card(encoder).input_size[0]
