"""The `fastcell shard` and `fastcell info` verbs: thin wrappers over `shard_screen` and `summarize`."""

from __future__ import annotations

from pathlib import Path

import typer

from fastcell.shard.config import ShardConfig
from fastcell.shard.sources import ALL_ROLES

_DEFAULT = ShardConfig(source=".", out=".")  # each option's default is the config's


def _names(value: str | None) -> tuple[str, ...] | None:
    """A comma-separated option as a tuple of names (None stays None)."""
    if value is None:
        return None
    return tuple(name.strip() for name in value.split(",") if name.strip())


def shard(
    source: str = typer.Argument(
        ...,
        help="A BBBC021-layout folder (BBBC021_v1_image.csv[.gz] + BBBC021_v1_moa.csv, images relative to it), "
        "a field table CSV (one row per field: plate, well, site, treatment and one image column per "
        "channel; paths relative to the CSV, or URLs) or an OME-Zarr plate (plate.zarr). Tables, plates and "
        "images may be URLs (s3://, https://; see the README).",
    ),
    out: Path = typer.Argument(..., help="Output folder for the shards, e.g. shards/bbbc021."),
    locations: str | None = typer.Option(
        None,
        help="Cell centres table (CellProfiler Nuclei_Location_Center_X/Y or AreaShape_Center_X/Y), keyed by "
        "plate/well/site, image file name or ImageNumber. Without it, nuclei are detected on the DNA channel.",
    ),
    channels: str | None = typer.Option(
        None,
        help="Comma-separated channel columns of a field table, in crop order (default: every column of image "
        "files). For BBBC021, a subset/order of DAPI,Tubulin,Actin.",
    ),
    dna_channel: str | None = typer.Option(
        None,
        help="Channel used for nuclei detection (default: the one named DNA/DAPI/Hoechst).",
    ),
    roles: str = typer.Option(
        ",".join(_DEFAULT.roles),
        help=f"Comma-separated field roles to shard, of {', '.join(ALL_ROLES)} ('all' for every field). BBBC021: "
        "annotated treatments, DMSO and the taxol plate controls by default; add unannotated for the other "
        "compounds (more unlabelled training data).",
    ),
    crop: int = typer.Option(_DEFAULT.crop_size, "--crop", help="Crop size in pixels (square, centred on each cell)."),
    border: str = typer.Option(
        _DEFAULT.border,
        help="Cells whose crop leaves the field: 'skip' them or 'pad' with zeros (counted).",
    ),
    illum: bool = typer.Option(
        _DEFAULT.illumination,
        "--illum/--no-illum",
        help="Illumination correction per plate and channel (saved as illumination.npz).",
    ),
    scaling: str = typer.Option(
        _DEFAULT.scaling,
        help="Intensity scaling after correction: 'none'; 'plate-percentile' (each plate's p0.1..p99.9 of "
        "corrected pixels mapped to 0..65535); or 'plate-dmso' (each plate's DMSO crops define it: their "
        "background (1st percentile) goes to 1000 and their mean to 5000, which removes per-plate gain and "
        "background differences; every plate needs DMSO wells).",
    ),
    shard_size: int | None = typer.Option(
        None,
        help="Samples per shard (default: ~256 MiB shards, 4,712 crops of 3 x 96 x 96, 2,861 of 5 x 96 x 96).",
    ),
    codec: str = typer.Option(
        _DEFAULT.codec,
        help="How crops are stored, all lossless: 'npy' (raw uint16; nothing to decode), 'blosc2' (gradient "
        "residuals, bit-shuffle, zstd: 1.7-1.8x smaller on real Cell Painting crops, decoded in threads), "
        "'blosc2-lz4' (the same with LZ4HC: ~3% larger, decompressed 1.4-2.8x faster) or 'tiff-deflate' (a TIFF "
        "any image tool opens; 1.3x smaller, slow to decode). See shards/README.md.",
    ),
    val_fraction: float = typer.Option(
        _DEFAULT.val_fraction, help="Fraction of cells (or plates) for validation."
    ),
    split: str = typer.Option(
        _DEFAULT.split, help="Validation split: 'random' cells or whole 'plate's."
    ),
    seed: int = typer.Option(_DEFAULT.seed, help="Seed of the split and of the interleaving permutation."),
    workers: int | None = typer.Option(None, help="Worker processes (default: min(4, CPUs))."),
    dask: str | None = typer.Option(
        _DEFAULT.dask,
        help="Run the work on Dask instead of a local process pool: 'local:N' (a local cluster of N worker "
        "processes, started and stopped here) or a running scheduler's address (tcp://host:8786; the "
        "workers must see SOURCE and OUT at the same paths). Same shards as without it.",
    ),
    on_error: str = typer.Option(
        _DEFAULT.on_error,
        help="A bad field (missing/unreadable image, mismatched channels or bit depths): 'fail' before any shard "
        "is written, or 'skip' it and record it in index.json. A field without cells is not an error: its "
        "count (0) is recorded in fields.parquet.",
    ),
    overwrite: bool = typer.Option(
        _DEFAULT.overwrite,
        "--overwrite",  # a flag: without its name Typer would add --no-overwrite
        help="Replace shards made with another configuration: the new ones are built in OUT/.staging and swapped "
        "in when complete; only files the old index.json lists are removed, other files are kept.",
    ),
    keep_work: bool = typer.Option(
        _DEFAULT.keep_work, "--keep-work", help="Keep OUT/.work (per-field crops) after finishing."
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
) -> None:
    """Fields of a screen -> illumination-corrected single-cell crops in WebDataset shards.

    Resumable (rerun the same command after an interruption) and deterministic (the same input,
    options and seed give byte-identical shards, whatever --workers).
    """
    from rich.console import Console

    from fastcell.shard.pipeline import shard_screen

    role_names = ALL_ROLES if roles.strip() == "all" else _names(roles)
    config = ShardConfig(
        source=source, out=out, locations=locations, channels=_names(channels), dna_channel=dna_channel,
        roles=role_names, crop_size=crop, border=border, illumination=illum, scaling=scaling,
        shard_size=shard_size, codec=codec, val_fraction=val_fraction, split=split, seed=seed,
        dask=dask, on_error=on_error, overwrite=overwrite,
        keep_work=keep_work, **({} if workers is None else {"workers": workers}),  # unset: ShardConfig's default
    )  # fmt: skip
    result = shard_screen(config, progress=progress)
    console = Console()
    if result.up_to_date:
        console.print(f"{out}: already complete ({result.n_cells:,} cells); nothing to do")
        if result.fields_skipped:
            console.print(f"[yellow]{len(result.fields_skipped)} field(s) still skipped[/yellow], unreadable as "
                          "before (reasons in index.json); fix them and rerun to add their cells")
        return
    counts = ", ".join(f"{split} {result.manifest.count(split):,}" for split in result.manifest.splits)
    console.print(
        f"{out}: {result.n_cells:,} cells ({counts}) from {result.n_fields - len(result.fields_skipped):,} fields "
        f"in {sum(len(s) for s in result.manifest.splits.values())} {config.codec} shards "
        f"({result.shards_written} written, {result.shards_reused} kept) in {result.timings['wall_total']:.1f} s"
    )
    if result.shards_repaired:
        console.print(
            f"[yellow]{len(result.shards_repaired)} kept shard(s) damaged[/yellow] (their crops no longer matched the "
            f"checksums recorded when they were written), written again: {', '.join(result.shards_repaired)}"
        )
    skipped_cells = result.manifest.skipped["cells"]
    console.print(f"border cells {'padded' if border == 'pad' else 'skipped'}: {skipped_cells.get('border', 0):,}")
    if "invalid_location" in skipped_cells:
        console.print(f"cells dropped for a missing or non-numeric location: {skipped_cells['invalid_location']:,}")
    if result.fields_empty:
        console.print(f"fields with no cells: {result.fields_empty:,} (cell counts per field in fields.parquet)")
    for role, (n, treatments) in result.fields_left_out.items():
        shown = "; ".join(treatments[:5]) + (f" and {len(treatments) - 5} more" if len(treatments) > 5 else "")
        why = " (their compound and dose are not in the MoA table: misspelt?)" if role == "unannotated" else ""
        console.print(f"fields left out by --roles {','.join(config.roles)}: {n:,} {role}{why}: {shown}")
    if result.fields_skipped:
        console.print(
            f"[yellow]{len(result.fields_skipped)} field(s) skipped[/yellow] (reasons in index.json):"
        )
        for record in result.fields_skipped[:5]:
            console.print(f"  {record['reason']}")


def info(
    shards: Path = typer.Argument(..., help="A shard folder written by `fastcell shard` (holds index.json)."),
    montage: Path | None = typer.Option(None, "--montage", help="Write a PNG montage of random crops here."),
    n: int = typer.Option(64, "--n", min=1, help="Crops in the montage."),
    seed: int = typer.Option(0, "--seed", help="Seed choosing the montage's crops."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON instead of tables."),
    verify: bool = typer.Option(
        False,
        "--verify",
        help="Check every crop of every shard against its checksum and decode it (slow: all the data); names the "
        "first bad shard and sample.",
    ),
) -> None:
    """What a shard folder holds: counts, channels, per-channel statistics, what was skipped."""
    import json

    from rich.console import Console
    from rich.table import Table

    from fastcell.errors import InputError
    from fastcell.shard.info import damage_report, summarize

    summary = summarize(shards, montage=montage, n=n, seed=seed, verify=verify)
    console = Console()
    problems = summary["problems"]
    if as_json:
        console.print_json(json.dumps(summary))
        if problems:
            raise InputError(damage_report(shards, problems))
        return
    splits = ", ".join(
        f"{s} {b['cells']:,} cells in {b['shards']} shards" for s, b in summary["splits"].items()
    )
    console.print(f"[bold]{summary['path']}[/bold]: {summary['cells']:,} cells ({splits})")
    console.print(
        f"{summary['plates']} plates, {summary['wells']} wells, {summary['compounds']} compounds; "
        f"crops {len(summary['channels'])} x {summary['crop_size']} x {summary['crop_size']} uint16"
    )
    console.print(
        f"codec {summary['codec']}: {summary['shard_bytes'] / 2**20:,.1f} MiB of shards, "
        f"{summary['bytes_per_cell']:,.0f} bytes per cell"
    )
    if verify:
        checked = "match their checksums and " if summary["checksums"] else ""
        console.print(f"verified: all {summary['verified']:,} crops {checked}decode to uint16 "
                      f"{len(summary['channels'])} x {summary['crop_size']} x {summary['crop_size']}")
        if not summary["checksums"]:
            console.print("[yellow]no checksums recorded[/yellow] (shards made by an older fastcell): "
                          "damaged pixels of npy crops cannot be detected; reshard to record them")
    scaling = summary["scaling"].get("method", "none")
    console.print(f"illumination: {summary['illumination'] or 'none'}; scaling: {scaling}")
    table = Table(title="per-channel statistics (training crops)")
    table.add_column("channel")
    stat_names = ["mean", "std", "min", "p01", "p99", "max"]
    for name in stat_names:
        table.add_column(name, justify="right")
    for channel, stats in summary["channel_stats"].items():
        table.add_row(channel, *(f"{stats[name]:,.1f}" for name in stat_names))
    console.print(table)
    skipped = summary["skipped"]
    cells = ", ".join(f"{reason} {count:,}" for reason, count in skipped["cells"].items()) or "none"
    console.print(f"skipped fields: {skipped['fields']}; fields with no cells: {skipped['empty_fields']}; "
                  f"cells not cropped or padded: {cells}")
    reasons = list(skipped["fields_by_reason"].items())
    for reason, count in reasons[:5]:
        console.print(f"  {count} x {reason}")
    if len(reasons) > 5:
        console.print(f"  ... {len(reasons) - 5} more reasons in index.json")
    if "montage" in summary:
        console.print(f"montage: {summary['montage']}")
    for problem in problems:
        console.print(f"[red]damaged:[/red] {problem}")
    if problems:
        raise InputError(damage_report(shards, problems))
