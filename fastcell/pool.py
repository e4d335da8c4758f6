"""Worker process pools that end with their parent and report errors, not worker tracebacks.

`process_pool` wraps `ProcessPoolExecutor` for the verbs that fan out over fields (`shard`,
`synth`):

- workers ignore Ctrl-C (the terminal sends it to every process; the parent stops the pool) and
  exit as soon as the process that started the pool is gone, even when it was killed with SIGKILL
  (a thread waits on its pidfd; Linux's PR_SET_PDEATHSIG would not do, as forkserver workers are
  children of the server, which lives as long as they do), so a killed run leaves no process behind;
- the workers are started before the pool is handed out, with SIGINT and SIGTERM deferred until
  all are spawned (a signal that comes meanwhile is raised right after); then SIGTERM in the parent
  raises KeyboardInterrupt, so it unwinds like Ctrl-C;
- leaving the pool with an exception terminates the workers at once instead of waiting for their
  tasks, and waits for them to end (a worker still starting up when the parent's semaphores
  vanish would print a traceback of its own);
- `result_of` re-raises a worker's user error (FastcellError, OSError) without the worker's
  traceback, and turns a worker that died into a message.

`WorkerPool` is the one seam the fan-out verbs use: `with WorkerPool(workers, init, args) as pool:
pool.run(fn, tasks)` yields `fn(*task)` for every task in completion order, in worker processes (or
in the calling process with one worker; or on a Dask cluster with `dask=`, `fastcell.dask_pool`,
whose executor has the process pool's `submit`, and whose `result_of` also names a task that kept
killing its workers).
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import select
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool

from fastcell.errors import EnvironmentProblem, FastcellError


def _exit_with(pid: int) -> None:
    """Wait for process `pid` to end, then end this process at once (a daemon thread's body)."""
    try:
        fd = os.pidfd_open(pid)  # Linux >= 5.3: readable when the process ends, no pid-reuse race
    except (AttributeError, OSError):
        fd = None
    if fd is not None:
        select.select([fd], [], [])
    else:
        while True:
            time.sleep(0.5)
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
    os._exit(1)


def _start_worker(parent: int, initializer: Callable | None, *initargs) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    threading.Thread(target=_exit_with, args=(parent,), daemon=True, name="fastcell-exit-with-parent").start()
    if initializer is not None:
        initializer(*initargs)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Run the body with SIGINT and SIGTERM noted, not acted on; raise KeyboardInterrupt after it if one came.
    (Blocking them would not do: Python runs handlers in the main thread for signals any thread takes.)"""
    received: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: received.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}  # fmt: skip
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if received:
        raise KeyboardInterrupt(f"signal {received[0]}")


@contextlib.contextmanager
def process_pool(
    workers: int,
    initializer: Callable | None = None,
    initargs: tuple = (),
    *,
    preload: Iterable[str] | None = None,
) -> Iterator[ProcessPoolExecutor]:
    """A `ProcessPoolExecutor` of `workers` processes that ends with the caller (see the module doc).

    With `preload`, workers fork from a forkserver (spawn where there is none) that imported those
    modules once: safe beside threads; otherwise the platform's default start method.
    """
    context = mp.get_context()
    if preload is not None:
        method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
        context = mp.get_context(method)
        if method == "forkserver":
            context.set_forkserver_preload(list(preload))
    executor = ProcessPoolExecutor(
        max_workers=workers,
        mp_context=context,
        initializer=_start_worker,
        initargs=(os.getpid(), initializer, *initargs),
    )
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if main_thread else None
    try:
        with _signals_deferred() if main_thread else contextlib.nullcontext():
            for future in [executor.submit(os.getpid) for _ in range(workers)]:
                result_of(future)
        yield executor
    except BaseException:
        processes = list((executor._processes or {}).values())  # no public way before Python 3.14
        for process in processes:
            process.terminate()
        for process in processes:
            process.join(timeout=10)
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


class WorkerPool:
    """Runs `fn(*task)` over tasks in `workers` processes (or, with one worker, the calling process).

    `initializer(*initargs)` runs once in every worker, and in the calling process too, so tasks
    find the same state either way; `preload` names modules the workers import once (see
    `process_pool`). `startup_seconds` is the time spent starting the workers.
    """

    def __init__(
        self,
        workers: int,
        initializer: Callable | None = None,
        initargs: tuple = (),
        *,
        preload: Iterable[str] | None = None,
        dask: str | None = None,
    ):
        self.workers = workers
        self._initializer, self._initargs, self._preload, self._dask = initializer, initargs, preload, dask
        self._executor = None  # a ProcessPoolExecutor or `dask_pool`'s wrap of distributed's executor
        self._result_of = result_of  # a finished task's result or its error, as the executor reports them
        self._stack = contextlib.ExitStack()
        self.startup_seconds = 0.0

    def __enter__(self) -> WorkerPool:
        start = time.perf_counter()  # workers start now, so the callers' pass timings measure work
        if self._dask is not None:
            from fastcell import dask_pool

            self._result_of = dask_pool.result_of
            self._executor, self.workers = self._stack.enter_context(  # 4 tasks per worker thread in flight
                dask_pool.dask_pool(self._dask, self._initializer, self._initargs))
        elif self.workers > 1:
            self._executor = self._stack.enter_context(
                process_pool(self.workers, self._initializer, self._initargs, preload=self._preload)
            )
        elif self._initializer is not None:
            self._initializer(*self._initargs)  # one worker: the calling process runs the tasks itself
        self.startup_seconds = time.perf_counter() - start
        return self

    def __exit__(self, *exc) -> bool:
        return self._stack.__exit__(*exc)

    def run(self, fn: Callable, tasks: Sequence[tuple]) -> Iterator:
        """fn(*task) for every task, in completion order (at most 4 tasks per worker in flight)."""
        if self._executor is None:
            for task in tasks:
                yield fn(*task)
            return
        pending: set = set()
        position = 0
        while position < len(tasks) or pending:
            while position < len(tasks) and len(pending) < 4 * self.workers:
                pending.add(self._executor.submit(fn, *tasks[position]))
                position += 1
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                yield self._result_of(future)
