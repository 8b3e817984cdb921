"""Moved to :mod:`gmcert.networks.cdeq` (the layout split: networks, bounds, encoders); this old path
is that same module, so existing imports keep working."""
import sys

from gmcert.networks import cdeq as _moved

sys.modules[__name__] = _moved
