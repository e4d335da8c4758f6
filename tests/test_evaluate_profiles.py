"""`fastcell eval` on pycytominer-style profile tables of any screen: metadata from the table, NSC/NSCB
against a brute-force reference, mAP against copairs called directly, profiles out and back, bad input."""

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from copairs.map import average_precision, mean_average_precision
from copairs.matching import assign_reference_index
from fault_helpers import assert_refused, cli_runner, snapshot
from profile_tables import FEATURES, pycytominer_wells
from test_evaluate_metrics import brute_force_accuracy
from typer.testing import CliRunner

from fastcell.cli import app
from fastcell.errors import InputError
from fastcell.evaluate.pipeline import EvalConfig, run_eval
from fastcell.evaluate.report import headline

COMPOUND, DOSE, MOA = "Metadata_pert_iname", "Metadata_mmoles_per_liter", "Metadata_moa"
NULL = 2000  # copairs null size in these tests (the default 10000 is slower and gives the same mAP)
EXAMPLE = Path(__file__).parent / "data" / "pycytominer_example.csv"  # README's worked example
cli = pytest.fixture(cli_runner)


def write(table: pd.DataFrame, path: Path) -> Path:
    table.to_parquet(path) if path.suffix == ".parquet" else table.to_csv(path, index=False)
    return path


def reference_treatments(table: pd.DataFrame) -> tuple[pd.DataFrame, np.ndarray]:
    """Median per (compound, dose) of the annotated treated wells, sorted, by plain pandas."""
    treated = table[(table[COMPOUND] != "DMSO") & table[MOA].notna()]
    t = treated.groupby([COMPOUND, DOSE]).agg(
        {**{f: "median" for f in FEATURES}, MOA: "first", "Metadata_Batch": "first"}).reset_index()
    t = t.rename(columns={COMPOUND: "compound", DOSE: "concentration", MOA: "moa", "Metadata_Batch": "batch"})
    return t, t[list(FEATURES)].to_numpy()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nsc_nscb_match_brute_force(tmp_path, seed):
    table = pycytominer_wells(seed, n_batches=3, noise=1.5)
    summary = run_eval(EvalConfig(source=write(table, tmp_path / "wells.csv"), post="none", retrieval=False))
    treatments, x = reference_treatments(table)
    nsc, n_nsc = brute_force_accuracy(treatments, x, across_batches=False)
    nscb, n_nscb = brute_force_accuracy(treatments, x, across_batches=True)
    assert (summary["n_nsc"], summary["n_nscb"]) == (n_nsc, n_nscb) == (3 * 4 * 2 + 4, 3 * 4 * 2)
    assert summary["nsc"] == pytest.approx(nsc) and summary["nscb"] == pytest.approx(nscb)
    assert summary["design"] == "table" and summary["nscb_left_out_moas"] == ["egfr"]
    assert summary["columns"] == {"plate": "Metadata_Plate", "well": "Metadata_Well", "compound": COMPOUND,
                                       "concentration": DOSE, "moa": MOA, "batch": "Metadata_Batch"}
    assert summary["wells_by_role"] == {"treatment": 3 * 2 * 8 + 8, "dmso": 3 * 2 * 6, "unannotated": 4}


def copairs_replicate_map(table: pd.DataFrame) -> pd.DataFrame:
    """copairs' documented phenotypic-activity recipe, on the table's own columns."""
    df = assign_reference_index(table.reset_index(drop=True), f"{COMPOUND} == 'DMSO'",
                                reference_col="Metadata_reference_index", default_value=-1)
    pos_sameby = [COMPOUND, DOSE, "Metadata_reference_index"]
    ap = average_precision(df.filter(regex="^Metadata"), df[list(FEATURES)].to_numpy(), pos_sameby=pos_sameby,
                           pos_diffby=[], neg_sameby=[], neg_diffby=[COMPOUND, "Metadata_reference_index"],
                           progress_bar=False)
    ap = ap[ap[COMPOUND] != "DMSO"]
    return mean_average_precision(ap, [COMPOUND, DOSE], null_size=NULL, threshold=0.05, seed=0, progress_bar=False)


def copairs_moa_map(table: pd.DataFrame) -> pd.DataFrame:
    treatments, x = reference_treatments(table)
    ap = average_precision(treatments[["compound", "moa"]], x, pos_sameby=["moa"], pos_diffby=["compound"],
                           neg_sameby=[], neg_diffby=["moa"], progress_bar=False)
    return mean_average_precision(ap, ["moa"], null_size=NULL, threshold=0.05, seed=0, progress_bar=False)


def test_map_matches_copairs_called_directly(tmp_path):
    table = pycytominer_wells(3, noise=2.0)
    summary = run_eval(EvalConfig(source=write(table, tmp_path / "wells.parquet"), post="none", null_size=NULL,
                                  out=tmp_path / "report"))
    ours = pd.read_csv(tmp_path / "report" / "map_replicate.csv")
    theirs = copairs_replicate_map(table).sort_values([COMPOUND, DOSE]).reset_index(drop=True)
    assert ours[["compound", "concentration"]].values.tolist() == theirs[[COMPOUND, DOSE]].values.tolist()
    for column in ("mean_average_precision", "p_value", "corrected_p_value"):
        assert np.allclose(ours[column], theirs[column])
    assert ours["retrieved"].tolist() == theirs["below_corrected_p"].tolist()
    replicate, moa_task = summary["retrieval"]["replicate"], summary["retrieval"]["moa"]
    assert replicate["map"] == pytest.approx(theirs["mean_average_precision"].mean())
    assert replicate["fraction_retrieved"] == pytest.approx(theirs["below_corrected_p"].mean())
    assert 0 < replicate["fraction_retrieved"] < 1  # noisy enough that some treatments are not retrieved
    moa = copairs_moa_map(table).sort_values("moa").reset_index(drop=True)
    ours_moa = pd.read_csv(tmp_path / "report" / "map_moa.csv")
    assert ours_moa["moa"].tolist() == moa["moa"].tolist()
    assert np.allclose(ours_moa[["mean_average_precision", "corrected_p_value"]],
                       moa[["mean_average_precision", "corrected_p_value"]])
    assert moa_task["map"] == pytest.approx(moa["mean_average_precision"].mean())
    assert moa_task["fraction_retrieved"] == pytest.approx(moa["below_corrected_p"].mean())
    md = (tmp_path / "report" / "report.md").read_text()
    assert f"| {replicate['map']:.3f} |" in md and "replicates vs controls" in md


def test_single_well_treatments_are_listed_not_scored(tmp_path):
    table = pycytominer_wells(0)
    lone = table.index[(table[COMPOUND] == "brd-hda1") & (table[DOSE] == 10.0)][1:]  # keep one well of it
    summary = run_eval(EvalConfig(source=write(table.drop(index=lone), tmp_path / "w.csv"), null_size=NULL))
    assert summary["retrieval"]["replicate"]["unscored"] == ["brd-hda1 @ 10"]
    assert summary["retrieval"]["replicate"]["n"] == 4 * 2 * 2 + 3 * 2 - 1


def test_one_batch_reports_nscb_not_applicable_and_compare_copes(tmp_path):
    for name, noise in (("a", 0.5), ("b", 2.0)):
        table = pycytominer_wells(0, noise=noise).drop(columns=["Metadata_Batch"])
        summary = run_eval(EvalConfig(source=write(table, tmp_path / f"{name}.csv"), null_size=NULL,
                                      out=tmp_path / name))
        assert summary["nscb"] is None and summary["drop"] is None and summary["nsc"] is not None
        assert summary["not_applicable"]["nscb"].startswith("one batch (all)")
        assert "--batch-column" in summary["not_applicable"]["nscb"]
        assert "| NSCB | n/a: one batch (all)" in (tmp_path / name / "report.md").read_text()
    result = CliRunner().invoke(app, ["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--out",
                                      str(tmp_path / "cmp")])
    assert result.exit_code == 0, result.output
    assert "n/a" in result.output
    md = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "Not applicable: nscb: one batch (all)" in md
    comparison = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert comparison["summary"]["a"]["map_replicate"] > comparison["summary"]["b"]["map_replicate"]
    assert comparison["summary"]["a"]["map_replicate"] == json.loads(
        (tmp_path / "a" / "report.json").read_text())["retrieval"]["replicate"]["map"]


def test_no_moa_column_gives_replicate_map_only(tmp_path):
    table = pycytominer_wells(0).drop(columns=[MOA])
    summary = run_eval(EvalConfig(source=write(table, tmp_path / "w.csv"), null_size=NULL, out=tmp_path / "r"))
    assert summary["nsc"] is None and summary["n_nsc"] == 0
    assert "--moa-column" in summary["not_applicable"]["nsc"]
    assert summary["retrieval"]["moa"]["not_applicable"] == "no treatment has a MoA"
    assert summary["retrieval"]["replicate"]["n"] == 11 * 2 and summary["retrieval"]["replicate"]["map"] > 0.5
    assert (tmp_path / "r" / "report.md").is_file() and not (tmp_path / "r" / "confusion.png").exists()
    from fastcell.evaluate.compare import write_comparison

    write_comparison([("a", tmp_path / "r")], tmp_path / "cmp")
    md = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "moa mAP: no treatment has a MoA" in md
    shown = f"{summary['retrieval']['replicate']['map']:.3f}"  # missing figures: n/a, as for NSC
    assert re.search(rf"\| a \| tvn \| n/a \| n/a \| n/a \| {shown} \| [\d.]+ \| n/a \| n/a \|", md), md


def test_options_name_the_columns_and_the_control(tmp_path):
    table = pycytominer_wells(0).rename(columns={"Metadata_Plate": "Barcode", "Metadata_Well": "Position",
                                                 MOA: "Mechanism", "Metadata_Batch": "Run"})
    table["Metadata_broad_sample"] = table["Metadata_broad_sample"].replace("DMSO", "vehicle")
    path = write(table, tmp_path / "w.csv")
    args = ["eval", str(path), "--plate-column", "Barcode", "--well-column", "Position", "--compound-column",
            "Metadata_broad_sample", "--control", "vehicle", "--moa-column", "Mechanism", "--batch-column", "Run",
            "--no-retrieval", "--post", "none"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    shown = json.loads(result.output.splitlines()[0])
    expected = run_eval(EvalConfig(source=write(pycytominer_wells(0), tmp_path / "std.csv"), post="none",
                                   retrieval=False))
    assert (shown["nsc"], shown["nscb"], shown["n_nscb"]) == (expected["nsc"], expected["nscb"], expected["n_nscb"])
    assert "Mechanism" not in FEATURES and expected["n_features"] == len(FEATURES)


def make_generic_embedding(folder: Path, seed: int = 0, cells_per_well: int = 3) -> None:
    """An `embed` folder of shards from a generic field table (plates not BBBC021's): cells around wells."""
    table = pycytominer_wells(seed)
    rng = np.random.default_rng(seed)
    repeat = np.repeat(np.arange(len(table)), cells_per_well)
    x = table[list(FEATURES)].to_numpy()[repeat] + rng.standard_normal((len(repeat), len(FEATURES)))
    cells = pd.DataFrame({
        "id": np.arange(len(repeat)), "plate": table["Metadata_Plate"].to_numpy()[repeat],
        "well": table["Metadata_Well"].to_numpy()[repeat], "site": 1,
        "batch": table["Metadata_Batch"].to_numpy()[repeat], "compound": table[COMPOUND].to_numpy()[repeat],
        "concentration": table[DOSE].to_numpy()[repeat], "moa": table[MOA].fillna("").to_numpy()[repeat],
        "role": np.where(table[COMPOUND].to_numpy()[repeat] == "DMSO", "dmso", "treatment"),
    })
    folder.mkdir()
    cells.to_parquet(folder / "cells.parquet", index=False)
    np.save(folder / "embeddings.npy", x.astype(np.float32))


def test_profiles_out_are_pycytominer_tables_that_read_back(tmp_path):
    make_generic_embedding(tmp_path / "emb")
    first = run_eval(EvalConfig(source=tmp_path / "emb", null_size=NULL, profiles_out=tmp_path / "profiles"))
    assert first["design"] == "table" and first["n_nsc"] == 20 and first["retrieval"]["replicate"]["n"] == 22
    wells = pd.read_parquet(tmp_path / "profiles" / "wells.parquet")
    assert list(wells.columns[:9]) == ["Metadata_Plate", "Metadata_Well", "Metadata_Compound",
                                       "Metadata_Concentration", "Metadata_moa", "Metadata_Batch", "Metadata_role",
                                       "Metadata_Object_Count", "f0"]
    assert len(wells) == 68 and (wells["Metadata_Object_Count"] == 3).all()
    cells = pd.read_parquet(tmp_path / "emb" / "cells.parquet")
    emb = np.load(tmp_path / "emb" / "embeddings.npy")
    one = wells.iloc[5]
    mean = emb[((cells["plate"] == one["Metadata_Plate"]) & (cells["well"] == one["Metadata_Well"])).to_numpy()].mean(0)
    assert np.allclose(one[[f"f{i}" for i in range(len(FEATURES))]].to_numpy(float), mean, atol=1e-5)
    again = run_eval(EvalConfig(source=tmp_path / "profiles" / "wells.parquet", null_size=NULL))
    for key in ("nsc", "nscb", "n_nsc", "n_nscb", "map_replicate", "fraction_retrieved", "map_moa"):
        assert headline(again)[key] == pytest.approx(headline(first)[key]), key
    treatments = pd.read_parquet(tmp_path / "profiles" / "treatments.parquet")
    assert len(treatments) == 11 * 2 + 1 and set(treatments["Metadata_role"]) == {"treatment", "dmso", "unannotated"}
    consensus = run_eval(EvalConfig(source=tmp_path / "profiles" / "treatments.parquet", post="none",
                                    null_size=NULL))
    assert consensus["input_level"] == "treatment"
    for key in ("nsc", "nscb", "n_nsc", "n_nscb", "map_moa"):
        assert headline(consensus)[key] == pytest.approx(headline(first)[key]), key
    assert consensus["retrieval"]["replicate"]["not_applicable"] == "no treatment has two or more wells"
    with pytest.raises(InputError, match="pass --post none"):
        run_eval(EvalConfig(source=tmp_path / "profiles" / "treatments.parquet"))
    cell = run_eval(EvalConfig(source=tmp_path / "emb", level="cell", k=3, retrieval=False))
    assert cell["design"] == "table" and (cell["n_nsc"], cell["n_nscb"]) == (20, 16)


def test_design_choice_is_explicit_when_asked(tmp_path):
    path = write(pycytominer_wells(0), tmp_path / "w.csv")
    with pytest.raises(InputError, match="not in the image table .*--design table"):
        run_eval(EvalConfig(source=path, design="bbbc021", retrieval=False))
    with pytest.raises(InputError, match="do not go with --design table"):
        run_eval(EvalConfig(source=path, design="table", moa=tmp_path / "moa.csv", retrieval=False))
    with pytest.raises(InputError, match="--design must be one of auto, bbbc021, table"):
        run_eval(EvalConfig(source=path, design="lincs"))


def test_cellprofiler_export_of_bbbc021_keys_by_image_metadata_columns(tmp_path):
    from test_evaluate_pipeline import make_wells

    from fastcell.evaluate.profiles import wells_design

    table = make_wells(wells_design(None, None), noise=2.5)
    plain = run_eval(EvalConfig(source=write(table, tmp_path / "plain.csv"), post="none", retrieval=False))
    exported = table.rename(columns={"plate": "Image_Metadata_Plate", "well": "Image_Metadata_Well"})
    summary = run_eval(EvalConfig(source=write(exported, tmp_path / "cp.csv"), post="none", retrieval=False))
    assert summary["design"] == "bbbc021" and (summary["n_nsc"], summary["n_nscb"]) == (103, 92)
    assert (summary["nsc"], summary["nscb"]) == (plain["nsc"], plain["nscb"])


def test_dropped_features_are_listed_in_the_report(tmp_path):
    table = pycytominer_wells(0)
    table["Cells_Empty"] = np.nan
    table["Nuclei_Flat"] = 7.0
    run_eval(EvalConfig(source=write(table, tmp_path / "w.csv"), retrieval=False, out=tmp_path / "r"))
    written = json.loads((tmp_path / "r" / "report.json").read_text())
    assert written["notes"] == {"dropped_nan_features": ["Cells_Empty"], "dropped_constant_features": ["Nuclei_Flat"]}
    assert written["n_features"] == len(FEATURES)
    assert "dropped_constant_features: ['Nuclei_Flat']" in (tmp_path / "r" / "report.md").read_text()


def bad(table: pd.DataFrame, case: str) -> tuple[pd.DataFrame, dict]:
    """A broken copy of `table` and the EvalConfig options for one bad-input case."""
    table = table.copy()
    if case == "duplicate wells":
        table.loc[1, ["Metadata_Plate", "Metadata_Well"]] = table.loc[0, ["Metadata_Plate", "Metadata_Well"]].values
    elif case == "disagreeing well":
        table = pd.concat([table.assign(Metadata_Site=1), table.assign(Metadata_Site=2)], ignore_index=True)
        table.loc[len(table) - 1, COMPOUND] = "brd-other"
    elif case == "no control":
        return table, {"control": "dmso"}
    elif case == "no numeric features":
        table = table.drop(columns=list(FEATURES)).assign(Cells_Note="x")
    elif case == "no compound":
        table = table.drop(columns=[COMPOUND, "Metadata_broad_sample"])
    elif case == "no keys":
        table = table.drop(columns=["Metadata_Plate", "Metadata_Well"]).drop(columns=[COMPOUND, "Metadata_broad_sample"])
    elif case == "named column missing":
        return table, {"moa_column": "Metadata_target"}
    elif case == "bad dose":
        table[DOSE] = table[DOSE].astype(object)
        table.loc[table.index[table[COMPOUND] != "DMSO"][0], DOSE] = "high"
    elif case == "two moas":
        table.loc[table.index[table[COMPOUND] == "brd-tub0"][0], MOA] = "actin"
    elif case == "moa missing in a well":
        table.loc[table.index[table[COMPOUND] == "brd-tub0"][0], MOA] = None
    elif case == "all features bad":
        table[list(FEATURES)] = np.nan
    return table, {}


@pytest.mark.parametrize("case, message", [
    ("duplicate wells", r"repeat a \(Metadata_Plate, Metadata_Well\) pair \(e\.g\. SQ0000 A01\).*--site-column"),
    ("disagreeing well", r"well SQ1001 \S+ has several values of 'Metadata_pert_iname' \(brd-hda1, brd-other\)"),
    ("no control", r"no row has 'Metadata_pert_iname' = 'dmso', the negative control.*--control"),
    ("no numeric features", r"no numeric feature columns \(non-numeric: Cells_Note\)"),
    ("no compound", r"missing metadata column 'compound' \(looked for Metadata_Compound, .*--compound-column\)"),
    ("no keys", r"missing key column 'plate' .*--plate-column\); key column 'well' .*--well-column\)"),
    ("named column missing", r"no column 'Metadata_target' \(named by --moa-column\)"),
    ("bad dose", r"1 treated row\(s\) with an empty or non-numeric 'Metadata_mmoles_per_liter'"),
    ("two moas", r"treatment brd-tub0 @ 1 has several values of 'Metadata_moa' \(actin, tubulin\)"),
    ("moa missing in a well", r"treatment brd-tub0 @ 1 has several values of 'Metadata_moa' \(None, tubulin\)"),
    ("all features bad", r"no usable features left .*24 feature columns"),
])
def test_bad_input_is_a_clear_error_naming_file_and_column(tmp_path, case, message):
    table, options = bad(pycytominer_wells(0), case)
    path = write(table, tmp_path / "profiles.csv")
    with pytest.raises(InputError, match=message) as err:
        run_eval(EvalConfig(source=path, retrieval=False, **options))
    assert str(err.value).startswith(str(path))


def test_readme_example_table_is_the_generator_output(tmp_path):
    shipped = Path(__file__).parent / "data" / "pycytominer_example.csv"
    pycytominer_wells().to_csv(tmp_path / "again.csv", index=False, float_format="%.5g")
    assert (tmp_path / "again.csv").read_text() == shipped.read_text()


def test_readme_example_through_the_cli_gives_its_numbers_and_profile_tables(cli, tmp_path):
    """README's worked example as typed (`--profiles-out`): its numbers, and the three tables hold the input."""
    outcome = cli("eval", EXAMPLE, "--out", tmp_path / "report", "--profiles-out", tmp_path / "profiles")
    assert outcome.code == 0, outcome.err
    shown = json.loads(outcome.out.splitlines()[0])
    assert (f"{100 * shown['nsc']:.1f}", f"{100 * shown['nscb']:.1f}", shown["n_nsc"], shown["n_nscb"]) == (
        "80.0", "75.0", 20, 16)
    assert (f"{shown['map_replicate']:.3f}", f"{100 * shown['fraction_retrieved']:.1f}", f"{shown['map_moa']:.3f}") == (
        "0.714", "63.6", "0.789")
    assert f"profiles: {tmp_path / 'profiles'}/{{wells,wells_normalized,treatments}}.parquet" in outcome.out
    md = (tmp_path / "report" / "report.md").read_text()
    assert "| NSC | 80.0% | 20 |" in md and "| replicates vs controls (per treatment) | 0.714 | 63.6% | 22 | 0 |" in md
    assert "| egfr | 4 | 1 | n/a | n/a |" in md  # left out of NSCB: n/a, as comparison.md shows it
    table = pd.read_csv(EXAMPLE)
    raw, normalized, treatments = (pd.read_parquet(tmp_path / "profiles" / f"{name}.parquet")
                                   for name in ("wells", "wells_normalized", "treatments"))
    # one input row per well: wells.parquet is the input itself, under pycytominer's column names
    both = table.merge(raw, on=["Metadata_Plate", "Metadata_Well"], suffixes=("", "_out"), validate="1:1")
    assert len(both) == len(raw) == len(normalized) == len(table) == 68
    assert np.allclose(both[list(FEATURES)], both[[f"{f}_out" for f in FEATURES]])
    assert (both["Metadata_Compound"] == both[COMPOUND]).all()
    assert (both["Metadata_Concentration"] == both[DOSE]).all()
    assert not np.allclose(normalized[list(FEATURES)], raw[list(FEATURES)])  # --post tvn applied
    pairs = set(map(tuple, table[[COMPOUND, DOSE]].drop_duplicates().to_numpy()))
    assert set(map(tuple, treatments[["Metadata_Compound", "Metadata_Concentration"]].to_numpy())) == pairs
    assert len(treatments) == len(pairs) == 11 * 2 + 1


def test_dose_column_option_names_the_dose(cli, tmp_path):
    table = pd.read_csv(EXAMPLE).rename(columns={DOSE: "Metadata_uM"})  # a name eval does not look for
    path = write(table, tmp_path / "renamed.csv")
    unnamed = cli("eval", path, "--no-retrieval", "--out", tmp_path / "one_dose")
    assert unnamed.code == 0, unnamed.err
    assert json.loads(unnamed.out.splitlines()[0])["n_nsc"] == 10  # no dose found: one treatment per compound
    named = cli("eval", path, "--dose-column", "Metadata_uM", "--no-retrieval", "--out", tmp_path / "named")
    assert named.code == 0, named.err
    report = json.loads((tmp_path / "named" / "report.json").read_text())
    assert report["columns"]["concentration"] == "Metadata_uM" and report["config"]["dose_column"] == "Metadata_uM"
    assert (report["nsc"], report["nscb"], report["n_nsc"], report["n_nscb"]) == (0.8, 0.75, 20, 16)
    treatments = pd.read_csv(tmp_path / "named" / "treatments.csv")
    assert sorted(set(treatments["concentration"])) == sorted(set(table.loc[table[MOA].notna(), "Metadata_uM"]))


def test_profiles_out_of_a_treatment_level_table_is_refused_before_any_work(cli, tmp_path):
    table = pd.read_csv(EXAMPLE)
    consensus = table.groupby([COMPOUND, DOSE], dropna=False).agg(
        {**{f: "median" for f in FEATURES}, MOA: "first", "Metadata_Batch": "first"}).reset_index()
    path = write(consensus, tmp_path / "consensus.csv")
    scored = cli("eval", path, "--post", "none", "--no-retrieval")  # the table itself is scored as it is
    assert scored.code == 0, scored.err
    before = snapshot(tmp_path)
    outcome = cli("eval", path, "--post", "none", "--out", tmp_path / "report", "--profiles-out", tmp_path / "p")
    assert_refused(outcome, f"{path}: a treatment-level table", "drop --profiles-out")
    assert snapshot(tmp_path) == before and not (tmp_path / "p").exists() and not (tmp_path / "report").exists()


def test_tsne_map_is_drawn(cli, tmp_path):
    for method in ("tsne", "pca"):
        outcome = cli("eval", EXAMPLE, "--map", method, "--no-retrieval", "--out", tmp_path / method)
        assert outcome.code == 0, outcome.err
        assert "![map](map.png)" in (tmp_path / method / "report.md").read_text()
    tsne, pca = ((tmp_path / method / "map.png").read_bytes() for method in ("tsne", "pca"))
    assert tsne.startswith(b"\x89PNG\r\n\x1a\n") and tsne != pca


def test_tsne_coordinates_keep_groups_apart():
    from fastcell.evaluate.report import map_coordinates

    rng = np.random.default_rng(0)
    group = np.repeat(np.arange(4), 5)
    x = 3 * rng.standard_normal((4, 16))[group] + 0.3 * rng.standard_normal((20, 16))
    tsne = map_coordinates(x, "tsne", seed=1)
    assert tsne.shape == (20, 2) and not np.allclose(tsne, map_coordinates(x, "pca"))  # not PCA's map
    distance = np.linalg.norm(tsne[:, None] - tsne[None], axis=-1) + np.diag(np.full(20, np.inf))
    assert (group[distance.argmin(axis=1)] == group).all()  # each point's 2-D neighbour is of its group


def test_alpha_and_null_size_reach_the_retrieval(cli, tmp_path):
    """`--alpha` / `--null-size` through the CLI: recorded in report.json and used (a smaller alpha retrieves no more)."""
    found = {}
    for alpha in (0.5, 0.001):
        outcome = cli("eval", EXAMPLE, "--out", tmp_path / f"a{alpha}", "--alpha", alpha, "--null-size", 200)
        assert outcome.code == 0, outcome.err
        report = json.loads((tmp_path / f"a{alpha}" / "report.json").read_text())
        assert report["retrieval"]["settings"] == {"null_size": 200, "alpha": alpha}
        found[alpha] = report["retrieval"]["replicate"]["fraction_retrieved"]
    assert found[0.001] < found[0.5]
