"""Fault sweep of `fastcell eval` on user profile tables: blank keys, stray spellings of compounds and the
control, text in a feature column, an empty table, --profiles-out onto a file, metric errors without a file."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fault_helpers import assert_refused, cli_runner, snapshot
from profile_tables import FEATURES, pycytominer_wells

from fastcell.errors import InputError
from fastcell.evaluate import profiles
from fastcell.evaluate.pipeline import EvalConfig, run_eval

COMPOUND, DOSE, MOA = "Metadata_pert_iname", "Metadata_mmoles_per_liter", "Metadata_moa"
cli = pytest.fixture(cli_runner)


def write(table: pd.DataFrame, path: Path) -> Path:
    table.to_parquet(path) if path.suffix == ".parquet" else table.to_csv(path, index=False)
    return path


def score(path: Path, **options) -> dict:
    return run_eval(EvalConfig(source=path, retrieval=False, **options))


def test_an_empty_table_says_it_has_no_rows(tmp_path):
    """A header-only CSV has untyped (object) columns: it used to be refused as having no numeric features."""
    path = write(pycytominer_wells(0).head(0), tmp_path / "empty.csv")
    with pytest.raises(InputError, match=r"empty\.csv: no rows; nothing to evaluate$"):
        score(path)


def sites(table: pd.DataFrame) -> pd.DataFrame:
    return pd.concat([table.assign(Metadata_Site=1), table.assign(Metadata_Site=2)], ignore_index=True)


@pytest.mark.parametrize("case, column, options, message", [
    # without a site column a NaN plate was a well of plate "nan"; beside a site column, a well of its own
    ("wells", "Metadata_Plate", {}, r"3 row\(s\) without a value of 'Metadata_Plate' \(data rows 1, 2, 3,"),
    ("sites", "Metadata_Plate", {}, r"3 row\(s\) without a value of 'Metadata_Plate' \(data rows 1, 2, 3,"),
    ("wells", "Metadata_Well", {}, r"3 row\(s\) without a value of 'Metadata_Well' \(data rows 1, 2, 3,"),
    # a NaN site was an image of its own
    ("sites", "Metadata_Site", {"aggregate": "image"}, r"3 row\(s\) without a value of 'Metadata_Site' \(e\.g\. "
     r"SQ0000 A01, SQ0000 A02, SQ0000 A03\)"),
    # a NaN batch was a TypeError from sorting str and float in tvn, a batch "nan" with --post none
    ("wells", "Metadata_Batch", {}, r"3 row\(s\) without a value of 'Metadata_Batch' \(e\.g\. SQ0000 A01,"),
    ("wells", "Metadata_Batch", {"post": "none"}, r"3 row\(s\) without a value of 'Metadata_Batch'"),
])
def test_rows_without_a_key_or_batch_are_refused(tmp_path, case, column, options, message):
    table = pycytominer_wells(0)
    table = sites(table) if case == "sites" else table
    table.loc[table.index[:3], column] = np.nan
    path = write(table, tmp_path / "blank.csv")
    with pytest.raises(InputError, match=message) as err:
        score(path, **options)
    assert str(err.value).startswith(f"{path}: ")


def test_the_control_row_of_a_treatment_level_table_needs_no_batch(tmp_path):
    """A consensus table's DMSO row may lack a batch (it is neither scored nor normalised): still scored."""
    table = pycytominer_wells(0)
    consensus = table.groupby([COMPOUND, DOSE], dropna=False).agg(
        {**{f: "median" for f in FEATURES}, MOA: "first", "Metadata_Batch": "first"}).reset_index()
    consensus.loc[consensus[COMPOUND] == "DMSO", "Metadata_Batch"] = np.nan
    summary = score(write(consensus, tmp_path / "consensus.csv"), post="none")
    assert summary["input_level"] == "treatment" and summary["n_nsc"] == 20


def test_blanks_around_a_compound_or_the_control_do_not_make_another_treatment(tmp_path):
    """'brd-tub0 ' beside 'brd-tub0' was another compound (its own wells became valid NSC neighbours:
    NSC 0.36 over 22 treatments instead of 0.25 over 20); 'DMSO ' wells were an unannotated treatment."""
    table = pycytominer_wells(0)
    clean = score(write(table, tmp_path / "clean.csv"), post="none")
    typed = table.copy()
    tub = typed.index[typed[COMPOUND] == "brd-tub0"]
    typed.loc[tub[: len(tub) // 2], COMPOUND] = "brd-tub0 "  # one dose in ' brd-tub0 ', the other without
    typed.loc[typed.index[typed[COMPOUND] == "DMSO"][:12], COMPOUND] = "DMSO "
    summary = score(write(typed, tmp_path / "typed.csv"), post="none")
    assert (summary["nsc"], summary["nscb"], summary["n_nsc"]) == (clean["nsc"], clean["nscb"], clean["n_nsc"]) == (
        0.25, 0.6875, 20)
    assert summary["wells_by_role"] == clean["wells_by_role"] == {"treatment": 40, "dmso": 24, "unannotated": 4}


def test_the_control_in_another_case_is_refused_not_scored_as_a_treatment(tmp_path):
    table = pycytominer_wells(0)
    table.loc[table.index[table[COMPOUND] == "DMSO"][::2], COMPOUND] = "dmso"  # was: 12 'unannotated' wells
    path = write(table, tmp_path / "mixed.csv")
    with pytest.raises(InputError, match=r"mixed\.csv: 12 row\(s\) have 'Metadata_pert_iname' = dmso, the control "
                       r"'DMSO' spelled in another case \(e\.g\. SQ0000 A01, .*spell the control one way"):
        score(path)
    table[COMPOUND] = table[COMPOUND].replace("DMSO", "dmso")
    with pytest.raises(InputError, match=r"no row has 'Metadata_pert_iname' = 'DMSO'.*--control \(dmso differs "
                       r"only in case\)$"):
        score(write(table, tmp_path / "lower.csv"))


@pytest.mark.parametrize("pattern", [None, "^Cells_"])
def test_a_feature_column_read_as_text_is_listed_not_dropped_unseen(tmp_path, pattern):
    """One '#DIV/0!' makes pandas read the whole column as text, which is no feature: it vanished silently."""
    table = pycytominer_wells(0)
    table["Cells_AreaShape_Area"] = table["Cells_AreaShape_Area"].astype(object)
    table.loc[5, "Cells_AreaShape_Area"] = "#DIV/0!"
    summary = score(write(table, tmp_path / "text.csv"), post="none", features=pattern)
    assert summary["notes"] == {"ignored_non_numeric_columns": ["Cells_AreaShape_Area"]}
    assert summary["n_features"] == (len(FEATURES) if pattern is None else len(FEATURES) // 3) - 1


@pytest.mark.parametrize("where", ["file", "under a file"])
def test_profiles_out_onto_a_file_is_refused_before_any_work(cli, tmp_path, monkeypatch, where):
    """It was a FileExistsError / NotADirectoryError traceback from mkdir, after the whole evaluation."""
    path = write(pycytominer_wells(0), tmp_path / "wells.csv")
    blocker = tmp_path / "taken"
    blocker.write_text("not a folder")
    target = blocker if where == "file" else blocker / "profiles"
    before = snapshot(tmp_path)

    def no_work(*args, **kwargs):
        raise AssertionError("the input was read before --profiles-out was checked")

    monkeypatch.setattr(profiles, "read_source", no_work)
    outcome = cli("eval", path, "--no-retrieval", "--out", tmp_path / "report", "--profiles-out", target)
    assert_refused(outcome, f"{target}: ", "is a file")
    assert snapshot(tmp_path) == before and not (tmp_path / "report").exists()


def test_profile_tables_onto_a_file_is_an_input_error(tmp_path):
    """write_profile_tables called by itself (or a file made during the evaluation): no mkdir traceback."""
    table = pycytominer_wells(0)
    wells = profiles.load_wells(write(table, tmp_path / "wells.csv"), None)
    (tmp_path / "taken").write_text("not a folder")
    with pytest.raises(InputError, match="taken: exists and is a file"):
        profiles.write_profile_tables(tmp_path / "taken", wells, wells.features, "median")


@pytest.mark.parametrize("case, message", [
    ("one compound", r"nsc: the treatments come from a single compound"),
    ("two batches", r"treatment brd-tub0 @ 1 spans batches batch0,batch1; NSCB needs each treatment in one batch"),
])
def test_metric_errors_name_the_table(tmp_path, case, message):
    """The metrics do not know the input: their errors used to reach the user without the file's name."""
    table = pycytominer_wells(0)
    if case == "one compound":
        table = table[table[COMPOUND].isin(["DMSO", "brd-tub0"])]
    else:
        tub = table[COMPOUND] == "brd-tub0"
        table.loc[tub, "Metadata_Batch"] = np.where(table.loc[tub, "Metadata_Plate"] == "SQ0000", "batch0", "batch1")
    path = write(table, tmp_path / "wells.csv")
    with pytest.raises(InputError, match=f"^{path}: {message}"):
        score(path, post="none")


@pytest.mark.parametrize("level", ["wells", "one batch's MoA", "one MoA in one batch"])
def test_treatments_of_one_moa_are_not_scored_as_perfect(tmp_path, level):
    """With one MoA among the scored treatments every nearest neighbour shares it: NSC (or NSCB) was 1.0 whatever
    the profiles. Now it is not scored, and the report says why."""
    table = pycytominer_wells(0)
    if level != "one batch's MoA":  # every treatment takes one MoA: NSC and NSCB
        treated = table[MOA].notna()
        table.loc[treated, MOA] = "tubulin"
        if level == "one MoA in one batch":  # NSCB has nothing to score, for another reason than NSC
            table = table[~treated | (table["Metadata_Batch"] == table["Metadata_Batch"].iloc[0])]
    else:  # only one MoA has treatments in both batches: NSCB alone
        moas = table[MOA].dropna().unique()
        keep_batched = moas[0]
        first_batch = table["Metadata_Batch"].iloc[0]
        other = table[MOA].notna() & (table[MOA] != keep_batched)
        table = table[~other | (table["Metadata_Batch"] == first_batch)]
    summary = score(write(table, tmp_path / "one_moa.csv"), post="none")
    nscb_reason = summary["not_applicable"]["nscb"]
    assert summary["nscb"] is None
    assert nscb_reason.startswith("one batch (") if level == "one MoA in one batch" else "share one MoA" in nscb_reason
    if level == "one batch's MoA":
        assert summary["nsc"] is not None and "nsc" not in summary["not_applicable"]
    else:
        assert summary["nsc"] is None and "share one MoA (tubulin)" in summary["not_applicable"]["nsc"]


def test_cell_level_scoring_of_one_moa_says_why(tmp_path):
    """The cell-level path of the same case: it crashed reading the query counts of an unscored table."""
    from test_evaluate_profiles import make_generic_embedding

    make_generic_embedding(tmp_path / "emb")
    cells = pd.read_parquet(tmp_path / "emb" / "cells.parquet")
    cells.loc[cells["moa"] != "", "moa"] = "tubulin"
    cells.to_parquet(tmp_path / "emb" / "cells.parquet", index=False)
    summary = run_eval(EvalConfig(source=tmp_path / "emb", level="cell", k=3, retrieval=False))
    assert summary["nsc"] is None and summary["n_query_cells"] == 0
    assert "share one MoA (tubulin)" in summary["not_applicable"]["nsc"]
