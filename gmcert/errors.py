"""Errors that name the problem. The CLI turns each into one line on stderr and exit code 2."""


class GmcertError(Exception):
    """Base class: a user-facing problem with input, files or environment."""


class DataError(GmcertError, ValueError):
    """Bad input data: NaN/inf, wrong shape, unknown labels, too few samples, unreadable images."""


class ModelFileError(GmcertError, ValueError):
    """A model file that cannot be used. ``reason`` is one of
    ``missing``, ``corrupt``, ``truncated``, ``foreign``, ``newer_version``."""

    def __init__(self, path, reason, detail=""):
        self.path, self.reason = str(path), reason
        super().__init__(f"{path}: {reason.replace('_', ' ')} model file" + (f": {detail}" if detail else ""))


class WeightsUnavailableError(GmcertError, RuntimeError):
    """Pretrained weights are neither cached nor downloadable; the message says how to supply them."""


class OutputPathError(GmcertError, ValueError):
    """An output path that cannot take what a command writes: a folder where a file goes (or the
    reverse), a parent that is a file, or a folder of someone else's that would be replaced."""


class LipschitzUnsupportedError(GmcertError, TypeError):
    """No sound bound is known for a module type (use the ``estimate`` kind)."""
