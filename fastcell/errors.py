"""User-facing errors.

Raise `FastcellError` (or a subclass) for anything a user can fix: a missing file, a corrupt
image, a shard without its index. The message must name the file and the problem. The CLI
prints it without a traceback and exits with status 2; library callers can catch it.

`describe_os_error` does the same for what the operating system refuses (a full disk, a folder
without write permission, a path through a file): the CLI prints those as user errors too.
"""

from __future__ import annotations

import errno


class FastcellError(Exception):
    """A problem with the user's input or environment, explained in the message."""


class InputError(FastcellError):
    """Bad input data: a missing, unreadable or inconsistent file or table."""


class EnvironmentProblem(FastcellError):
    """Something the machine lacks: DALI not installed, no GPU where one was asked for."""


# OS conditions a user causes and can fix (errno -> what to say); any other OSError is a bug.
_USER_OS_ERRORS = {
    errno.ENOSPC: "the disk is full (no space left on the device)",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "the file system is read-only",
    errno.EISDIR: "is a folder, not a file",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EEXIST: "already exists",
    errno.ENOENT: "no such file or folder",
    errno.ENAMETOOLONG: "the name is too long",
    errno.EIO: "input/output error (a failing disk or a lost network mount?)",
    errno.EMFILE: "too many open files (raise `ulimit -n`)",
}


def describe_os_error(err: OSError) -> str | None:
    """`<path>: <problem>` for an OSError a user can fix (full disk, permissions, ...); None for others."""
    problem = _USER_OS_ERRORS.get(err.errno)
    if problem is None:
        return None
    paths = [str(p) for p in (err.filename, err.filename2) if p is not None]
    return f"{' -> '.join(paths)}: {problem}" if paths else problem


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
