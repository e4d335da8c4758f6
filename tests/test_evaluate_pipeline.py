"""`fastcell eval` end to end on profile tables over the real BBBC021 design, and its bad-input handling."""

import hashlib
import json
import re

import numpy as np
import pandas as pd
import pytest

from fastcell import metadata
from fastcell.errors import InputError
from fastcell.evaluate.pipeline import EvalConfig, run_eval
from fastcell.evaluate.profiles import load_wells, treatment_profiles, wells_design

D = 8


@pytest.fixture(scope="module")
def design():
    return wells_design(None, None)


def make_wells(design, seed=0, noise=1.0):
    """One row per well of the design: MoA centre + batch shift + noise; controls are decoys."""
    rng = np.random.default_rng(seed)
    centres = {m: rng.standard_normal(D) * 2 for m in design["moa"].dropna().unique()}
    shifts = {b: rng.standard_normal(D) for b in design["batch"].unique()}
    x = np.stack([
        (centres[m] if role in ("treatment", "dmso") else rng.standard_normal(D) * 4) + shifts[b]
        for m, role, b in zip(design["moa"], design["role"], design["batch"], strict=True)
    ]) + rng.standard_normal((len(design), D)) * noise
    table = design[["plate", "well"]].copy()
    for i in range(D):
        table[f"feature_{i}"] = x[:, i]
    return table


def reference_scores(table, design):
    """Independent reference: pandas join, median per treatment, float64 cosine 1-NN by loops."""
    joined = table.merge(design, on=["plate", "well"])
    treated = joined[joined["role"] == "treatment"]
    features = [c for c in table.columns if c.startswith("feature_")]
    t = treated.groupby(["compound", "concentration"]).agg(
        {**{f: "median" for f in features}, "moa": "first", "batch": "first"}).reset_index()
    x = t[features].to_numpy()
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    sims = x @ x.T
    result = {}
    for across in (False, True):
        keep = np.ones(len(t), bool)
        if across:
            keep = t["moa"].map(t.groupby("moa")["batch"].nunique()).to_numpy() > 1
        s = sims[np.ix_(keep, keep)].copy()
        sub = t[keep].reset_index(drop=True)
        s[sub["compound"].to_numpy()[:, None] == sub["compound"].to_numpy()[None, :]] = -np.inf
        if across:
            s[sub["batch"].to_numpy()[:, None] == sub["batch"].to_numpy()[None, :]] = -np.inf
        correct = sub["moa"].to_numpy()[s.argmax(1)] == sub["moa"].to_numpy()
        result["nscb" if across else "nsc"] = (correct.mean(), len(sub))
    return result


def test_end_to_end_matches_reference_and_writes_report(tmp_path, design):
    table = make_wells(design, noise=2.5)
    source = tmp_path / "wells.csv"
    table.to_csv(source, index=False)
    summary = run_eval(EvalConfig(source=source, out=tmp_path / "report", post="none"))
    expected = reference_scores(table, design)
    assert (summary["n_nsc"], summary["n_nscb"]) == (103, 92)
    assert summary["nsc"] == pytest.approx(expected["nsc"][0])
    assert summary["nscb"] == pytest.approx(expected["nscb"][0])
    assert summary["drop"] == pytest.approx(summary["nsc"] - summary["nscb"])
    assert 0 < summary["nsc"] < 1  # noisy enough that the comparison means something
    assert summary["nscb_left_out_moas"] == ["Cholesterol-lowering", "Kinase inhibitors"]
    assert summary["wells_by_role"]["control"] == 330
    written = json.loads((tmp_path / "report" / "report.json").read_text())
    assert written["nsc"] == summary["nsc"] and written["n_nscb"] == 92
    # what the report was computed from: the table's SHA-256 (an embed folder: its recorded inputs)
    assert written["inputs"] == {"table": str(source.resolve()),
                                 "sha256": hashlib.sha256(source.read_bytes()).hexdigest()}
    for name in ("report.md", "treatments.csv", "per_moa.csv", "confusion.png", "map.png"):
        assert (tmp_path / "report" / name).stat().st_size > 0
    per_treatment = pd.read_csv(tmp_path / "report" / "treatments.csv")
    assert len(per_treatment) == 103 and per_treatment["correct_nsc"].mean() == pytest.approx(summary["nsc"])


def test_taxol_plate_controls_are_not_treatments(design):
    wells = load_wells_from(design, make_wells(design))
    treatments = treatment_profiles(wells)
    taxol = treatments.rows[treatments.rows["compound"] == metadata.TAXOL]
    assert sorted(taxol["concentration"]) == [0.3, 1.0, 3.0]
    assert taxol["n_wells"].tolist() == [3, 3, 3]  # a naive join gives taxol 0.3 uM hundreds of wells
    assert "DMSO" not in set(treatments.rows["compound"]) and len(treatments.rows) == 103


def load_wells_from(design, table, tmp=None, **kwargs):
    import tempfile
    from pathlib import Path

    folder = Path(tmp or tempfile.mkdtemp())
    path = folder / "wells.parquet"
    table.to_parquet(path)
    return load_wells(path, design, **kwargs)


def test_image_level_rows_average_to_the_well_table(tmp_path, design):
    table = make_wells(design).iloc[:600]
    sites = pd.concat([table.assign(site=s) for s in (1, 2)], ignore_index=True)
    features = [c for c in table.columns if c.startswith("feature_")]
    sites.loc[sites["site"] == 2, features] += 1.0
    sites.loc[sites.index[:5], "site"] = 3  # a third site in a few wells: image averaging weighs sites equally
    for aggregate in ("well", "image"):
        wells = load_wells_from(design, sites, tmp_path, aggregate=aggregate)
        expected = sites.groupby(["plate", "well"])[features].mean() if aggregate == "well" else \
            sites.groupby(["plate", "well", "site"])[features].mean().groupby(["plate", "well"]).mean()
        got = pd.DataFrame(wells.features, columns=features, index=pd.MultiIndex.from_frame(wells.rows[["plate", "well"]]))
        assert np.allclose(got.loc[expected.index].to_numpy(), expected.to_numpy())


def test_nan_and_constant_features_are_dropped_and_reported(tmp_path, design):
    table = make_wells(design)
    table.loc[5, "feature_1"] = np.nan
    table["flat"] = 3.0
    path = tmp_path / "wells.csv"
    table.to_csv(path, index=False)
    summary = run_eval(EvalConfig(source=path, post="zscore"))
    assert summary["notes"] == {"dropped_nan_features": ["feature_1"], "dropped_constant_features": ["flat"]}
    assert summary["n_features"] == D - 1
    with pytest.raises(InputError, match="NaN"):
        run_eval(EvalConfig(source=path, nan_policy="error"))


def test_metadata_that_does_not_match_is_an_error(tmp_path, design):
    table = make_wells(design)
    unknown = table.copy()
    unknown.loc[0, "plate"] = "Week99_00000"
    unknown.to_csv(tmp_path / "unknown.csv", index=False)
    with pytest.raises(InputError, match="not in the image table"):
        run_eval(EvalConfig(source=tmp_path / "unknown.csv"))
    mismatch = table.merge(design[["plate", "well", "compound"]], on=["plate", "well"])
    mismatch.loc[mismatch["compound"] == "taxol", "compound"] = "emetine"
    mismatch.to_csv(tmp_path / "mismatch.csv", index=False)
    with pytest.raises(InputError, match="disagree with the image table on compound"):
        run_eval(EvalConfig(source=tmp_path / "mismatch.csv"))
    table.drop(columns=["well"]).to_csv(tmp_path / "nowell.csv", index=False)
    with pytest.raises(InputError, match="missing key column 'well'"):
        run_eval(EvalConfig(source=tmp_path / "nowell.csv"))


def test_treatment_missing_from_the_moa_table_is_not_scored(tmp_path, design):
    moa = metadata.load_moa_table()
    moa[moa["compound"] != "emetine"].to_csv(tmp_path / "moa.csv", index=False)
    make_wells(design).to_csv(tmp_path / "wells.csv", index=False)
    summary = run_eval(EvalConfig(source=tmp_path / "wells.csv", moa=tmp_path / "moa.csv", post="none"))
    n_emetine = int((moa["compound"] == "emetine").sum())
    assert summary["n_nsc"] == 103 - n_emetine


def test_a_moa_of_one_compound_is_noted(tmp_path, design):
    """NSC keeps the convention (every annotated treatment is a query), but a MoA with a single compound can never
    be predicted under it: the report's notes name it. BBBC021's own MoAs all have several compounds."""
    make_wells(design).to_csv(tmp_path / "wells.csv", index=False)
    assert "nsc_moas_with_one_compound" not in run_eval(EvalConfig(source=tmp_path / "wells.csv", post="none"))["notes"]
    moa = metadata.load_moa_table()
    moa.loc[moa["compound"] == "emetine", "moa"] = "Solo"
    moa.to_csv(tmp_path / "moa.csv", index=False)
    summary = run_eval(EvalConfig(source=tmp_path / "wells.csv", moa=tmp_path / "moa.csv", post="none"))
    assert summary["notes"]["nsc_moas_with_one_compound"] == ["Solo"]


def test_no_dmso_wells_for_whitening_is_an_error(tmp_path, design):
    table = make_wells(design)
    table = table[(design["role"] != "dmso").to_numpy()]
    table.to_csv(tmp_path / "wells.csv", index=False)
    with pytest.raises(InputError, match="no DMSO"):
        run_eval(EvalConfig(source=tmp_path / "wells.csv", post="tvn"))
    assert run_eval(EvalConfig(source=tmp_path / "wells.csv", post="zscore"))["n_nsc"] == 103


def test_batch_column_from_the_profiles(tmp_path, design):
    table = make_wells(design)
    table["site_group"] = np.where(design["plate"].str.endswith(("1", "3", "5", "7", "9")), "odd", "even")
    table.to_csv(tmp_path / "wells.csv", index=False)
    with pytest.raises(InputError, match="spans batches"):  # treatments straddle the odd/even split
        run_eval(EvalConfig(source=tmp_path / "wells.csv", batch_column="site_group", post="none"))
    with pytest.raises(InputError, match="no batch column 'nope'"):
        run_eval(EvalConfig(source=tmp_path / "wells.csv", batch_column="nope"))


def make_embedding_folder(folder, design, cells_per_well=4, seed=1):
    """An `embed`-style folder: per-cell vectors around their well's profile, cells shuffled."""
    benchmark = design[design["role"].isin(["treatment", "dmso"])].reset_index(drop=True)
    wells = make_wells(benchmark, seed=seed, noise=0.5)
    features = [c for c in wells.columns if c.startswith("feature_")]
    rng = np.random.default_rng(seed)
    repeat = np.repeat(np.arange(len(wells)), cells_per_well)
    x = wells[features].to_numpy()[repeat] + rng.standard_normal((len(repeat), D)) * 0.3
    cells = benchmark.iloc[repeat][["plate", "well", "compound", "concentration", "batch"]].reset_index(drop=True)
    cells["moa"] = ""  # the shards' moa column is informative only; the design decides
    cells["site"] = 1
    order = rng.permutation(len(cells))
    folder.mkdir()
    cells.iloc[order].assign(id=np.arange(len(cells))).to_parquet(folder / "cells.parquet", index=False)
    np.save(folder / "embeddings.npy", x[order].astype(np.float32))
    return cells.iloc[order].reset_index(drop=True), x[order]


def test_embedding_folder_treatment_and_cell_level(tmp_path, design):
    cells, x = make_embedding_folder(tmp_path / "emb", design)
    means = pd.DataFrame(x, columns=[f"feature_{i}" for i in range(D)]).groupby(
        [cells["plate"], cells["well"]]).mean().reset_index()
    means.to_csv(tmp_path / "wells.csv", index=False)
    from_cells = run_eval(EvalConfig(source=tmp_path / "emb"))
    from_wells = run_eval(EvalConfig(source=tmp_path / "wells.csv"))
    assert (from_cells["nsc"], from_cells["nscb"]) == (from_wells["nsc"], from_wells["nscb"])
    assert from_cells["n_nsc"] == 103 and from_cells["post"] == "tvn"
    cell = run_eval(EvalConfig(source=tmp_path / "emb", level="cell", k=5, out=tmp_path / "cell_report"))
    assert (cell["n_nsc"], cell["n_nscb"]) == (103, 92)
    assert cell["nsc"] > 0.9 and 0 <= cell["cell_accuracy_nscb"] <= 1
    assert (tmp_path / "cell_report" / "confusion.png").is_file()
    np.save(tmp_path / "emb" / "embeddings.npy", x[:-1].astype(np.float32))
    with pytest.raises(InputError, match="has shape"):
        run_eval(EvalConfig(source=tmp_path / "emb"))


def test_embedding_folder_without_cells_is_an_error_naming_the_embeddings(tmp_path, design):
    cells, x = make_embedding_folder(tmp_path / "emb", design)
    cells.iloc[:0].assign(id=np.arange(0)).to_parquet(tmp_path / "emb" / "cells.parquet", index=False)
    np.save(tmp_path / "emb" / "embeddings.npy", x[:0].astype(np.float32))
    with pytest.raises(InputError, match=f"{tmp_path / 'emb' / 'embeddings.npy'}: no cells"):
        run_eval(EvalConfig(source=tmp_path / "emb"))


@pytest.mark.parametrize("level", ["treatment", "cell"])
def test_cells_with_nan_embeddings_are_refused_naming_the_file_and_ids(tmp_path, design, level):
    """One NaN cell would make every feature NaN in its well, and so drop them all for every well."""
    _, x = make_embedding_folder(tmp_path / "emb", design)
    x[3], x[40, 5] = np.nan, np.inf  # a whole cell, and one value of another
    np.save(tmp_path / "emb" / "embeddings.npy", x.astype(np.float32))
    with pytest.raises(InputError, match=re.escape(f"{tmp_path / 'emb' / 'embeddings.npy'}: 2 of {len(x)} cell(s) "
                                                   "have NaN or inf in their embedding (ids 3, 40)")):
        run_eval(EvalConfig(source=tmp_path / "emb", level=level))


def test_batch_without_dmso_names_the_embedding_folder(tmp_path, design):
    cells, x = make_embedding_folder(tmp_path / "emb", design)
    keep = ~((cells["compound"] == "DMSO") & (cells["batch"] == "Week4")).to_numpy()
    cells[keep].assign(id=np.arange(keep.sum())).to_parquet(tmp_path / "emb" / "cells.parquet", index=False)
    np.save(tmp_path / "emb" / "embeddings.npy", x[keep].astype(np.float32))
    with pytest.raises(InputError, match=f"{tmp_path / 'emb'}: tvn: batch 'Week4' has no DMSO"):
        run_eval(EvalConfig(source=tmp_path / "emb"))


def test_constant_embeddings_name_the_embeddings_file(tmp_path, design):
    _, x = make_embedding_folder(tmp_path / "emb", design)
    np.save(tmp_path / "emb" / "embeddings.npy", np.ones_like(x, dtype=np.float32))
    with pytest.raises(InputError, match=f"{tmp_path / 'emb' / 'embeddings.npy'}: no usable features"):
        run_eval(EvalConfig(source=tmp_path / "emb"))
