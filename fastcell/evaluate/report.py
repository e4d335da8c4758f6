"""The evaluation report: report.json, report.md, per-treatment and per-MoA CSVs, and two plots.

    REPORT_DIR/
      report.json      the numbers (nsc, nscb, drop as fractions; n_nsc, n_nscb; retrieval: mAP per task and
                       its settings; the run's settings; notes)
      report.md        the same as readable tables, with the plots
      treatments.csv   one row per treatment: MoA, NSC and NSCB predictions and nearest neighbours
      per_moa.csv      accuracy per MoA
      map_replicate.csv  replicate retrieval per treatment: mAP, p-value, corrected p-value, retrieved
      map_moa.csv      MoA retrieval per MoA (the same columns)
      confusion.png    true vs predicted MoA (NSC and NSCB)
      map.png          2-D map (PCA or t-SNE) of the treatment profiles, coloured by MoA
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd

from fastcell.evaluate.metrics import RETRIEVAL_GROUPS, Retrieval, Score
from fastcell.io import write_bytes_atomic, write_json_atomic

MAPS = ("pca", "tsne")
RETRIEVAL_TASKS = tuple(RETRIEVAL_GROUPS)
HEADLINE = ("nsc", "nscb", "drop", "n_nsc", "n_nscb")  # what every eval report has
MISSING = "n/a"  # how every table shows a figure a report does not have
MARKER = "report.json"  # written last: a folder holds a whole report only when it has one (`compare` checks)
# Every file write_report may write, the marker first: removed before a report is rewritten, so no file of
# an older report (one this report would not rewrite, or one an interrupted rewrite did not reach) outlives it.
REPORT_FILES = (MARKER, "report.md", "treatments.csv", "per_moa.csv", *(f"map_{t}.csv" for t in RETRIEVAL_TASKS),
                "confusion.png", "map.png")


def figure(value, kind: str = "percent", unit: str = "") -> str:
    """A report figure as text, the same in report.md, comparison.md and on the terminal: a fraction as a
    percentage with one decimal ("percent") or an mAP with three ("map"), then `unit`; MISSING when there is
    none (None or NaN: not applicable, not scored, or absent from an older report)."""
    if value is None or pd.isna(value):
        return MISSING
    return f"{100 * value:.1f}{unit}" if kind == "percent" else f"{value:.3f}{unit}"


def retrieval_section(summary: dict) -> dict:
    """A report.json's retrieval figures as {"settings": {null_size, alpha}, "replicate": {...}, "moa": {...}}
    (each task: map, fraction_retrieved, n, not_applicable, unscored); {} without retrieval.

    Reads this version's shape and fastcell 0.1.0's, which kept null_size and alpha beside the tasks
    (and repeated the mAP figures at the top level).
    """
    found = summary.get("retrieval") or {}
    settings = found.get("settings", {key: found[key] for key in ("null_size", "alpha") if key in found})
    tasks = {name: found[name] for name in RETRIEVAL_TASKS if name in found}
    return ({"settings": settings} if tasks else {}) | tasks


def headline(summary: dict) -> dict:
    """A report's headline figures, flat: nsc, nscb, drop, n_nsc, n_nscb, then the mAP and fraction retrieved
    of each retrieval task (map_replicate, fraction_retrieved, map_moa, fraction_moa_retrieved; None when
    the report has no retrieval). `summary` in this version's shape (`compare.read_report` upgrades older ones)."""
    section = summary.get("retrieval") or {}
    task = {name: section.get(name, {}) for name in RETRIEVAL_TASKS}
    return {key: summary[key] for key in HEADLINE} | {
        "map_replicate": task["replicate"].get("map"), "fraction_retrieved": task["replicate"].get("fraction_retrieved"),
        "map_moa": task["moa"].get("map"), "fraction_moa_retrieved": task["moa"].get("fraction_retrieved")}


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def confusion_png(scores: list[Score], path: Path) -> None:
    """Confusion matrices (rows: true MoA, columns: predicted MoA) side by side, one per score."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    predicted_column = {s.name: ("predicted_moa" if "predicted_moa" in s.table else "neighbour_moa") for s in scores}
    moas = sorted(set().union(*(set(s.table["moa"]) | set(s.table[predicted_column[s.name]]) for s in scores)))
    fig, axes = plt.subplots(1, len(scores), figsize=(7 * len(scores), 6), squeeze=False)
    fig.subplots_adjust(wspace=0.6)
    for ax, score in zip(axes[0], scores, strict=True):
        matrix = pd.crosstab(score.table["moa"], score.table[predicted_column[score.name]]).reindex(
            index=moas, columns=moas, fill_value=0)
        ax.imshow(matrix.to_numpy(), cmap="Blues")
        for (i, j), value in np.ndenumerate(matrix.to_numpy()):
            if value:
                ax.text(j, i, str(value), ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(moas)), moas, rotation=90, fontsize=7)
        ax.set_yticks(range(len(moas)), moas, fontsize=7)
        ax.set_title(f"{score.name.upper()} {figure(score.accuracy, unit='%')} (n={score.n})")
        ax.set_xlabel("predicted MoA")
        ax.set_ylabel("true MoA")
    write_bytes_atomic(path, _png(fig))
    plt.close(fig)


def map_coordinates(profiles: np.ndarray, method: str, seed: int = 0) -> np.ndarray:
    """Treatment profiles (L2-normalised) in 2-D [N, 2]: PCA, or t-SNE (cosine, PCA-initialised, seeded;
    PCA below 5 profiles, too few for t-SNE's perplexity)."""
    if method not in MAPS:
        raise ValueError(f"map must be one of {MAPS}")
    x = profiles / np.linalg.norm(profiles, axis=1, keepdims=True)
    if method == "pca" or len(x) < 5:
        centred = x - x.mean(axis=0)
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        return centred @ vt[:2].T if vt.shape[0] >= 2 else np.c_[centred @ vt[:1].T, np.zeros(len(x))]
    from sklearn.manifold import TSNE

    return TSNE(2, perplexity=min(30, (len(x) - 1) / 3), metric="cosine", init="pca",
                random_state=seed).fit_transform(x)


def map_png(treatments: pd.DataFrame, profiles: np.ndarray, method: str, path: Path, seed: int = 0) -> None:
    """The treatment profiles' 2-D map (`map_coordinates`), coloured by MoA."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xy = map_coordinates(profiles, method, seed)
    fig, ax = plt.subplots(figsize=(8, 6))
    cmap = plt.get_cmap("tab20")
    for i, moa in enumerate(sorted(treatments["moa"].unique())):
        rows = (treatments["moa"] == moa).to_numpy()
        ax.scatter(xy[rows, 0], xy[rows, 1], s=28, color=cmap(i % 20), label=moa)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1, 0.5))
    ax.set_title(f"treatment profiles ({method.upper()}), coloured by MoA")
    write_bytes_atomic(path, _png(fig))
    plt.close(fig)


def _markdown_table(table: pd.DataFrame, floats: str = "{:.4g}") -> str:
    def cell(value) -> str:
        if pd.isna(value):
            return MISSING
        if isinstance(value, float | np.floating):
            return floats.format(value)
        return str(value)

    header = "| " + " | ".join(map(str, table.columns)) + " |"
    rule = "|" + "---|" * len(table.columns)
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def _retrieval_lines(summary: dict, retrieval: dict[str, Retrieval]) -> list[str]:
    if not retrieval:
        return []
    settings = summary["retrieval"]["settings"]
    lines = ["## Retrieval (mAP, copairs)", "",
             f"Cosine similarity; p-values from a null of {settings['null_size']} draws, "
             f"Benjamini-Hochberg corrected; retrieved: corrected p < {settings['alpha']}.", "",
             "| task | mAP | retrieved | scored | not scored |", "|---|---|---|---|---|"]
    what = {"replicate": "replicates vs controls (per treatment)", "moa": "MoA (per MoA, other compounds)"}
    for name, found in retrieval.items():
        shown = f"{MISSING}: {found.reason}" if found.reason else figure(found.map, "map")
        lines.append(f"| {what[name]} | {shown} | {figure(found.fraction_retrieved, unit='%')} | "
                     f"{len(found.table)} | {len(found.unscored)} |")
    unscored = {name: found.unscored for name, found in retrieval.items() if found.unscored}
    for name, groups in unscored.items():
        kind = "treatments with a single well" if name == "replicate" else "MoAs with a single compound"
        shown = ", ".join(groups[:20]) + (f" and {len(groups) - 20} more" if len(groups) > 20 else "")
        lines += ["", f"Not scored ({kind}, no positive pair): {shown}."]
    return lines + [""]


def write_report(
    out: Path,
    summary: dict,
    nsc: Score,
    nscb: Score,
    per_moa_table: pd.DataFrame,
    treatments: pd.DataFrame | None,
    profiles: np.ndarray | None,
    map_method: str,
    seed: int = 0,
    retrieval: dict[str, Retrieval] | None = None,
) -> None:
    """Write every report file into `out` (atomically, each), report.json last.

    An older report in `out` is removed first, its report.json before anything else: a rewrite
    interrupted half-way leaves a folder without report.json, which `compare` refuses, never new
    tables beside an old headline.
    """
    out.mkdir(parents=True, exist_ok=True)
    for name in REPORT_FILES:
        (out / name).unlink(missing_ok=True)
    retrieval = retrieval or {}
    key = ["compound", "concentration"]
    both = nsc.table.merge(nscb.table.drop(columns=["moa", "batch"]), on=key, how="left", suffixes=("_nsc", "_nscb"))
    write_bytes_atomic(out / "treatments.csv", both.to_csv(index=False).encode())
    write_bytes_atomic(out / "per_moa.csv", per_moa_table.to_csv(index=False).encode())
    for name, found in retrieval.items():
        write_bytes_atomic(out / f"map_{name}.csv", found.table.to_csv(index=False).encode())
    plots = []
    if nsc.n:
        confusion_png([nsc, nscb], out / "confusion.png")
        plots.append("![confusion](confusion.png)")
    if profiles is not None and treatments is not None:
        map_png(treatments, profiles, map_method, out / "map.png", seed)
        plots.append("![map](map.png)")
    reasons = summary.get("not_applicable", {})

    def value(name: str) -> str:
        return f"{MISSING}: {reasons[name]}" if name in reasons else figure(summary[name], unit="%")

    lines = [
        "# fastcell MoA evaluation",
        "",
        f"Source: `{summary['source']}`; level: {summary['level']}; post-processing: {summary['post']}; "
        f"design: {summary.get('design', 'bbbc021')}.",
        "",
        "| metric | value | treatments scored |",
        "|---|---|---|",
        f"| NSC | {value('nsc')} | {summary['n_nsc']} |",
        f"| NSCB | {value('nscb')} | {summary['n_nscb']} |",
        f"| drop (NSC - NSCB) | {figure(summary['drop'], unit='%')} | |",
        "",
        f"MoAs left out of NSCB (found in one batch only): {', '.join(nscb.left_out_moas) or 'none'}.",
        "",
        *_retrieval_lines(summary, retrieval),
        "## Per MoA",
        "",
        _markdown_table(per_moa_table),
        "",
        "## Plots",
        "",
        "\n\n".join(plots) or "none (nothing scored by NSC)",
        "",
        "## Per treatment",
        "",
        _markdown_table(both),
        "",
    ]
    if summary.get("notes"):
        lines += ["## Notes", ""] + [f"- {k}: {v}" for k, v in summary["notes"].items()] + [""]
    write_bytes_atomic(out / "report.md", "\n".join(lines).encode())
    write_json_atomic(out / MARKER, summary)
