"""Side-by-side comparison of several `fastcell eval` reports (e.g. SimCLR against its baselines).

Reads each report folder's `report.json` (this version's, or an older one's upgraded once on reading by
`report.retrieval_section`) and `per_moa.csv` and writes `comparison.json` and
`comparison.md`: NSC / NSCB / drop and retrieval mAP per representation, then per-MoA NSC and NSCB.
Reports are only comparable when they scored the same treatments; a mismatch is an error, not a
footnote. A metric a report does not have (NSCB of a one-batch screen, mAP of a report without
retrieval) is shown as n/a (`report.figure`), with the report's reason when it gives one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from fastcell.errors import InputError
from fastcell.evaluate.report import HEADLINE, RETRIEVAL_TASKS, figure, headline, retrieval_section
from fastcell.io import check_output_folder, write_bytes_atomic, write_json_atomic


@dataclass
class Report:
    name: str
    folder: Path
    summary: dict
    per_moa: pd.DataFrame


def read_report(name: str, folder: str | Path) -> Report:
    folder = Path(folder)
    path = folder / "report.json"
    if not path.is_file():
        raise InputError(f"{path}: no report (run `fastcell eval ... --out {folder}` first)")
    try:
        summary = json.loads(path.read_text())
        per_moa = pd.read_csv(folder / "per_moa.csv")
    except (OSError, ValueError) as err:
        raise InputError(f"{folder}: unreadable report ({err})") from err
    missing = [key for key in HEADLINE if key not in summary]
    if missing:
        raise InputError(f"{path}: not a fastcell eval report (missing {', '.join(missing)})")
    summary["retrieval"] = retrieval_section(summary)  # fastcell 0.1.0's shape read as this version's, once
    return Report(name, folder, summary, per_moa)


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
    per_moa = pd.concat(
        [r.per_moa.set_index("moa")[["nsc", "nscb"]].add_prefix(f"{r.name} ") for r in reports], axis=1
    ).sort_index()
    header = " | ".join(f"{r.name} NSC | {r.name} NSCB" for r in reports)
    lines += ["", "Per MoA (% of its treatments):", "", f"| MoA | {header} |",
              "|---|" + "---:|" * (2 * len(reports))]
    lines += [f"| {moa} | " + " | ".join(figure(v) for v in row) + " |" for moa, row in per_moa.iterrows()]
    comparison = {"reports": {r.name: str(r.folder) for r in reports}, "summary": table,
                  "per_moa": json.loads(per_moa.to_json(orient="index"))}
    return comparison, "\n".join(lines) + "\n"


def write_comparison(named_folders: list[tuple[str, Path]], out: str | Path) -> dict:
    """Compare report folders given as (name, folder); write comparison.json/.md into `out`."""
    out = Path(out)
    check_output_folder(out, "comparison.md and comparison.json")
    comparison, markdown = compare_reports([read_report(name, folder) for name, folder in named_folders])
    write_json_atomic(out / "comparison.json", comparison)
    write_bytes_atomic(out / "comparison.md", ("# fastcell: representations compared\n\n" + markdown).encode())
    return comparison
