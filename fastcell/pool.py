"""Worker process pools that end with their parent and report errors, not worker tracebacks.

`process_pool` wraps `ProcessPoolExecutor` for the verbs that fan out over fields (`shard`,
`synth`):

- workers ignore Ctrl-C (the terminal sends it to every process; the parent stops the pool) and,
  on Linux, are sent SIGTERM when the process that started them dies, so a killed run leaves no
  worker behind (`PR_SET_PDEATHSIG`; with the forkserver start method the server itself exits
  when the parent dies);
- while the pool runs, SIGTERM in the parent raises KeyboardInterrupt, so it unwinds like Ctrl-C;
- leaving the pool with an exception terminates the workers at once instead of waiting for them;
- `result_of` re-raises a worker's user error (FastcellError, OSError) without the worker's
  traceback, and turns a worker that died into a message.
"""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import signal
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager

from fastcell.errors import EnvironmentProblem, FastcellError

_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with_parent() -> None:
    """Ask Linux to SIGTERM this process when its parent exits (no-op elsewhere)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def _start_worker(initializer: Callable | None, *initargs) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _die_with_parent()
    if initializer is not None:
        initializer(*initargs)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextmanager
def process_pool(
    workers: int,
    initializer: Callable | None = None,
    initargs: tuple = (),
    *,
    preload: Iterable[str] = (),
) -> Iterator[ProcessPoolExecutor]:
    """A `ProcessPoolExecutor` of `workers` processes (forkserver when available, `preload` modules
    imported once by the server) that ends with the caller; see the module doc."""
    method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
    context = mp.get_context(method)
    if method == "forkserver" and preload:
        context.set_forkserver_preload(list(preload))
    executor = ProcessPoolExecutor(
        max_workers=workers, mp_context=context, initializer=_start_worker, initargs=(initializer, *initargs)
    )
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if main_thread else None
    try:
        yield executor
    except BaseException:
        for process in list((executor._processes or {}).values()):  # no public way before Python 3.14
            process.terminate()
        executor.shutdown(wait=False, cancel_futures=True)
        raise
    else:
        executor.shutdown(wait=True)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def result_of(future: Future):
    """The future's result; a worker's user error re-raised as itself, without the worker's traceback."""
    try:
        return future.result()
    except (FastcellError, OSError) as err:
        raise err.with_traceback(None) from None
    except BrokenProcessPool:
        raise EnvironmentProblem(
            "a worker process died (killed, or out of memory?); rerun the same command to resume, "
            "with fewer --workers if memory is short"
        ) from None
