"""Which samples a data-parallel rank reads, and how many batches an epoch has.

Both backends split a split's samples (the concatenation of its shards in manifest order) the way
DALI's readers do: rank r of n reads the contiguous slice [N*r // n, N*(r+1) // n). Slices differ
by at most one sample, and DDP needs the same number of steps on every rank, so every rank runs
`(N // n) // batch_size` full batches per training epoch. Each epoch, a rank shuffles its slice
and leaves out `len(slice) - steps * batch_size` of them (at most `batch_size`): a different
random subset every epoch. Over all ranks, every sample is read at most once per epoch and
exactly `n * steps * batch_size` of the N are read, i.e. all but `N - n * steps * batch_size`.
"""

from __future__ import annotations

from fastcell.errors import InputError


def check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise InputError(f"rank {rank} must lie in [0, world_size={world_size})")


def rank_slice(total: int, rank: int, world_size: int) -> range:
    """Positions (in the split's sample order) read by rank `rank` of `world_size`."""
    check_rank(rank, world_size)
    return range(total * rank // world_size, total * (rank + 1) // world_size)


def train_steps(total: int, batch_size: int, world_size: int, where: str = "shards") -> int:
    """Full batches per training epoch on every rank; at least one or an InputError."""
    steps = (total // world_size) // batch_size
    if steps < 1:
        raise InputError(
            f"{where}: {total} training samples over {world_size} rank(s) do not fill one batch of "
            f"{batch_size}; lower the batch size or add data"
        )
    return steps
