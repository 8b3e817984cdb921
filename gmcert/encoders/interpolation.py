"""Moved to :mod:`gmcert.bounds.interpolation` (the layout split: networks, bounds, encoders); this old path
is that same module, so existing imports keep working."""
import sys

from gmcert.bounds import interpolation as _moved

sys.modules[__name__] = _moved
