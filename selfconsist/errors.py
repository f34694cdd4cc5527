"""User-facing errors.

Anything raised as a :class:`SelfconsistError` is a problem with the user's input
(a bad file, a wrong option, an unsupported model). The CLI prints it as one red
line on stderr and exits with code 2; only ``--debug`` shows the traceback.
"""

from __future__ import annotations


class SelfconsistError(Exception):
    """An error the user can fix. The message should say how."""


class CheckpointError(SelfconsistError):
    """A model file is missing, corrupt, truncated or not in a format we know."""


class UnsupportedModelError(SelfconsistError):
    """The model loads, but selfconsist cannot make it self-consistent."""


class DataError(SelfconsistError):
    """A dataset is missing, empty, unreadable or has the wrong shape."""


class NonFiniteLossError(SelfconsistError):
    """Training produced a NaN or Inf loss."""
