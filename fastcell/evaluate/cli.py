"""`fastcell embed` and `fastcell eval`: cells -> embeddings -> NSC / NSCB / drop, retrieval mAP and a report."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from fastcell.evaluate.embed import EmbedConfig
from fastcell.evaluate.pipeline import EvalConfig
from fastcell.io import check_output_folder

# each option's default is its config's (the settings' one source of truth)
_EMBED = EmbedConfig(run=None, shards=Path("."), out=Path("."))
_EVAL = EvalConfig(source=Path("."))


def embed(
    run: str = typer.Argument(
        ..., help="Training run folder (or checkpoint file) from `fastcell train`. With --random-init or "
        "--handcrafted it may be 'none'.", show_default=False,
    ),
    shards: Path = typer.Argument(..., help="Shard folder from `fastcell shard` (with index.json).", show_default=False),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: embeddings.npy, cells.parquet, embed.json.",
                             show_default=False),
    projection: bool = typer.Option(_EMBED.projection, "--projection", help="Embed with the projection head's output instead "
                                    "of the encoder's pooled features (those are the usual choice)."),
    random_init: bool = typer.Option(_EMBED.random_init, "--random-init", help="An untrained network of the run's architecture "
                                     "(or --arch/--stem): the random-features baseline."),
    handcrafted: bool = typer.Option(_EMBED.handcrafted, "--handcrafted", help="Classical per-channel intensity and texture "
                                     "features (fastcell.evaluate.handcrafted) instead of a network: the "
                                     "hand-crafted baseline."),
    arch: str = typer.Option(_EMBED.arch, "--arch", help="Architecture for --random-init without a run."),
    stem: str = typer.Option(_EMBED.stem, "--stem", help="Stem for --random-init without a run: standard | small."),
    batch_size: int = typer.Option(_EMBED.batch_size, "--batch-size", help="Cells per forward pass."),
    backend: str = typer.Option(_EMBED.backend, "--backend", help="Eval loader: dali (fast decode) | torch."),
    device: str = typer.Option(_EMBED.device, "--device", help="auto (the GPU when present) | cpu | cuda."),
    precision: str = typer.Option(_EMBED.precision, "--precision", help="Autocast: auto (GPU: bf16, or fp16 where bf16 is "
                                  "missing; CPU: fp32, faster there) | bf16 | fp16 | fp32."),
    dtype: str = typer.Option(_EMBED.dtype, "--dtype", help="Stored embeddings: float32 | float16 (half the disk)."),
    chunk_size: int = typer.Option(_EMBED.chunk_size, "--chunk-size", help="Cells per resumable chunk."),
    split: str = typer.Option(None, "--split", help="Embed one split only (train | val). Default: every split.",
                              show_default=False),
    crop: int = typer.Option(None, "--crop", help="Centre crop (pixels) fed to the model. Default: the full "
                             "stored crop.", show_default=False),
    workers: int = typer.Option(_EMBED.num_workers, "--workers", help="Loader threads (DALI) or worker processes (torch)."),
    seed: int = typer.Option(_EMBED.seed, "--seed", help="Seed of --random-init weights."),
    overwrite: bool = typer.Option(_EMBED.overwrite, "--overwrite", help="Discard chunks left by a run with other settings."),
    progress: bool = typer.Option(_EMBED.progress, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """One embedding per cell: a trained encoder over every crop of the shards, in mixed precision.

    Writes OUT/embeddings.npy (float [N, D]; row i = row i of OUT/cells.parquet, the shards' cell
    table sorted by id) and OUT/embed.json (model, precision, timing). Work is saved in chunks of
    --chunk-size cells; rerunning the same command after an interruption resumes.

    Example: fastcell embed runs/simclr shards/bbbc021 --out emb/simclr
    """
    from fastcell.evaluate.embed import run_embed
    from fastcell.settings import named_as_options

    if run.lower() == "none" and not (random_init or handcrafted):
        raise typer.BadParameter("RUN 'none' needs --random-init or --handcrafted")
    if random_init and handcrafted:
        raise typer.BadParameter("--random-init and --handcrafted exclude each other")
    with named_as_options(EmbedConfig):
        config = EmbedConfig(
            run=None if run.lower() == "none" else Path(run), shards=shards, out=out, projection=projection,
            random_init=random_init, handcrafted=handcrafted, arch=arch, stem=stem, batch_size=batch_size,
            backend=backend, device=device, precision=precision, dtype=dtype, chunk_size=chunk_size, split=split,
            crop=crop, num_workers=workers, seed=seed, overwrite=overwrite, progress=progress,
        )
    info = run_embed(config)
    if info["cells_embedded_this_run"] == 0:
        typer.echo(f"{out}: already holds the embeddings of these inputs and settings ({info['n_cells']} cells, "
                   f"checked against embed.json); nothing to do")
        return
    typer.echo(f"embedded {info['n_cells']} cells -> {out / 'embeddings.npy'} [{info['n_cells']}, {info['dim']}] "
               f"({info['precision']} on {info['device']}, {info['cells_per_second']} cells/s)")


def evaluate(
    source: Path = typer.Argument(
        ..., help="An `embed` output folder, or a profile table (CSV/parquet) keyed by plate and well (+ site), "
        "e.g. CellProfiler or pycytominer output; or one row per treatment (no plate/well, with --post none).",
        show_default=False,
    ),
    out: Path = typer.Option(None, "--out", "-o", help="Report folder: report.json, report.md, treatments.csv, "
                             "per_moa.csv, map_replicate.csv, map_moa.csv, confusion.png, map.png. Default: print "
                             "the numbers only.", show_default=False),
    images: Path = typer.Option(None, "--images", help="Image table (BBBC021_v1_image.csv format) giving each "
                                "plate/well its compound and concentration. Default: the packaged BBBC021 one.",
                                show_default=False),
    moa: Path = typer.Option(None, "--moa", help="MoA table (compound, concentration, moa). Default: the "
                             "packaged BBBC021 one.", show_default=False),
    design: str = typer.Option(_EVAL.design, "--design", help="Where each well's compound, dose, MoA and batch come "
                               "from: bbbc021 (the image and MoA tables) | table (the input's own metadata "
                               "columns) | auto (bbbc021 for BBBC021 plates or with --images/--moa, else table)."),
    plate_column: str = typer.Option(None, "--plate-column", help="Plate column. Default: Metadata_Plate, "
                                     "Image_Metadata_Plate or plate.", show_default=False),
    well_column: str = typer.Option(None, "--well-column", help="Well column. Default: Metadata_Well, "
                                    "Image_Metadata_Well or well.", show_default=False),
    site_column: str = typer.Option(None, "--site-column", help="Site (image) column of image-level rows. "
                                    "Default: Metadata_Site, Image_Metadata_Site or site.", show_default=False),
    compound_column: str = typer.Option(None, "--compound-column", help="Treatment identity column. Default: "
                                        "Metadata_Compound, Metadata_pert_iname, Metadata_broad_sample, "
                                        "Metadata_JCP2022, compound, ...", show_default=False),
    dose_column: str = typer.Option(None, "--dose-column", help="Dose column. Default: Metadata_Concentration, "
                                    "Metadata_mmoles_per_liter, Metadata_dose or concentration; none: one dose "
                                    "per compound.", show_default=False),
    moa_column: str = typer.Option(None, "--moa-column", help="MoA column. Default: Metadata_moa or moa; none: "
                                   "no NSC/NSCB or MoA mAP, replicate mAP only.", show_default=False),
    batch_column: str = typer.Option(None, "--batch-column", help="Batch column for NSCB. Default: "
                                     "Metadata_Batch or batch in the input, else the image table's (BBBC021: "
                                     "week); none with --design table: one batch (NSCB not applicable).",
                                     show_default=False),
    control: str = typer.Option(_EVAL.control, "--control", help="Compound value of the negative-control wells "
                                "(--design table)."),
    level: str = typer.Option(_EVAL.level, "--level", help="treatment: 1-NN over treatment profiles (the "
                              "benchmark); cell: k-NN vote of each cell's neighbours, scored per treatment."),
    post: str = typer.Option(_EVAL.post, "--post", help="Post-processing of well profiles: none | zscore (each "
                             "feature over all wells) | whiten (PCA whitening on DMSO) | tvn (whiten + per-batch "
                             "CORAL on DMSO)."),
    reg: float = typer.Option(_EVAL.reg, "--reg", help="Whitening regularisation, a fraction of the mean eigenvalue "
                              "added to the DMSO covariance."),
    coral_reg: float = typer.Option(_EVAL.coral_reg, "--coral-reg", help="Regularisation of tvn's per-batch step "
                                    "(1 = CORAL's C + I)."),
    aggregate: str = typer.Option(_EVAL.aggregate, "--aggregate", help="well: mean of a well's cells/rows; image: mean "
                                  "per image (plate, well, site), then per well."),
    treatment_stat: str = typer.Option(_EVAL.treatment_stat, "--treatment-stat", help="Treatment profile from its wells: "
                                       "median | mean."),
    features: str = typer.Option(None, "--features", help="Regex selecting feature columns of a profile table. "
                                 "Default: every numeric non-metadata column.", show_default=False),
    nan_policy: str = typer.Option(_EVAL.nan_policy, "--nan-policy", help="Features with NaN/inf: drop (listed in the "
                                   "report) | error."),
    k: int = typer.Option(_EVAL.k, "--k", help="Cell level: neighbours per cell."),
    queries_per_treatment: int = typer.Option(None, "--queries-per-treatment", help="Cell level: query at most "
                                              "this many cells per treatment (seeded sample).", show_default=False),
    retrieval: bool = typer.Option(_EVAL.retrieval, "--retrieval/--no-retrieval", help="mAP of replicate retrieval "
                                   "(against controls) and MoA retrieval, with copairs."),
    null_size: int = typer.Option(_EVAL.null_size, "--null-size", help="Draws of copairs' null distribution per p-value."),
    alpha: float = typer.Option(_EVAL.alpha, "--alpha", help="Retrieved: Benjamini-Hochberg corrected p below this."),
    profiles_out: Path = typer.Option(None, "--profiles-out", help="Also write pycytominer-style parquet "
                                      "tables here: wells.parquet, wells_normalized.parquet, treatments.parquet.",
                                      show_default=False),
    map_method: str = typer.Option(_EVAL.map, "--map", help="2-D map of treatment profiles: pca | tsne."),
    device: str = typer.Option(_EVAL.device, "--device", help="FAISS index: auto (GPU when FAISS sees one) | cpu | gpu."),
    seed: int = typer.Option(_EVAL.seed, "--seed", help="Seed of the cell-level sample and the t-SNE map."),
) -> None:
    """Score a representation: NSC, NSCB and drop (the BBBC021 benchmark) and retrieval mAP (copairs).

    Cells -> wells (mean) -> post-processing fitted on DMSO -> treatments (median) -> cosine 1-NN
    over treatments (FAISS). NSC ignores neighbours of the same compound, NSCB also those of the
    same batch, and leaves out MoAs found in one batch only. DMSO wells are neither queries nor
    references; taxol plate controls are not treatments (only the annotated wells count). mAP:
    replicate wells against controls per treatment, and MoA retrieval over treatments.

    Example: fastcell eval emb/simclr --out reports/simclr
    Example: fastcell eval profiles.parquet --compound-column Metadata_broad_sample --out reports/lincs
    """
    from fastcell.evaluate.pipeline import run_eval
    from fastcell.evaluate.report import headline

    if out is not None:
        check_output_folder(out, "report.json, report.md and the tables and plots")
    config = EvalConfig(
        source=source, out=out, images=images, moa=moa, design=design, plate_column=plate_column,
        well_column=well_column, site_column=site_column, compound_column=compound_column, dose_column=dose_column,
        moa_column=moa_column, batch_column=batch_column, control=control, level=level, post=post, reg=reg,
        coral_reg=coral_reg, aggregate=aggregate, treatment_stat=treatment_stat, features=features,
        nan_policy=nan_policy, k=k, queries_per_treatment=queries_per_treatment, retrieval=retrieval,
        null_size=null_size, alpha=alpha, profiles_out=profiles_out, map=map_method, device=device, seed=seed,
    )
    summary = run_eval(config)
    typer.echo(json.dumps(headline(summary)))
    if out is not None:
        typer.echo(f"report: {out / 'report.md'}")
    if profiles_out is not None:
        typer.echo(f"profiles: {profiles_out}/{{wells,wells_normalized,treatments}}.parquet")


def compare(
    reports: list[str] = typer.Argument(
        ..., help="Report folders from `fastcell eval --out`, each as NAME=FOLDER or FOLDER (named by the "
        "folder).", show_default=False,
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for comparison.md and comparison.json.",
                             show_default=False),
) -> None:
    """Side by side: NSC / NSCB / drop, retrieval mAP and per-MoA accuracy of several eval reports.

    Example: fastcell compare simclr=reports/simclr random=reports/random handcrafted=reports/hand --out reports
    """
    from fastcell.evaluate.compare import write_comparison
    from fastcell.evaluate.report import figure

    named = [(item.split("=", 1)[0], Path(item.split("=", 1)[1])) if "=" in item else (Path(item).name, Path(item))
             for item in reports]
    comparison = write_comparison(named, out)
    typer.echo(f"{'representation':<16} {'NSC %':>6} {'NSCB %':>7} {'drop':>6} {'rep mAP':>8} {'MoA mAP':>8}")
    for name, row in comparison["summary"].items():
        typer.echo(f"{name:<16} {figure(row['nsc']):>6} {figure(row['nscb']):>7} {figure(row['drop']):>6} "
                   f"{figure(row['map_replicate'], 'map'):>8} {figure(row['map_moa'], 'map'):>8}")
    for warning in comparison["warnings"]:
        typer.echo(f"warning: {warning}", err=True)
    typer.echo(f"comparison: {out / 'comparison.md'}")
