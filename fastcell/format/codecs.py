"""How a crop is stored in a shard: the codecs of `fastcell shard --codec`.

A codec turns a uint16 C x S x S crop into the bytes of one tar member (`<key>.<ext>`) and back:

- `npy` (default): `numpy.save` bytes, channels first. Nothing to decompress: DALI parses it on
  the CPU (`fn.decoders.numpy`) at ~5-9k crops/s per two cores.
- `tiff-deflate`: a one-page, one-strip TIFF, channels interleaved (HWC, "contiguous"),
  minisblack, horizontal-difference predictor, deflate (zlib level 1). Lossless, 1.25-1.3x smaller
  than npy on real 3- and 5-channel Cell Painting crops and 2.2x on nuclei crops; DALI decodes it
  with `fn.decoders.image(output_type=ANY_DATA, dtype=UINT16)`: on the GPU through nvTIFF
  (`device="mixed"`), on the CPU through libtiff (~0.5-0.75k 96-px crops/s per two cores).

- `blosc2`: the crop's gradient residuals, zigzag-mapped, bit-shuffled and zstd-compressed as one Blosc2
  chunk (`encode_blosc2`): 1.73-1.77x smaller than npy on real Cell Painting crops. No DALI operator decodes
  it: the loaders decode batches in threads (`Codec.decode_members`).
- `blosc2-lz4`: the same with LZ4HC: ~3% larger, decompressed 1.4-2.8x faster.

Why this TIFF and not another encoding (bench/results/codec_probe.md): DALI decodes interleaved
TIFF bit-exactly for 1, 3 and 5 channels, while planar TIFF comes back wrong, JPEG 2000 fails at 5
channels, PNG has no GPU decoder and nvTIFF 0.8 has no zstd. LZW with the predictor is 15% larger
than deflate at the same decode speed. zlib level 1 is as small as levels 6 and 9 on these 16-bit
crops (the low bits are noise) and encodes 1.3-1.8x faster (bench/results/codec_bench.md).

`CODECS` is the registry; `get_codec(name)` looks one up. `Codec.decode` is the NumPy reference
decoder (torch loader, `fastcell info --verify`, tests); it raises `CorruptCrop` for bytes that
are not the expected crop.
"""

from __future__ import annotations

import io
import queue
import struct
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np

from fastcell.errors import InputError

DEFAULT_CODEC = "npy"
LEGACY_CODEC = "npy"  # what a manifest or a shard config that names no codec was written with
TIFF_DEFLATE_LEVEL = 1
FINISH_CROPS = 16  # crops a host decoder finishes per call (~220 kB at 3 x 48 x 48, ~880 kB at 3 x 96 x 96:
# within a core's L2); 8, 32 and 64 were no faster in the 48-px eval loader (2-core Xeon, 2026-12-01)
BLOSC2_LZ4_LEVEL = 5  # LZ4HC level 5: as small as 9 (< 0.3%) at half the encode time
BLOSC2_LEVEL = 1  # zstd level 1 in Blosc2's scale: levels 5-8 shrink real crops by < 1% and encode 2-20x slower


class CorruptCrop(ValueError):
    """Bytes that do not decode to the crop the manifest describes."""


def check_crop(crop: np.ndarray) -> None:
    """A crop is uint16, C x S x S; refuse anything else before it is written."""
    if crop.dtype != np.uint16 or crop.ndim != 3 or crop.shape[1] != crop.shape[2]:
        raise ValueError(f"a crop must be uint16 C x S x S, got {crop.dtype} {crop.shape}")


def encode_npy(crop: np.ndarray) -> bytes:
    """`numpy.save` bytes of a uint16 C x S x S crop (C-order, little-endian)."""
    check_crop(crop)
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(crop, dtype="<u2"), allow_pickle=False)
    return buf.getvalue()


def decode_npy(data: bytes) -> np.ndarray:
    """The array of `numpy.save` bytes (no check of its shape: see `Codec.decode`)."""
    return np.load(io.BytesIO(data), allow_pickle=False)


def encode_tiff_deflate(crop: np.ndarray, level: int = TIFF_DEFLATE_LEVEL) -> bytes:
    """A C x S x S crop as a one-strip, interleaved (HWC) TIFF: minisblack, predictor, deflate (zlib `level`).

    No metadata, software or date tags, so the same crop always gives the same bytes.
    """
    import tifffile

    check_crop(crop)
    channels = crop.shape[0]
    data = crop[0] if channels == 1 else np.ascontiguousarray(np.moveaxis(crop, 0, -1))
    buf = io.BytesIO()
    tifffile.imwrite(
        buf, data, photometric="minisblack", planarconfig="contig" if channels > 1 else None,
        compression="zlib", compressionargs={"level": level}, predictor=True,
        rowsperstrip=crop.shape[1], metadata=None, software=False,
    )  # fmt: skip
    return buf.getvalue()


def decode_tiff(data: bytes) -> np.ndarray:
    """A one-page, interleaved, deflate + predictor TIFF's pixels as C x H x W.

    Decoded by tifffile, which inflates each strip to its end and so checks deflate's checksum:
    libtiff and nvTIFF (DALI's decoders) stop at the strip's pixel count, so a flipped bit in
    the compressed data can decode to wrong pixels there without an error, but never here.
    """
    import tifffile

    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        if len(tif.pages) != 1:
            raise CorruptCrop(f"{len(tif.pages)} pages, expected 1")
        page = tif.pages[0]
        if page.samplesperpixel > 1 and page.planarconfig != tifffile.PLANARCONFIG.CONTIG:
            raise CorruptCrop("planar TIFF: DALI decodes only interleaved (contiguous) channels correctly")
        if page.compression != tifffile.COMPRESSION.ADOBE_DEFLATE or page.predictor != tifffile.PREDICTOR.HORIZONTAL:
            found = [getattr(value, "name", value) for value in (page.compression, page.predictor)]
            raise CorruptCrop(f"compression {found[0]}, predictor {found[1]}; expected ADOBE_DEFLATE, HORIZONTAL")
        pixels = page.asarray()
    return pixels[None] if pixels.ndim == 2 else np.moveaxis(pixels, -1, 0)


def zigzag(residual: np.ndarray) -> np.ndarray:
    """uint16 residuals (mod 2**16) read as int16, mapped 0, -1, 1, -2, ... -> 0, 1, 2, 3, ...: small either way."""
    signed = residual.view(np.int16)
    return ((signed << 1) ^ (signed >> 15)).view(np.uint16)


def unzigzag(codes: np.ndarray) -> np.ndarray:
    """The inverse of `zigzag`, in place (one temporary: the sign mask)."""
    sign = np.bitwise_and(codes, 1)
    np.negative(sign, out=sign)
    np.right_shift(codes, 1, out=codes)
    return np.bitwise_xor(codes, sign, out=codes)


def encode_blosc2(crop: np.ndarray, level: int = BLOSC2_LEVEL, compressor: str = "zstd") -> bytes:
    """A C x S x S crop as one Blosc2 chunk of its gradient residuals (CHW, zigzag), bit-shuffled, zstd (or LZ4HC
    for `blosc2-lz4`; the chunk's header names its compressor, so one decoder reads both).

    The residual of a pixel is x - left - up + up-left (mod 2**16; 0 outside the crop), so its inverse is two
    running sums (`undo_gradient`); zigzag keeps small negative residuals' high bits 0, bit-shuffling
    groups each bit plane so zstd finds the empty high planes. On real Cell Painting crops this is 1.7-1.8x
    smaller than npy, within 1% of the order-0 entropy of the residuals (bench/results/codec_bench.md).
    """
    import imagecodecs

    check_crop(crop)
    return imagecodecs.blosc2_encode(gradient_codes(crop), level=level, compressor=compressor, shuffle="bitshuffle",
                                     splitmode="always", typesize=2, numthreads=1)


def gradient_codes(crop: np.ndarray) -> np.ndarray:
    """A uint16 crop's gradient residuals x - left - up + up-left (mod 2**16; 0 outside the crop), zigzag-mapped:
    what `encode_blosc2` compresses; `undo_gradient` is the inverse."""
    import imagecodecs

    residual = imagecodecs.delta_encode(imagecodecs.delta_encode(np.ascontiguousarray(crop, "<u2"), axis=-1), axis=-2)
    return zigzag(residual)


def decompress_blosc2_into(data, out: np.ndarray) -> np.ndarray:
    """Decompress a `encode_blosc2` chunk into `out` (uint16 C x S x S, C-contiguous): the zigzag-mapped residuals,
    still to be undone by `undo_gradient`. `CorruptCrop` unless its header announces exactly `out`'s bytes in
    exactly `data`'s length. Releases the GIL: threads decompress in parallel."""
    import imagecodecs

    if len(data) < 16:
        raise CorruptCrop(f"{len(data)} bytes, shorter than a Blosc2 header")
    nbytes, _, cbytes = struct.unpack_from("<iii", data, 4)  # Blosc2 chunk header: sizes after 4 flag bytes
    if nbytes != out.nbytes or cbytes != len(data):
        raise CorruptCrop(f"Blosc2 header says {nbytes} bytes from {cbytes}; expected {out.nbytes} from {len(data)}")
    try:
        imagecodecs.blosc2_decode(data, numthreads=1, out=out.reshape(-1).view(np.uint8))
    except Exception as err:  # imagecodecs.Blosc2Error and buffer errors
        raise CorruptCrop(f"{type(err).__name__}: {err}") from err
    return out


def undo_gradient(codes: np.ndarray) -> np.ndarray:
    """Zigzag-mapped gradient residuals [..., S, S] back to pixels, in place: un-zigzag, then running sums down
    the columns and along the rows (mod 2**16). Any number of leading axes: one call undoes a whole batch."""
    import imagecodecs

    unzigzag(codes)
    imagecodecs.delta_decode(codes, axis=-2, out=codes)
    return imagecodecs.delta_decode(codes, axis=-1, out=codes)


def decode_blosc2(data: bytes, shape: tuple[int, int, int]) -> np.ndarray:
    """The uint16 crop of `shape` of a `encode_blosc2` chunk; see `decompress_blosc2_into`."""
    return undo_gradient(decompress_blosc2_into(data, np.empty(shape, dtype=np.uint16)))


@dataclass(frozen=True)
class Codec:
    """One way of storing crops: the member extension, the encoder, the NumPy decoder, the DALI decoder."""

    name: str
    ext: str  # the tar member of a sample's crop is `<key>.<ext>`
    # "numpy": fn.decoders.numpy (CPU, CHW); "image": fn.decoders.image (CPU or mixed, HWC); "host": no DALI
    # operator decodes it, the loaders read the members and `decode_members` decodes them in threads
    dali_decoder: str
    params: dict[str, Any]  # recorded in the manifest as `codec_params`
    _encode: Callable[[np.ndarray], bytes] = field(repr=False)
    _decode: Callable[[bytes, tuple[int, int, int]], np.ndarray] = field(repr=False)
    format_version: int = 1  # the lowest shard format version that knows this codec (fastcell.format.folder)
    # host-decoded codecs: `_unpack_into(member, out[i])` per member, then `_finish(out[a:b])` vectorised over up to
    # FINISH_CROPS crops (blosc2: decompress each, then undo the predictor of several at once)
    _unpack_into: Callable[[Any, np.ndarray], np.ndarray] | None = field(default=None, repr=False)
    _finish: Callable[[np.ndarray], np.ndarray] | None = field(default=None, repr=False)

    @property
    def host_decoded(self) -> bool:
        """Whether the loaders decode it themselves (no DALI operator does)."""
        return self.dali_decoder == "host"

    def __reduce__(self):
        """Pickled by name (e.g. into shard workers), unpickled as the registry's entry."""
        return get_codec, (self.name,)

    def encode(self, crop: np.ndarray) -> bytes:
        """The member bytes of a uint16 C x S x S crop."""
        return self._encode(crop)

    def decode(self, data: bytes, shape: tuple[int, int, int]) -> np.ndarray:
        """The uint16 C x S x S crop of member bytes; `CorruptCrop` unless exactly that comes out."""
        try:
            crop = self._decode(data, tuple(shape))
        except CorruptCrop as err:
            raise CorruptCrop(f"not a {self.name} crop: {err}") from err
        except Exception as err:  # third-party decoders raise many types (zlib, tifffile, struct, ...)
            raise CorruptCrop(f"not a {self.name} crop: {type(err).__name__}: {err}") from err
        if crop.dtype != np.uint16 or crop.shape != tuple(shape):
            raise CorruptCrop(f"decodes to {crop.dtype} {crop.shape}, expected uint16 {tuple(shape)}")
        return np.ascontiguousarray(crop)

    def decode_members(self, members: Sequence, out: np.ndarray, pool: ThreadPoolExecutor,
                       then: Callable[[int, int], Any] | None = None) -> None:
        """Decode a batch of members (bytes-like: bytes, memoryviews, uint8 arrays) of a host-decoded codec into
        `out` [B, C, S, S] uint16 with the threads of `pool` (the other codecs DALI decodes; `decode` reads one crop).

        One thread unpacks the members in order (blosc2: decompresses each into its slot): calls of 10-30 µs that
        release the GIL, made in several threads at once, hand the GIL back and forth and ran slower than in one
        (bench/results/host_decode_processes.md). Each group of `FINISH_CROPS` unpacked crops is then finished with
        one vectorised call (blosc2: the predictor undone; long calls, which threads run in parallel) and handed to
        `then(start, stop)` (e.g. to normalise the crops while they are in cache) by whichever thread is free: the
        pool's other threads, and the unpacking one too when unpacked groups queue up. Raises `BadSample` with
        `.index`, the position of the first member that does not decode. After any error the other threads stop at
        their next group (the batch is lost), and the error is raised once all have stopped.
        """
        if not self.host_decoded:
            raise ValueError(f"{self.name} crops are decoded by DALI, not by decode_members")
        groups = [(first, min(first + FINISH_CROPS, len(out))) for first in range(0, len(out), FINISH_CROPS)]
        finishers = min(getattr(pool, "_max_workers", 1), len(groups)) - 1
        unpacked: queue.SimpleQueue = queue.SimpleQueue()  # groups to finish; then one None per finisher
        failed = threading.Event()  # a member or a group failed: the batch is lost, every thread stops its work

        def finish(start: int, stop: int) -> None:
            if failed.is_set():
                return
            try:
                self._finish(out[start:stop])
                if then is not None:
                    then(start, stop)
            except BaseException:
                failed.set()
                raise

        def finish_one_queued() -> bool:
            try:
                group = unpacked.get_nowait()
            except queue.Empty:
                return False
            finish(*group)
            return True

        def unpack_all() -> None:
            try:
                for start, stop in groups:
                    if failed.is_set():
                        break
                    for i in range(start, stop):
                        try:
                            self._unpack_into(members[i], out[i])
                        except CorruptCrop as err:
                            raise BadSample(f"not a {self.name} crop: {err}", i) from err
                    unpacked.put((start, stop))
                    if unpacked.qsize() > finishers:  # the finishers are behind (or there are none): help
                        finish_one_queued()
                while finish_one_queued():
                    pass
            except BaseException:
                failed.set()
                raise
            finally:
                for _ in range(finishers):
                    unpacked.put(None)

        def finish_all() -> None:
            while (group := unpacked.get()) is not None:
                finish(*group)

        tasks = [pool.submit(unpack_all)] + [pool.submit(finish_all) for _ in range(finishers)]
        wait(tasks)  # all of them, even after an error: none may still write into `out` once this returns
        for task in tasks:
            task.result()  # the unpacker's error first


class BadSample(CorruptCrop):
    """A member of a batch that does not decode; `index` is its position in the batch."""

    def __init__(self, message: str, index: int):
        super().__init__(message)
        self.index = index


def blosc2_codec(name: str, compressor: str, level: int, format_version: int) -> Codec:
    """A Blosc2 codec of gradient residuals (`encode_blosc2`) with `compressor` at `level`; one decoder reads all."""
    params = {"container": "blosc2-chunk", "layout": "CHW", "predictor": "gradient", "residual": "zigzag-int16",
              "filter": "bitshuffle", "compressor": compressor, "level": level, "splitmode": "always", "typesize": 2}
    return Codec(name, "b2", "host", params, partial(encode_blosc2, level=level, compressor=compressor), decode_blosc2,
                 format_version=format_version, _unpack_into=decompress_blosc2_into, _finish=undo_gradient)


CODECS: dict[str, Codec] = {
    codec.name: codec
    for codec in (
        Codec("npy", "npy", "numpy", {"layout": "CHW"}, encode_npy, lambda data, _: decode_npy(data)),
        Codec(
            "tiff-deflate", "tif", "image",
            {"container": "tiff", "layout": "HWC", "planarconfig": "contig", "photometric": "minisblack",
             "predictor": "horizontal", "compression": "deflate", "level": TIFF_DEFLATE_LEVEL, "strips": 1},
            encode_tiff_deflate, lambda data, _: decode_tiff(data), format_version=2,
        ),  # fmt: skip
        blosc2_codec("blosc2", "zstd", BLOSC2_LEVEL, format_version=3),
        # the v3 layout with another compressor: v3 readers that predate it refuse it as an unknown codec
        blosc2_codec("blosc2-lz4", "lz4hc", BLOSC2_LZ4_LEVEL, format_version=3),
    )
}


def get_codec(name: str, where: str = "codec") -> Codec:
    """The registered codec `name`; InputError naming `where` (an option or a file) otherwise."""
    try:
        return CODECS[name]
    except (KeyError, TypeError):
        raise InputError(f"{where}: unknown codec {name!r} (known: {', '.join(CODECS)})") from None
