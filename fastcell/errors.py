"""User-facing errors.

Raise `FastcellError` (or a subclass) for anything a user can fix: a missing file, a corrupt
image, a shard without its index. The message must name the file and the problem. The CLI
prints it without a traceback and exits with status 2; library callers can catch it.
"""


class FastcellError(Exception):
    """A problem with the user's input or environment, explained in the message."""


class InputError(FastcellError):
    """Bad input data: a missing, unreadable or inconsistent file or table."""


class EnvironmentProblem(FastcellError):
    """Something the machine lacks: DALI not installed, no GPU where one was asked for."""
