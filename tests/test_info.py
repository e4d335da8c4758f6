"""`fastcell info`: summary of a shard folder and the montage of random crops."""

import numpy as np
import pandas as pd
import pytest
from matplotlib.image import imread

from fastcell.errors import InputError
from fastcell.format.folder import read_manifest, write_manifest
from fastcell.shard.illumination import save_illumination
from fastcell.shard.info import sample_crops, summarize, write_montage
from fastcell.testing import make_shards as write_shard_folder

CHANNELS = ["DNA", "ER", "RNA"]
SIZE = 8


def filled(ids) -> np.ndarray:
    """Crop i is filled with i * 100 in every channel, so ids can be checked on pixels."""
    return np.stack([np.full((len(CHANNELS), SIZE, SIZE), i * 100, np.uint16) for i in ids])


def make_shards(root, n_train=9, n_val=3):
    """Train shards of 5 + 4 cells and a val shard of 3, with known stats, skips and a varied cell table."""
    write_shard_folder(root, filled(range(n_train)), CHANNELS, shard_size=5,
                       val=filled(range(n_train, n_train + n_val)) if n_val else None)
    manifest = read_manifest(root)
    manifest.channel_stats = {k: [1.0, 2.0, 3.0] for k in ("mean", "std", "min", "max")}
    manifest.channel_stats |= {"p01": [0.0, 0.0, 0.0], "p99": [1100.0, 600.0, 200.0]}
    manifest.illumination = "illumination.npz"
    save_illumination(root / "illumination.npz", {})  # listed: `info` reports it when missing
    manifest.skipped = {
        "fields": [{"image": "a.tif", "plate": "P0", "well": "A01", "site": 1, "reason": "no cells"},
                   {"image": "b.tif", "plate": "P0", "well": "A02", "site": 1, "reason": "no cells"}],
        "cells": {"border": 7},
    }
    write_manifest(root, manifest)
    cells = pd.read_parquet(root / "cells.parquet")
    ids = cells["id"]
    cells = cells.assign(plate="P" + (ids % 2).astype(str), well="A0" + (ids % 3).astype(str),
                         compound=np.where(ids % 4 == 0, "taxol", "DMSO"))
    cells.to_parquet(root / "cells.parquet")
    return n_train + n_val


def test_summary_counts(tmp_path):
    total = make_shards(tmp_path)
    summary = summarize(tmp_path)
    assert summary["cells"] == total == 12
    assert summary["splits"] == {"train": {"cells": 9, "shards": 2}, "val": {"cells": 3, "shards": 1}}
    assert summary["channels"] == CHANNELS and summary["crop_size"] == SIZE
    assert (summary["plates"], summary["wells"], summary["compounds"]) == (2, 6, 2)
    assert summary["channel_stats"]["ER"] == {"mean": 2.0, "std": 2.0, "min": 2.0, "max": 2.0, "p01": 0.0, "p99": 600.0}
    assert summary["skipped"] == {"fields": 2, "fields_by_reason": {"no cells": 2}, "empty_fields": 0,
                                  "cells": {"border": 7}}
    assert "montage" not in summary


def test_montage_png_is_written(tmp_path):
    make_shards(tmp_path)
    png = tmp_path / "montage.png"
    summary = summarize(tmp_path, montage=png, n=6, seed=1)
    assert summary["montage"] == str(png)
    image = imread(png)
    assert image.ndim == 3 and image.shape[1] > 2.5 * image.shape[0]  # three panels side by side
    assert image.std() > 0.05  # crops of different brightness, not a blank figure
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left
    write_montage(tmp_path, tmp_path / "again.png", n=6, seed=1)
    assert (tmp_path / "again.png").read_bytes() == png.read_bytes()


def test_sampled_crops_are_the_samples_they_claim(tmp_path):
    from fastcell.format.folder import read_manifest

    total = make_shards(tmp_path)
    manifest = read_manifest(tmp_path)
    crops, ids = sample_crops(manifest, n=5, seed=0)
    assert crops.shape == (5, 3, SIZE, SIZE) and len(set(ids.tolist())) == 5
    np.testing.assert_array_equal(crops[:, 0, 0, 0], ids * 100)
    np.testing.assert_array_equal(sample_crops(manifest, n=5, seed=0)[1], ids)
    assert not np.array_equal(sample_crops(manifest, n=5, seed=1)[1], ids)
    _, every = sample_crops(manifest, n=100, seed=0)
    np.testing.assert_array_equal(np.sort(every), np.arange(total))


def test_inconsistent_cell_table_is_reported(tmp_path):
    make_shards(tmp_path)
    table = pd.read_parquet(tmp_path / "cells.parquet")
    table.iloc[:-1].to_parquet(tmp_path / "cells.parquet")
    with pytest.raises(InputError, match="cells.parquet: lists 2 val cells, the manifest 3"):
        summarize(tmp_path)
    (tmp_path / "cells.parquet").write_bytes(b"PAR1 not a parquet file")
    with pytest.raises(InputError, match="cells.parquet: unreadable cell table"):
        summarize(tmp_path, verify=True)
    (tmp_path / "cells.parquet").unlink()
    with pytest.raises(InputError, match="cells.parquet"):
        summarize(tmp_path)


def test_truncated_shard_is_reported(tmp_path):
    from fastcell.format.folder import read_manifest

    make_shards(tmp_path, n_train=3, n_val=0)
    tar = tmp_path / "train-000000.tar"
    tar.write_bytes(tar.read_bytes()[:1500])  # cut inside the second crop
    with pytest.raises(InputError, match=r"train-000000.tar: member \d{12}.npy is corrupt"):
        sample_crops(read_manifest(tmp_path), n=3)


def test_verify_checks_the_recorded_checksums_reading_each_index_and_the_table_once(tmp_path, monkeypatch):
    """`make_shards` records each crop's CRC-32 as `fastcell shard` does: --verify finds a flipped pixel byte
    (an npy crop still decodes); sizes, members and crops are checked in one pass over the shards."""
    from pathlib import Path

    import pyarrow.parquet as pq

    from fastcell.format import folder

    total = make_shards(tmp_path)
    reads, real = [], folder.read_dali_index
    monkeypatch.setattr(folder, "read_dali_index", lambda path: reads.append(Path(path).name) or real(path))
    tables, parquet_file, read_table, read_parquet = [], pq.ParquetFile, pq.read_table, pd.read_parquet
    monkeypatch.setattr(pq, "ParquetFile", lambda path: tables.append(Path(path).name) or parquet_file(path))
    monkeypatch.setattr(pq, "read_table", lambda path, **kw: tables.append(Path(path).name) or read_table(path, **kw))
    monkeypatch.setattr(pd, "read_parquet", lambda path, **kw: tables.append(Path(path).name) or read_parquet(path, **kw))
    summary = summarize(tmp_path, verify=True)
    assert (summary["verified"], summary["checksums"], summary["problems"]) == (total, True, [])
    assert sorted(reads) == ["train-000000.idx", "train-000001.idx", "val-000000.idx"]
    assert tables == ["cells.parquet"]  # opened once: counts, plates and checksums from one read
    _, offset, size, member = real(tmp_path / "val-000000.idx")[1][0]
    tar = tmp_path / "val-000000.tar"
    data = bytearray(tar.read_bytes())
    data[offset + size - 1] ^= 1
    tar.write_bytes(bytes(data))
    with pytest.raises(InputError, match=f"val-000000.tar: sample {member.split('.')[0]} is damaged"):
        summarize(tmp_path, verify=True)


def test_verify_finds_a_shard_copied_over_another_of_the_same_size(tmp_path):
    """Train shards of 5 + 5 npy crops have the same size: one copied over the other passes the size, count and
    checksum checks, but its cells belong to the other shard by the cell table."""
    make_shards(tmp_path, n_train=10)
    for ext in ("tar", "idx"):
        (tmp_path / f"train-000000.{ext}").write_bytes((tmp_path / f"train-000001.{ext}").read_bytes())
    assert summarize(tmp_path)["problems"] == []  # sizes alone cannot tell
    with pytest.raises(InputError, match="train-000000.tar: sample 000000000005 belongs to train-000001.tar by "
                                         "cells.parquet"):
        summarize(tmp_path, verify=True)


def test_verify_finds_a_cell_stored_twice(tmp_path):
    """A shard holding one cell twice (and another not at all), whole and consistent with its index and checksums."""
    from fastcell.format.folder import ShardWriter

    make_shards(tmp_path, n_train=10)
    with ShardWriter(tmp_path / "train-000000.tar") as writer:
        for cell_id, crop in zip([0, 1, 2, 3, 3], filled([0, 1, 2, 3, 3]), strict=True):
            writer.add(cell_id, crop)
    with pytest.raises(InputError, match="train-000000.tar: sample 000000000003 is also in train-000000.tar"):
        summarize(tmp_path, verify=True)


@pytest.mark.parametrize("damage", ["header byte", "size field", "checksum field", "index line repeated"])
def test_verify_finds_tar_headers_that_disagree_with_the_index(tmp_path, damage):
    """DALI reads through the index; tar readers (the torch backend's webdataset, `tar`) walk the headers and stop at a
    damaged one. Either disagreement is named; the torch loader refuses the shard rather than read fewer cells."""
    from fastcell.format.folder import read_dali_index
    from fastcell.loaders import create_eval_loader

    make_shards(tmp_path)
    tar, idx = tmp_path / "train-000001.tar", tmp_path / "train-000001.idx"
    if damage != "index line repeated":
        (_, offset, _, name), _ = read_dali_index(idx)[2]
        data = bytearray(tar.read_bytes())
        # in the name field of the sample's crop member, in a digit of its size, in a digit of its checksum
        data[offset - 512 + {"header byte": 20, "size field": 130, "checksum field": 150}[damage]] ^= 0x01
        tar.write_bytes(bytes(data))
        if damage == "header byte":
            with pytest.raises(InputError, match=r"train-000001.tar: reading the tar's headers finds 2 samples, its "
                                                 r"index 4"):
                list(create_eval_loader(tmp_path, 4, backend="torch", device="cpu", num_workers=0))
    else:
        lines = idx.read_text().splitlines()
        lines[2] = lines[1]
        idx.write_text("\n".join(lines) + "\n")
        name = read_dali_index(idx)[1][0][3]
    assert summarize(tmp_path)["problems"] == []  # sizes alone cannot tell
    with pytest.raises(InputError, match=f"train-000001.tar: the tar header of member {name} is damaged"):
        summarize(tmp_path, verify=True)


def test_verify_reads_the_illumination_file_whole(tmp_path):
    """A rerun keeps the illumination file of a complete folder, so only --verify can tell it is damaged."""
    make_shards(tmp_path)
    npz = tmp_path / "illumination.npz"
    assert summarize(tmp_path, verify=True)["problems"] == []
    npz.write_bytes(npz.read_bytes()[:-30])
    assert summarize(tmp_path)["problems"] == []  # plain info: it is there
    problems = summarize(tmp_path, verify=True)["problems"]
    assert len(problems) == 1 and problems[0].startswith(f"{npz}:"), problems
