"""Atomic file writes: a file appears complete under its final name, or not at all.

Everything fastcell writes (shards, indices, manifests, checkpoints, embeddings, reports)
goes through `atomic_path`: the content is written under a temporary name in the same folder
and renamed into place, so an interrupted run never leaves a half-written file that a rerun
would take as complete. A write that fails (a full disk) leaves nothing behind and its OSError
names the file being written, so the CLI can say which. `output_folder` makes an output folder
or says clearly why it cannot (`check_output_folder` only says).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fastcell.errors import InputError


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success fsync and rename it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:  # it names a random temporary file: name the folder instead
        raise type(err)(err.errno, err.strerror, str(path.parent)) from None
    os.close(fd)
    tmp = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the final file the usual mode
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        if err.filename is None or err.filename == str(tmp):  # name the file being written, not its temporary
            raise type(err)(err.errno, err.strerror, str(path)) from err
        raise
    finally:
        tmp.unlink(missing_ok=True)


def check_output_folder(path: str | os.PathLike, holds: str | None = None) -> Path:
    """InputError when `path` cannot be an output folder: it, or a folder above it, is a file.

    Verbs that write only at the end (embed, eval, compare) call it before their work, so a bad --out
    fails at once; `holds` says what the folder is for, in the message.
    """
    path = Path(path)
    blocker = next((p for p in (path, *path.parents) if os.path.lexists(p) and not p.is_dir()), None)  # links too
    if blocker == path:
        if holds is not None:
            raise InputError(f"{path}: exists and is not a folder; --out names a folder (for {holds})")
        raise InputError(f"{path}: exists and is a file, not a folder; choose another output folder")
    if blocker is not None:
        raise InputError(f"{path}: cannot make the folder: {blocker} is a file")
    return path


def output_folder(path: str | os.PathLike) -> Path:
    """Create the output folder `path` (and its parents); InputError when a file stands in the way."""
    path = check_output_folder(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):  # a file made meanwhile: the same message as before the work
        check_output_folder(path)
        raise
    return path


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def remove_unfinished_writes(folder: str | os.PathLike, name: str = "*") -> None:
    """Delete the temporary files `atomic_path` left in `folder` for `name` (a glob; default: every file) when its
    process was killed before the rename."""
    for stale in Path(folder).glob(f".{name}.*.tmp"):
        stale.unlink(missing_ok=True)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write `obj` as indented JSON, atomically."""
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def sha256_of(paths) -> str:
    """SHA-256 over the bytes of the files in order (read in 1 MiB blocks): the identity of an input
    (local paths or fsspec/UPath objects); InputError naming a file that cannot be read."""
    digest = hashlib.sha256()
    for path in paths:
        path = path if hasattr(path, "open") else Path(path)
        try:
            with path.open("rb") as f:
                while block := f.read(1 << 20):
                    digest.update(block)
        except OSError as err:
            raise InputError(f"{path}: cannot read ({err.strerror or err})") from err
    return digest.hexdigest()
