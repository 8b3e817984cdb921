"""Moved to :mod:`gmcert.bounds.ball_rounding` (the layout split: networks, bounds, encoders); this old path
is that same module, so existing imports keep working."""
import sys

from gmcert.bounds import ball_rounding as _moved

sys.modules[__name__] = _moved
