"""Fan-out on a Dask cluster: the same small interface as `fastcell.pool.process_pool`.

`dask_pool(spec, initializer, initargs)` yields distributed's `concurrent.futures` executor (whose
`submit(fn, *args)` returns a `concurrent.futures.Future`; wrapped so that a task's user error arrives
as itself, `_chainless`) and the cluster's thread count, so code written for the process pool (`submit`,
`wait`) runs unchanged on:

- `local:N`: a `LocalCluster` of N single-threaded worker processes, started here and closed on exit;
- any other spec: the address of a running scheduler (`tcp://host:8786`, e.g. one started by
  dask-jobqueue on a Slurm cluster); it is connected to within `CONNECT_TIMEOUT` seconds, and must
  have a worker within `WORKERS_TIMEOUT` seconds, else an `EnvironmentProblem` names the problem.

`initializer(*initargs)` runs once in every worker process, including those that join or restart
later (a worker plugin), as the process pool's initializer does. A worker that dies mid-task has its
tasks rerun elsewhere by the scheduler; a task whose workers keep dying (`allowed-failures`, 3 by
default) fails with an `EnvironmentProblem` (`result_of`: the process pool's, plus that). Tasks must
therefore be idempotent (fastcell's write their outputs atomically), and the workers must see the
same files (a shared filesystem).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import re
from collections.abc import Callable, Iterator
from concurrent.futures import Future

from distributed import KilledWorker, WorkerPlugin

from fastcell import pool
from fastcell.errors import EnvironmentProblem, FastcellError, InputError

CONNECT_TIMEOUT = 10  # seconds to reach a scheduler before giving up
WORKERS_TIMEOUT = 10  # seconds, once connected, for the scheduler to have a worker
LOCAL_SPEC = re.compile(r"^local:(\d+)$")


def check_spec(spec: str) -> None:
    """InputError unless `spec` is `local:N` (N >= 1) or looks like a scheduler address."""
    local = LOCAL_SPEC.match(spec)
    if local is not None:
        if int(local.group(1)) < 1:
            raise InputError(f"--dask {spec}: a local cluster needs at least 1 worker (local:N, N >= 1)")
    elif spec.startswith("local") or not spec.strip() or any(c.isspace() for c in spec):
        raise InputError(
            f"--dask {spec!r}: expected local:N (a local cluster of N worker processes) or a scheduler "
            "address such as tcp://host:8786"
        )


def result_of(future: Future):
    """`fastcell.pool.result_of`; a task that kept killing its workers (distributed's KilledWorker, raised
    once the scheduler's allowed-failures are spent) as an EnvironmentProblem."""
    try:
        return pool.result_of(future)
    except KilledWorker as err:
        raise EnvironmentProblem(
            f"Dask workers kept dying while running {err.task}; out of memory? rerun the same command to resume"
        ) from None


def _chainless(fn: Callable) -> Callable:
    """`fn` (same name: Dask keys and messages name the task), raising its user errors without their causes.
    distributed pickles an error with its whole chain; one cause it cannot pickle (an aiohttp response error
    behind an unreadable remote chunk) turns the error into a bare `Exception` naming it, which no longer
    reads as an InputError (not skipped by --on-error skip, a traceback). The process pool drops causes too."""

    @functools.wraps(fn)
    def task(*args):
        try:
            return fn(*args)
        except (FastcellError, OSError) as err:
            err.__cause__ = err.__context__ = None
            raise

    return task


class _Executor:
    """distributed's `concurrent.futures` executor, running each task through `_chainless`."""

    def __init__(self, executor):
        self._executor = executor

    def submit(self, fn: Callable, *args) -> Future:
        return self._executor.submit(_chainless(fn), *args)


class _Initializer(WorkerPlugin):
    """A worker plugin that runs `initializer(*initargs)` in each worker process when it starts."""

    name = "fastcell-initializer"

    def __init__(self, initializer: Callable, initargs: tuple):
        self.initializer, self.initargs = initializer, initargs

    def setup(self, worker) -> None:
        self.initializer(*self.initargs)


@contextlib.contextmanager
def dask_pool(spec: str, initializer: Callable | None = None, initargs: tuple = ()) -> Iterator[tuple]:
    """(executor, task slots) on the cluster `spec` names (see the module doc): distributed's
    `concurrent.futures` executor (through `_Executor`) and the number of worker threads, for sizing how
    many tasks to keep in flight; closed (and a local cluster stopped, its workers with it) on exit."""
    check_spec(spec)
    from distributed import Client, LocalCluster

    local = LOCAL_SPEC.match(spec)
    with contextlib.ExitStack() as stack:
        if local is not None:
            cluster = stack.enter_context(LocalCluster(
                n_workers=int(local.group(1)), threads_per_worker=1, processes=True, dashboard_address=None,
                silence_logs=logging.ERROR,
            ))  # fmt: skip
            client = stack.enter_context(Client(cluster))
        else:
            try:
                client = stack.enter_context(Client(spec, timeout=CONNECT_TIMEOUT))
            except (OSError, TimeoutError, ValueError) as err:
                raise EnvironmentProblem(
                    f"cannot reach the Dask scheduler at {spec} within {CONNECT_TIMEOUT} s ({err}); "
                    "is it running, and is the address right?"
                ) from None
        if initializer is not None:
            client.register_plugin(_Initializer(initializer, initargs))
        try:
            client.wait_for_workers(1, timeout=WORKERS_TIMEOUT)
        except TimeoutError:
            raise EnvironmentProblem(
                f"the Dask scheduler at {spec} has no workers (waited {WORKERS_TIMEOUT} s); start some"
            ) from None
        yield _Executor(client.get_executor(pure=False)), sum(client.nthreads().values())
