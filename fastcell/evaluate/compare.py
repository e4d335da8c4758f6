"""Side-by-side comparison of several `fastcell eval` reports (e.g. SimCLR against its baselines).

Reads each report folder's `report.json` (this version's, or an older one's upgraded once on reading by
`report.retrieval_section`) and `per_moa.csv` and writes `comparison.json` and
`comparison.md`: NSC / NSCB / drop and retrieval mAP per representation, then per-MoA NSC and NSCB.
Reports are only comparable when they scored the same treatments (the counts in report.json, and the rows
of treatments.csv and map_*.csv where both reports have them); a mismatch is an error, not a footnote.
Reports of different shards (`inputs.shards_sha256`) are compared with a warning (`shard_warning`). A
folder without report.json beside other report files is an interrupted eval's, refused. A metric a report
does not have (NSCB of a one-batch screen, mAP of a report without retrieval) is shown as n/a
(`report.figure`), with the report's reason when it gives one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from fastcell.errors import InputError
from fastcell.evaluate.metrics import RETRIEVAL_GROUPS
from fastcell.evaluate.report import (
    HEADLINE,
    MARKER,
    REPORT_FILES,
    RETRIEVAL_TASKS,
    figure,
    headline,
    retrieval_section,
)
from fastcell.io import check_output_folder, write_bytes_atomic, write_json_atomic

# The tables whose rows are what a report scored: file -> the columns naming a row.
SCORED_TABLES = {"treatments.csv": ["compound", "concentration", "moa"]} | {
    f"map_{name}.csv": RETRIEVAL_GROUPS[name] for name in RETRIEVAL_TASKS}


@dataclass
class Report:
    name: str
    folder: Path
    summary: dict
    per_moa: pd.DataFrame
    scored: dict[str, set[str]]  # SCORED_TABLES file -> its rows as text, for the files the report has


def _read_csv(path: Path, columns: list[str]) -> pd.DataFrame:
    """A report table with the given columns; InputError naming the file when unreadable or short of one."""
    try:
        table = pd.read_csv(path)
    except (OSError, ValueError) as err:
        raise InputError(f"{path}: unreadable report table ({err})") from err
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise InputError(f"{path}: not a fastcell eval report table (missing column(s) {', '.join(missing)})")
    return table


def _scored_rows(path: Path, columns: list[str]) -> set[str]:
    """The rows of a scored table as text ("compound | dose | moa"), doses as numbers so 3 and 3.0 agree."""
    table = _read_csv(path, columns).astype(object)
    if "concentration" in table:
        table["concentration"] = [f"{v:g}" for v in pd.to_numeric(table["concentration"], errors="coerce")]
    return {" | ".join(map(str, row)) for row in table[columns].itertuples(index=False)}


def read_report(name: str, folder: str | Path) -> Report:
    folder = Path(folder)
    path = folder / MARKER
    if not path.is_file():
        left = [n for n in REPORT_FILES if (folder / n).is_file()]
        if left:
            raise InputError(f"{folder}: an incomplete report ({', '.join(left)} but no {MARKER}: an eval into it "
                             f"was interrupted); rerun `fastcell eval ... --out {folder}`")
        raise InputError(f"{path}: no report (run `fastcell eval ... --out {folder}` first)")
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise InputError(f"{path}: unreadable report ({err})") from err
    missing = [key for key in HEADLINE if key not in summary] if isinstance(summary, dict) else list(HEADLINE)
    if missing:
        raise InputError(f"{path}: not a fastcell eval report (missing {', '.join(missing)})")
    per_moa = _read_csv(folder / "per_moa.csv", ["moa", "nsc", "nscb"])
    scored = {file: _scored_rows(folder / file, columns) for file, columns in SCORED_TABLES.items()
              if (folder / file).is_file()}
    summary["retrieval"] = retrieval_section(summary)  # fastcell 0.1.0's shape read as this version's, once
    return Report(name, folder, summary, per_moa, scored)


def _check_same_rows(first: Report, other: Report) -> None:
    """InputError naming the two tables and a few rows when the reports scored different treatments or MoAs."""
    for file in sorted(first.scored.keys() & other.scored.keys()):
        ours, theirs = first.scored[file], other.scored[file]
        if ours != theirs:
            only = [f"only in {r.folder / file}: {'; '.join(sorted(rows)[:3])}" + (
                    f" and {len(rows) - 3} more" if len(rows) > 3 else "")
                    for r, rows in ((other, theirs - ours), (first, ours - theirs)) if rows]
            raise InputError(f"{other.folder} and {first.folder} are not comparable: they scored different rows "
                             f"of {file} ({'; '.join(only)})")


def shard_warning(reports: list[Report]) -> str | None:
    """A warning when the reports were computed from different shards (inputs.shards_sha256, where recorded).

    A warning, not an error: the same screen sharded again (another codec, crop size or shard size)
    hashes differently, yet comparing representations of it is fair once the scored treatments agree
    (checked, as an error). The reader is told, as the cells behind the figures may differ.
    """
    hashes = {r.name: (r.summary.get("inputs") or {}).get("shards_sha256") for r in reports}
    recorded = {name: sha[:12] for name, sha in hashes.items() if sha}
    if len(set(recorded.values())) < 2:
        return None
    return ("the reports were computed from different shards (shards_sha256 " +
            ", ".join(f"{name}: {sha}" for name, sha in recorded.items()) +
            "); the cells behind their figures may differ")


def compare_reports(reports: list[Report]) -> tuple[dict, str]:
    """(comparison as a dict, the same as Markdown) for reports that scored the same treatments."""
    if not reports:
        raise InputError("nothing to compare: give at least one report folder")
    names = [r.name for r in reports]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise InputError(f"report name(s) {', '.join(repeated)} given more than once: name each report "
                         "NAME=FOLDER with distinct names")
    first = reports[0]
    for other in reports[1:]:
        counts = [(key, other.summary.get(key), first.summary.get(key)) for key in ("n_nsc", "n_nscb", "level")]
        theirs, ours = other.summary["retrieval"], first.summary["retrieval"]
        counts += [(f"n_map_{name}", theirs[name]["n"], ours[name]["n"])  # only where both reports have mAP
                   for name in RETRIEVAL_TASKS if name in theirs and name in ours]
        for key, their_count, our_count in counts:
            if their_count != our_count:
                raise InputError(f"{other.folder} and {first.folder} are not comparable: {key} "
                                 f"{their_count} vs {our_count}")
        _check_same_rows(first, other)
    warning = shard_warning(reports)
    table = {r.name: headline(r.summary) | {"post": r.summary.get("post")} for r in reports}
    lines = [
        f"Level: {first.summary.get('level', 'treatment')}; treatments scored: NSC {first.summary['n_nsc']}, "
        f"NSCB {first.summary['n_nscb']}.",
        "",
        "| representation | post-processing | NSC % | NSCB % | drop (points) | replicate mAP | retrieved % "
        "| MoA mAP | MoAs retrieved % |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {name} | {row['post'] or ''} | {figure(row['nsc'])} | {figure(row['nscb'])} | {figure(row['drop'])} | "
        f"{figure(row['map_replicate'], 'map')} | {figure(row['fraction_retrieved'])} | "
        f"{figure(row['map_moa'], 'map')} | {figure(row['fraction_moa_retrieved'])} |"
        for name, row in table.items()
    ]
    reasons = {f"{name}: {reason}" for r in reports for name, reason in r.summary.get("not_applicable", {}).items()}
    reasons |= {f"{name} mAP: {task['not_applicable']}" for r in reports
                for name, task in r.summary["retrieval"].items() if task.get("not_applicable")}
    if reasons:
        lines += ["", "Not applicable: " + "; ".join(sorted(reasons)) + "."]
    if warning:
        lines += ["", f"Warning: {warning}."]
    per_moa = pd.concat(
        [r.per_moa.set_index("moa")[["nsc", "nscb"]].add_prefix(f"{r.name} ") for r in reports], axis=1
    ).sort_index()
    header = " | ".join(f"{r.name} NSC | {r.name} NSCB" for r in reports)
    lines += ["", "Per MoA (% of its treatments):", "", f"| MoA | {header} |",
              "|---|" + "---:|" * (2 * len(reports))]
    lines += [f"| {moa} | " + " | ".join(figure(v) for v in row) + " |" for moa, row in per_moa.iterrows()]
    comparison = {"reports": {r.name: str(r.folder) for r in reports}, "summary": table,
                  "per_moa": json.loads(per_moa.to_json(orient="index")), "warnings": [warning] if warning else []}
    return comparison, "\n".join(lines) + "\n"


def write_comparison(named_folders: list[tuple[str, Path]], out: str | Path) -> dict:
    """Compare report folders given as (name, folder); write comparison.json/.md into `out`."""
    out = Path(out)
    check_output_folder(out, "comparison.md and comparison.json")
    comparison, markdown = compare_reports([read_report(name, folder) for name, folder in named_folders])
    write_json_atomic(out / "comparison.json", comparison)
    write_bytes_atomic(out / "comparison.md", ("# fastcell: representations compared\n\n" + markdown).encode())
    return comparison
