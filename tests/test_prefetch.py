"""The background loader (`fastcell.loaders.prefetch`): order, look-ahead bound, errors, early stop; the torch
threads around the DALI loader's GPU decode."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from fastcell.loaders.dali import DaliTrainLoader
from fastcell.loaders.prefetch import prefetch

CPU = torch.device("cpu")


def _threads() -> int:
    return sum(t.name == "fastcell-prefetch" for t in threading.enumerate())


def test_batches_come_in_order_and_the_producer_runs_at_most_depth_ahead():
    made = []

    def batches():
        for i in range(10):
            made.append(i)
            yield (torch.full((2,), i), i)

    seen = []
    for tensor, i in prefetch(batches, depth=2, device=CPU):
        time.sleep(0.02)  # a slow consumer: the producer fills the queue and waits
        # made: the consumed ones, up to `depth` queued, and one blocked in the hand-over
        assert len(made) <= i + 1 + 2 + 1
        seen.append(i)
        assert torch.equal(tensor, torch.full((2,), i))
    assert seen == list(range(10))


def test_a_producer_error_is_raised_in_the_consumer_after_the_good_batches():
    def batches():
        yield (1,)
        yield (2,)
        raise ValueError("shard 3 is corrupt")

    seen = []
    with pytest.raises(ValueError, match="shard 3 is corrupt"):
        for (i,) in prefetch(batches, depth=4, device=CPU):
            seen.append(i)
    assert seen == [1, 2]
    assert _threads() == 0


def test_stopping_early_stops_the_producer_thread():
    produced = []

    def batches():
        i = 0
        while True:  # an endless loader
            produced.append(i)
            yield (i,)
            i += 1

    loader = prefetch(batches, depth=2, device=CPU)
    assert [next(loader)[0] for _ in range(3)] == [0, 1, 2]
    loader.close()
    assert _threads() == 0
    count = len(produced)
    time.sleep(0.3)
    assert len(produced) == count  # nothing runs on after close


class _Members:
    """A `ShardMembers` stand-in."""

    def find(self, ids) -> list:
        return [b"member"] * len(ids)


class _Decoder:
    """A `HostDecoder` stand-in that records torch's thread count while it decodes."""

    def __init__(self):
        self.threads: list[int] = []

    def decode(self, members: list, ids: torch.Tensor) -> torch.Tensor:
        self.threads.append(torch.get_num_threads())
        return torch.zeros((len(members), 1, 2, 2), dtype=torch.uint16)


def test_the_gpu_decode_runs_on_one_torch_thread_but_hands_back_the_caller_s_threads():
    """Between batches (at the generator's yield) the training step runs with torch's threads as they were."""
    outputs = {"ids": torch.tensor([[7], [8]])}
    decoder, before = _Decoder(), torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        batches = DaliTrainLoader._gpu_decoded(iter([(outputs,), (outputs,)]), _Members(), decoder)
        for images, ids in batches:
            assert torch.get_num_threads() == 2
            assert images.dtype == torch.float32 and ids.tolist() == [7, 8]
    finally:
        torch.set_num_threads(before)
    assert decoder.threads == [1, 1]
