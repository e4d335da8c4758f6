"""Fixtures shared by the test files. Shard folders are built by `fastcell.testing` (the production
writer and statistics), which the benchmarks import too."""

from __future__ import annotations

import builtins
import io

import pytest

from fastcell.testing import make_shards, random_crops


@pytest.fixture(scope="session")
def shard_folder(tmp_path_factory):
    """A factory of small shard folders of `random_crops`: `shard_folder(n, n_channels, size, seed=..., **make_shards
    options)`; each call writes a new folder."""

    def make(n: int, n_channels: int = 3, size: int = 32, *, seed: int = 0, **options):
        crops = random_crops(n, n_channels, size, seed=seed)
        return make_shards(tmp_path_factory.mktemp("shards"), crops, **options)

    return make


@pytest.fixture
def opened(monkeypatch) -> list[str]:
    """The files opened (by Python's open, which pathlib, pandas and json use) since the test began, in order:
    to check that an input is read once."""
    paths, real = [], builtins.open

    def spy(file, *args, **kwargs):
        paths.append(str(file))
        return real(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", spy)
    monkeypatch.setattr(io, "open", spy)  # what pathlib calls
    return paths
