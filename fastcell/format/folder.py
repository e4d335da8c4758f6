"""A shard folder: WebDataset tars of single-cell crops, their DALI indices, and the manifest.

This module is the one place that knows the on-disk layout (see shards/README.md):

- `ShardWriter` writes one tar of samples (`<key>.<ext>` the crop in the folder's codec, e.g.
  `<key>.npy` uint16 CHW or `<key>.tif`; `<key>.id` int64) and its DALI `.idx` in the same pass,
  both atomically: a shard is complete exactly when its tar and its index exist under their final names.
- `ShardManifest` / `read_manifest` / `write_manifest` handle `index.json`.
- `verify_shard` checks a tar against its index (truncation, members of the manifest's codec);
  `read_samples` decodes every crop of a shard and names the first bad one, checking each crop
  member against its CRC-32 when the cell table records them (`CHECKSUM_COLUMN`; `ShardWriter`
  computes them as it writes, `crop_checksums` from a written shard).

How crops are encoded is `fastcell.format.codecs`.

Tars are deterministic: fixed member order, mtime 0, uid/gid 0, no user names, so the same
crops give byte-identical shards.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from fastcell import __version__
from fastcell.errors import InputError
from fastcell.format.codecs import CODECS, DEFAULT_CODEC, LEGACY_CODEC, Codec, CorruptCrop, get_codec
from fastcell.format.codecs import decode_npy as decode_crop  # noqa: F401  (the npy member, for its callers)
from fastcell.format.codecs import encode_npy as encode_crop  # noqa: F401
from fastcell.io import atomic_path, write_json_atomic

FORMAT_NAME = "fastcell-shards"
FORMAT_VERSION = 3  # 3: blosc2 crops; 2: crops in a codec of fastcell.format.codecs (tiff-deflate); 1: npy only
READABLE_VERSIONS = (1, 2, 3)
MANIFEST_NAME = "index.json"
CELLS_TABLE_NAME = "cells.parquet"
FIELDS_TABLE_NAME = "fields.parquet"
CELL_COLUMNS = ("id", "split", "shard", "plate", "well", "site", "batch", "compound", "concentration", "moa",
                "role", "x", "y", "image")  # cells.parquet, in this order (shards/README.md); then CHECKSUM_COLUMN
CHECKSUM_COLUMN = "crc32"  # cells.parquet: CRC-32 of each sample's crop member, as stored in its tar
KEY_DIGITS = 12
ID_EXT = "id"
DALI_INDEX_VERSION = "v1.2"


def sample_key(cell_id: int) -> str:
    """The sample key of a cell id: 12 decimal digits, no dot (DALI splits at the first dot)."""
    if not 0 <= cell_id < 10**KEY_DIGITS:
        raise ValueError(f"cell id {cell_id} outside [0, 1e{KEY_DIGITS})")
    return f"{cell_id:0{KEY_DIGITS}d}"


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def index_name(tar_name: str) -> str:
    return tar_name[: -len(".tar")] + ".idx"


NPY = CODECS[DEFAULT_CODEC]


def manifest_codec(raw: dict[str, Any], path: Path) -> Codec:
    """The codec a manifest names (none: npy, as written before codecs existed), checked against this fastcell's
    parameters of it: a recorded parameter that differs (another predictor, layout, ...) would misdecode."""
    codec = get_codec(raw.get("codec", LEGACY_CODEC), where=f"{path}: field 'codec'")
    known = codec.params
    recorded = raw.get("codec_params") or {}
    differing = {k: v for k, v in recorded.items() if k != "level" and known.get(k, v) != v} if isinstance(
        recorded, dict) else recorded
    if differing:
        raise InputError(f"{path}: codec {codec.name!r} with parameters {differing} this fastcell does not decode "
                         f"(it knows {known}); a newer fastcell may read it")
    return codec


def encode_id(cell_id: int) -> bytes:
    return np.int64(cell_id).astype("<i8").tobytes()


def decode_id(data: bytes) -> int:
    return int(np.frombuffer(data, dtype="<i8")[0])


class ShardWriter:
    """Write one shard (tar + DALI index) atomically, its crops encoded by `codec`.

    Use as a context manager; `add(cell_id, crop)` appends a sample. On a clean exit the tar
    and its `.idx` are renamed into place (index first, so a tar under its final name always
    has its index); on an exception nothing appears under the final names.
    """

    def __init__(self, tar_path: str | os.PathLike, codec: Codec = NPY):
        self.tar_path = Path(tar_path)
        self.codec = codec
        self.idx_path = self.tar_path.with_suffix(".idx")
        self.count = 0
        self.checksums: list[int] = []  # CRC-32 of each crop member, in sample order
        self._index_lines: list[str] = []

    def __enter__(self) -> ShardWriter:
        self._tar_ctx = atomic_path(self.tar_path)
        tmp = self._tar_ctx.__enter__()
        self._tar = tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT)
        return self

    def add(self, cell_id: int, crop: np.ndarray) -> None:
        key = sample_key(cell_id)
        parts = []
        data = self.codec.encode(crop)
        self.checksums.append(zlib.crc32(data))
        members = ((self.codec.ext, data), (ID_EXT, encode_id(cell_id)))
        for ext, data in members:
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            info.mode = 0o644
            info.mtime = 0
            data_offset = self._tar.offset + tarfile.BLOCKSIZE  # USTAR: one header block per member
            self._tar.addfile(info, io.BytesIO(data))
            parts.append(f"{ext} {data_offset} {info.size} {info.name}")
        self._index_lines.append(" ".join(parts))
        self.count += 1

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._tar.close()
        if exc_type is None and self.count == 0:
            error = ValueError(f"refusing to write an empty shard: {self.tar_path}")
            self._tar_ctx.__exit__(ValueError, error, None)
            raise error
        if exc_type is None:
            with atomic_path(self.idx_path) as tmp_idx:
                tmp_idx.write_text(self._dali_index())
        return bool(self._tar_ctx.__exit__(exc_type, exc, tb))

    def _dali_index(self) -> str:
        return f"{DALI_INDEX_VERSION} {self.count}\n" + "\n".join(self._index_lines) + "\n"


def read_dali_index(idx_path: str | os.PathLike) -> list[list[tuple[str, int, int, str]]]:
    """Parse a DALI `.idx`: per sample, a list of (ext, data offset, size, member name)."""
    idx_path = Path(idx_path)
    try:
        lines = idx_path.read_text().splitlines()
        version, n = lines[0].split()
        samples = []
        for line in lines[1 : 1 + int(n)]:
            tok = line.split()
            samples.append([(tok[i], int(tok[i + 1]), int(tok[i + 2]), tok[i + 3]) for i in range(0, len(tok), 4)])
    except (OSError, ValueError, IndexError) as err:
        raise InputError(f"{idx_path}: not a readable DALI index ({err})") from err
    if version != DALI_INDEX_VERSION or len(samples) != int(n):
        raise InputError(f"{idx_path}: expected a {DALI_INDEX_VERSION} index of {n} samples, found {len(samples)}")
    return samples


class MemberSpans(NamedTuple):
    """Where a shard's samples lie, in index order ([n] int64 each)."""

    crop_at: np.ndarray  # offset of each crop member's data in the tar
    crop_size: np.ndarray
    id_at: np.ndarray  # offset of each 8-byte id member's data
    names: list[str]  # the id members' names (`<key>.id`: the key is the id written)
    idx_path: Path

    def keys(self) -> np.ndarray:
        """The ids the members' names give [n] int64; InputError naming the index when one is not a number."""
        try:
            return np.array([name.partition(".")[0] for name in self.names], dtype=np.int64)
        except (ValueError, OverflowError) as err:
            raise InputError(f"{self.idx_path}: an id member's name is not <cell id>.{ID_EXT} ({err})") from err


def read_member_spans(tar_path: str | os.PathLike, codec: Codec) -> MemberSpans:
    """Where a shard's crop and id members lie, parsed from its DALI index in a few vectorised steps
    (`read_dali_index` costs ~3 µs a sample in Python: as much as decompressing a small crop). InputError naming
    the shard when a sample does not hold exactly the codec's crop member and an 8-byte id, or a member lies beyond
    the end of the tar."""
    tar_path = Path(tar_path)
    idx_path = tar_path.with_suffix(".idx")
    try:
        tokens = idx_path.read_text().split()
    except (OSError, ValueError) as err:
        raise InputError(f"{idx_path}: not a readable DALI index ({err})") from err
    n = int(tokens[1]) if len(tokens) >= 2 and tokens[1].isdigit() else -1
    if tokens[:1] != [DALI_INDEX_VERSION] or len(tokens) != 2 + 8 * n:
        raise InputError(f"{idx_path}: not a {DALI_INDEX_VERSION} index of samples of two members each")
    # per sample: ext offset size name, twice, the members in the order of the tar (ShardWriter: crop, then id)
    first, second = (ID_EXT, codec.ext) if tokens[2:3] == [ID_EXT] else (codec.ext, ID_EXT)
    if n and (set(tokens[2::8]) != {first} or set(tokens[6::8]) != {second}):
        raise InputError(f"{tar_path}: a sample does not hold exactly <key>.{codec.ext} + <key>.{ID_EXT} "
                         f"(the manifest's codec is {codec.name!r})")
    try:
        columns = {ext: (np.array(tokens[at + 1 :: 8], dtype=np.int64), np.array(tokens[at + 2 :: 8], dtype=np.int64))
                   for ext, at in ((first, 2), (second, 6))}
    except (ValueError, OverflowError) as err:
        raise InputError(f"{idx_path}: not a readable DALI index ({err})") from err
    if n and min(int(v.min()) for pair in columns.values() for v in pair) < 0:
        raise InputError(f"{idx_path}: not a readable DALI index (a negative offset or size)")
    (crop_at, crop_size), (id_at, id_size) = columns[codec.ext], columns[ID_EXT]
    names = tokens[5 if first == ID_EXT else 9 :: 8]
    if n and np.any(id_size != 8):
        raise InputError(f"{tar_path}: member {names[np.argmax(id_size != 8)]} is not an 8-byte id")
    end = max(int((crop_at + crop_size).max(initial=0)), int((id_at + id_size).max(initial=0)))
    try:
        size = tar_path.stat().st_size
    except OSError as err:
        raise InputError(f"{tar_path}: shard missing ({err.strerror})") from err
    if end > size:
        raise InputError(f"{tar_path}: truncated ({size} bytes; its index needs {end})")
    return MemberSpans(crop_at, crop_size, id_at, names, idx_path)


def verify_shard(tar_path: str | os.PathLike, expected_count: int | None = None, codec: Codec | None = None) -> int:
    """Check a shard against its index: every member within the file, the count as expected and,
    with `codec`, each sample made of exactly the codec's crop member and the id.

    Returns the sample count. Raises InputError naming the shard (and the sample) when it is
    truncated, lacks its index, disagrees with the manifest's count, or holds other members (or, with
    `codec`, an id member that is not 8 bytes). Reads the index only; `read_samples` decodes the crops.
    """
    if codec is None:
        return len(_checked_index(Path(tar_path), expected_count, None))
    return len(checked_spans(tar_path, codec, expected_count).crop_at)


def checked_spans(tar_path: str | os.PathLike, codec: Codec, expected_count: int | None = None) -> MemberSpans:
    """The shard's `MemberSpans` after `verify_shard`'s checks, the index parsed at once (`read_member_spans`:
    loaders open every shard of a split and keep the spans); what is wrong with a shard that fails is then found
    sample by sample."""
    tar_path = Path(tar_path)
    try:
        spans = read_member_spans(tar_path, codec)
    except InputError:
        _checked_index(tar_path, expected_count, codec)  # names the sample, or the missing file
        raise
    if expected_count is not None and len(spans.crop_at) != expected_count:
        raise InputError(f"{tar_path}: holds {len(spans.crop_at)} samples, the manifest says {expected_count}")
    return spans


def _checked_index(tar_path: Path, expected_count: int | None, codec: Codec | None) -> list:
    """The shard's index (`read_dali_index`), read once, after the checks `verify_shard` describes."""
    idx_path = tar_path.with_suffix(".idx")
    if not tar_path.is_file():
        raise InputError(f"{tar_path}: shard missing")
    if not idx_path.is_file():
        raise InputError(
            f"{tar_path}: shard has no DALI index {idx_path.name}; rerun `fastcell shard` on the same "
            "output folder to complete it"
        )
    samples = read_dali_index(idx_path)
    size = tar_path.stat().st_size
    end = max(off + sz for sample in samples for _, off, sz, _ in sample)
    if end > size:
        raise InputError(f"{tar_path}: truncated ({size} bytes; its index needs {end})")
    if expected_count is not None and len(samples) != expected_count:
        raise InputError(f"{tar_path}: holds {len(samples)} samples, the manifest says {expected_count}")
    if codec is not None:
        expected = sorted((codec.ext, ID_EXT))
        for sample in samples:
            if sorted(ext for ext, *_ in sample) != expected:
                names = ", ".join(name for *_, name in sample)
                raise InputError(
                    f"{tar_path}: sample {names.split('.')[0]} holds {names}; the manifest's codec {codec.name!r} "
                    f"stores each sample as <key>.{expected[0]} + <key>.{expected[1]} (shards of another codec?)"
                )
    return samples


def decode_member(codec: Codec, data: bytes, shape: tuple[int, int, int], tar_path, member: str) -> np.ndarray:
    """A crop member's pixels; InputError naming the shard and the member when they do not decode to `shape`."""
    try:
        return codec.decode(data, shape)
    except CorruptCrop as err:
        raise InputError(f"{tar_path}: member {member} is corrupt ({err})") from err


def crop_checksums(tar_path: str | os.PathLike, codec: Codec) -> list[int]:
    """CRC-32 of every crop member of a written shard, in sample order (what `ShardWriter` recorded)."""
    spans = read_member_spans(tar_path, codec)
    data = np.memmap(tar_path, dtype=np.uint8, mode="r")
    return [zlib.crc32(data[at : at + size]) for at, size in zip(spans.crop_at.tolist(), spans.crop_size.tolist(),
                                                                  strict=True)]


def read_samples(
    tar_path: str | os.PathLike,
    codec: Codec,
    shape: tuple[int, int, int],
    checksums=None,
    expected_count: int | None = None,
) -> Iterator[tuple[int, np.ndarray]]:
    """(id, crop) of every sample of a shard in order, through its index, each crop decoded and checked.

    Raises InputError naming the shard and the member of the first sample that is missing a
    member, whose tar header is not the index's (`check_tar_headers`), has an id that is not its key, does not
    match its recorded CRC-32 (`checksums`: a mapping id -> CRC-32, when given) or does not decode to a uint16
    `shape` crop; first, whatever
    `verify_shard(tar_path, expected_count, codec)` raises (the index is read once for both).
    """
    tar_path = Path(tar_path)
    samples = _checked_index(tar_path, expected_count, codec)
    check_tar_headers(tar_path, [member for sample in samples for member in sample])
    with open(tar_path, "rb") as f:
        for sample in samples:
            members = {}
            for ext, offset, size, name in sample:
                f.seek(offset)
                members[ext] = (f.read(size), name)
            data, name = members[ID_EXT]
            key = name.split(".")[0]
            cell_id = decode_id(data) if len(data) == 8 else None
            if cell_id is None or sample_key(cell_id) != key:
                raise InputError(f"{tar_path}: member {name} is corrupt (not the 8-byte id {int(key)})")
            data, name = members[codec.ext]
            if checksums is not None:
                _check_crc(tar_path, key, name, data, checksums.get(cell_id))
            yield cell_id, decode_member(codec, data, shape, tar_path, name)


def _octal_fields(blocks: np.ndarray) -> np.ndarray:
    """The numbers in octal ASCII fields [N, width] of tar headers (digits, then NUL or space; blanks before them
    allowed); -1 where a field holds anything else."""
    value = np.zeros(len(blocks), np.int64)
    started, ended, bad = (np.zeros(len(blocks), bool) for _ in range(3))
    for column in blocks.T.astype(np.int64):
        digit = (column >= ord("0")) & (column <= ord("7"))
        blank = (column == 0) | (column == ord(" "))
        bad |= ~(digit | blank) | (digit & ended)
        ended |= started & blank
        value = np.where(digit & ~ended, value * 8 + column - ord("0"), value)
        started |= digit
    return np.where(bad | ~started, -1, value)


def check_tar_headers(tar_path: Path, members: list[tuple[str, int, int, str]], chunk: int = 1 << 14) -> None:
    """InputError naming the shard and the member when the tar's own headers are not its index's `members` (ext,
    data offset, size, name), one after the other from the start: a damaged header block stops tar readers that
    walk the headers (the torch backend's webdataset, `tar`), which would then miss samples without a word, while
    DALI, which reads through the index, would not notice. Checked in one vectorised pass over the header blocks."""
    if not members:
        return
    offsets = np.array([offset for _, offset, _, _ in members], np.int64)
    sizes = np.array([size for _, _, size, _ in members], np.int64)
    names = [name.encode() for *_, name in members]
    expected_at = np.concatenate([[0], offsets[:-1] + -(-sizes[:-1] // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE])
    data = np.memmap(tar_path, dtype=np.uint8, mode="r")
    if offsets.min() < tarfile.BLOCKSIZE or offsets.max() > len(data):
        raise InputError(f"{tar_path}: its index puts a member outside the tar")
    wrong = offsets - tarfile.BLOCKSIZE != expected_at
    for lo in range(0, len(members), chunk):  # header blocks gathered a chunk at a time (bounded memory)
        at = slice(lo, lo + chunk)
        blocks = np.asarray(data[(offsets[at] - tarfile.BLOCKSIZE)[:, None] + np.arange(tarfile.BLOCKSIZE)])
        checksum = blocks.sum(axis=1, dtype=np.int64) - blocks[:, 148:156].sum(axis=1, dtype=np.int64) + 8 * ord(" ")
        name_field = np.frombuffer(b"".join(name.ljust(100, b"\0")[:100] for name in names[at]), np.uint8)
        wrong[at] |= ((_octal_fields(blocks[:, 148:156]) != checksum) | (_octal_fields(blocks[:, 124:136]) != sizes[at])
                      | np.any(blocks[:, :100] != name_field.reshape(-1, 100), axis=1))
    if wrong.any():
        name = members[int(np.argmax(wrong))][3]
        raise InputError(f"{tar_path}: the tar header of member {name} is damaged or not where the index says (tar "
                         "readers would stop there); copy the shard again, or delete it and rerun `fastcell shard`")


def _check_crc(tar_path: Path, key: str, member: str, data: bytes, recorded: int | None) -> None:
    """InputError naming the shard and sample when a crop member does not match its recorded CRC-32."""
    if recorded is None:
        raise InputError(f"{tar_path}: sample {key} is not listed in {CELLS_TABLE_NAME} (shards of another run?)")
    found = zlib.crc32(data)
    if found != recorded:
        raise InputError(
            f"{tar_path}: sample {key} is damaged: member {member} does not match the checksum recorded in "
            f"{CELLS_TABLE_NAME} (CRC-32 {found:08x}, recorded {int(recorded):08x}); copy the shard again, or "
            "delete it and rerun `fastcell shard` with the same options"
        )


def find_bad_sample(tar_paths, codec: Codec, shape: tuple[int, int, int]) -> str | None:
    """Decode every sample of the shards in order (`read_samples`); the error naming the first bad
    shard and member, or None when all decode. What to run when a loader failed without saying where."""
    for tar_path in tar_paths:
        try:
            for _ in read_samples(tar_path, codec, shape):
                pass
        except InputError as err:
            return str(err)
    return None


@dataclass
class ShardInfo:
    name: str
    index: str
    count: int
    bytes: int | None = None  # the tar's size as written (None in manifests made before it was recorded)


@dataclass
class ShardManifest:
    """The content of `index.json` (see shards/README.md)."""

    channels: list[str]
    crop_size: int
    splits: dict[str, list[ShardInfo]]
    channel_stats: dict[str, list[float]]
    illumination: str | None = None
    scaling: dict[str, Any] = field(default_factory=lambda: {"method": "none"})
    skipped: dict[str, Any] = field(default_factory=lambda: {"fields": [], "cells": {}})
    config: dict[str, Any] = field(default_factory=dict)
    codec: Codec = NPY  # how the crops are stored (fastcell.format.codecs)
    fields_table: str | None = None  # per-field cell counts (FIELDS_TABLE_NAME); None in older folders
    root: Path | None = None  # the folder it was read from; not serialised
    sha256: str | None = None  # of the index.json bytes it was parsed from (`read_manifest`); not serialised

    @property
    def crop_shape(self) -> tuple[int, int, int]:
        """(C, S, S) of every stored crop."""
        return (len(self.channels), self.crop_size, self.crop_size)

    def count(self, split: str = "train") -> int:
        return sum(s.count for s in self.split_shards(split))

    def split_shards(self, split: str = "train") -> list[ShardInfo]:
        if split not in self.splits:
            where = self.root / MANIFEST_NAME if self.root else "the manifest"
            raise InputError(f"{where}: no split {split!r} (has {sorted(self.splits)})")
        return self.splits[split]

    def tar_paths(self, split: str = "train") -> list[Path]:
        return [self._root() / s.name for s in self.split_shards(split)]

    def index_paths(self, split: str = "train") -> list[Path]:
        return [self._root() / s.index for s in self.split_shards(split)]

    @property
    def cells_table(self) -> Path:
        return self._root() / CELLS_TABLE_NAME

    def files(self) -> list[str]:
        """Every file of the folder that the manifest names (itself included): what fastcell wrote there."""
        names = [MANIFEST_NAME, CELLS_TABLE_NAME, *([self.fields_table] if self.fields_table else [])]
        names += [self.illumination] if self.illumination else []
        return names + [name for shards in self.splits.values() for s in shards for name in (s.name, s.index)]

    def _root(self) -> Path:
        if self.root is None:
            raise ValueError("manifest has no root folder; read it with read_manifest()")
        return self.root

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "version": self.codec.format_version,  # the lowest that knows the codec: older readers refuse, not misread
            "codec": self.codec.name,
            "codec_params": self.codec.params,
            "channels": list(self.channels),
            "dtype": "uint16",
            "layout": "CHW",
            "crop_size": int(self.crop_size),
            "splits": {
                split: {"count": sum(s.count for s in shards), "shards": [asdict(s) for s in shards]}
                for split, shards in self.splits.items()
            },
            "channel_stats": self.channel_stats,
            "cells_table": CELLS_TABLE_NAME,
            **({"fields_table": self.fields_table} if self.fields_table else {}),
            "illumination": self.illumination,
            "scaling": self.scaling,
            "skipped": self.skipped,
            "config": self.config,
            "created_by": f"fastcell {__version__}",
        }


def write_manifest(shard_dir: str | os.PathLike, manifest: ShardManifest) -> Path:
    path = Path(shard_dir) / MANIFEST_NAME
    write_json_atomic(path, manifest.to_json())
    return path


def read_manifest_bytes(shard_dir: str | os.PathLike) -> bytes:
    """The bytes of `<shard_dir>/index.json`; InputError when it is missing or cannot be read."""
    root = Path(shard_dir)
    path = root / MANIFEST_NAME
    if not path.is_file():
        hint = " (did `fastcell shard` finish? rerun it to complete the output)" if root.is_dir() else ""
        raise InputError(f"{path}: no shard manifest{hint}")
    try:
        return path.read_bytes()
    except OSError as err:
        raise InputError(f"{path}: unreadable manifest ({err})") from err


def read_manifest(shard_dir: str | os.PathLike, *, verify: bool = True, data: bytes | None = None) -> ShardManifest:
    """Read and check `<shard_dir>/index.json`; with `verify`, every listed shard and index exists.
    `data`: the file's bytes (`read_manifest_bytes`) when the caller has read them already. The manifest's
    `sha256` is that of the bytes parsed: what a run that uses it records, whatever the file holds later."""
    root = Path(shard_dir)
    path = root / MANIFEST_NAME
    data = read_manifest_bytes(root) if data is None else data
    try:
        raw = json.loads(data)
    except ValueError as err:  # not JSON, or not UTF-8
        raise InputError(f"{path}: unreadable manifest ({err})") from err
    if not isinstance(raw, dict):
        raise InputError(f"{path}: unreadable manifest (a JSON {type(raw).__name__}, not an object)")
    if raw.get("format") != FORMAT_NAME or raw.get("version") not in READABLE_VERSIONS:
        raise InputError(
            f"{path}: not a {FORMAT_NAME} {', '.join(f'v{v}' for v in READABLE_VERSIONS[:-1])} or "
            f"v{READABLE_VERSIONS[-1]} manifest "
            f"(format={raw.get('format')!r}, version={raw.get('version')!r}); a newer fastcell may read it"
        )
    codec = manifest_codec(raw, path)
    try:
        manifest = ShardManifest(
            channels=list(raw["channels"]),
            crop_size=int(raw["crop_size"]),
            splits={
                split: [ShardInfo(**s) for s in body["shards"]] for split, body in raw["splits"].items()
            },
            channel_stats={k: [float(x) for x in v] for k, v in raw["channel_stats"].items()},
            illumination=raw.get("illumination"),
            scaling=raw.get("scaling", {"method": "none"}),
            skipped=raw.get("skipped", {"fields": [], "cells": {}}),
            config=raw.get("config", {}),
            codec=codec,
            fields_table=raw.get("fields_table"),
            root=root,
            sha256=hashlib.sha256(data).hexdigest(),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise InputError(f"{path}: malformed manifest ({err!r})") from err
    if verify:
        for shards in manifest.splits.values():
            for s in shards:
                if not (root / s.name).is_file() or not (root / s.index).is_file():
                    missing = s.name if not (root / s.name).is_file() else s.index
                    raise InputError(f"{root / missing}: listed in {path} but missing")
    return manifest
