"""Shard format v1: tars, DALI indices and the manifest (fastcell.format.folder)."""

import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from fastcell.errors import InputError
from fastcell.format.codecs import get_codec
from fastcell.format.folder import (
    ShardInfo,
    ShardManifest,
    ShardWriter,
    check_tar_headers,
    decode_crop,
    decode_id,
    read_dali_index,
    read_manifest,
    read_member_spans,
    sample_key,
    verify_shard,
    write_manifest,
)


@pytest.fixture
def crops():
    rng = np.random.default_rng(0)
    return {i * 7: rng.integers(0, 65535, (5, 24, 24), dtype=np.uint16) for i in range(23)}


def write(path: Path, crops: dict) -> Path:
    with ShardWriter(path) as writer:
        for cell_id, crop in crops.items():
            writer.add(cell_id, crop)
    return path


def test_keys_have_no_dot_and_fixed_width():
    assert sample_key(42) == "000000000042"
    with pytest.raises(ValueError):
        sample_key(-1)


def test_webdataset_reads_back_every_crop_bit_exact(tmp_path, crops):
    tar = write(tmp_path / "train-000000.tar", crops)
    seen = {}
    for sample in wds.WebDataset(str(tar), shardshuffle=False):
        seen[decode_id(sample["id"])] = decode_crop(sample["npy"])
    assert seen.keys() == crops.keys()
    for cell_id, crop in crops.items():
        assert seen[cell_id].dtype == np.uint16
        np.testing.assert_array_equal(seen[cell_id], crop)


def test_index_matches_dalis_own_tool(tmp_path, crops):
    tool = Path(sys.executable).with_name("wds2idx")
    if not tool.exists():
        pytest.skip("DALI's wds2idx tool is not installed beside this Python")
    tar = write(tmp_path / "a.tar", crops)
    subprocess.run([str(tool), str(tar), str(tmp_path / "ref.idx")], check=True, capture_output=True)
    assert (tmp_path / "a.idx").read_text() == (tmp_path / "ref.idx").read_text()


def test_dali_reader_with_fastcell_index(tmp_path, crops):
    dali = pytest.importorskip("nvidia.dali")
    from nvidia.dali import fn, types

    tar = write(tmp_path / "a.tar", crops)

    @dali.pipeline_def(batch_size=len(crops), num_threads=1, device_id=None)
    def pipe():
        npy, cell_id = fn.readers.webdataset(
            paths=[str(tar)], index_paths=[str(tar.with_suffix(".idx"))], ext=["npy", "id"],
            dtypes=[types.UINT8, types.INT64], random_shuffle=False,
        )
        return fn.decoders.numpy(npy), cell_id

    p = pipe()
    p.build()
    images, ids = p.run()
    for k in range(len(crops)):
        cell_id = int(np.array(ids[k])[0])
        np.testing.assert_array_equal(np.array(images[k]), crops[cell_id])


def test_shards_are_deterministic(tmp_path, crops, monkeypatch):
    """The same crops give the same bytes whenever they are written: members carry mtime 0 and no owner."""
    monkeypatch.setattr(time, "time", lambda: 1.7e9)
    a = write(tmp_path / "a" / "s.tar", crops)
    monkeypatch.setattr(time, "time", lambda: 1.7e9 + 3600)  # an hour later, by the clock tarfile would read
    b = write(tmp_path / "b" / "s.tar", crops)
    assert a.read_bytes() == b.read_bytes()
    with tarfile.open(a) as tar:
        members = tar.getmembers()
    assert len(members) == 2 * len(crops)
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname) for m in members} == {(0, 0, 0, "", "")}


def test_failed_write_leaves_nothing(tmp_path, crops):
    tar = tmp_path / "s.tar"
    with pytest.raises(RuntimeError):
        with ShardWriter(tar) as writer:
            writer.add(0, crops[0])
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="empty shard"):
        with ShardWriter(tar):
            pass
    assert list(tmp_path.iterdir()) == []


def test_bad_crops_are_refused(tmp_path):
    with ShardWriter(tmp_path / "s.tar") as writer:
        with pytest.raises(ValueError, match="uint16"):
            writer.add(0, np.zeros((3, 8, 8), np.float32))
        writer.add(1, np.zeros((3, 8, 8), np.uint16))


def test_verify_detects_truncation_and_missing_index(tmp_path, crops):
    tar = write(tmp_path / "s.tar", crops)
    assert verify_shard(tar, len(crops)) == len(crops)
    with pytest.raises(InputError, match="manifest says"):
        verify_shard(tar, len(crops) + 1)
    data = tar.read_bytes()
    tar.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="truncated"):
        verify_shard(tar)
    tar.with_suffix(".idx").unlink()
    with pytest.raises(InputError, match="no DALI index"):
        verify_shard(tar)


def test_corrupt_index_is_named(tmp_path):
    idx = tmp_path / "s.idx"
    idx.write_text("garbage\n")
    with pytest.raises(InputError, match=str(idx)):
        read_dali_index(idx)


def test_member_spans_are_the_index_read_at_once(tmp_path, crops):
    """`read_member_spans` (the eval loader's vectorised index read) finds every crop and id where
    `read_dali_index` does, in index order."""
    tar = write(tmp_path / "s.tar", crops)
    crop_at, crop_size, id_at, names, _ = read_member_spans(tar, get_codec("npy"))
    found = [{ext: (offset, size, name) for ext, offset, size, name in sample}
             for sample in read_dali_index(tar.with_suffix(".idx"))]
    assert list(zip(crop_at.tolist(), crop_size.tolist(), strict=True)) == [sample["npy"][:2] for sample in found]
    assert id_at.tolist() == [sample["id"][0] for sample in found]
    assert names == [sample["id"][2] for sample in found]
    data = tar.read_bytes()
    read = {decode_id(data[at : at + 8]): decode_crop(data[at_crop : at_crop + size])
            for at, at_crop, size in zip(id_at, crop_at, crop_size, strict=True)}
    assert read.keys() == crops.keys() and all(np.array_equal(read[k], crops[k]) for k in crops)


def test_member_spans_of_an_index_of_no_samples_are_empty(tmp_path):
    """fastcell writes no empty shard, but an index of 0 samples is a well-formed one."""
    tar = tmp_path / "s.tar"
    tarfile.open(tar, "w").close()
    tar.with_suffix(".idx").write_text("v1.2 0\n")
    assert [len(column) for column in read_member_spans(tar, get_codec("npy"))[:4]] == [0, 0, 0, 0]


def _second_sample(idx: Path, change) -> None:
    header, *lines = idx.read_text().splitlines()
    tokens = lines[1].split()
    change(tokens)
    lines[1] = " ".join(tokens)
    idx.write_text("\n".join([header, *lines]) + "\n")


@pytest.mark.parametrize("damage, error", [
    (lambda tar: tar.with_suffix(".idx").write_text("garbage\n"), r"s\.idx: not a v1\.2 index"),
    (lambda tar: _second_sample(tar.with_suffix(".idx"), lambda t: t.extend(["x", "0", "1", "k.x"])),
     r"s\.idx: not a v1\.2 index of samples of two members"),
    (lambda tar: _second_sample(tar.with_suffix(".idx"), lambda t: t.__setitem__(5, "1e3")),
     r"s\.idx: not a readable DALI index"),
    (lambda tar: _second_sample(tar.with_suffix(".idx"), lambda t: t.__setitem__(6, "7")),
     r"s\.tar: member 000000000007\.id is not an 8-byte id"),
    (lambda tar: _second_sample(tar.with_suffix(".idx"), lambda t: t.__setitem__(4, "tif")),
     r"s\.tar: a sample does not hold exactly <key>\.npy \+ <key>\.id"),
    (lambda tar: tar.write_bytes(tar.read_bytes()[:5000]), r"s\.tar: truncated \(5000 bytes; its index needs"),
    (lambda tar: _second_sample(tar.with_suffix(".idx"), lambda t: t.__setitem__(5, "99999999999999999999")),
     r"s\.idx: not a readable DALI index"),
    (lambda tar: _second_sample(tar.with_suffix(".idx"), lambda t: t.__setitem__(1, "-512")),
     r"s\.idx: not a readable DALI index \(a negative offset or size\)"),
])
def test_member_spans_name_a_damaged_shard(tmp_path, crops, damage, error):
    tar = write(tmp_path / "s.tar", crops)
    damage(tar)
    with pytest.raises(InputError, match=error):
        read_member_spans(tar, get_codec("npy"))
    with pytest.raises(InputError, match=r"s\.(tar|idx): "):  # the same checks, or the sample-by-sample one
        verify_shard(tar, len(crops), get_codec("npy"))


def test_verifying_a_good_shard_with_its_codec_parses_the_index_at_once(tmp_path, crops, monkeypatch):
    """Loaders verify every shard of a split when they open: with the codec known, the index is parsed in a few
    vectorised steps (`read_member_spans`), not sample by sample; the count is still checked."""
    from fastcell.format import folder

    tar = write(tmp_path / "s.tar", crops)
    monkeypatch.setattr(folder, "read_dali_index", lambda path: pytest.fail("parsed sample by sample"))
    assert verify_shard(tar, len(crops), get_codec("npy")) == len(crops)
    with pytest.raises(InputError, match=f"s\\.tar: holds {len(crops)} samples, the manifest says 5"):
        verify_shard(tar, 5, get_codec("npy"))


def test_member_spans_refuse_another_codecs_shard(tmp_path, crops):
    tar = write(tmp_path / "s.tar", crops)
    with pytest.raises(InputError, match=r"<key>\.b2 \+ <key>\.id \(the manifest's codec is 'blosc2'\)"):
        read_member_spans(tar, get_codec("blosc2"))


def manifest(tmp_path, crops) -> ShardManifest:
    write(tmp_path / "train-000000.tar", crops)
    return ShardManifest(
        channels=["DNA", "ER", "RNA", "AGP", "Mito"],
        crop_size=24,
        splits={"train": [ShardInfo("train-000000.tar", "train-000000.idx", len(crops))]},
        channel_stats={"mean": [1.0] * 5, "std": [2.0] * 5},
        config={"seed": 3},
    )


def test_manifest_round_trip(tmp_path, crops):
    write_manifest(tmp_path, manifest(tmp_path, crops))
    m = read_manifest(tmp_path)
    assert m.channels == ["DNA", "ER", "RNA", "AGP", "Mito"]
    assert m.count("train") == len(crops)
    assert m.tar_paths() == [tmp_path / "train-000000.tar"]
    assert m.index_paths() == [tmp_path / "train-000000.idx"]
    assert m.config == {"seed": 3}
    with pytest.raises(InputError, match="no split 'val'"):
        m.split_shards("val")


def test_manifest_errors_name_the_file(tmp_path, crops):
    with pytest.raises(InputError, match="no shard manifest"):
        read_manifest(tmp_path)
    path = write_manifest(tmp_path, manifest(tmp_path, crops))
    (tmp_path / "train-000000.idx").unlink()
    with pytest.raises(InputError, match="train-000000.idx.*missing"):
        read_manifest(tmp_path)
    path.write_text('{"format": "something-else", "version": 1}')
    with pytest.raises(InputError, match="not a fastcell-shards v1, v2 or v3 manifest"):
        read_manifest(tmp_path)
    for text, reason in (("[1, 2]", "a JSON list, not an object"), ("{", "Expecting property name"),
                         (b'{"a": "\xff"}', "can't decode")):
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        with pytest.raises(InputError, match=f"index.json: unreadable manifest .*{reason}"):
            read_manifest(tmp_path)
    shutil.rmtree(tmp_path)


def test_the_format_and_the_test_folders_import_no_stage_of_fastcell():
    """The format is the low layer every stage reads, and `fastcell.testing` writes its folders with the format's
    writer and statistics alone: neither imports shard, loaders, train or evaluate."""
    code = ("import sys, fastcell.format.folder, fastcell.format.stats, fastcell.testing; "
            "print(sorted(m for m in sys.modules if m.startswith(('fastcell.shard', 'fastcell.loaders', "
            "'fastcell.train', 'fastcell.evaluate'))))")  # fmt: skip
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"


@pytest.mark.parametrize("field", ["size", "name", "checksum"])
def test_tar_headers_are_checked_field_by_field_and_chunk_by_chunk(tmp_path, field):
    """`check_tar_headers` reads the header blocks a chunk at a time; a header rewritten with another size or name
    (its checksum made to match) is caught as surely as one whose checksum no longer matches."""
    crops = np.random.default_rng(4).integers(0, 65535, (7, 2, 8, 8), dtype=np.uint16)
    tar = tmp_path / "train-000000.tar"
    with ShardWriter(tar) as writer:
        for i, crop in enumerate(crops):
            writer.add(i, crop)
    members = [member for sample in read_dali_index(tar.with_suffix(".idx")) for member in sample]
    check_tar_headers(tar, members, chunk=3)  # whole
    data = bytearray(tar.read_bytes())
    header = members[9][1] - 512  # the tenth member's header block, in the fourth chunk of three
    if field == "size":
        data[header + 124 : header + 135] = b"%011o" % (members[9][2] + 512)
    elif field == "name":
        data[header] = ord("9")
    if field != "checksum":  # a valid header, with other contents
        data[header + 148 : header + 156] = b" " * 8
        data[header + 148 : header + 155] = b"%06o\0" % sum(data[header : header + 512])
    else:
        data[header + 150] ^= 0x01
    tar.write_bytes(bytes(data))
    with pytest.raises(InputError, match=f"the tar header of member {members[9][3]} is damaged"):
        check_tar_headers(tar, members, chunk=3)
