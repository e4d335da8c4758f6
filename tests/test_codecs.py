"""Crop codecs (`fastcell shard --codec`): bit-exact round trips, the same screen sharded as npy, tiff-deflate,
blosc2 and blosc2-lz4 read back identically by every loader, older folders, the manifest, and bad input named to the
sample."""

from __future__ import annotations

import dataclasses
import gc
import io
import json
import pickle
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from shard_screens import write_screen
from typer.testing import CliRunner

from fastcell.cli import app
from fastcell.errors import InputError
from fastcell.format.codecs import CODECS, FINISH_CROPS, BadSample, CorruptCrop, get_codec
from fastcell.format.folder import read_dali_index, read_manifest, read_samples, verify_shard
from fastcell.loaders import AugmentSpec, create_eval_loader, create_train_loader
from fastcell.shard.info import summarize
from fastcell.shard.pipeline import ShardConfig, shard_screen
from fastcell.testing import make_shards, random_crops

CROP = 24
CHANNELS = 5
SHARD_CODECS = ("npy", "tiff-deflate", "blosc2", "blosc2-lz4")
HOST_CODECS = ("blosc2", "blosc2-lz4")  # decoded by the loaders themselves (no DALI operator)
VERSIONS = {"npy": 1, "tiff-deflate": 2, "blosc2": 3, "blosc2-lz4": 3}  # the lowest format version that knows each


def full_range(channels: int, size: int = 32, seed: int = 0) -> np.ndarray:
    """Uniform noise over all 65536 values: catches rescaling, byte order and dropped bits."""
    return np.random.default_rng(seed).integers(0, 2**16, (channels, size, size), dtype=np.uint16)


@pytest.mark.parametrize("name", list(CODECS))
@pytest.mark.parametrize("channels", [1, 3, 5])
def test_round_trip_is_bit_exact_and_deterministic(name, channels):
    codec = get_codec(name)
    extremes = np.where(np.indices((channels, 32, 32)).sum(0) % 2, 65535, 0).astype(np.uint16)  # residuals wrap
    for crop in (full_range(channels), extremes, random_crops(1, channels, 40, seed=channels)[0]):
        data = codec.encode(crop)
        assert codec.encode(crop.copy()) == data  # same crop, same bytes: shards stay reproducible
        decoded = codec.decode(data, crop.shape)
        assert decoded.dtype == np.uint16 and np.array_equal(decoded, crop)


def test_tiff_deflate_is_the_layout_dali_decodes():
    """One page, one strip, channels interleaved, deflate + horizontal predictor (see codec_probe.md)."""
    crop = random_crops(1, 5, 48, seed=0)[0]
    data = get_codec("tiff-deflate").encode(crop)
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        page = tif.pages[0]
        assert len(tif.pages) == 1 and len(page.dataoffsets) == 1
        assert page.planarconfig == tifffile.PLANARCONFIG.CONTIG and page.samplesperpixel == 5
        assert page.compression == tifffile.COMPRESSION.ADOBE_DEFLATE
        assert page.predictor == tifffile.PREDICTOR.HORIZONTAL and page.dtype == np.uint16
    assert len(data) < 0.9 * crop.nbytes  # a cell-like crop compresses


def test_decoders_refuse_what_is_not_the_expected_crop():
    crop = random_crops(1, 3, 32, seed=0)[0]
    tiff = get_codec("tiff-deflate")
    with pytest.raises(CorruptCrop, match=r"expected uint16 \(3, 24, 24\)"):
        tiff.decode(tiff.encode(crop), (3, 24, 24))
    planar = io.BytesIO()
    tifffile.imwrite(planar, crop, photometric="minisblack", planarconfig="separate", compression="zlib",
                     predictor=True)
    with pytest.raises(CorruptCrop, match="planar TIFF"):
        tiff.decode(planar.getvalue(), crop.shape)
    lzw = io.BytesIO()
    tifffile.imwrite(lzw, np.moveaxis(crop, 0, -1), photometric="minisblack", planarconfig="contig",
                     compression="lzw")
    with pytest.raises(CorruptCrop, match="compression LZW"):
        tiff.decode(lzw.getvalue(), crop.shape)
    with pytest.raises(CorruptCrop, match="not a tiff-deflate crop"):
        tiff.decode(get_codec("npy").encode(crop), crop.shape)
    with pytest.raises(CorruptCrop, match="not a npy crop"):
        get_codec("npy").decode(tiff.encode(crop), crop.shape)
    with pytest.raises(ValueError, match="uint16 C x S x S"):
        tiff.encode(crop.astype(np.float32))


def test_blosc2_batches_decode_in_threads_and_name_the_bad_sample():
    """Members as the loaders hand them over (views into a buffer, of any length) decoded by `decode_members`;
    the error says which one is bad."""
    codec = get_codec("blosc2")
    crops = random_crops(9, 3, 20, seed=3)
    encoded = [codec.encode(crop) for crop in crops]
    buffer = np.frombuffer(b"".join(encoded), dtype=np.uint8).copy()
    ends = np.cumsum([len(m) for m in encoded])
    members = [buffer[end - len(m) : end] for m, end in zip(encoded, ends, strict=True)]
    out = np.zeros_like(crops)
    with ThreadPoolExecutor(2) as pool:
        codec.decode_members(members, out, pool)
        assert np.array_equal(out, crops)
        members[6][20:40] ^= 0xFF  # inside the compressed stream
        members[4] = members[4][:-1]  # a truncated member
        with pytest.raises(BadSample, match="not a blosc2 crop: Blosc2 header says .*expected") as caught:
            codec.decode_members(members, out, pool)
    assert caught.value.index == 4
    with pytest.raises(CorruptCrop, match="not a blosc2 crop"):
        codec.decode(bytes(members[6]), crops[6].shape)
    with pytest.raises(CorruptCrop, match="shorter than a Blosc2 header"):
        codec.decode(encoded[0][:10], crops[0].shape)
    with pytest.raises(CorruptCrop, match=r"expected 1600 from"):  # another crop size
        codec.decode(encoded[0], (2, 20, 20))
    with ThreadPoolExecutor(1) as pool, pytest.raises(ValueError, match="npy crops are decoded by DALI"):
        get_codec("npy").decode_members(encoded, out, pool)


@pytest.mark.parametrize("name", HOST_CODECS)
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_batched_decode_equals_the_per_crop_decode(name, threads):
    """`decode_members` undoes the predictor of groups of crops at once (FINISH_CROPS) in any thread:
    37 crops (not a multiple of a group, nor of the threads) of every kind come out as `Codec.decode` gives them."""
    codec = get_codec(name)
    crops = random_crops(37, 5, 24, seed=threads)
    crops[3] = full_range(5, 24)
    crops[20] = np.where(np.indices((5, 24, 24)).sum(0) % 2, 65535, 0)
    members = [codec.encode(crop) for crop in crops]
    out = np.zeros_like(crops)
    finished = []
    with ThreadPoolExecutor(threads) as pool:
        codec.decode_members(members, out, pool, then=lambda start, stop: finished.append((start, stop)))
    assert np.array_equal(out, np.stack([codec.decode(m, crops[0].shape) for m in members]))
    assert np.array_equal(out, crops)
    assert sorted(i for start, stop in finished for i in range(start, stop)) == list(range(37))  # each crop once
    assert max(stop - start for start, stop in finished) <= FINISH_CROPS


def test_one_thread_unpacks_the_members_in_order():
    """Decompressing small crops in several threads at once hands the GIL back and forth (slower than one thread):
    one thread unpacks every member, in order, however many the pool has; finishing is shared."""
    codec = get_codec("blosc2-lz4")
    members = [codec.encode(crop) for crop in random_crops(40, 3, 16, seed=5)]
    unpacked = []

    def unpack_into(member, out):
        unpacked.append((threading.get_ident(), members.index(bytes(member))))
        return codec._unpack_into(member, out)

    out = np.zeros((len(members), 3, 16, 16), dtype=np.uint16)
    with ThreadPoolExecutor(3) as pool:
        dataclasses.replace(codec, _unpack_into=unpack_into).decode_members(members, out, pool)
    assert len({thread for thread, _ in unpacked}) == 1
    assert [i for _, i in unpacked] == list(range(len(members)))
    assert np.array_equal(out, np.stack([codec.decode(m, (3, 16, 16)) for m in members]))


@pytest.mark.parametrize("failure", ["bad member", "then raises"])
def test_a_failed_batch_leaves_every_thread_free(failure):
    """A member that does not decode (in the unpacking thread) or an error in `then` (in a finishing thread) is
    raised once every thread has stopped: nothing writes on afterwards, and all of the pool's threads are free
    again (a finisher still waiting for groups would hold one forever)."""
    codec = get_codec("blosc2")
    crops = random_crops(50, 3, 16, seed=6)
    members = [codec.encode(crop) for crop in crops]
    if failure == "bad member":
        members[35] = members[35][:-1]

    finished = []

    def then(start: int, stop: int) -> None:
        if failure == "then raises" and start == FINISH_CROPS:
            raise RuntimeError("normalising failed")
        time.sleep(0.05)  # slow groups: still running when the error is found
        finished.append(start)

    pool = ThreadPoolExecutor(3)
    try:
        with pytest.raises(BadSample if failure == "bad member" else RuntimeError) as caught:
            codec.decode_members(members, np.zeros_like(crops), pool, then)
        if failure == "bad member":
            assert caught.value.index == 35
        done = list(finished)
        time.sleep(0.2)
        assert finished == done  # nothing ran on after the error was raised
        everyone = threading.Barrier(3, timeout=10)  # passes only when three tasks run at once
        for task in [pool.submit(everyone.wait) for _ in range(3)]:
            task.result()
    finally:
        pool.shutdown(wait=False)


def test_after_a_finishing_error_the_unpacker_stops():
    """Once a group fails to finish (`then` raises), the batch is lost: the unpacker stops at its next group
    (before: it decompressed the rest of the batch)."""
    codec = get_codec("blosc2")
    crops = random_crops(8 * FINISH_CROPS, 3, 16, seed=7)
    members = [codec.encode(crop) for crop in crops]
    unpacked = []

    def unpack_into(member, out):
        unpacked.append(len(unpacked))
        time.sleep(0.002)  # slow enough that the finisher's error comes long before the unpacker's end
        return codec._unpack_into(member, out)

    def then(start: int, stop: int) -> None:
        raise RuntimeError("normalising failed")

    with ThreadPoolExecutor(2) as pool, pytest.raises(RuntimeError, match="normalising failed"):
        dataclasses.replace(codec, _unpack_into=unpack_into).decode_members(members, np.zeros_like(crops), pool, then)
    assert len(unpacked) <= 3 * FINISH_CROPS  # the first group, the one it was in when the error came, one more


def test_after_a_bad_member_no_queued_group_is_finished():
    """A member fails to decode while an unpacked group still waits in the queue (the one finishing thread is busy
    with the group before): that group is never finished or handed to `then` (before: it was)."""
    codec = get_codec("blosc2")
    crops = random_crops(8 * FINISH_CROPS, 3, 16, seed=7)
    members = [codec.encode(crop) for crop in crops]
    bad = 2 * FINISH_CROPS
    members[bad] = b"not a crop"
    reached_bad, unpacked, handed = threading.Event(), [], []

    def unpack_into(member, out):
        index = len(unpacked)
        unpacked.append(index)
        if index // FINISH_CROPS == 1:
            time.sleep(0.005)  # the finishing thread has long taken group 0 when group 1 is queued
        if index == bad:
            reached_bad.set()
        return codec._unpack_into(member, out)

    def then(start: int, stop: int) -> None:
        if start == 0:  # busy until the bad member is found, and a little after
            reached_bad.wait(10)
            time.sleep(0.05)
        handed.append(start)

    with ThreadPoolExecutor(2) as pool, pytest.raises(BadSample) as caught:
        dataclasses.replace(codec, _unpack_into=unpack_into).decode_members(members, np.zeros_like(crops), pool, then)
    assert caught.value.index == bad and handed == [0]  # group 1 was queued when the error came: never finished


def test_blosc2_lz4_is_blosc2_with_lz4hc(tmp_path):
    """The same layout and format version (one decoder reads both; the chunk names its compressor), another
    codec name (which fastcells that predate it refuse as unknown)."""
    crop = random_crops(1, 3, 32, seed=1)[0]
    zstd, lz4 = get_codec("blosc2"), get_codec("blosc2-lz4")
    assert {k: v for k, v in zstd.params.items() if k not in ("compressor", "level")} == \
        {k: v for k, v in lz4.params.items() if k not in ("compressor", "level")}
    assert lz4.params["compressor"] == "lz4hc" and lz4.format_version == zstd.format_version == 3
    assert zstd.encode(crop)[2] >> 5 == 4 and lz4.encode(crop)[2] >> 5 == 1  # header flags: zstd 4, LZ4(HC) 1
    assert np.array_equal(zstd.decode(lz4.encode(crop), crop.shape), crop)
    folder = make_shards(tmp_path / "shards", random_crops(2, 3, 8), codec="blosc2-lz4")
    raw = json.loads((folder / "index.json").read_text())
    (folder / "index.json").write_text(json.dumps({**raw, "codec_params": {**raw["codec_params"], "compressor": "zstd"}}))
    with pytest.raises(InputError, match=r"codec 'blosc2-lz4' with parameters \{'compressor': 'zstd'\}"):
        read_manifest(folder)


def old_blosc2_crops() -> np.ndarray:
    """The crops of tests/data/blosc2_v3_a6147d2 (written by fastcell at a6147d2, before the batched decoder)."""
    crops = random_crops(6, 3, 16, seed=14)
    crops[0] = np.random.default_rng(14).integers(0, 2**16, (3, 16, 16), dtype=np.uint16)  # full range
    crops[1] = np.where(np.indices((3, 16, 16)).sum(0) % 2, 65535, 0)  # residuals wrap
    return crops


def test_a_blosc2_folder_written_before_reads_bit_exact_everywhere(tmp_path):
    """A v3 blosc2 folder of an earlier fastcell: every reader gives back its crops, and today's writer makes the
    same bytes."""
    old = Path(__file__).parent / "data" / "blosc2_v3_a6147d2"
    crops = old_blosc2_crops()
    raw = json.loads((old / "index.json").read_text())
    assert raw["version"] == 3 and raw["codec"] == "blosc2" and raw["codec_params"] == CODECS["blosc2"].params
    found = every_crop(old)
    assert sorted(found) == list(range(6)) and all(np.array_equal(found[i], crops[i]) for i in found)
    assert summarize(old, verify=True)["verified"] == 6
    npy = make_shards(tmp_path / "npy", crops, shard_size=4)

    def loaded(folder: Path, backend: str):
        images, ids = map(torch.cat, zip(*create_eval_loader(folder, 4, backend=backend, device="cpu", num_workers=2),
                                         strict=True))
        identity, _, train_ids = map(torch.cat, zip(*create_train_loader(
            folder, AugmentSpec.identity(), 2, backend=backend, device="cpu", num_workers=2), strict=True))
        return images, ids, identity[train_ids.argsort()], train_ids.sort().values

    for backend in ("torch", "dali"):  # the same crops as npy: the same tensors (to float32 rounding on DALI)
        (images, ids, identity, train_ids), reference = loaded(old, backend), loaded(npy, backend)
        assert torch.equal(ids, torch.arange(6)) and torch.equal(train_ids, torch.arange(6))
        torch.testing.assert_close(images, reference[0], rtol=1e-6, atol=1e-6)
        assert torch.equal(identity, reference[2])
    again = make_shards(tmp_path / "again", crops, shard_size=4, codec="blosc2")
    for tar in sorted(old.glob("*.tar")):
        assert (again / tar.name).read_bytes() == tar.read_bytes()


def test_manifests_with_codec_parameters_this_fastcell_does_not_decode_are_refused(tmp_path):
    folder = make_shards(tmp_path / "shards", random_crops(2, 3, 8), codec="blosc2")
    raw = json.loads((folder / "index.json").read_text())
    assert raw["version"] == 3 and raw["codec_params"]["predictor"] == "gradient"
    (folder / "index.json").write_text(json.dumps({**raw, "codec_params": {**raw["codec_params"], "level": 5}}))
    assert read_manifest(folder).codec.name == "blosc2"  # the level only matters to the encoder
    (folder / "index.json").write_text(json.dumps({**raw, "codec_params": {**raw["codec_params"], "predictor": "left"}}))
    with pytest.raises(InputError, match=r"index.json: codec 'blosc2' with parameters \{'predictor': 'left'\}"):
        read_manifest(folder)


def test_codecs_pickle_as_their_registry_entry():
    """Shard workers receive the Codec of the run: it crosses the process boundary by name."""
    for codec in CODECS.values():
        assert pickle.loads(pickle.dumps(codec)) is codec


def test_unknown_codecs_are_refused_with_the_known_ones(tmp_path):
    with pytest.raises(InputError, match="unknown codec 'jpeg' .known: npy, tiff-deflate, blosc2"):
        get_codec("jpeg")
    with pytest.raises(InputError, match="--codec must be one of"):
        ShardConfig(source=tmp_path, out=tmp_path / "out", codec="png").validate()
    folder = make_shards(tmp_path / "shards", random_crops(2, 3, 8))
    raw = json.loads((folder / "index.json").read_text())
    (folder / "index.json").write_text(json.dumps({**raw, "codec": "jpeg"}))
    with pytest.raises(InputError, match=r"index.json: field 'codec': unknown codec 'jpeg'"):
        read_manifest(folder)


# --- one screen, sharded with each codec ------------------------------------------------------------


@pytest.fixture(scope="module")
def screen(tmp_path_factory) -> Path:
    """2 plates x 2 wells x 1 site of 5-channel 96 x 128 px fields, 6 cells each (locations given)."""
    return write_screen(tmp_path_factory.mktemp("screen"), wells=("A01", "B01"), sites=1, n_channels=CHANNELS)


@pytest.fixture(scope="module")
def sharding(screen) -> dict:
    """The options of `sharded` as ShardConfig fields."""
    return dict(locations=screen.parent / "cells.csv", crop_size=CROP, border="pad", shard_size=8,
                val_fraction=0.25, workers=1)


@pytest.fixture(scope="module")
def sharded(screen, tmp_path_factory) -> dict[str, Path]:
    """The same screen through `fastcell shard` once per codec (val split so that both splits are read)."""
    root = tmp_path_factory.mktemp("sharded")
    out = {}
    for codec in SHARD_CODECS:
        out[codec] = root / codec
        result = CliRunner().invoke(app, [
            "shard", str(screen), str(out[codec]), "--locations", str(screen.parent / "cells.csv"),
            "--crop", str(CROP), "--border", "pad", "--shard-size", "8", "--val-fraction", "0.25",
            "--workers", "1", "--no-progress", "--codec", codec,
        ])  # fmt: skip
        assert result.exit_code == 0, result.output
        assert f"{codec} shards" in " ".join(result.output.split())
    return out


def every_crop(folder: Path) -> dict[int, np.ndarray]:
    manifest = read_manifest(folder)
    return {
        cell_id: crop
        for split in manifest.splits
        for tar in manifest.tar_paths(split)
        for cell_id, crop in read_samples(tar, manifest.codec, manifest.crop_shape)
    }


def test_the_manifest_records_the_codec_and_the_members_follow_it(sharded):
    for codec in SHARD_CODECS:
        raw = json.loads((sharded[codec] / "index.json").read_text())
        assert raw["codec"] == codec and raw["codec_params"] == CODECS[codec].params
        assert raw["version"] == VERSIONS[codec]  # npy folders stay readable by v1 readers, tiff-deflate by v2
        assert raw["config"]["codec"] == codec
        manifest = read_manifest(sharded[codec])
        for tar in manifest.tar_paths("train"):
            exts = {ext for sample in read_dali_index(tar.with_suffix(".idx")) for ext, *_ in sample}
            assert exts == {CODECS[codec].ext, "id"}
    npy = every_crop(sharded["npy"])
    assert sorted(npy) == list(range(len(npy))) and len(npy) == 24
    for codec in SHARD_CODECS[1:]:
        crops = every_crop(sharded[codec])
        assert sorted(crops) == sorted(npy) and all(np.array_equal(npy[i], crops[i]) for i in npy)


def test_info_shows_the_codec_and_the_smaller_shards(sharded):
    sizes = {}
    for codec in SHARD_CODECS:
        summary = summarize(sharded[codec], verify=True)
        assert summary["codec"] == codec and summary["verified"] == summary["cells"] == 24
        sizes[codec] = summary["bytes_per_cell"]
        result = CliRunner().invoke(app, ["info", str(sharded[codec]), "--verify"])
        assert result.exit_code == 0, result.output
        output = " ".join(result.output.split())
        assert f"codec {codec}:" in output
        assert "verified: all 24 crops match their checksums and decode to uint16 5 x 24 x 24" in output
    assert sizes["tiff-deflate"] < 0.8 * sizes["npy"] and sizes["blosc2"] < 0.8 * sizes["npy"]


def test_old_manifests_without_a_codec_are_npy_and_resume(sharded, screen, sharding, tmp_path):
    folder = tmp_path / "old"
    shutil.copytree(sharded["npy"], folder)
    raw = json.loads((folder / "index.json").read_text())
    del raw["codec"], raw["codec_params"], raw["config"]["codec"]  # as written before codecs existed
    (folder / "index.json").write_text(json.dumps(raw))
    assert read_manifest(folder).codec.name == "npy"
    config = ShardConfig(source=screen, out=folder, **sharding)
    assert shard_screen(config).up_to_date  # the same configuration: nothing to redo


def test_resuming_with_another_codec_is_refused(sharded, screen, sharding):
    config = ShardConfig(source=screen, out=sharded["npy"], **sharding, codec="tiff-deflate")
    with pytest.raises(InputError, match="different configuration .*codec: 'npy' -> 'tiff-deflate'.*--overwrite"):
        shard_screen(config)


@pytest.mark.parametrize("crop", [CROP, CROP - 4])
def test_eval_loaders_read_identical_tensors_from_every_codec_on_both_backends(sharded, crop):
    """Identical per backend; across backends (and for the blosc2 codecs, which the DALI loader normalises in NumPy,
    not in DALI's `crop_mirror_normalize`) equal up to float32 rounding of the same affine map; centre-cropped alike."""
    out = {}
    for codec in SHARD_CODECS:
        for backend in ("dali", "torch"):
            images, ids = zip(*create_eval_loader(sharded[codec], 7, backend=backend, device="cpu", num_workers=2,
                                                  crop=crop), strict=True)  # fmt: skip
            out[codec, backend] = torch.cat(images), torch.cat(ids)
    for backend in ("dali", "torch"):
        images, ids = out["npy", backend]
        assert images.shape == (24, CHANNELS, crop, crop) and sorted(ids.tolist()) == list(range(24))
        for codec in SHARD_CODECS[1:]:
            assert torch.equal(out[codec, backend][1], ids)
            if codec in HOST_CODECS and backend == "dali":
                torch.testing.assert_close(out[codec, backend][0], images, rtol=1e-6, atol=1e-6)
                assert torch.equal(out[codec, backend][0], out[codec, "torch"][0])  # the same decode and arithmetic
            else:
                assert torch.equal(out[codec, backend][0], images), (codec, backend)
    torch.testing.assert_close(out["npy", "dali"][0], out["npy", "torch"][0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("channels", [1, 3])
def test_dali_decodes_every_channel_count(tmp_path, channels):
    crops = random_crops(10, channels, 16, seed=channels)
    crops[0] = full_range(channels, 16)
    out = {}
    for codec in SHARD_CODECS:
        folder = make_shards(tmp_path / codec, crops, shard_size=4, codec=codec)
        out[codec] = torch.cat([x for x, _ in create_eval_loader(folder, 4, device="cpu", num_workers=1)])
    assert out["npy"].shape == (10, channels, 16, 16) and torch.equal(out["npy"], out["tiff-deflate"])
    for codec in HOST_CODECS:
        torch.testing.assert_close(out["npy"], out[codec], rtol=1e-6, atol=1e-6)  # normalised in NumPy, not DALI


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_train_loaders_read_every_codec(sharded, backend):
    identity, augmented = {}, {}
    for codec in SHARD_CODECS:
        view1, view2, ids = map(torch.cat, zip(*create_train_loader(
            sharded[codec], AugmentSpec.identity(), 6, backend=backend, device="cpu", num_workers=2), strict=True))
        identity[codec] = view1[ids.argsort()]
        assert torch.equal(view1, view2) and sorted(ids.tolist()) == sorted(set(ids.tolist()))
        augmented[codec] = next(iter(create_train_loader(sharded[codec], AugmentSpec(output_size=16), 6,
                                                         backend=backend, device="cpu", num_workers=1)))
    for codec in SHARD_CODECS[1:]:
        assert torch.equal(identity["npy"], identity[codec])
        for mine, npy in zip(augmented[codec], augmented["npy"], strict=True):  # same seeds, same crops
            torch.testing.assert_close(mine, npy)
    view1, view2, _ = augmented["blosc2"]
    assert view1.shape == view2.shape == (6, CHANNELS, 16, 16) and torch.isfinite(view1).all()
    assert (view1 - view2).abs().mean() > 0.1


@pytest.mark.parametrize("codec", HOST_CODECS)
def test_blosc2_batches_of_several_finishing_groups_read_the_same(sharded, codec):
    """Batches of more than FINISH_CROPS crops (a group finished in one thread while the next is unpacked in
    another) read as batches of 7 do (eval: 24 crops) and as npy's batches do (train: 18 crops)."""
    assert 18 > FINISH_CROPS
    small = torch.cat([images for images, _ in create_eval_loader(sharded[codec], 7, device="cpu", num_workers=2)])
    large = torch.cat([images for images, _ in create_eval_loader(sharded[codec], 24, device="cpu", num_workers=3)])
    assert torch.equal(small, large)
    (npy,), (mine,) = (list(create_train_loader(sharded[name], AugmentSpec.identity(), 18, device="cpu",
                                                 num_workers=3)) for name in ("npy", codec))
    assert torch.equal(mine[2], npy[2]) and torch.equal(mine[0], npy[0])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (DALI's mixed TIFF decoder, nvTIFF)")
def test_gpu_decoder_equals_the_cpu_decoder(sharded):
    """Same GPU arithmetic after decoding: tiff (mixed decoder) and npy (CPU parse, copied) must be identical."""
    out = {}
    for codec, device in (("npy", "cuda"), ("tiff-deflate", "cuda"), ("tiff-deflate", "cpu")):
        images, ids = zip(*create_eval_loader(sharded[codec], 8, device=device, num_workers=1), strict=True)
        out[codec, device] = torch.cat([x.cpu() for x in images]), torch.cat(ids)
    assert torch.equal(out["npy", "cuda"][1], out["tiff-deflate", "cuda"][1])
    assert torch.equal(out["npy", "cuda"][0], out["tiff-deflate", "cuda"][0])
    torch.testing.assert_close(out["tiff-deflate", "cuda"][0], out["tiff-deflate", "cpu"][0], atol=1e-4, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (pinned host decode, copy, GPU views)")
def test_blosc2_on_the_gpu_equals_npy(sharded):
    """blosc2 is decoded on the host into pinned memory and copied over: eval tensors equal npy's on the GPU;
    the GPU train loader (host decode, views by the batched recipe on the GPU) reads every sample once."""
    out = {}
    for codec in ("npy", *HOST_CODECS):
        images, ids = zip(*create_eval_loader(sharded[codec], 8, device="cuda", num_workers=2), strict=True)
        out[codec] = torch.cat([x.cpu() for x in images]), torch.cat(ids)
    for codec in HOST_CODECS:
        assert torch.equal(out["npy"][1], out[codec][1])
        torch.testing.assert_close(out["npy"][0], out[codec][0], rtol=1e-6, atol=1e-6)
    identity = {}
    for codec in ("npy", *HOST_CODECS):
        view1, _, ids = map(torch.cat, zip(*create_train_loader(sharded[codec], AugmentSpec.identity(), 6,
                                                                device="cuda", num_workers=2), strict=True))
        identity[codec] = view1[ids.argsort()].cpu()
        assert view1.is_cuda and len(set(ids.tolist())) == len(ids) == 18
    for codec in HOST_CODECS:
        torch.testing.assert_close(identity["npy"], identity[codec])


# --- bad input ----------------------------------------------------------------------------------------


def flip_bytes(tar: Path, sample: int, start: float, n: int = 16) -> str:
    """Invert `n` bytes of one sample's crop member at `start` (a fraction of its size); the tar keeps its size."""
    _, offset, size, member = read_dali_index(tar.with_suffix(".idx"))[sample][0]
    data = bytearray(tar.read_bytes())
    at = offset + int(start * size)
    data[at : at + n] = bytes(b ^ 0xFF for b in data[at : at + n])
    tar.write_bytes(bytes(data))
    return member


@pytest.fixture
def damaged(sharded, tmp_path):
    """A copy of the tiff-deflate folder to damage."""
    return Path(shutil.copytree(sharded["tiff-deflate"], tmp_path / "damaged"))


def test_members_of_another_codec_are_named_by_every_reader(sharded, tmp_path):
    folder = Path(shutil.copytree(sharded["npy"], tmp_path / "mislabelled"))
    raw = json.loads((folder / "index.json").read_text())
    raw["codec"], raw["codec_params"] = "tiff-deflate", CODECS["tiff-deflate"].params  # npy members, manifest says tiff
    (folder / "index.json").write_text(json.dumps(raw))
    expected = r"train-000000.tar: sample \d{12} holds \d{12}.npy, \d{12}.id; the manifest's codec 'tiff-deflate'"
    for backend in ("dali", "torch"):
        with pytest.raises(InputError, match=expected):
            create_eval_loader(folder, 8, backend=backend, device="cpu")
        with pytest.raises(InputError, match=expected):
            create_train_loader(folder, AugmentSpec(), 4, backend=backend, device="cpu")
    with pytest.raises(InputError, match=expected):
        summarize(folder, verify=True)
    with pytest.raises(InputError, match=expected):
        verify_shard(folder / "train-000000.tar", codec=get_codec("tiff-deflate"))


def test_a_corrupt_compressed_crop_is_named(damaged):
    tar = damaged / "train-000001.tar"
    member = flip_bytes(tar, 3, start=0.5)  # inside the deflate stream
    expected = f"train-000001.tar: member {member} is corrupt"
    with pytest.raises(InputError, match=f"train-000001.tar: sample .* is damaged: member {member}"):
        summarize(damaged, verify=True)  # its CRC-32 in cells.parquet, checked before deflate's own
    result = CliRunner().invoke(app, ["info", str(damaged), "--verify"])
    assert isinstance(result.exception, InputError) and f"is damaged: member {member}" in str(result.exception)
    with pytest.raises(InputError, match=expected):  # the error comes through the DataLoader worker
        list(create_eval_loader(damaged, 8, backend="torch", device="cpu", num_workers=1))


def test_a_crop_dali_cannot_decode_is_named_with_its_sample(damaged):
    """DALI's decoder says only `nvImageCodec failure: '#4'`: the loader finds the shard and the sample."""
    member = flip_bytes(damaged / "train-000002.tar", 1, start=0.0)  # the TIFF header
    expected = f"train-000002.tar: member {member} is corrupt .*not a TIFF file.*DALI: nvImageCodec failure"
    with pytest.raises(InputError, match=expected):
        list(create_eval_loader(damaged, 8, device="cpu", num_workers=1))
    with pytest.raises(InputError, match=expected):
        list(create_train_loader(damaged, AugmentSpec(), 6, device="cpu", num_workers=1))


@pytest.mark.parametrize("codec", HOST_CODECS)
def test_shard_members_are_found_in_shard_order_and_by_id(sharded, codec):
    """The blosc2 loaders read members through the indices: in shard order (eval) and by the ids DALI's reader
    shuffles (train); an id that no index lists, or that two samples hold, is refused."""
    from fastcell.loaders.base import open_split
    from fastcell.loaders.dali import ShardMembers

    manifest, shards = open_split(sharded[codec], None)
    crops = every_crop(sharded[codec])
    table = ShardMembers(shards)
    ordered = [(member, int(i)) for members, ids in table.batches(5) for member, i in zip(members, ids, strict=True)]
    assert [i for _, i in ordered] == list(crops)  # shard order, as read_samples reads them
    assert all(np.array_equal(manifest.codec.decode(m, manifest.crop_shape), crops[i]) for m, i in ordered)
    wanted = np.random.default_rng(0).permutation(list(crops))[:7]
    found = table.find(wanted)
    assert all(np.array_equal(manifest.codec.decode(m, manifest.crop_shape), crops[i])
               for m, i in zip(found, wanted.tolist(), strict=True))
    with pytest.raises(InputError, match="DALI read cell id 1000000000, which no shard index lists"):
        table.find(np.array([wanted[0], 10**9, wanted[1]]))
    twice = ShardMembers(shards + shards[:1])  # a shard listed twice: its ids twice
    with pytest.raises(InputError, match=r"cell id \d+ is in more than one sample of the shards"):
        twice.find(wanted)


def test_a_damaged_id_member_is_named_by_the_blosc2_loaders(sharded, tmp_path):
    """The blosc2 loaders find members through the indices (the train loader by the id DALI read): an id member
    whose bytes no longer match its name names the shard and the member, instead of passing a wrong id on."""
    folder = Path(shutil.copytree(sharded["blosc2"], tmp_path / "blosc2"))
    tar = folder / "train-000001.tar"
    sample = read_dali_index(tar.with_suffix(".idx"))[1]
    (_, offset, _, name), = [member for member in sample if member[0] == "id"]
    data = bytearray(tar.read_bytes())
    data[offset : offset + 8] = (10**9).to_bytes(8, "little")
    tar.write_bytes(bytes(data))
    expected = f"train-000001.tar: member {name} is corrupt .not the 8-byte id"
    with pytest.raises(InputError, match=expected):  # the train loader checks the ids once, when it is made
        create_train_loader(folder, AugmentSpec(), 6, device="cpu", num_workers=1)
    with pytest.raises(InputError, match=expected):
        list(create_eval_loader(folder, 6, backend="dali", device="cpu", num_workers=1))


def test_a_damaged_id_in_the_index_is_named_by_the_blosc2_eval_loader(sharded, tmp_path):
    """The DALI eval loader reads blosc2 shards through their indices: an id member that is not 8 bytes names the
    shard and the member (as `read_samples` does), rather than becoming an id of nothing."""
    folder = Path(shutil.copytree(sharded["blosc2"], tmp_path / "blosc2"))
    idx = folder / "train-000001.idx"
    header, *lines = idx.read_text().splitlines()
    tokens = lines[2].split()
    at = tokens.index("id")
    name, tokens[at + 2] = tokens[at + 3], "7"
    lines[2] = " ".join(tokens)
    idx.write_text("\n".join([header, *lines]) + "\n")
    with pytest.raises(InputError, match=f"train-000001.tar: member {name} is not an 8-byte id"):
        list(create_eval_loader(folder, 8, backend="dali", device="cpu", num_workers=1))
    with pytest.raises(InputError, match=f"train-000001.tar: the tar header of member {name} is damaged"):
        list(read_samples(folder / "train-000001.tar", get_codec("blosc2"), (CHANNELS, CROP, CROP)))


def test_an_eval_loader_stopped_early_leaves_no_decoding_thread(sharded):
    """Breaking out of a blosc2 eval loader (DALI backend) ends its decoding threads and the batch decoded ahead."""
    loader = create_eval_loader(sharded["blosc2"], 4, backend="dali", device="cpu", num_workers=2)

    def decoding() -> set[str]:
        return {t.name.split("_")[0] for t in threading.enumerate()
                if t.name.startswith(("fastcell-decode", "fastcell-prefetch"))}

    gc.collect()  # a loader of an earlier test, left in a reference cycle, would still hold its threads

    for images, _ in loader:
        assert decoding() == {"fastcell-decode", "fastcell-prefetch"} and images.shape[0] == 4
        break
    assert decoding() == set()


def test_a_corrupt_blosc2_crop_is_named_by_every_reader(sharded, tmp_path):
    """No DALI operator decodes blosc2: the loaders decode it in threads, and name the shard and the member.
    (A flipped byte inside the compressed stream can decode to other pixels: Blosc2 keeps no checksum.)"""
    folders, expected = {}, {}
    for codec in HOST_CODECS:
        folders[codec] = Path(shutil.copytree(sharded[codec], tmp_path / codec))
        member = flip_bytes(folders[codec] / "train-000002.tar", 1, start=0.0)  # the Blosc2 header
        expected[codec] = f"train-000002.tar: member {member} is corrupt .*not a {codec} crop"
        with pytest.raises(InputError, match=f"train-000002.tar: sample .* is damaged: member {member}"):
            summarize(folders[codec], verify=True)  # its CRC-32 in cells.parquet, checked before decoding
    for backend in ("torch", "dali"):  # torch first: its workers fork, and DALI's failed pipelines hold threads
        for codec in HOST_CODECS:
            with pytest.raises(InputError, match=expected[codec]):
                list(create_eval_loader(folders[codec], 8, backend=backend, device="cpu", num_workers=2))
            with pytest.raises(InputError, match=expected[codec]):
                list(create_train_loader(folders[codec], AugmentSpec(), 6, backend=backend, device="cpu",
                                         num_workers=1))
