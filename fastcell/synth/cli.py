"""`fastcell synth OUT_DIR`: a BBBC021-shaped screen with the real design and synthetic pixels."""

from __future__ import annotations

from pathlib import Path

import typer


def synth(
    out_dir: Path = typer.Argument(
        ..., help="Folder to write the screen into: new or empty (created), or an earlier synth screen (resumed).",
        show_default=False,
    ),
    weeks: str = typer.Option(
        "all", "--weeks", help="Weekly batches to include: 'all' or a list like '1,2,3' (BBBC021 has Week1-Week10)."
    ),
    plates_per_week: str = typer.Option(
        "all", "--plates-per-week",
        help="Plates per week ('all' or a number). Plates covering the most annotated treatments come first.",
    ),
    sites_per_well: str = typer.Option("1", "--sites-per-well", help="Sites (fields) per well: 1-4 or 'all'."),
    annotated_only: bool = typer.Option(
        True, "--annotated-only/--all-compounds",
        help="Only the benchmark's wells (103 annotated treatments + DMSO), or every well of the design "
        "(113 compounds, taxol positive controls included).",
    ),
    field_size: str = typer.Option(
        "256x320", "--field-size", help="Field HEIGHTxWIDTH in pixels; the real BBBC021 fields are 1024x1280."
    ),
    cell_size: float = typer.Option(
        32.0, "--cell-size", help="Diameter of a DMSO cell in pixels; about 64 looks like real BBBC021 at 1024x1280."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the whole screen; each field's pixels depend only on it and the field."),
    workers: int = typer.Option(
        None, "--workers", help="Worker processes. Default: min(4, CPU count).", show_default=False
    ),
) -> None:
    """Generate a synthetic BBBC021 screen: the real plates, wells and treatments, with synthetic cells.

    Writes uint16 TIFFs (DAPI, Tubulin, Actin) in the BBBC021 folder layout (OUT_DIR/Week1/Week1_22123/<file>.tif), the selected rows of BBBC021_v1_image.csv and BBBC021_v1_moa.csv with their real columns, and synth_cells.csv (ground truth: one row per cell with its nuclear centre x, y, state, treatment and MoA). `fastcell shard OUT_DIR SHARDS` reads it like the real download.

    Cells respond to their treatment's MoA (12 mechanisms) with a dose-dependent phenotype; DMSO cells are unperturbed. Each week has its own channel gains, background, vignetting and focus: batch effects that a good pipeline has to correct.

    The default (all weeks and plates, 1 site per well, annotated treatments + DMSO, 256x320 px) holds each of the 103 annotated treatments in 2-3 wells: 632 fields, about 15k cells, a minute or two on 2 cores. The full screen: --weeks all --plates-per-week all --sites-per-well all --all-compounds --field-size 1024x1280 --cell-size 64 (13,200 fields, about 100 GB of TIFFs).

    Rerunning on the same OUT_DIR skips complete fields; the CSVs are written last, so an interrupted run never leaves a table listing fields it did not write. Example: fastcell synth demo/bbbc021 --weeks 1,2,3 --workers 2
    """
    from fastcell.synth.design import SynthConfig, parse_count, parse_field_size, parse_weeks
    from fastcell.synth.screen import generate_screen

    config = SynthConfig(
        out_dir=out_dir,
        weeks=parse_weeks(weeks),
        plates_per_week=parse_count(plates_per_week, "--plates-per-week"),
        sites_per_well=parse_count(sites_per_well, "--sites-per-well"),
        annotated_only=annotated_only,
        field_size=parse_field_size(field_size),
        cell_size=cell_size,
        seed=seed,
        workers=workers,
    )
    result = generate_screen(config)
    skipped = f", {result.n_skipped} already complete and skipped" if result.n_skipped else ""
    typer.echo(
        f"{result.out_dir}: {result.n_fields} fields ({result.n_rendered} rendered{skipped}), "
        f"{result.n_cells} cells, {result.n_treatments} annotated treatments, {result.seconds:.1f} s"
    )
