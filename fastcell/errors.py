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


def without_worker_traceback(err: BaseException) -> BaseException:
    """`err` without the worker traceback that torch's DataLoader writes into a re-raised worker error.

    A worker's `InputError("x.tar: member ... is corrupt")` reaches the main process as
    `InputError("Caught InputError in DataLoader worker process 0.\\nOriginal Traceback ...")`;
    this returns an error of the same type holding only the worker's own message.
    """
    import re

    text = str(err)
    if "Original Traceback" not in text:
        return err
    found = list(re.finditer(rf"^(?:[\w.]+\.)?{re.escape(type(err).__name__)}: ", text, re.MULTILINE))
    if not found:
        return err
    try:
        return type(err)(text[found[-1].end():].strip())
    except TypeError:  # an exception type that needs other arguments
        return err
