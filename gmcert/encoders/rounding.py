"""Moved to :mod:`gmcert.bounds.rounding` (the layout split: networks, bounds, encoders); this old path
is that same module, so existing imports keep working."""
import sys

from gmcert.bounds import rounding as _moved

sys.modules[__name__] = _moved
