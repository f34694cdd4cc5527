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


class Interrupted(SelfconsistError):
    """A run stopped on SIGINT or SIGTERM, after saving what it could.

    ``exit_code`` is 128 + the signal number (130 for SIGINT, 143 for SIGTERM), as shells
    report a process ended by that signal. ``step`` is the step the saved state resumes from
    (``None`` when nothing was saved) and ``state_file`` where it is.
    """

    def __init__(self, message: str, signum: int, step: int | None = None,
                 state_file: object = None) -> None:
        super().__init__(message)
        self.signum, self.step, self.state_file = signum, step, state_file

    @property
    def exit_code(self) -> int:
        return 128 + self.signum
