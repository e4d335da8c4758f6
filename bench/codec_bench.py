"""Crop codecs side by side: shard size, encode time, decode speed and loader throughput of every codec
(`npy`, `tiff-deflate`, `blosc2`).

On the demo's synthetic screen (`fastcell synth` defaults: 632 fields, ~16k cells; 48-px crops,
nuclei detection, like `make demo`), sharded once per codec in the same run:

- bytes: total shard size and bytes per cell, and the ratio npy / codec;
- encode: microseconds per crop of `Codec.encode` over every crop (median of repeats), and the
  wall time of the shard-writing pass of `fastcell shard` (which also loads crops and counts statistics);
- loading: two-view samples/s of the default DALI train loader (default `AugmentSpec`), and
  samples/s of the DALI eval loader (decode + normalise only), medians over repeats that
  alternate the codecs; on the CPU also what the HWC -> CHW transpose after the TIFF decoder costs;
- real crops: npy bytes / codec bytes (median per crop and over the set) and the decode time per crop on
  one core (`Codec.decode`; for blosc2 also `Codec.decode_members` on 1 and 2 threads), on the 96-px crops
  of `codec_probe.py` around the nuclei of the real JUMP Cell Painting field (5 channels, and its first 3)
  and of the DSB nuclei image (1 channel, 8-bit data stored as uint16);
- the zlib level of tiff-deflate (1, 6, 9) and the Blosc2 level of blosc2 (1, 5, 8): size and encode time
  on those real crops.

`gpu_rows(folders)` measures, on a GPU, the eval and two-view loader rates per codec and whether each
codec's eval tensors equal npy's (for `bench/gpu_check.py`).

    .venv/bin/python bench/codec_bench.py                        # CPU: writes bench/results/codec_bench.{json,md}
    .venv/bin/python bench/codec_bench.py --device gpu           # GPU: codec_bench_gpu.json, same .md
    .venv/bin/python bench/codec_bench.py --screen demo/screen   # reuse a synthetic screen
    .venv/bin/python bench/codec_bench.py --screen demo/screen --crop 96 --loaders-only   # loader rows at 96 px

The markdown table shows the CPU and, once measured, the GPU results side by side.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import numpy as np
import torch
from machine import machine

from fastcell.format.codecs import (
    CODECS,
    FINISH_CROPS,
    encode_blosc2,
    encode_npy,
    encode_tiff_deflate,
    gradient_codes,
    undo_gradient,
)
from fastcell.format.folder import read_manifest, read_samples
from fastcell.io import write_bytes_atomic, write_json_atomic
from fastcell.loaders import AugmentSpec, create_eval_loader, create_train_loader
from fastcell.shard.pipeline import ShardConfig, shard_screen

RESULTS = Path(__file__).resolve().parent / "results"
BASELINE = "npy"
PREVIOUS = "codec_bench_94f81f9.json"  # the CPU run before the host decode of 2026-12-01


def make_screen(folder: Path, weeks: str, workers: int) -> dict:
    from fastcell.synth.design import SynthConfig
    from fastcell.synth.screen import generate_screen

    chosen = None if weeks == "all" else tuple(f"Week{w}" for w in weeks.split(","))
    result = generate_screen(SynthConfig(out_dir=folder, weeks=chosen, seed=0, workers=workers), progress=False)
    return {"source": f"fastcell synth defaults, weeks {weeks} (annotated + DMSO, 1 site/well, 256x320 px)",
            "fields": result.n_fields, "true_cells": result.n_cells}


def shard(screen: Path, out: Path, codec: str, crop: int, workers: int) -> dict:
    result = shard_screen(ShardConfig(source=screen, out=out, crop_size=crop, codec=codec, workers=workers,
                                      overwrite=True))
    tars = [tar for split in result.manifest.splits for tar in result.manifest.tar_paths(split)]
    size = sum(t.stat().st_size for t in tars)
    return {"cells": result.n_cells, "shards": len(tars), "shard_bytes": size, "bytes_per_cell": size / result.n_cells,
            "shard_pass_s": result.timings["wall_shards"], "shard_total_s": result.timings["wall_total"]}


def encode_us_per_crop(folder: Path, repeats: int) -> dict[str, float]:
    """Median over repeats of the mean time `Codec.encode` takes per crop, every crop of the folder."""
    manifest = read_manifest(folder)
    crops = [crop for split in manifest.splits for tar in manifest.tar_paths(split)
             for _, crop in read_samples(tar, manifest.codec, manifest.crop_shape)]
    times: dict[str, list[float]] = {name: [] for name in CODECS}
    for _ in range(repeats):
        for name, codec in CODECS.items():
            start = time.perf_counter()
            for crop in crops:
                codec.encode(crop)
            times[name].append((time.perf_counter() - start) / len(crops) * 1e6)
    return {name: statistics.median(t) for name, t in times.items()}


def rate(loader, device: torch.device) -> tuple[float, float]:
    """Samples/s of one epoch from its first batch to its last (pipeline start-up excluded), and the process's CPU
    time per sample meanwhile in µs (all threads: on a shared machine less sensitive to the others' load)."""
    first, samples = None, 0
    for batch in loader:
        if device.type == "cuda":
            torch.cuda.synchronize()
        if first is None:
            first = time.perf_counter(), time.process_time()
        else:
            samples += len(batch[-1])
    return samples / (time.perf_counter() - first[0]), (time.process_time() - first[1]) / samples * 1e6


def loader_rates(folders: dict[str, Path], device: str, batch: int, workers: int, repeats: int) -> dict:
    """Two-view (train) and eval samples/s per codec: medians of `repeats` epochs, codecs alternating."""
    runs: dict[str, dict[str, list[float]]] = {c: {"two_view": [], "eval": []} for c in folders}
    cpu: dict[str, dict[str, list[float]]] = {c: {"two_view": [], "eval": []} for c in folders}
    for repeat in range(repeats):
        for codec, folder in folders.items():
            train = create_train_loader(folder, AugmentSpec(), batch, device=device, num_workers=workers)
            train.set_epoch(repeat)
            evaluate = create_eval_loader(folder, batch, device=device, num_workers=workers)
            for kind, loader in (("two_view", train), ("eval", evaluate)):
                samples_per_s, cpu_us = rate(loader, loader.device)
                runs[codec][kind].append(samples_per_s)
                cpu[codec][kind].append(cpu_us)
            print(f"repeat {repeat} {codec:13s} two-view {runs[codec]['two_view'][-1]:7.0f}/s "
                  f"({cpu[codec]['two_view'][-1]:.0f} CPU µs) eval {runs[codec]['eval'][-1]:7.0f}/s "
                  f"({cpu[codec]['eval'][-1]:.0f} CPU µs)", flush=True)
    paired = lambda codec, kind: [mine / npy for mine, npy in zip(runs[codec][kind], runs[BASELINE][kind],  # noqa: E731
                                                                   strict=True)]
    return {codec: {kind: {"median": statistics.median(v), "runs": v, "vs_npy": statistics.median(paired(codec, kind)),
                           "cpu_us": statistics.median(cpu[codec][kind]), "cpu_runs": cpu[codec][kind]}
                    for kind, v in r.items()}
            for codec, r in runs.items()}


def transpose_cost(folder: Path, batch: int, workers: int, rounds: int = 60) -> dict:
    """CPU crops/s of decoding the TIFF shards alone and followed by the HWC -> CHW transpose.

    Each round times one batch of each pipeline back to back; the medians of the per-round rates and of
    the paired ratios (which cancel the drift of a shared machine's load) are returned.
    """
    from nvidia.dali import fn, pipeline_def, types

    manifest = read_manifest(folder)
    tars = [str(t) for t in manifest.tar_paths("train")]

    def build(transpose: bool):
        @pipeline_def(batch_size=batch, num_threads=workers, device_id=None, prefetch_queue_depth=1)
        def decode():
            data, _ = fn.readers.webdataset(paths=tars, index_paths=[t[:-4] + ".idx" for t in tars],
                                            ext=["tif", "id"], dtypes=[types.UINT8, types.INT64])
            hwc = fn.decoders.image(data, device="cpu", output_type=types.ANY_DATA, dtype=types.UINT16)
            return fn.transpose(hwc, perm=[2, 0, 1], output_layout="CHW") if transpose else hwc

        pipe = decode()
        pipe.build()
        pipe.run()  # warm-up
        return pipe

    pipes = {"decode": build(False), "decode+transpose": build(True)}
    seconds: dict[str, list[float]] = {name: [] for name in pipes}
    for _ in range(rounds):
        for name, pipe in pipes.items():
            start = time.perf_counter()
            pipe.run()
            seconds[name].append(time.perf_counter() - start)
    ratios = [d / t for d, t in zip(seconds["decode"], seconds["decode+transpose"], strict=True)]
    return {**{name: batch / statistics.median(s) for name, s in seconds.items()}, "ratio": statistics.median(ratios)}


def codec_levels(repeats: int) -> dict:
    """Per encoder level and real crop set: median npy bytes / encoded bytes, and median encode µs per crop."""
    from codec_probe import real_crops

    out: dict = {}
    for label, encode, levels in (("tiff-deflate zlib", encode_tiff_deflate, (1, 6, 9)),
                                  ("blosc2 zstd", encode_blosc2, (1, 5, 8)),
                                  ("blosc2-lz4 lz4hc", partial(encode_blosc2, compressor="lz4hc"), (3, 5, 9))):
        for name, crops in real_crops().items():
            npy = [len(encode_npy(c)) for c in crops]
            for level in levels:
                ratios = [n / len(encode(c, level)) for n, c in zip(npy, crops, strict=True)]
                times = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    for c in crops:
                        encode(c, level)
                    times.append((time.perf_counter() - start) / len(crops) * 1e6)
                out.setdefault(label, {}).setdefault(name, {})[str(level)] = {
                    "ratio": statistics.median(ratios), "encode_us": statistics.median(times), "crops": len(crops)}
    return out


def real_crop_codecs(repeats: int) -> dict:
    """Per real crop set and codec: npy bytes / codec bytes (median per crop, and of the whole set), bytes per
    crop, and decode µs per crop on one core (min over repeats of the mean; `Codec.decode`, the reference
    decoder). For a codec with a batch decoder, also its µs per crop on 1 and 2 threads over a batch of 256."""
    from concurrent.futures import ThreadPoolExecutor

    from codec_probe import real_crops

    out: dict = {}
    for name, crops in real_crops().items():
        npy = [len(encode_npy(c)) for c in crops]
        for codec in CODECS.values():
            members = [codec.encode(c) for c in crops]
            row = {"ratio_median": statistics.median(n / len(m) for n, m in zip(npy, members, strict=True)),
                   "ratio_total": sum(npy) / sum(map(len, members)), "bytes_per_crop": statistics.mean(map(len, members)),
                   "crops": len(crops)}
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                for m, c in zip(members, crops, strict=True):
                    codec.decode(m, c.shape)
                times.append((time.perf_counter() - start) / len(crops) * 1e6)
            row["decode_us"] = min(times)
            if codec.dali_decoder == "host":
                batch = [np.frombuffer(members[i % len(members)], dtype=np.uint8) for i in range(256)]
                decoded = torch.empty((len(batch), *crops[0].shape), dtype=torch.uint16).numpy()
                for threads in (1, 2):
                    with ThreadPoolExecutor(threads) as pool:
                        times = []
                        for _ in range(repeats):
                            start = time.perf_counter()
                            codec.decode_members(batch, decoded, pool)
                            times.append((time.perf_counter() - start) / len(batch) * 1e6)
                    row[f"batch_decode_us_{threads}t"] = min(times)
            out.setdefault(name, {})[codec.name] = row
    return out


def blosc2_candidates(repeats: int) -> list[dict]:
    """The Blosc2 variants the codec was chosen from, on the real 5-channel crops: predictor (none, left
    neighbour, gradient; residuals zigzag-mapped), shuffle (byte or bit), compressor (LZ4, LZ4HC, zstd at
    level 1): median npy bytes / encoded bytes, and decompress + inverse-predictor µs per crop on one core."""
    import imagecodecs
    from codec_probe import real_crops

    from fastcell.format.codecs import unzigzag, zigzag

    crops = real_crops()["jump5"]
    npy = [len(encode_npy(c)) for c in crops]
    predictors = {
        "none": (lambda c: c, lambda r: r),
        "left": (lambda c: zigzag(imagecodecs.delta_encode(c, axis=-1)),
                 lambda r: imagecodecs.delta_decode(unzigzag(r), axis=-1, out=r)),
        "gradient": (gradient_codes, undo_gradient),
    }
    rows = []
    for predictor, (forward, inverse) in predictors.items():
        residuals = [forward(c) for c in crops]
        for shuffle in ("shuffle", "bitshuffle"):
            for compressor, level in (("lz4", 5), ("lz4hc", 5), ("zstd", 1)):
                members = [imagecodecs.blosc2_encode(r, level=level, compressor=compressor, shuffle=shuffle,
                                                     splitmode="always", typesize=2, numthreads=1) for r in residuals]
                out = np.empty(crops[0].shape, dtype=np.uint16)
                times = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    for m in members:
                        imagecodecs.blosc2_decode(m, numthreads=1, out=out.reshape(-1).view(np.uint8))
                        inverse(out)
                    times.append((time.perf_counter() - start) / len(members) * 1e6)
                rows.append({"predictor": predictor, "shuffle": shuffle, "compressor": f"{compressor} {level}",
                             "ratio": statistics.median(n / len(m) for n, m in zip(npy, members, strict=True)),
                             "decode_us": min(times)})
    return rows


def entropy_bits(values: np.ndarray) -> float:
    """The order-0 entropy of non-negative integer `values`, in bits for all of them."""
    p = np.bincount(values.ravel()) / values.size
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum()) * values.size


def residual_entropy() -> dict:
    """Per real crop set: 16 bits / the order-0 entropy (bits per pixel) of a crop's zigzag-mapped gradient
    residuals, median over crops: what a coder of independent residuals could reach, for comparison with
    blosc2's ratio (deterministic, no timing)."""
    from codec_probe import real_crops


    out = {}
    for name, crops in real_crops().items():
        bounds = []
        for crop in crops:
            residual = gradient_codes(crop)
            bounds.append(residual.size * 16 / entropy_bits(residual))
        out[name] = statistics.median(bounds)
    return out


def ratio_ceiling() -> dict:
    """What would reach 1.8x on the real crops: per set, median npy bytes / encoded bytes of blosc2 (zstd 1 and
    Blosc2's top level 9 = zstd 22), of context-modelling coders on the same bit-shuffled gradient residuals (brotli
    11, lzma), of JPEG-LS (CharLS, channels stacked), of adaptive Rice coding (AEC) and of pcodec on the gradient
    residuals, with their decode µs per crop on one core; and 16 bits /
    order-0 entropy of the residuals of other predictors (MED of LOCO-I; least squares on 4 neighbours per channel)
    and of the gradient per channel (per-channel tables, their cost not counted: an optimistic bound)."""
    import imagecodecs
    from codec_probe import real_crops


    def zz(residual: np.ndarray) -> np.ndarray:
        return np.where(residual >= 0, 2 * residual, -2 * residual - 1)

    def residuals(crop: np.ndarray) -> dict[str, np.ndarray]:
        c = crop.astype(np.int64)
        x, a, b, cc, d = c[:, 1:, 1:-1], c[:, 1:, :-2], c[:, :-1, 1:-1], c[:, :-1, :-2], c[:, :-1, 2:]
        low, high = np.minimum(a, b), np.maximum(a, b)
        med = np.where(cc >= high, low, np.where(cc <= low, high, a + b - cc))
        lsq = np.empty(x.shape)
        for ch in range(len(c)):
            neighbours = np.stack([v[ch].ravel() for v in (a, b, cc, d)] + [np.ones(a[ch].size)], 1).astype(float)
            weights, *_ = np.linalg.lstsq(neighbours, x[ch].ravel().astype(float), rcond=None)
            lsq[ch] = (neighbours @ weights).reshape(x[ch].shape)
        return {"gradient": zz(x - a - b + cc), "MED": zz(x - med), "least squares": zz(x - np.rint(lsq).astype(np.int64))}

    def bitshuffled(crop: np.ndarray) -> bytes:
        r = gradient_codes(crop)
        return bytes(imagecodecs.bitshuffle_encode(r.reshape(-1), itemsize=2, blocksize=r.size))

    aec = {"bitspersample": 16, "blocksize": 32, "rsi": 128, "flags": 0}  # Rice codes per block of 32, no preprocessing
    blosc2 = CODECS["blosc2"].decode
    coders = {  # name: (encode(crop), decode(member, shape))
        "blosc2 (zstd 1)": (encode_blosc2, blosc2),
        "blosc2 zstd level 9 (zstd 22)": (partial(encode_blosc2, level=9), blosc2),
        "brotli 11, bit-shuffled residuals": (lambda c: imagecodecs.brotli_encode(bitshuffled(c), level=11),
                                              lambda m, _: imagecodecs.brotli_decode(m)),
        "lzma, bit-shuffled residuals": (lambda c: imagecodecs.lzma_encode(bitshuffled(c)),
                                         lambda m, _: imagecodecs.lzma_decode(m)),
        "JPEG-LS (channels stacked)": (lambda c: imagecodecs.jpegls_encode(c.reshape(-1, c.shape[-1])),
                                       lambda m, _: imagecodecs.jpegls_decode(m)),
        # adaptive Rice coding (CCSDS 121.0, libaec) of the zigzag gradient residuals: a code choice per 32 values
        "AEC (Rice, libaec), gradient residuals": (
            lambda c: imagecodecs.aec_encode(gradient_codes(c), **aec),
            lambda m, shape: undo_gradient(imagecodecs.aec_decode(m, out=np.empty(shape, np.uint16), **aec))),
        "pcodec (Zarr v3's numeric codec), gradient residuals": (
            lambda c: imagecodecs.pcodec_encode(gradient_codes(c)),
            lambda m, shape: undo_gradient(imagecodecs.pcodec_decode(m, shape=shape, dtype=np.uint16))),
    }
    gives_crops = {name for name in coders if name.startswith(("blosc2", "AEC", "pcodec"))}
    out: dict = {}
    for name, crops in real_crops().items():
        if name == "dsb1":
            continue
        npy = [len(encode_npy(c)) for c in crops]
        row = {}
        for coder, (encode, decode) in coders.items():
            members = [encode(c) for c in crops]
            start = time.thread_time()
            for m in members:
                decode(m, crops[0].shape)
            row[coder] = {"ratio": statistics.median(n / len(m) for n, m in zip(npy, members, strict=True)),
                          "decode_us": (time.thread_time() - start) / len(members) * 1e6}
            if coder in gives_crops:
                row[coder]["exact"] = all(np.array_equal(decode(m, c.shape), c) for m, c in zip(members, crops, strict=True))
        bounds: dict[str, list[float]] = {}
        for crop in crops:
            per_predictor = residuals(crop)
            for predictor, r in per_predictor.items():
                bounds.setdefault(predictor, []).append(r.size * 16 / entropy_bits(r))
            r = per_predictor["gradient"]
            bounds.setdefault("gradient, per-channel tables", []).append(
                r.size * 16 / sum(entropy_bits(r[ch]) for ch in range(len(r))))
        row["entropy"] = {k: statistics.median(v) for k, v in bounds.items()}
        out[name] = row
    return out


def decode_profile(folders: dict[str, Path], workers: int, repeats: int) -> dict:
    """Where the CPU time of a host-decoded codec goes on the demo crops: per codec, thread CPU µs per crop of
    decompression alone, of the reference per-crop `Codec.decode`, of the batched `decode_members` on one thread
    (groups of crops undone at once) and of `normalise_into` in the loader's groups (median of `repeats` over the
    first 2048 members; process CPU time, one thread working);
    and process CPU µs per sample of the readers: DALI's shuffled id reader + the member lookup (train), the eval's
    reads through the indices, and npy's whole DALI eval pipeline (read, decode, normalise) for scale."""
    from concurrent.futures import ThreadPoolExecutor

    from nvidia.dali.plugin.pytorch import LastBatchPolicy

    from fastcell.format.codecs import decompress_blosc2_into
    from fastcell.format.folder import read_dali_index
    from fastcell.loaders.base import eval_affine, open_split
    from fastcell.loaders.dali import ShardMembers, _iterate, normalise_into

    out: dict = {}
    for codec, folder in folders.items():
        manifest = read_manifest(folder)
        if not manifest.codec.host_decoded:
            continue
        tar = manifest.tar_paths("train")[0]
        data = tar.read_bytes()
        members = [data[o : o + n] for sample in read_dali_index(tar.with_suffix(".idx"))[:2048]
                   for ext, o, n, _ in sample if ext == manifest.codec.ext]
        shape, c = manifest.crop_shape, manifest.codec
        batch = np.empty((len(members), *shape), dtype=np.uint16)
        normalised = np.empty(batch.shape, dtype=np.float32)
        evaluate = create_eval_loader(folder, 256, device="cpu", num_workers=workers)
        affine = [a.numpy() for a in eval_affine(evaluate.intensity, torch.device("cpu"))]
        groups = [slice(i, i + FINISH_CROPS) for i in range(0, len(batch), FINISH_CROPS)]
        stages = {
            "decompress": lambda: [decompress_blosc2_into(m, batch[i]) for i, m in enumerate(members)],  # noqa: B023
            "per-crop decode (Codec.decode)": lambda: [c.decode(m, shape) for m in members],  # noqa: B023
            "batched decode, 1 thread": lambda: c.decode_members(members, batch, one),  # noqa: B023
            "normalise_into": lambda: [normalise_into(batch[g], normalised[g], *affine)  # noqa: B023
                                       for g in groups],  # noqa: B023
        }
        times: dict[str, list[float]] = {k: [] for k in stages}
        with ThreadPoolExecutor(1) as one:
            for _ in range(repeats):
                for stage, run in stages.items():
                    start = time.process_time()  # the batched decode runs in the pool's thread
                    run()
                    times[stage].append((time.process_time() - start) / len(members) * 1e6)
        row = {k: statistics.median(v) for k, v in times.items()}
        start = time.process_time()
        table = ShardMembers(open_split(folder, None)[1])  # the indices parsed, the tars mapped, the ids checked
        n = sum(len(crops) for crops, _ in table.batches(256))
        row["index reads (eval) per sample"] = (time.process_time() - start) / n * 1e6
        train = create_train_loader(folder, AugmentSpec(), 256, device="cpu", num_workers=workers)

        def found(batches):
            for outputs in batches:
                table.find(outputs[0]["ids"].numpy().ravel())  # noqa: B023
                yield outputs

        row["DALI id reader + member lookup (train) per sample"] = _pipeline_cpu_us(
            found(_iterate(train.build_pipeline(0), ["ids"], LastBatchPolicy.DROP, train)))
        out[codec] = row
    npy = create_eval_loader(folders[BASELINE], 256, device="cpu", num_workers=workers)
    out[BASELINE] = {"DALI eval pipeline (read, decode, normalise) per sample": _pipeline_cpu_us(
        _iterate(npy.build_pipeline(), ["images", "ids"], LastBatchPolicy.PARTIAL, npy))}
    return out


def _pipeline_cpu_us(batches) -> float:
    """Process CPU µs per sample of a DALI iterator after its first batch (start-up excluded)."""
    start, n = None, 0
    for outputs in batches:
        if start is None:
            start = time.process_time()
        else:
            n += len(outputs[0]["ids"])
    return (time.process_time() - start) / n * 1e6


def gpu_rows(folders: dict[str, Path], batch: int = 512, workers: int = 8, epochs: int = 3) -> dict:
    """On a GPU: per codec, eval and two-view samples/s of the default loaders (best of `epochs`; codecs
    alternating) and whether its eval tensors equal npy's. `folders` maps codec names (npy among them) to
    shard folders of the same crops. For `bench/gpu_check.py`."""
    reference = None
    out: dict = {}
    for codec, folder in folders.items():
        images = torch.cat([x.cpu() for x, _ in create_eval_loader(folder, batch, device="cuda", num_workers=workers)])
        reference = images if codec == BASELINE else reference
        out[codec] = {"eval_tensors": images}
    for row in out.values():
        images = row.pop("eval_tensors")
        row["equal_to_npy"] = bool(torch.equal(images, reference))
        row["max_abs_diff_to_npy"] = float((images - reference).abs().max())
    rates = loader_rates(folders, "cuda", batch, workers, epochs)
    for codec, r in rates.items():
        out[codec].update({kind: max(v["runs"]) for kind, v in r.items()})
    return out


def markdown() -> str:
    """The report: CPU and (when measured) GPU results side by side."""
    results = {kind: json.loads(p.read_text()) for kind, p in (("cpu", RESULTS / "codec_bench.json"),
                                                                ("gpu", RESULTS / "codec_bench_gpu.json"))
               if p.is_file()}
    first = next(iter(results.values()))
    lines = ["# Crop codecs: shard size, encode time, decode speed, loader throughput", ""]
    for kind, r in results.items():
        m = r["machine"]
        lines.append(f"- {kind}: {r['date']}; {m['nproc']} CPU cores ({m['cpu']}), GPU {m.get('gpu') or 'none'}; "
                     f"load average {m['load_average_1min']:.1f} at the end; batch {r['batch_size']}, "
                     f"{r['workers']} DALI threads, {r['repeats']} repeats (medians).")
    s = first["screen"]
    lines += [
        f"- screen: {s['source']}" + (f": {s['fields']} fields" if s["fields"] else "")
        + f"; `fastcell shard --crop {first['crop']}` with nuclei "
        f"detection, {first['codecs'][BASELINE]['shard']['cells']:,} cells, {first['crop_shape']} uint16 crops.",
        "- The CPU is shared with other jobs: read the ratios (measured in the same run, codecs alternating), "
        "not the absolute rates.",
        "",
        "| codec | shard MiB | bytes/cell | npy / codec | encode µs/crop | shard-writing pass s | "
        + " | ".join(f"{k} two-view/s | vs npy | {k} eval/s | vs npy" for k in results) + " |",
        "|---|---:|---:|---:|---:|---:|" + "---:|---:|---:|---:|" * len(results),
    ]
    for codec, c in first["codecs"].items():
        base = first["codecs"][BASELINE]
        cells = [f"{c['shard']['shard_bytes'] / 2**20:.1f}", f"{c['shard']['bytes_per_cell']:,.0f}",
                 f"{base['shard']['shard_bytes'] / c['shard']['shard_bytes']:.2f}", f"{c['encode_us_per_crop']:.0f}",
                 f"{c['shard']['shard_pass_s']:.1f}"]
        for r in results.values():
            mine = r["codecs"][codec]["loader"]
            for kind in ("two_view", "eval"):
                cells += [f"{mine[kind]['median']:,.0f}", f"{mine[kind]['vs_npy']:.2f}"]
        lines.append(f"| {codec} | " + " | ".join(cells) + " |")
    lines += ["", "Loader rates: medians over the repeats; `vs npy`: the median of the per-repeat ratios to npy "
                  "(each repeat runs every codec back to back, so the machine's load cancels). "
                  + ("GPU rows: not measured yet (no GPU in that session); `gpu_rows()` measures them."
                     if "gpu" not in results else "")]
    cpu = results.get("cpu", {})
    if cpu and "cpu_us" in cpu["codecs"][BASELINE]["loader"]["eval"]:
        previous = RESULTS / PREVIOUS
        old = json.loads(previous.read_text()) if previous.is_file() else {"codecs": {}}
        lines += ["", "Before and after the host decode of 2026-12-01 (one thread decompresses every member, the other "
                      "finishes; the train loader reads only ids through DALI; `bench/results/host_decode_processes.md`): "
                      "loader rates vs npy of the same run (before: "
                      f"`{PREVIOUS}`, {old.get('date', '–')}, load {old.get('machine', {}).get('load_average_1min', 0):.1f}"
                      " at its end; after: this run) and this run's process CPU µs per sample (all threads):", "",
                  "| codec | bytes/cell | two-view vs npy, before | after | eval vs npy, before | after | "
                  "CPU µs/sample two-view | eval |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for codec, c in cpu["codecs"].items():
            before = old["codecs"].get(codec)
            cells = [f"{c['shard']['bytes_per_cell']:,.0f}"]
            for kind in ("two_view", "eval"):
                cells += [f"{before['loader'][kind]['vs_npy']:.2f}" if before else "–", f"{c['loader'][kind]['vs_npy']:.2f}"]
            cells += [f"{c['loader'][kind]['cpu_us']:.0f}" for kind in ("two_view", "eval")]
            lines.append(f"| {codec} | " + " | ".join(cells) + " |")
    if "decode_profile" in cpu:
        profile = cpu["decode_profile"]
        stages = [k for k in next(iter(profile.values())) if "per sample" not in k]
        lines += ["", "Where a host-decoded crop's CPU time goes (demo crops; process CPU µs per crop, one thread working; readers: "
                      "process CPU µs per sample):", "", "| codec | " + " | ".join(stages) + " |",
                  "|---|" + "---:|" * len(stages)]
        lines += [f"| {codec} | " + " | ".join(f"{row[k]:.1f}" for k in stages) + " |"
                  for codec, row in profile.items() if codec != BASELINE]
        lines += [""] + [f"- {codec}: {k} {v:.1f} µs" for codec, row in profile.items() for k, v in row.items()
                         if "per sample" in k]
    if "ratio_ceiling" in cpu:
        ceiling = cpu["ratio_ceiling"]
        lines += ["", "What reaches 1.8x on the real 96-px crops (median npy bytes / encoded; decode µs per crop on one "
                      "core: back to the crop, except brotli and lzma: their bytes alone, before bit-unshuffling and "
                      "undoing the predictor):", "", "| coder | " + " | ".join(f"{n} ratio | {n} decode µs" for n in ceiling) + " |",
                  "|---|" + "---:|---:|" * len(ceiling)]
        coders = [k for k in next(iter(ceiling.values())) if k != "entropy"]
        lines += [f"| {k} | " + " | ".join(f"{ceiling[n][k]['ratio']:.3f} | {ceiling[n][k]['decode_us']:.0f}"
                                          for n in ceiling) + " |" for k in coders]
        checked = {k: all(ceiling[n][k]["exact"] for n in ceiling) for k in coders
                   if all("exact" in ceiling[n][k] for n in ceiling)}
        if checked:
            lines += ["", "Decoded back to the crops and compared: " + "; ".join(
                f"{k} {'bit-exact' if exact else 'NOT bit-exact'}" for k, exact in checked.items()) + "."]
        bounds = next(iter(ceiling.values()))["entropy"]
        lines += ["", "16 bits / order-0 entropy of the residuals of other predictors (median over crops): "
                  + "; ".join(f"{k}: " + ", ".join(f"{n} {ceiling[n]['entropy'][k]:.3f}" for n in ceiling)
                              for k in bounds) + "."]
    if "real_crops" in results.get("cpu", {}):
        real = results["cpu"]["real_crops"]
        lines += ["", "Real crops (96 px, `codec_probe.real_crops`: JUMP Cell Painting field, 5 channels and its first 3; "
                      "DSB nuclei, 1 channel): npy bytes / codec bytes, median per crop (over the set); decode µs per "
                      "crop on one core (`Codec.decode`; blosc2's batch decoder on 1 and 2 threads):", "",
                  "| set | codec | bytes/crop | npy / codec | decode µs/crop, 1 core | batch decode µs/crop 1 thread | "
                  "2 threads |", "|---|---|---:|---:|---:|---:|---:|"]
        for name, codecs in real.items():
            for codec, r in codecs.items():
                batch = [f"{r[k]:.0f}" if k in r else "–" for k in ("batch_decode_us_1t", "batch_decode_us_2t")]
                lines.append(f"| {name} ({r['crops']}) | {codec} | {r['bytes_per_crop']:,.0f} | "
                             f"{r['ratio_median']:.3f} ({r['ratio_total']:.3f}) | {r['decode_us']:.0f} | "
                             + " | ".join(batch) + " |")
    if "transpose" in results.get("cpu", {}):
        t = results["cpu"]["transpose"]
        ratio = t["ratio"]
        lines += ["", f"CPU TIFF decode alone {t['decode']:,.0f} crops/s, with the HWC -> CHW transpose "
                      f"{t['decode+transpose']:,.0f} crops/s (median paired ratio {ratio:.2f}x): the transpose costs "
                      f"{max(0.0, 1 - ratio):.0%} of the CPU decode rate (on the GPU it runs on the device after nvTIFF). "
                      "The loaders keep it, so that one CHW graph serves both codecs; an HWC eval pipeline could "
                      "leave it to `crop_mirror_normalize`, which changes the layout while it normalises."]
    if "blosc2_candidates" in results.get("cpu", {}):
        lines += ["", "Blosc2 variants on the real 5-channel crops (split mode always; median npy / encoded; decompress + "
                      "inverse predictor, µs per crop on one core). `blosc2` is gradient + bitshuffle + zstd 1:", "",
                  "| predictor | shuffle | compressor | npy / encoded | decode µs/crop |", "|---|---|---|---:|---:|"]
        lines += [f"| {r['predictor']} | {r['shuffle']} | {r['compressor']} | {r['ratio']:.3f} | {r['decode_us']:.0f} |"
                  for r in results["cpu"]["blosc2_candidates"]]
    if "residual_entropy" in results.get("cpu", {}):
        bound = results["cpu"]["residual_entropy"]
        lines += ["", "16 bits / order-0 entropy of the gradient residuals (what a coder of independent residuals could "
                      "reach; median over crops): " + ", ".join(f"{k} {v:.3f}" for k, v in bound.items()) + "."]
    for label, levels in results.get("cpu", {}).get("codec_levels", {}).items():
        names = list(levels)
        lines += ["", f"{label} level on real crops (npy bytes / encoded, median; encode µs per 96-px crop):",
                  "", "| level | " + " | ".join(f"{n} ratio | {n} µs" for n in names) + " |",
                  "|---|" + "---:|---:|" * len(names)]
        for level in levels[names[0]]:
            lines.append(f"| {level} | " + " | ".join(f"{levels[n][level]['ratio']:.3f} | {levels[n][level]['encode_us']:.0f}"
                                                  for n in names) + " |")
    lines += ["", "Produced by `bench/codec_bench.py`.", ""]
    return "\n".join(lines)


def loader_table(record: dict) -> str:
    """The loader rows of a run (`--loaders-only`): samples/s and the median per-repeat ratio to npy, at its crop."""
    m = record["machine"]
    lines = [f"{record['date']}, {m['nproc']} CPU cores, load average {m['load_average_1min']:.1f} at the end; "
             f"{record['crop_shape']} crops (--crop {record['crop']}), batch {record['batch_size']}, "
             f"{record['workers']} workers, {record['repeats']} repeats", "",
             "| codec | crop | two-view/s | vs npy | eval/s | vs npy |", "|---|---|---:|---:|---:|---:|"]
    for codec, c in record["codecs"].items():
        r = c["loader"]
        lines.append(f"| {codec} | {record['crop_shape']} | {r['two_view']['median']:,.0f} | "
                     f"{r['two_view']['vs_npy']:.2f} | {r['eval']['median']:,.0f} | {r['eval']['vs_npy']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu", help="where the DALI loaders run")
    parser.add_argument("--screen", type=Path, help="an existing synthetic screen (default: synthesise one)")
    parser.add_argument("--weeks", default="all", help="weeks of the synthesised screen: 'all' (the demo) or '1,2'")
    parser.add_argument("--crop", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2,
                        help="shard worker processes and DALI threads")
    parser.add_argument("--loaders-only", action="store_true",
                        help="shard and measure the loader rows only, at --crop: writes codec_bench_loaders_<device>_<crop>px.json")
    args = parser.parse_args()
    if args.device == "gpu" and not torch.cuda.is_available():
        sys.exit("codec_bench --device gpu: no CUDA device is visible to torch; run it on a GPU machine "
                 "(or measure the CPU with --device cpu)")
    device = "cuda" if args.device == "gpu" else "cpu"
    with tempfile.TemporaryDirectory(prefix="codec_bench_") as tmp:
        screen = args.screen
        screen_info = {"source": str(screen), "fields": None, "true_cells": None}
        if screen is None:
            print("synthesising the demo screen ...", flush=True)
            screen = Path(tmp) / "screen"
            screen_info = make_screen(screen, args.weeks, args.workers)
        folders, codecs = {}, {}
        for codec in CODECS:
            print(f"sharding with --codec {codec} ...", flush=True)
            folders[codec] = Path(tmp) / codec
            codecs[codec] = {"shard": shard(screen, folders[codec], codec, args.crop, args.workers)}
        encode = {} if args.loaders_only else encode_us_per_crop(folders[BASELINE], args.repeats)
        for codec, rates in loader_rates(folders, device, args.batch_size, args.workers, args.repeats).items():
            codecs[codec].update(encode_us_per_crop=encode.get(codec), loader=rates, params=CODECS[codec].params)
        manifest = read_manifest(folders[BASELINE])
        record = {
            "benchmark": "codec_bench", "device": args.device,
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": machine(gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                               torch=torch.__version__),
            "screen": screen_info, "crop": args.crop, "crop_shape": "x".join(map(str, manifest.crop_shape)),
            "batch_size": args.batch_size, "workers": args.workers, "repeats": args.repeats, "spec": "AugmentSpec()",
            "codecs": codecs,
        }  # fmt: skip
        if args.loaders_only:
            write_json_atomic(RESULTS / f"codec_bench_loaders_{args.device}_{args.crop}px.json", record)
            print(loader_table(record))
            return
        if args.device == "cpu":
            record["transpose"] = transpose_cost(folders["tiff-deflate"], args.batch_size, args.workers)
            record["codec_levels"] = codec_levels(args.repeats)
            record["real_crops"] = real_crop_codecs(max(3, args.repeats))
            record["blosc2_candidates"] = blosc2_candidates(max(3, args.repeats))
            record["residual_entropy"] = residual_entropy()
            record["ratio_ceiling"] = ratio_ceiling()
            record["decode_profile"] = decode_profile(folders, args.workers, max(3, args.repeats))
    name = "codec_bench.json" if args.device == "cpu" else "codec_bench_gpu.json"
    write_json_atomic(RESULTS / name, record)
    write_bytes_atomic(RESULTS / "codec_bench.md", markdown().encode())
    print(markdown())


if __name__ == "__main__":
    main()
