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
