"""An epoch started at a batch (`set_epoch(e, start_batch=k)`, what a resumed run asks for): batches k.. of the
whole epoch, views and ids bit for bit, and the batches before k neither augmented nor, where the loader decodes
crops itself (torch; DALI with blosc2), decoded. And the DALI loader's next epoch, started in the background
during the one before: the same batches, its errors raised when it begins."""

from __future__ import annotations

import gc
import threading
import time

import pytest
import torch

from fastcell.errors import InputError
from fastcell.format import folder
from fastcell.format.folder import sample_key
from fastcell.loaders import AugmentSpec, create_train_loader, torch_ref
from fastcell.loaders.augment import ViewRecipe
from fastcell.loaders.dali import DaliTrainLoader, HostDecoder, ShardMembers
from fastcell.testing import make_shards, random_crops
from fastcell.train.synthetic import SyntheticPairLoader

CELLS, BATCH = 100, 16  # 6 batches an epoch
SPEC = AugmentSpec(channel_drop_p=0.2)  # every step of the recipe drawn


def shards_of(tmp_path, codec: str):
    return make_shards(tmp_path / codec, random_crops(CELLS, channels=3, size=32, seed=1), shard_size=16, codec=codec)


def loader_of(shards, backend: str, workers: int = 1):
    return create_train_loader(shards, SPEC, BATCH, backend=backend, device="cpu", seed=3, num_workers=workers)


def assert_same_batches(expected: list, got: list) -> None:
    assert len(got) == len(expected)
    for i, (a, b) in enumerate(zip(expected, got, strict=True)):
        for name, x, y in zip(("view1", "view2", "ids"), a, b, strict=True):
            assert torch.equal(x, y), f"batch {i}: {name}"


@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes")
@pytest.mark.parametrize(("backend", "codec", "workers"), [
    ("dali", "npy", 1), ("dali", "blosc2", 2),
    ("torch", "npy", 2), ("torch", "npy", 3),  # the batch started at is another DataLoader worker's each time
])
def test_an_epoch_started_at_a_batch_is_the_rest_of_the_whole_epoch(tmp_path, backend, codec, workers):
    loader = loader_of(shards_of(tmp_path, codec), backend, workers)
    loader.set_epoch(1)
    whole = list(loader)
    assert len(whole) == len(loader) == 6
    for start in (1, 4, 6):
        loader.set_epoch(1, start_batch=start)
        assert_same_batches(whole[start:], list(loader))
    loader.set_epoch(1)  # back to the whole epoch
    assert_same_batches(whole, list(loader))


@pytest.mark.parametrize(("backend", "workers"), [("dali", 1), ("torch", 2)])
def test_a_rank_s_epoch_started_at_a_batch_is_the_rest_of_its_whole_epoch(tmp_path, backend, workers):
    """Rank 1 of 2 (its own slice and seeds): the same promise as one process."""
    shards = shards_of(tmp_path, "npy")
    loader = create_train_loader(shards, SPEC, BATCH, backend=backend, device="cpu", seed=3, num_workers=workers,
                                 rank=1, world_size=2)
    loader.set_epoch(2)
    whole = list(loader)
    assert len(whole) == len(loader) == 3
    for start in (1, 2):
        loader.set_epoch(2, start_batch=start)
        assert_same_batches(whole[start:], list(loader))


def test_a_start_batch_outside_the_epoch_is_refused(tmp_path):
    loader = loader_of(shards_of(tmp_path, "npy"), "torch")
    for start in (-1, 7):
        with pytest.raises(InputError, match=rf"start_batch {start} must lie in \[0, 6\]"):
            loader.set_epoch(0, start_batch=start)


@pytest.mark.parametrize("codec", ["npy", "blosc2"])
def test_dali_neither_augments_nor_host_decodes_the_batches_before_the_start(tmp_path, monkeypatch, codec):
    augmented, decoded = [], []
    apply, decode = ViewRecipe.apply, HostDecoder.decode

    def counting_apply(self, images, draws):
        augmented.append(len(draws))
        return apply(self, images, draws)

    def counting_decode(self, members, ids, *args, **kwargs):
        decoded.append(ids.clone())
        return decode(self, members, ids, *args, **kwargs)

    monkeypatch.setattr(ViewRecipe, "apply", counting_apply)
    monkeypatch.setattr(HostDecoder, "decode", counting_decode)
    loader = loader_of(shards_of(tmp_path, codec), "dali")
    loader.set_epoch(1, start_batch=4)
    ids = torch.cat([ids for *_, ids in loader])
    assert len(ids) == 2 * BATCH
    assert sum(augmented) == 2 * len(ids)  # both views of batches 4 and 5; none of batches 0-3
    if codec == "blosc2":
        assert torch.equal(torch.cat(decoded), ids)
    else:
        assert not decoded  # DALI decodes npy itself


def test_torch_neither_decodes_nor_augments_the_samples_before_the_start(tmp_path, monkeypatch):
    """One worker's share, made in this process (DataLoader workers are other processes): counted per sample."""
    decoded, augmented = [], []
    decode_member, torch_view = torch_ref.decode_member, torch_ref.torch_view

    def counting_decode(codec, data, shape, tar, name):
        decoded.append(name)
        return decode_member(codec, data, shape, tar, name)

    def counting_view(image, *args):
        augmented.append(image)
        return torch_view(image, *args)

    monkeypatch.setattr(torch_ref, "decode_member", counting_decode)
    monkeypatch.setattr(torch_ref, "torch_view", counting_view)
    loader = loader_of(shards_of(tmp_path, "npy"), "torch")
    loader.set_epoch(1, start_batch=4)
    ids = torch.cat([ids for *_, ids in torch_ref._TwoViewEpoch(loader, loader.epoch_plan(), loader.start_batch)])
    assert len(ids) == 2 * BATCH
    assert sorted(decoded) == sorted(f"{sample_key(i)}.npy" for i in ids.tolist())  # the crops of batches 4 and 5 only
    assert len(augmented) == 2 * len(ids)


def test_the_synthetic_loader_starts_at_a_batch_too():
    loader = SyntheticPairLoader(48, 8, seed=2)
    loader.set_epoch(1)
    whole = list(loader)
    loader.set_epoch(1, start_batch=4)
    assert_same_batches(whole[4:], list(loader))


@pytest.mark.parametrize("codec", ["npy", "blosc2"])
def test_the_next_epoch_is_started_in_the_background_and_gives_the_same_batches(tmp_path, codec, monkeypatch):
    """Halfway through an epoch the DALI loader starts the next epoch's pipeline (its shuffle buffer filled, its
    first batch ready) in a background thread; the next epoch takes it instead of waiting for a start, and its
    batches are bit for bit those of the epoch started on demand by a fresh loader. An epoch other than the next
    one (here: 0 again) is started on demand."""
    shards = shards_of(tmp_path, codec)
    started, start = [], DaliTrainLoader._started
    monkeypatch.setattr(DaliTrainLoader, "_started",
                        lambda self, epoch: started.append((epoch, threading.current_thread().name)) or start(self, epoch))
    loader = loader_of(shards, "dali", workers=2)
    epochs = []
    for epoch in (0, 1, 2, 0):
        loader.set_epoch(epoch)
        epochs.append(list(loader))
    assert [(epoch, thread.split("_")[0]) for epoch, thread in started] == [
        (0, "MainThread"), (1, "fastcell-next-epoch"), (2, "fastcell-next-epoch"), (3, "fastcell-next-epoch"),
        (0, "MainThread"), (1, "fastcell-next-epoch")]
    assert_same_batches(epochs[0], epochs[3])
    loader.set_epoch(1, start_batch=4)  # a resumed epoch can take the iterator started ahead too
    assert_same_batches(epochs[1][4:], list(loader))
    assert [(epoch, thread.split("_")[0]) for epoch, thread in started[6:]] == [(2, "fastcell-next-epoch")]
    for epoch in (1, 2):
        fresh = loader_of(shards, "dali", workers=2)
        fresh.set_epoch(epoch)
        assert_same_batches(list(fresh), epochs[epoch])


def test_an_error_starting_the_next_epoch_is_raised_when_that_epoch_begins(tmp_path, monkeypatch):
    """The background start of epoch 1 fails: epoch 0 runs to its end, and epoch 1 raises that error (not hidden
    by a second start on demand)."""
    start = DaliTrainLoader._started

    def started(self, epoch: int):
        if epoch == 1 and threading.current_thread().name.startswith("fastcell-next-epoch"):
            raise InputError("train-000003.tar: gone")
        return start(self, epoch)

    monkeypatch.setattr(DaliTrainLoader, "_started", started)
    loader = loader_of(shards_of(tmp_path, "npy"), "dali")
    loader.set_epoch(0)
    assert len(list(loader)) == 6
    loader.set_epoch(1)
    with pytest.raises(InputError, match="train-000003.tar: gone"):
        next(iter(loader))


def test_a_blosc2_train_loader_parses_the_indices_and_makes_its_member_table_once(tmp_path, monkeypatch):
    """The shards' indices are parsed when the loader is made (`open_split` checks them) and not again; the member
    table (the tars mapped, the ids checked) serves every epoch, the ones started in the background included."""
    made = {"indices": 0, "tables": 0}

    def counted(what: str, function):
        def call(*args, **kwargs):
            made[what] += 1
            return function(*args, **kwargs)
        return call

    monkeypatch.setattr(folder, "read_member_spans", counted("indices", folder.read_member_spans))
    monkeypatch.setattr(ShardMembers, "__init__", counted("tables", ShardMembers.__init__))
    loader = loader_of(shards_of(tmp_path, "blosc2"), "dali", workers=2)
    for epoch in (0, 1, 2):
        loader.set_epoch(epoch)
        assert len(list(loader)) == 6
    loader.close()
    assert made == {"indices": -(-CELLS // 16), "tables": 1}


def test_close_lets_go_of_the_epoch_started_ahead_and_the_threads(tmp_path):
    """After an epoch the loader holds the next one's started pipeline, a starter thread and the view threads;
    `close()` (the trainer's, when no epoch follows) lets go of them all, and the loader still iterates after."""
    gc.collect()  # loaders of earlier tests, in reference cycles, would still hold threads of the same names

    def threads() -> set[str]:
        return {t.name.split("_")[0] for t in threading.enumerate()
                if t.name.startswith(("fastcell-next-epoch", "fastcell-views"))}

    shards = shards_of(tmp_path, "npy")
    loader = loader_of(shards, "dali")
    loader.set_epoch(0)
    list(loader)
    assert loader._ahead is not None and threads() == {"fastcell-next-epoch", "fastcell-views"}
    loader.close()
    deadline = time.monotonic() + 10
    while threads() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert loader._ahead is None and threads() == set()
    loader.set_epoch(1)
    fresh = loader_of(shards, "dali")
    fresh.set_epoch(1)
    assert_same_batches(list(fresh), list(loader))
    loader.close()
    fresh.close()
