"""Load ahead of the consumer: a background thread runs an epoch's batches `depth` batches ahead.

On CUDA the producer thread issues its work (DALI's copies into torch, the views' kernels) on a
stream of its own, and each batch is handed over with an event the consumer's stream waits on:
loading and augmenting the next batch overlaps the training step on the GPU, and the consumer
never blocks the host for it. Errors in the producer are raised in the consumer, at the batch
where they happened; stopping early (break, garbage collection) stops the thread.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from contextlib import nullcontext

import torch

_END = object()
POLL_S = 0.1  # how often a blocked producer checks whether the consumer went away


def prefetch(batches: Callable[[], Iterator[tuple]], depth: int, device: torch.device) -> Iterator[tuple]:
    """Iterate `batches()` (called in the background thread) up to `depth` batches ahead of the caller.

    Items are tuples of tensors (and other values); CUDA tensors in them are safe to use on the
    caller's current stream when they are yielded.
    """
    handoff: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()
    stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def put(item) -> bool:
        while not stop.is_set():
            try:
                handoff.put(item, timeout=POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        if stream is not None:
            torch.cuda.set_device(device)
        try:
            with torch.cuda.stream(stream) if stream is not None else nullcontext():
                for batch in batches():
                    ready = None
                    if stream is not None:
                        ready = torch.cuda.Event()
                        ready.record(stream)
                    if not put((batch, ready, None)):
                        return
        except BaseException as err:  # noqa: BLE001 - handed to the consumer, raised there
            put((None, None, err))
            return
        put(_END)

    thread = threading.Thread(target=produce, name="fastcell-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = handoff.get()
            if item is _END:
                return
            batch, ready, err = item
            if err is not None:
                raise err
            if ready is not None:
                consumer = torch.cuda.current_stream(device)
                consumer.wait_event(ready)
                for value in batch:
                    if isinstance(value, torch.Tensor) and value.is_cuda:
                        value.record_stream(consumer)  # the producer's allocator must not reuse it early
            yield batch
    finally:
        stop.set()
        thread.join()
