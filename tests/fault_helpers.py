"""Helpers of the fault-injection tests: run the real `fastcell` entry point in-process, snapshot files.

`cli_runner` (made a fixture by each test module: `cli = pytest.fixture(cli_runner)`) runs `fastcell.cli.run` (the console entry point, with its error boundary) on
the given arguments and returns the exit status and the printed output, so a test asserts the
message a user sees and the status a script gets. `snapshot(*roots)` hashes every file under the
roots, so a test asserts that every byte that existed before a failed command is still there.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from fastcell.cli import run


@dataclass
class Outcome:
    code: int
    out: str
    err: str


def cli_runner(capsys, monkeypatch):
    """`cli(*args) -> Outcome`: `fastcell ARGS` through the console entry point, in this process."""

    def invoke(*args) -> Outcome:
        monkeypatch.setattr(sys, "argv", ["fastcell", *map(str, args)])
        capsys.readouterr()
        with pytest.raises(SystemExit) as exited:
            run()
        printed = capsys.readouterr()
        code = exited.value.code
        return Outcome(0 if code is None else int(code), printed.out, printed.err)

    return invoke


def snapshot(*roots: Path) -> dict[str, str]:
    """{path: SHA-256} of every file under the roots (a root may be a file; missing roots hold nothing)."""
    files = []
    for root in map(Path, roots):
        files += [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def assert_refused(outcome: Outcome, *fragments: str) -> None:
    """Exit status 2, no traceback, and the output ends with one `fastcell: error:` line (after any
    progress bar) holding every fragment."""
    assert outcome.code == 2, (outcome.code, outcome.out, outcome.err)
    assert "Traceback" not in outcome.err, outcome.err
    assert "fastcell: error: " in outcome.err, outcome.err
    message = outcome.err[outcome.err.index("fastcell: error: "):]
    assert message.count("\n") == 1 and message.endswith("\n"), message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
