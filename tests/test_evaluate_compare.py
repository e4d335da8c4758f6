"""`fastcell compare`: eval reports side by side."""

import json

import pandas as pd
import pytest
from typer.testing import CliRunner

from fastcell.cli import app
from fastcell.errors import InputError
from fastcell.evaluate.compare import write_comparison


def fake_report(folder, nsc, nscb, n_nscb=92, level="treatment"):
    folder.mkdir(parents=True)
    summary = {"nsc": nsc, "nscb": nscb, "drop": nsc - nscb, "n_nsc": 103, "n_nscb": n_nscb, "level": level,
               "post": "tvn"}
    (folder / "report.json").write_text(json.dumps(summary))
    pd.DataFrame({"moa": ["Eg5 inhibitors", "Actin disruptors"], "n_nsc": [12, 5], "nsc": [1.0, nsc],
                  "n_nscb": [12, 5], "nscb": [0.5, nscb]}).to_csv(folder / "per_moa.csv", index=False)
    return folder


def test_side_by_side_table(tmp_path):
    a = fake_report(tmp_path / "a", 0.9, 0.8)
    b = fake_report(tmp_path / "b", 0.7, 0.4)
    comparison = write_comparison([("simclr", a), ("random", b)], tmp_path / "out")
    assert comparison["summary"]["simclr"]["nsc"] == 0.9
    assert comparison["per_moa"]["Actin disruptors"]["random nscb"] == 0.4
    md = (tmp_path / "out" / "comparison.md").read_text()
    assert "| simclr | tvn | 90.0 | 80.0 | 10.0 |" in md
    assert "| random | tvn | 70.0 | 40.0 | 30.0 |" in md
    assert "| Actin disruptors | 90.0 | 80.0 | 70.0 | 40.0 |" in md


def test_reports_of_different_treatment_sets_are_refused(tmp_path):
    a = fake_report(tmp_path / "a", 0.9, 0.8)
    b = fake_report(tmp_path / "b", 0.7, 0.4, n_nscb=80)
    with pytest.raises(InputError, match="not comparable: n_nscb 80 vs 92"):
        write_comparison([("a", a), ("b", b)], tmp_path / "out")
    with pytest.raises(InputError, match="no report"):
        write_comparison([("missing", tmp_path / "nowhere")], tmp_path / "out")


def test_cli_names_reports_by_folder_or_prefix(tmp_path):
    a = fake_report(tmp_path / "simclr", 0.9, 0.8)
    b = fake_report(tmp_path / "b", 0.7, 0.4)
    result = CliRunner().invoke(app, ["compare", str(a), f"random={b}", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "simclr" in result.output and "random" in result.output
    assert set(json.loads((tmp_path / "out" / "comparison.json").read_text())["summary"]) == {"simclr", "random"}
