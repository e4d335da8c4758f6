"""Reruns of `fastcell shard` never hide or make damage: a kept shard must match the checksums recorded
when it was written, and a swap record is replayed only for the build it was written for."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
from shard_screens import write_screen

from fastcell.cli import run
from fastcell.format.codecs import get_codec
from fastcell.format.folder import read_manifest, read_member_spans
from fastcell.shard import output, pipeline
from fastcell.shard.info import summarize
from fastcell.shard.pipeline import ShardConfig, shard_screen


@pytest.fixture(scope="module")
def screen(tmp_path_factory) -> Path:
    """2 plates x 2 wells, one 96 x 128 site each, 6 cells a field: 24 cells."""
    return write_screen(tmp_path_factory.mktemp("integrity") / "screen", wells=("A01", "B01"), sites=1)


@pytest.fixture
def config(screen, tmp_path) -> ShardConfig:
    return ShardConfig(source=screen, out=tmp_path / "shards", crop_size=24, shard_size=4, workers=1)


def damage_a_crop(tar: Path) -> None:
    """Flip one byte inside the first crop member of `tar` (its structure stays valid)."""
    at = int(read_member_spans(tar, get_codec("npy")).crop_at[0]) + 200
    data = bytearray(tar.read_bytes())
    data[at] ^= 0xFF
    tar.write_bytes(bytes(data))


def train_shards(out: Path) -> list[str]:
    return [shard.name for shard in read_manifest(out).split_shards("train")]


def assert_whole(out: Path) -> None:
    """Every shard the manifest lists is there and every crop matches its checksum; no staging is left."""
    assert summarize(out, verify=True)["problems"] == []
    assert not (out / output.STAGING_DIR).exists()


def test_a_damaged_kept_shard_of_a_finished_run_is_written_again(config, capsys):
    shard_screen(config)
    first, damaged = train_shards(config.out)[1:3]
    original = (config.out / damaged).read_bytes()
    damage_a_crop(config.out / damaged)
    (config.out / first).unlink()  # so the rerun has work to do and keeps the other shards
    with pytest.raises(SystemExit) as finished:
        run(["shard", str(config.source), str(config.out), "--crop", "24", "--shard-size", "4", "--workers", "1",
             "--no-progress"])  # fmt: skip
    assert not finished.value.code
    said = " ".join(capsys.readouterr().out.split())
    assert "(2 written," in said and "1 kept shard(s) damaged" in said and damaged in said, said
    assert (config.out / damaged).read_bytes() == original
    assert_whole(config.out)


def test_a_damaged_shard_of_an_interrupted_run_is_written_again(config, monkeypatch):
    def interrupted(*args):
        raise KeyboardInterrupt  # after every shard is written, before cells.parquet and index.json

    real = pipeline.write_outputs
    monkeypatch.setattr(pipeline, "write_outputs", interrupted)
    with pytest.raises(KeyboardInterrupt):
        shard_screen(config)
    monkeypatch.setattr(pipeline, "write_outputs", real)
    damaged = sorted(config.out.glob("train-*.tar"))[1]
    original = damaged.read_bytes()
    damage_a_crop(damaged)
    result = shard_screen(config)
    assert damaged.read_bytes() == original
    assert_whole(config.out)
    assert result.shards_repaired == [damaged.name] and result.shards_written == 1


def stop_before_removing_staging(monkeypatch):
    """Make the swap stop after its last move, before it removes OUT/.staging."""
    real = shutil.rmtree

    def rmtree(path, *args, **kwargs):
        if Path(path).name == output.STAGING_DIR:
            raise KeyboardInterrupt
        real(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", rmtree)
    return real


def test_a_swap_stopped_before_its_cleanup_is_not_replayed_for_the_next_build(config, monkeypatch):
    shard_screen(config)
    real = stop_before_removing_staging(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        shard_screen(replace(config, crop_size=20, overwrite=True))
    monkeypatch.setattr(shutil, "rmtree", real)
    assert (config.out / output.STAGING_DIR / output.SWAP_RECORD).is_file()
    assert shard_screen(replace(config, crop_size=20)).up_to_date  # the swap was done: only its cleanup is left
    assert_whole(config.out)
    result = shard_screen(replace(config, crop_size=20, shard_size=2, overwrite=True))  # more shards: new names
    assert result.manifest.crop_size == 20 and len(train_shards(config.out)) > 4
    assert_whole(config.out)
    assert {p.name for p in config.out.glob("*.tar")} == {s.name for v in result.manifest.splits.values() for s in v}


def test_a_stale_swap_record_beside_a_complete_build_is_not_replayed(config, monkeypatch):
    """A record left by a finished swap (as an older fastcell left it) beside the next build, complete but
    not swapped in yet: the swap that finishes the build makes its own record."""
    shard_screen(config)
    real = stop_before_removing_staging(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        shard_screen(replace(config, crop_size=20, overwrite=True))
    monkeypatch.setattr(shutil, "rmtree", real)
    staging = config.out / output.STAGING_DIR
    stale = (staging / output.SWAP_RECORD).read_bytes()

    def not_swapped(out, build):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "swap_in", not_swapped)
    with pytest.raises(KeyboardInterrupt):
        shard_screen(replace(config, crop_size=20, shard_size=2, overwrite=True))
    monkeypatch.undo()
    (staging / output.SWAP_RECORD).write_bytes(stale)
    result = shard_screen(replace(config, crop_size=20, shard_size=2, overwrite=True))
    assert result.up_to_date, "the swap left the build incomplete in OUT, so the run built it again"
    assert result.manifest.crop_size == 20 and len(train_shards(config.out)) > 4
    assert_whole(config.out)


def test_a_swap_an_older_fastcell_began_is_finished(config, monkeypatch):
    """A swap record without the build's identity (an older fastcell's), of a swap stopped half-way (after
    moving the work folder, which makes OUT's files named like shards look like its own)."""
    config = replace(config, keep_work=True)
    shard_screen(config)
    real, moves = os.replace, []

    def stop_after_two(src, dst):  # the swap moves from OUT/.staging into OUT
        if output.STAGING_DIR in str(src) and output.STAGING_DIR not in str(dst):
            if len(moves) == 2:
                raise KeyboardInterrupt
            moves.append(dst)
        real(src, dst)

    monkeypatch.setattr(os, "replace", stop_after_two)
    with pytest.raises(KeyboardInterrupt):
        shard_screen(replace(config, crop_size=20, shard_size=2, overwrite=True))
    monkeypatch.undo()
    record = config.out / output.STAGING_DIR / output.SWAP_RECORD
    plan = json.loads(record.read_text())
    del plan["build"]
    record.write_text(json.dumps(plan))
    result = shard_screen(replace(config, crop_size=20, shard_size=2, overwrite=True))
    assert result.up_to_date and result.manifest.crop_size == 20
    assert_whole(config.out)
    assert {p.name for p in config.out.glob("*.tar")} == {s.name for v in result.manifest.splits.values() for s in v}
