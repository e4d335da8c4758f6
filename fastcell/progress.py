"""Progress bars of the verbs that fan out over a pool (`shard`, `synth`): one rich bar per pass."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


class Progress:
    """One rich progress bar per `track`ed pass, or nothing when disabled."""

    def __init__(self, enabled: bool):
        self._progress = None
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self._progress = RichProgress(
                TextColumn("{task.description:<24}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()
            )

    def __enter__(self) -> Progress:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.stop()

    def track(self, results: Iterable[T], total: int, description: str) -> Iterator[T]:
        """`results` as they come, advancing a bar of `total` steps named `description`."""
        if self._progress is None:
            yield from results
            return
        task = self._progress.add_task(description, total=total)
        for result in results:
            self._progress.advance(task)
            yield result
