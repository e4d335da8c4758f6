"""Inputs by URL: fsspec URLs (`s3://`, `https://`, `gs://`, ...) wherever a local input path is accepted.

A location with a scheme becomes a `upath.UPath` (pathlib's interface over fsspec, picklable, so
the workers that read the pixels open the URLs themselves); anything else stays a `pathlib.Path`.
Credentials and endpoints are fsspec's: the usual provider configuration (AWS_* variables,
~/.aws) or fsspec's `FSSPEC_<PROTOCOL>_<OPTION>` environment variables, e.g. `FSSPEC_S3_ANON=true`
for a public bucket, `FSSPEC_S3_ENDPOINT_URL=http://host:9000` for another S3 server.
`read_bytes` turns a missing object or refused credentials into an `InputError` naming the URL.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from fastcell.errors import InputError

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_url(location: str | os.PathLike) -> bool:
    return not isinstance(location, Path) and bool(_SCHEME.match(str(location)))


def as_path(location: str | os.PathLike) -> Any:
    """A `UPath` for a URL (a remote path), else a `Path`."""
    if is_url(location):
        from upath import UPath

        return UPath(str(location))
    return Path(location)


def is_remote(path: Any) -> bool:
    return not isinstance(path, Path)


def join(root: Any, relative: str) -> Any:
    """`relative` (a path from a table) resolved against `root`; URLs and absolute local paths stand alone."""
    if is_url(relative) or os.path.isabs(relative):
        return as_path(relative)
    return root / relative


def resolved(path: Any) -> str:
    """The path as recorded in manifests: absolute when local, the URL when remote."""
    return str(path) if is_remote(path) else str(Path(path).resolve())


def read_bytes(path: Any) -> bytes:
    """A remote file's content; InputError naming it when it is missing, forbidden or unreachable."""
    try:
        return path.read_bytes()
    except FileNotFoundError as err:
        status = _http_status(err)
        if status is not None and status != 404:
            raise InputError(f"{path}: cannot read (the server answered HTTP {status})") from None
        raise InputError(f"{path}: not found") from None
    except PermissionError as err:
        raise InputError(
            f"{path}: access refused ({err}); check the credentials (AWS_* variables, ~/.aws), or read a "
            "public bucket anonymously with FSSPEC_S3_ANON=true"
        ) from None
    except (OSError, ValueError) as err:
        raise InputError(f"{path}: cannot read ({type(err).__name__}: {err})") from None
    except Exception as err:  # an HTTP error in mid-read (aiohttp's, once fsspec found the file)
        status = _http_status(err)
        if status is None:
            raise
        problem = "not found" if status == 404 else f"cannot read (the server answered HTTP {status})"
        raise InputError(f"{path}: {problem}") from None


def _http_status(err: BaseException) -> int | None:
    """The HTTP status of the failed request behind `err`, if any: fsspec's HTTP reader turns every failure
    (403, 500, 503, ...) into a FileNotFoundError, which must not be reported as a missing file."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        status = getattr(err, "status", None)
        if isinstance(status, int):
            return status
        err = err.__cause__ or err.__context__
    return None
