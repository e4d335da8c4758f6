"""Codec probe for issue 7: can DALI decode losslessly compressed 16-bit multi-channel crops?

Answers, on real Cell Painting / nuclei crops, for each candidate lossless encoding of a
uint16 C x S x S crop (C = 1, 3, 5; S = 96):

1. does `fn.decoders.image(..., output_type=ANY_DATA, dtype=UINT16)` decode it, bit-exact,
   with which output shape / layout / dtype, and which nvImageCodec plugin did the work;
2. how much smaller than the `.npy` member it is (median over real crops);
3. how fast DALI decodes it from a WebDataset tar (batch 256, 2 threads), next to `.npy` +
   `fn.decoders.numpy` measured in the same run.

Run `.venv/bin/python bench/codec_probe.py` (CPU: about 1 min on 2 idle cores, 4 min on busy ones;
`--skip-throughput` for the first two answers only). On a GPU machine, `--device mixed` repeats the
decode checks and the throughput with the GPU decoders and writes `codec_probe_mixed.{json,md}`.
With device="mixed" nvImageCodec silently falls back to a CPU plugin when the GPU plugin refuses a
sample, so the probe reads nvImageCodec's log to name the plugin that decoded each sample
(`nvtiff_cuda_decoder`, `nvjpeg2k_decoder`, or a CPU fallback such as `libtiff_decoder`).
"""

from __future__ import annotations

import argparse
import gc
import io
import os
import platform
import re
import subprocess
import tarfile
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from machine import cpu_model

from fastcell.io import write_bytes_atomic, write_json_atomic

REPO = Path(__file__).resolve().parents[1]
# the copies committed under tests/data travel with the checkout (GPU machines); else the shared originals
DATA = next(d for d in (REPO / "tests" / "data", REPO.parent / "shared" / "data") if (d / "jump-cpg0000").is_dir())
JUMP_FIELD = DATA / "jump-cpg0000" / "BR00116991" / "A01-1"
DSB_IMAGE = DATA / "stardist-dsb" / "img2d.tif"
DSB_MASK = DATA / "stardist-dsb" / "mask2d.tif"
RESULTS = REPO / "bench" / "results"
CROP = 96
BATCH = 256
THREADS = 2
BENCH_SAMPLES = 2048  # crops in each benchmark tar (the real crops, cycled)
TIMED_BATCHES = 2  # batches per pipeline and round; the reader wraps around the tar
REPEATS = 5
# 3-channel throughput: the formats that only exist for <= 4 channels, next to the two best TIFFs
JUMP3_SPEED = ("tiff-deflate-pred", "tiff-zstd-pred", "tiff-deflate-pred-rgb", "png16", "jpeg2k-lossless")


# --------------------------------------------------------------------------- encoders


@dataclass(frozen=True)
class Codec:
    """One candidate encoding of a C x S x S uint16 crop, stored in the tar as `<key>.<ext>`."""

    name: str
    ext: str
    encode: Callable[[np.ndarray], bytes]
    channels: tuple[int, ...]  # channel counts the format can hold
    gpu_plugin: str  # the nvImageCodec plugin that should take it with device="mixed"


def _tiff(compression: str | None, predictor: bool, planar: bool = False, rgb: bool = False):
    """A tifffile encoder: one strip, channels contiguous (HWC) unless `planar`."""
    import tifffile

    def encode(chw: np.ndarray) -> bytes:
        buf = io.BytesIO()
        if chw.shape[0] == 1:
            data, extra = chw[0], {"photometric": "minisblack"}
        elif planar:
            data, extra = chw, {"photometric": "minisblack", "planarconfig": "separate"}
        else:
            data = np.moveaxis(chw, 0, -1)
            extra = {"photometric": "rgb" if rgb else "minisblack", "planarconfig": "contig"}
        tifffile.imwrite(
            buf, data, compression=compression, predictor=predictor or None,
            rowsperstrip=chw.shape[1], metadata=None, **extra,
        )
        return buf.getvalue()

    return encode


def _image_array(chw: np.ndarray) -> np.ndarray:
    """What image encoders take: H x W for one channel, contiguous H x W x C otherwise."""
    return chw[0] if chw.shape[0] == 1 else np.ascontiguousarray(np.moveaxis(chw, 0, -1))


def _png(chw: np.ndarray) -> bytes:
    import imagecodecs

    return imagecodecs.png_encode(_image_array(chw))


def _jpeg2k(chw: np.ndarray) -> bytes:
    import imagecodecs

    hwc = _image_array(chw)
    # reversible 5/3 wavelet, no colour transform (the channels are stains, not RGB)
    return imagecodecs.jpeg2k_encode(hwc, level=0, reversible=True, mct=False)


def _npy(chw: np.ndarray) -> bytes:
    from fastcell.format.folder import encode_crop

    return encode_crop(chw)


def _byte_planes(chw: np.ndarray) -> bytes:
    """Low bytes of every sample, then high bytes: lets a byte-oriented compressor see the smooth part."""
    planes = chw.astype("<u2").view(np.uint8).reshape(*chw.shape, 2).transpose(3, 0, 1, 2)
    return np.ascontiguousarray(planes).tobytes()


def _lz4_byte_planes(chw: np.ndarray) -> bytes:
    import imagecodecs

    return imagecodecs.lz4_encode(_byte_planes(chw))


def _zlib_delta_byte_planes(chw: np.ndarray) -> bytes:
    import imagecodecs

    delta = np.diff(chw.astype(np.int32), axis=2, prepend=0).astype(np.uint16)  # mod 2**16: reversible
    return imagecodecs.zlib_encode(_byte_planes(delta), level=6)


ALL_C = (1, 3, 5)
# raw streams fn.decoders.image cannot read: compression only, to size what a TIFF container leaves behind
STREAMS_NOT_IMAGES = [
    Codec("lz4-byteplanes", "lz4", _lz4_byte_planes, ALL_C, "fn.decoders.inflate (GPU only; no CPU DALI op)"),
    Codec("zlib-delta-byteplanes", "zlib", _zlib_delta_byte_planes, ALL_C, "no DALI operator"),
]
CODECS = [
    Codec("tiff-raw", "tif", _tiff(None, False), ALL_C, "nvtiff_cuda_decoder"),
    Codec("tiff-deflate", "tif", _tiff("zlib", False), ALL_C, "nvtiff_cuda_decoder"),
    Codec("tiff-deflate-pred", "tif", _tiff("zlib", True), ALL_C, "nvtiff_cuda_decoder"),
    Codec("tiff-lzw", "tif", _tiff("lzw", False), ALL_C, "nvtiff_cuda_decoder"),
    Codec("tiff-lzw-pred", "tif", _tiff("lzw", True), ALL_C, "nvtiff_cuda_decoder"),
    Codec("tiff-zstd", "tif", _tiff("zstd", False), ALL_C, "none in nvTIFF 0.8 (CPU fallback)"),
    Codec("tiff-zstd-pred", "tif", _tiff("zstd", True), ALL_C, "none in nvTIFF 0.8 (CPU fallback)"),
    Codec("tiff-deflate-pred-planar", "tif", _tiff("zlib", True, planar=True), (3, 5), "nvtiff_cuda_decoder"),
    Codec("tiff-deflate-pred-rgb", "tif", _tiff("zlib", True, rgb=True), (3,), "nvtiff_cuda_decoder"),
    Codec("png16", "png", _png, (1, 3), "none (PNG has no GPU decoder; CPU fallback)"),
    Codec("jpeg2k-lossless", "jp2", _jpeg2k, ALL_C, "nvjpeg2k_decoder"),
]


# --------------------------------------------------------------------------- real crops


def _crop_at(field: np.ndarray, x: float, y: float, size: int = CROP) -> np.ndarray | None:
    """C x size x size crop centred on (x, y); None when it would cross the border."""
    half = size // 2
    cx, cy = int(round(x)), int(round(y))
    if cx - half < 0 or cy - half < 0 or cx + half > field.shape[2] or cy + half > field.shape[1]:
        return None
    return np.ascontiguousarray(field[:, cy - half : cy + half, cx - half : cx + half])


def real_crops() -> dict[str, list[np.ndarray]]:
    """The crop sets: JUMP 5-channel, its first 3 channels, and the 1-channel DSB nuclei image."""
    import pandas as pd
    import tifffile
    from skimage.measure import regionprops

    channels = sorted(JUMP_FIELD.glob("*-ch*.tiff"))
    field = np.stack([tifffile.imread(p) for p in channels])
    nuclei = pd.read_csv(JUMP_FIELD / "Nuclei.csv", usecols=["AreaShape_Center_X", "AreaShape_Center_Y"])
    jump = [_crop_at(field, x, y) for x, y in nuclei.itertuples(index=False)]
    jump = [c for c in jump if c is not None]

    image = tifffile.imread(DSB_IMAGE)[None]
    mask = tifffile.imread(DSB_MASK)
    dsb = [_crop_at(image, p.centroid[1], p.centroid[0]) for p in regionprops(mask)]
    dsb = [c for c in dsb if c is not None]
    return {"jump5": jump, "jump3": [c[:3].copy() for c in jump], "dsb1": dsb}


def full_range_crop(c: int, seed: int = 0) -> np.ndarray:
    """Uniform noise over all 65536 values: catches rescaling, byte order and dropped bits."""
    return np.random.default_rng(seed).integers(0, 2**16, (c, CROP, CROP), dtype=np.uint16)


# --------------------------------------------------------------------------- DALI helpers


class StderrCapture:
    """Capture file descriptor 2 (where nvImageCodec logs) around a block."""

    def __enter__(self) -> StderrCapture:
        self._tmp = tempfile.TemporaryFile(mode="w+b")
        self._saved = os.dup(2)
        os.dup2(self._tmp.fileno(), 2)
        return self

    def __exit__(self, *exc) -> None:
        os.dup2(self._saved, 2)
        os.close(self._saved)
        self._tmp.seek(0)
        self.text = self._tmp.read().decode(errors="replace")
        self._tmp.close()


class DecodeFailed(RuntimeError):
    """DALI refused a batch; the message carries nvImageCodec's own error lines."""


def _log_lines(log: str, level: str) -> list[str]:
    """Distinct nvImageCodec log lines of one level, without colour codes, in first-seen order."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", ln).strip() for ln in log.splitlines() if f"[{level}]" in ln]
    return list(dict.fromkeys(ln.replace(f"[{level}] ", "") for ln in lines))


def decode_with_dali(blobs: list[bytes], device: str, **decoder_args) -> tuple[list[np.ndarray], str, dict]:
    """Decode `blobs` as one batch with fn.decoders.image.

    Returns the arrays, the output layout and what nvImageCodec logged: the plugin that processed
    each sample and any error lines (a plugin may fail and hand the sample to a fallback plugin).
    """
    from nvidia.dali import fn, pipeline_def, types

    args = {"output_type": types.ANY_DATA, "dtype": types.UINT16, **decoder_args}
    batch = [np.frombuffer(b, dtype=np.uint8) for b in blobs]

    @pipeline_def(batch_size=len(blobs), num_threads=THREADS, device_id=0 if device == "mixed" else None)
    def pipe():
        data = fn.external_source(source=lambda: batch, batch=True, dtype=types.UINT8)
        return fn.decoders.image(data, device=device, **args)

    os.environ["DALI_NVIMGCODEC_LOG_LEVEL"] = "3"  # INFO: names the plugin that processed each sample
    failure = None
    try:
        with StderrCapture() as cap:
            try:
                p = pipe()
                p.build()
                (out,) = p.run()
                out = out.as_cpu() if device == "mixed" else out
                decoded = [np.array(out[i]) for i in range(len(blobs))]
                layout = str(out.layout())
            except Exception as err:  # noqa: BLE001 - reported below with the log's reasons
                failure = RuntimeError(str(err))  # no traceback: it would keep the pipeline alive
            finally:
                p = None
                gc.collect()  # destroy the pipeline while its log is still captured
    finally:
        os.environ.pop("DALI_NVIMGCODEC_LOG_LEVEL", None)
    log = {"plugins": dict(Counter(re.findall(r"\] \d+: (\w+) process", cap.text))),
           "log_errors": _log_lines(cap.text, "ERROR")[:4]}
    if failure is not None:
        reasons = log["log_errors"] + [short_error(failure)]
        if "can't be processed" in cap.text:
            reasons.append("no nvImageCodec plugin accepted the sample (\"Sample #0 can't be processed\")")
        reasons = "; ".join(reasons)
        raise DecodeFailed(f"{reasons} (plugins tried: {', '.join(log['plugins']) or 'none'})")
    return decoded, layout, log


def short_error(err: Exception) -> str:
    """DALI's own line about the failure (e.g. 'Failed to decode sample #0 : ...')."""
    lines = [ln.strip(" :") for ln in str(err).splitlines() if ln.strip(" :")] or [type(err).__name__]
    return next((ln for ln in lines if "Failed to decode" in ln), lines[0])[:200]


def matches(decoded: np.ndarray, chw: np.ndarray) -> bool:
    """Bit-exact against the original crop in the decoder's HWC layout."""
    hwc = np.moveaxis(chw, 0, -1)
    return decoded.shape == hwc.shape and decoded.dtype == hwc.dtype and np.array_equal(decoded, hwc)


def check_decode(codec: Codec, crops: list[np.ndarray], device: str) -> dict:
    """Decode real crops plus a full-range noise crop; compare each to the original in HWC."""
    c = crops[0].shape[0]
    originals = crops + [full_range_crop(c)]
    row = {"codec": codec.name, "channels": c, "device": device, "expected_gpu_plugin": codec.gpu_plugin}
    blobs = [codec.encode(x) for x in originals]
    try:
        decoded, layout, log = decode_with_dali(blobs, device)
    except DecodeFailed as err:
        row.update(decodes=False, bit_exact=False, error=str(err))
        return row
    row.update(
        decodes=True,
        bit_exact=all(matches(d, o) for d, o in zip(decoded, originals, strict=True)),
        shape=list(decoded[0].shape), layout=layout, dtype=str(decoded[0].dtype),
        samples=len(originals), **log,
    )
    return row


def trap_checks(device: str) -> list[dict]:
    """What the wrong decoder arguments do to 16-bit multi-channel TIFF."""
    from nvidia.dali import types

    tiff = next(c for c in CODECS if c.name == "tiff-deflate-pred")
    rgb = next(c for c in CODECS if c.name == "tiff-deflate-pred-rgb")
    cases = [
        ("C=5, output_type=RGB", tiff, 5, {"output_type": types.RGB}),
        ("C=5, dtype left at its default (UINT8)", tiff, 5, {"dtype": types.UINT8}),
        ("C=3 minisblack, output_type=RGB", tiff, 3, {"output_type": types.RGB}),
        ("C=3 photometric=rgb, output_type=RGB", rgb, 3, {"output_type": types.RGB}),
        ("C=1, output_type=GRAY", tiff, 1, {"output_type": types.GRAY}),
    ]
    rows = []
    for label, codec, c, args in cases:
        x = full_range_crop(c, seed=1)
        blob = codec.encode(x)
        try:
            (d,), layout, _ = decode_with_dali([blob], device, **args)
            rows.append({"case": label, "shape": list(d.shape), "dtype": str(d.dtype), "bit_exact": matches(d, x)})
        except DecodeFailed as err:
            rows.append({"case": label, "error": str(err)})
    return rows


# --------------------------------------------------------------------------- compression


def compression(crop_sets: dict[str, list[np.ndarray]]) -> list[dict]:
    """Median npy-bytes / encoded-bytes per codec and crop set, with the encode cost."""
    rows = []
    for set_name, crops in crop_sets.items():
        c = crops[0].shape[0]
        npy = [len(_npy(x)) for x in crops]
        for codec in CODECS + STREAMS_NOT_IMAGES:
            if c not in codec.channels:
                continue
            t0 = time.perf_counter()
            sizes = [len(codec.encode(x)) for x in crops]
            encode_us = (time.perf_counter() - t0) / len(crops) * 1e6
            ratios = np.array(npy) / np.array(sizes)
            rows.append({
                "set": set_name, "channels": c, "crops": len(crops), "codec": codec.name,
                "median_ratio": round(float(np.median(ratios)), 3),
                "total_ratio": round(sum(npy) / sum(sizes), 3),
                "median_bytes": int(np.median(sizes)), "npy_bytes": npy[0],
                "encode_us_per_crop": round(encode_us, 1),
            })
    return rows


# --------------------------------------------------------------------------- throughput


def write_tar(folder: Path, codec: Codec | None, crops: list[np.ndarray]) -> tuple[Path, Path]:
    """A shard of BENCH_SAMPLES crops (real crops cycled): npy via ShardWriter, others via tarfile + wds2idx."""
    from fastcell.format.folder import ShardWriter, encode_id, sample_key

    samples = [crops[i % len(crops)] for i in range(BENCH_SAMPLES)]
    name = "npy" if codec is None else codec.name
    tar_path = folder / f"{name}-c{crops[0].shape[0]}.tar"
    idx_path = tar_path.with_suffix(".idx")
    if codec is None:
        with ShardWriter(tar_path) as writer:
            for i, crop in enumerate(samples):
                writer.add(i, crop)
        return tar_path, idx_path
    blobs = [codec.encode(x) for x in crops]
    with tarfile.open(tar_path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for i in range(BENCH_SAMPLES):
            for ext, data in ((codec.ext, blobs[i % len(crops)]), ("id", encode_id(i))):
                info = tarfile.TarInfo(f"{sample_key(i)}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    subprocess.run([str(REPO / ".venv" / "bin" / "wds2idx"), str(tar_path), str(idx_path)],
                   check=True, capture_output=True)
    return tar_path, idx_path


def build_reader_pipeline(tar: Path, idx: Path, ext: str, device: str):
    """Read `<key>.<ext>` + `<key>.id` from one tar and decode the crops (npy or an image codec)."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=BATCH, num_threads=THREADS, device_id=0 if device == "mixed" else None)
    def pipe():
        data, ids = fn.readers.webdataset(
            paths=[str(tar)], index_paths=[str(idx)], ext=[ext, "id"],
            dtypes=[types.UINT8, types.INT64], name="reader",
        )
        if ext == "npy":  # CPU-only operator; on a GPU run the crops are copied over like decoded ones
            crops = fn.decoders.numpy(data)
            return (crops.gpu() if device == "mixed" else crops), ids
        return fn.decoders.image(data, device=device, output_type=types.ANY_DATA, dtype=types.UINT16), ids

    p = pipe()
    p.build()
    p.run()  # warm-up batch
    return p


def timed_rate(pipe) -> float:
    t0 = time.perf_counter()
    for _ in range(TIMED_BATCHES):
        pipe.run()
    return TIMED_BATCHES * BATCH / (time.perf_counter() - t0)


def decode_speed(crop_sets: dict[str, list[np.ndarray]], exact: set[tuple[str, int]], device: str) -> list[dict]:
    """Crops/s per codec next to npy. The pipelines are timed round-robin, REPEATS rounds, so that
    load from other processes hits every codec alike; `vs_npy` is the median of per-round ratios."""
    rows = []
    npy_label = "npy (fn.decoders.numpy" + (" + .gpu())" if device == "mixed" else ")")
    with tempfile.TemporaryDirectory(prefix="codec_probe_") as tmp:
        for set_name in ("jump5", "jump3"):
            crops = crop_sets[set_name]
            c = crops[0].shape[0]
            entries = [(npy_label, "npy", write_tar(Path(tmp), None, crops))]
            entries += [(codec.name, codec.ext, write_tar(Path(tmp), codec, crops)) for codec in CODECS
                        if (codec.name, c) in exact and (set_name == "jump5" or codec.name in JUMP3_SPEED)]
            pipes = [build_reader_pipeline(tar, idx, ext, device) for _, ext, (tar, idx) in entries]
            rounds = np.array([[timed_rate(p) for p in pipes] for _ in range(REPEATS)])  # REPEATS x codecs
            del pipes
            for k, (label, _, (tar, _)) in enumerate(entries):
                rows.append({"set": set_name, "channels": c, "codec": label,
                             "crops_per_s": round(float(np.median(rounds[:, k]))),
                             "vs_npy": round(float(np.median(rounds[:, k] / rounds[:, 0])), 3),
                             "tar_bytes": tar.stat().st_size})
    return rows


# --------------------------------------------------------------------------- GPU evidence (docs)

GPU_EVIDENCE = [
    {
        "decoder": "DALI 2.4 fn.decoders.image docstring",
        "source": "nvidia.dali.fn.decoders.image.__doc__ (installed wheel 2.4.0)",
        "says": "'GPU accelerated decoding is only available for a subset of the image formats (JPEG, and "
                "JPEG2000). For other formats, a CPU based decoder is used.' Output layout HWC.",
    },
    {
        "decoder": "DALI 2.4 wheel, nvImageCodec 0.9.0 plugin registry (this machine)",
        "source": "DALI_NVIMGCODEC_LOG_LEVEL=4 log; DALI source dali/operators/imgcodec/image_decoder.h "
                  "(load_extension_modules = WITH_DYNAMIC_NVIMGCODEC_ENABLED)",
        "says": "The pip wheel loads nvImageCodec dynamically with all extension modules from "
                "site-packages/nvidia/nvimgcodec/extensions, and registers 'nvtiff_cuda_decoder codec:tiff' "
                "(nvTIFF 0.8.0) and 'nvjpeg2k_decoder codec:jpeg2k' (nvJPEG2000 0.11.0) next to the CPU "
                "'libtiff_decoder', 'opencv_tiff_decoder', 'opencv_png_decoder', 'opencv_jpeg2k_decoder'. "
                "So with device='mixed' TIFF should go to nvTIFF despite the docstring; to be verified on a GPU.",
    },
    {
        "decoder": "nvTIFF (decoder feature list)",
        "source": "https://docs.nvidia.com/cuda/nvtiff/ (NVIDIA nvTiff, Decoder)",
        "says": "'Planar Separate and Contiguous modes'; 'Up to 16 Samples per pixel'; compression 'Deflate(via "
                "nvCOMP)', 'LZW', 'JPEG 2000', 'None'; 'Up to 32 bits per sample when compression type is: None, "
                "Deflate, LZW, JPEG2000'. No word on the predictor. Zstandard is listed only by the newer "
                "https://docs.nvidia.com/cuda/archive/13.4.3/nvtiff/index.html; the installed nvtiff.h (0.8.0) "
                "has no ZSTD compression enum.",
    },
    {
        "decoder": "nvTIFF 0.8.0 binary (installed nvidia-nvtiff-cu13 0.8.0.82)",
        "source": "strings libnvtiff.so.0",
        "says": "contains src/kernels/nvtiff_predictor.cu and the errors 'Unsupported predictor.', 'Unsupported "
                "bitsPerSample for horizontal differencing: ', 'Unsupported samplesPerPixel: ': horizontal "
                "differencing is decoded on the GPU for some bit depths / sample counts (which: verify).",
    },
    {
        "decoder": "nvImageCodec nvtiff_ext canDecode",
        "source": "NVIDIA/nvImageCodec extensions/nvtiff/cuda_decoder.cpp",
        "says": "accepts precision 8/16/32 and sample formats incl. I_UNCHANGED (what ANY_DATA asks for); "
                "nvTIFF decodes to interleaved; rejects EXIF-rotated images when orientation is applied.",
    },
    {
        "decoder": "nvJPEG2000",
        "source": "https://docs.nvidia.com/cuda/nvjpeg2000 (NVIDIA nvJPEG2000, Decoder)",
        "says": "'Up to 16 bits per component'; 'No of components : 4'; 'Reversible(5-3) and irreversible(9-7) "
                "wavelet transforms'; 'jp2 file format and jpeg2000 codestream'. Tier-2 decode runs on the CPU. "
                "5 components is outside the documented range.",
    },
    {
        "decoder": "nvImageCodec nvjpeg2k_ext canDecode",
        "source": "NVIDIA/nvImageCodec extensions/nvjpeg2k/cuda_decoder.cpp",
        "says": "accepts UINT8/UINT16/INT16 and P/I_UNCHANGED sample formats; no explicit component-count check.",
    },
]


# --------------------------------------------------------------------------- report


def machine() -> dict:
    cpu = cpu_model()
    import imagecodecs
    import nvidia.dali
    import tifffile

    return {"nproc": os.cpu_count(), "cpu": cpu, "python": platform.python_version(),
            "dali": nvidia.dali.__version__, "tifffile": tifffile.__version__, "imagecodecs": imagecodecs.__version__}


def recommend(decode_rows: list[dict], ratio_rows: list[dict], speed_rows: list[dict]) -> dict:
    """The TIFF codec bit-exact for 1, 3 and 5 channels with a GPU path, best median ratio on jump5."""
    exact = {(r["codec"], r["channels"]) for r in decode_rows if r.get("bit_exact")}
    candidates = [c for c in CODECS if c.gpu_plugin == "nvtiff_cuda_decoder"
                  and all((c.name, ch) in exact for ch in ALL_C)]
    ratio = {(r["codec"], r["set"]): r["median_ratio"] for r in ratio_rows}
    if not candidates:
        return {"codec": None, "why": "no TIFF variant decoded bit-exact for 1, 3 and 5 channels"}
    best = max(candidates, key=lambda c: ratio[(c.name, "jump5")])
    speed = {r["set"]: {"crops_per_s": r["crops_per_s"], "vs_npy": r["vs_npy"]}
             for r in speed_rows if r["codec"] == best.name}
    return {"codec": best.name, "median_ratio": {s: ratio[(best.name, s)] for s in ("jump5", "jump3", "dsb1")},
            "decode_speed": speed}


def markdown(report: dict) -> str:
    m = report["machine"]
    out = [
        f"# Codec probe ({report['device']})", "",
        f"{report['date']} · {m['nproc']} CPUs ({m['cpu']}) · Python {m['python']} · DALI {m['dali']} · "
        f"tifffile {m['tifffile']} · imagecodecs {m['imagecodecs']}", "",
        "Produced by `bench/codec_probe.py`. Crops: 96x96 uint16 around the nuclei of the real JUMP "
        "field (5 channels; `jump3` = its first 3) and of the StarDist DSB image (1 channel, 8-bit data "
        "stored as uint16). Decoder call: `fn.decoders.image(data, device=..., "
        "output_type=types.ANY_DATA, dtype=types.UINT16)`; bit-exact is checked on every real crop plus a "
        "full-range noise crop against the HWC original.", "",
        "## 1. Decode in DALI", "",
        "| codec | C | decodes | bit-exact | shape / layout / dtype | plugin used | expected GPU plugin | errors logged |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["decode"]:
        shape = f"{tuple(r['shape'])} {r['layout']} {r['dtype']}" if r["decodes"] else ""
        plugins = ", ".join(r.get("plugins", {})) or ""
        out.append(f"| {r['codec']} | {r['channels']} | {'yes' if r['decodes'] else 'no'} | "
                   f"{'yes' if r['bit_exact'] else 'no'} | {shape} | {plugins} | {r['expected_gpu_plugin']} | "
                   f"{r.get('error') or '; '.join(r.get('log_errors', []))} |")
    out += ["", "Plugin counts in the JSON include DALI's prefetch (each sample is decoded once per queued "
            "iteration). A plugin that logs an error hands the sample to the next one: planar TIFF goes from "
            "libtiff_decoder to opencv_tiff_decoder, which returns the wrong channels.", "",
            "Traps (tiff-deflate-pred, full-range noise crop):", "", "| arguments | result |", "|---|---|"]
    for t in report["traps"]:
        res = t.get("error") or f"{tuple(t['shape'])} {t['dtype']}, bit-exact {'yes' if t['bit_exact'] else 'no'}"
        out.append(f"| {t['case']} | {res} |")
    out += ["", "## 2. Compression (npy bytes / encoded bytes, median over crops)", "",
            "| codec | jump5 | jump3 | dsb1 | bytes/crop jump5 | encode µs/crop jump5 |", "|---|---|---|---|---|---|"]
    by = {(r["codec"], r["set"]): r for r in report["compression"]}
    for codec in CODECS + STREAMS_NOT_IMAGES:
        cells = [f"{by[(codec.name, s)]['median_ratio']:.2f}" if (codec.name, s) in by else "–"
                 for s in ("jump5", "jump3", "dsb1")]
        j5 = by.get((codec.name, "jump5"))
        out.append(f"| {codec.name} | {' | '.join(cells)} | {j5['median_bytes'] if j5 else '–'} | "
                   f"{j5['encode_us_per_crop'] if j5 else '–'} |")
    sets = {r["set"]: r["crops"] for r in report["compression"]}
    out += ["", "The last rows are raw streams, not images (fn.decoders.image cannot read them): "
            + "; ".join(f"`{c.name}`: {c.gpu_plugin}" for c in STREAMS_NOT_IMAGES) + ".",
            "", f"Crops: {sets}; npy bytes per crop: 5 ch {5 * CROP * CROP * 2 + 128}, "
            f"3 ch {3 * CROP * CROP * 2 + 128}, 1 ch {CROP * CROP * 2 + 128}.", "",
            f"## 3. Decode throughput (webdataset tar, batch {BATCH}, num_threads {THREADS}, "
            f"tar of {BENCH_SAMPLES} crops; {REPEATS} rounds, each timing {TIMED_BATCHES} batches of every "
            "pipeline in turn after 1 warm-up batch; medians. Measured on a shared machine: read the ratios, "
            "which come from the same rounds)", "",
            "| set | codec | crops/s | vs npy | tar MB |", "|---|---|---|---|---|"]
    for r in report["throughput"]:
        out.append(f"| {r['set']} | {r['codec']} | {r['crops_per_s']} | {r['vs_npy']:.2f} | "
                   f"{r['tar_bytes'] / 1e6:.1f} |")
    out += ["", "## 4. GPU decode: what the documentation and the installed libraries say", ""]
    for e in GPU_EVIDENCE:
        out.append(f"- **{e['decoder']}** ({e['source']}): {e['says']}")
    rec = report["recommendation"]
    out += ["", "## 5. Recommendation (computed)", "",
            f"`{rec['codec']}`: median ratio {rec.get('median_ratio', rec.get('why'))}; "
            f"decode speed {rec.get('decode_speed')}", "",
            "Rule: the best jump5 ratio among the TIFF variants that decode bit-exact for 1, 3 and 5 channels "
            "and that nvTIFF 0.8 should take on the GPU (zstd is excluded: not in nvTIFF 0.8).", ""]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "mixed"], default="cpu",
                        help="decoder backend; 'mixed' needs a GPU and writes codec_probe_mixed.*")
    parser.add_argument("--skip-throughput", action="store_true", help="only decode checks and ratios")
    args = parser.parse_args()
    if args.device == "mixed":
        from nvidia.dali.backend import GetCUDADeviceCount

        if GetCUDADeviceCount() == 0:
            parser.error("--device mixed needs a CUDA GPU; DALI sees none")
    started = time.perf_counter()

    crop_sets = real_crops()
    decode_rows = [check_decode(codec, crop_sets[s], args.device)
                   for s in ("dsb1", "jump3", "jump5") for codec in CODECS
                   if crop_sets[s][0].shape[0] in codec.channels]
    traps = trap_checks(args.device)
    ratio_rows = compression(crop_sets)
    exact = {(r["codec"], r["channels"]) for r in decode_rows if r["bit_exact"]}
    speed_rows = [] if args.skip_throughput else decode_speed(crop_sets, exact, args.device)

    report = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": args.device, "machine": machine(), "crop_size": CROP,
        "decode": decode_rows, "traps": traps, "compression": ratio_rows, "throughput": speed_rows,
        "gpu_evidence": GPU_EVIDENCE, "recommendation": recommend(decode_rows, ratio_rows, speed_rows),
        "runtime_s": round(time.perf_counter() - started, 1),
    }
    stem = "codec_probe" if args.device == "cpu" else "codec_probe_mixed"
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json_atomic(RESULTS / f"{stem}.json", report)
    write_bytes_atomic(RESULTS / f"{stem}.md", (markdown(report) + "\n").encode())
    print(markdown(report))
    print(f"\nwrote {RESULTS / stem}.json|.md in {report['runtime_s']} s")


if __name__ == "__main__":
    main()
