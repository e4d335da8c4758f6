"""`fastcell compare`: eval reports side by side, of this version and of fastcell 0.1.0; one way to show a
missing figure."""

import json
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from fastcell.cli import app
from fastcell.errors import InputError
from fastcell.evaluate.compare import write_comparison
from fastcell.evaluate.pipeline import EvalConfig, run_eval
from fastcell.evaluate.report import figure, headline, retrieval_section

DATA = Path(__file__).parent / "data"
OLD = DATA / "reports_0.1.0"  # as fastcell 0.1.0 wrote them: mAP also at the top level, null_size beside the tasks


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
    assert "| simclr | tvn | 90.0 | 80.0 | 10.0 | n/a | n/a | n/a | n/a |" in md  # a report without mAP
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


def test_figure_shows_every_missing_value_as_n_a():
    assert [figure(v) for v in (None, float("nan"), pd.NA)] == ["n/a"] * 3
    assert [figure(v, "map") for v in (None, float("nan"))] == ["n/a"] * 2
    assert (figure(0.8), figure(0.05, unit="%"), figure(0.7139919921577951, "map")) == ("80.0", "5.0%", "0.714")


def test_reports_of_fastcell_0_1_0_compare_with_this_versions(tmp_path):
    """The stored 0.1.0 report of README's example table against a fresh one of the same table and settings."""
    new = run_eval(EvalConfig(source=DATA / "pycytominer_example.csv", out=tmp_path / "new"))
    old = json.loads((OLD / "example" / "report.json").read_text())
    assert "map_replicate" in old and "null_size" in old["retrieval"]  # the old shape ...
    assert "map_replicate" not in new and set(new["retrieval"]) == {"settings", "replicate", "moa"}  # ... and the new
    assert retrieval_section(old) == retrieval_section(new) == new["retrieval"]
    assert headline(old) == headline(new)
    comparison = write_comparison([("old", OLD / "example"), ("new", tmp_path / "new")], tmp_path / "cmp")
    assert comparison["summary"]["old"] == comparison["summary"]["new"]
    md = (tmp_path / "cmp" / "comparison.md").read_text()
    for name in ("old", "new"):
        assert f"| {name} | tvn | 80.0 | 75.0 | 5.0 | 0.714 | 63.6 | 0.789 | 80.0 |" in md


def test_old_report_without_moa_map_shows_n_a_and_its_reason(tmp_path):
    result = CliRunner().invoke(app, ["compare", f"a={OLD / 'no_moa'}", f"b={OLD / 'no_moa'}", "--out",
                                      str(tmp_path / "cmp")])
    assert result.exit_code == 0, result.output
    assert "a                   n/a     n/a    n/a    0.714      n/a" in result.output
    md = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "| a | tvn | n/a | n/a | n/a | 0.714 | 63.6 | n/a | n/a |" in md
    assert "moa mAP: no treatment has a MoA" in md


@pytest.mark.parametrize("shape", ["0.1.0", "this version"])
def test_reports_that_scored_other_retrieval_groups_are_refused(tmp_path, shape):
    other = tmp_path / "other"
    shutil.copytree(OLD / "example", other)
    summary = json.loads((other / "report.json").read_text())
    if shape == "this version":
        summary = {k: v for k, v in summary.items() if not k.startswith(("map_", "fraction_", "n_map_"))}
        summary["retrieval"] = retrieval_section(summary)
    summary["retrieval"]["replicate"]["n"] = 21
    (other / "report.json").write_text(json.dumps(summary))
    with pytest.raises(InputError, match="not comparable: n_map_replicate 21 vs 22"):
        write_comparison([("a", OLD / "example"), ("b", other)], tmp_path / "cmp")


def test_interrupted_rewrite_of_a_report_is_refused_not_mixed(tmp_path, monkeypatch):
    """Eval killed while plotting into an older report's folder: no old headline beside the new tables."""
    from fastcell.evaluate import report

    run_eval(EvalConfig(source=DATA / "pycytominer_example.csv", out=tmp_path / "r"))
    shutil.copytree(tmp_path / "r", tmp_path / "rx")

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "map_png", killed)
    with pytest.raises(KeyboardInterrupt):
        run_eval(EvalConfig(source=DATA / "pycytominer_example.csv", out=tmp_path / "rx", post="none"))
    assert (tmp_path / "rx" / "per_moa.csv").is_file() and not (tmp_path / "rx" / "report.json").exists()
    with pytest.raises(InputError, match=f"{tmp_path / 'rx'}: an incomplete report .* rerun `fastcell eval"):
        write_comparison([("a", tmp_path / "r"), ("b", tmp_path / "rx")], tmp_path / "cmp")


def with_treatments(folder, rows):
    """A fake report with a treatments.csv of (compound, concentration, moa) rows."""
    pd.DataFrame(rows, columns=["compound", "concentration", "moa"]).to_csv(folder / "treatments.csv", index=False)
    return folder


def test_reports_that_scored_other_treatments_are_refused(tmp_path):
    """Equal counts are not enough: the treatments themselves must agree (a dose of 3 is one of 3.0)."""
    a = with_treatments(fake_report(tmp_path / "a", 0.9, 0.8), [("taxol", 3.0, "MT"), ("ALLN", 1.0, "PD")])
    b = with_treatments(fake_report(tmp_path / "b", 0.7, 0.4), [("ALLN", 1, "PD"), ("taxol", 3, "MT")])
    write_comparison([("a", a), ("b", b)], tmp_path / "same")
    c = with_treatments(fake_report(tmp_path / "c", 0.7, 0.4), [("ALLN", 1, "PD"), ("taxol", 0.3, "MT")])
    with pytest.raises(InputError, match=re.escape(
            f"{c} and {a} are not comparable: they scored different rows of treatments.csv (only in "
            f"{c / 'treatments.csv'}: taxol | 0.3 | MT; only in {a / 'treatments.csv'}: taxol | 3 | MT)")):
        write_comparison([("a", a), ("c", c)], tmp_path / "cmp")


def test_reports_of_other_shards_compare_with_a_warning(tmp_path):
    reports = {}
    for name, sha in (("a", "1" * 64), ("b", "2" * 64)):
        folder = fake_report(tmp_path / name, 0.9, 0.8)
        summary = json.loads((folder / "report.json").read_text()) | {"inputs": {"shards_sha256": sha}}
        (folder / "report.json").write_text(json.dumps(summary))
        reports[name] = folder
    result = CliRunner().invoke(app, ["compare", f"a={reports['a']}", f"b={reports['b']}", "--out",
                                      str(tmp_path / "cmp")])
    assert result.exit_code == 0, result.output
    warning = "computed from different shards (shards_sha256 a: 111111111111, b: 222222222222)"
    assert warning in result.output and warning in (tmp_path / "cmp" / "comparison.md").read_text()
    assert warning in json.loads((tmp_path / "cmp" / "comparison.json").read_text())["warnings"][0]


@pytest.mark.parametrize(("file", "content", "message"), [
    ("per_moa.csv", b"moa,n_nsc,nsc\nactin,4,0.5\n", "not a fastcell eval report table (missing column(s) nscb)"),
    ("per_moa.csv", b"\xff\xfe\x00garbage", "unreadable report table"),
    ("report.json", b"{not json", "unreadable report"),
    ("treatments.csv", b"compound,moa\nALLN,PD\n",
     "not a fastcell eval report table (missing column(s) concentration)"),
])
def test_a_bad_report_file_is_named(tmp_path, file, content, message):
    folder = fake_report(tmp_path / "a", 0.9, 0.8)
    (folder / file).write_bytes(content)
    with pytest.raises(InputError, match=re.escape(f"{folder / file}: {message}")):
        write_comparison([("a", folder)], tmp_path / "cmp")
