"""User-facing errors.

A `UserError` is bad input (an unknown name, a missing dataset, a checkpoint that does not fit):
the CLIs print its message as one clear line and exit with status 2 instead of a traceback wall.
"""


class UserError(Exception):
    """Bad input from the user; the message alone must say what is wrong and how to fix it."""


class UnknownNameError(UserError, KeyError):
    """A name that is not in a registry; the message lists the valid names."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class RunStopped(Exception):
    """A run that stopped early for a reason its message says in one line (a signal, a full disk, a
    diverged loss). The run directory already records it (summary.json status, error.txt for failures);
    the CLIs print the message without a traceback and exit with `exit_code` (130 SIGINT, 143 SIGTERM,
    1 a failed run)."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code
