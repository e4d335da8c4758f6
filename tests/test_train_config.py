"""TrainConfig: augmentation settings from a config file and `--augment NAME=VALUE`, and their checks."""

from __future__ import annotations

import json

import pytest

from fastcell.errors import InputError
from fastcell.loaders.spec import AugmentSpec
from fastcell.train.config import TrainConfig, parse_augment_options, resolve_config


def test_augment_options_parse_scalars_ranges_and_booleans():
    parsed = parse_augment_options(["crop_scale=0.5,1", "jitter_p=0", "dihedral=false"])
    assert parsed == {"crop_scale": [0.5, 1], "jitter_p": 0, "dihedral": False}
    spec = TrainConfig(augment=parsed, view_size=32).augment_spec()
    assert spec == AugmentSpec(output_size=32, crop_scale=(0.5, 1.0), jitter_p=0.0, dihedral=False)


def test_default_augmentation_is_the_spec_default():
    assert TrainConfig().augment_spec() == AugmentSpec()


@pytest.mark.parametrize("pair", ["jitter_p", "=0.5", "jitter_p="])
def test_malformed_augment_option_is_refused(pair):
    with pytest.raises(InputError, match="expected NAME=VALUE"):
        parse_augment_options([pair])


@pytest.mark.parametrize(("augment", "message"), [
    ({"jiter_p": 0.5}, "unknown augmentation setting.*jiter_p"),
    ({"output_size": 32}, "view_size"),
    ({"jitter_p": 2}, "jitter_p must be a probability"),
    ({"gain": "bright"}, "augment.gain must be a range LOW,HIGH"),
])
def test_bad_augmentation_is_refused_when_configured(augment, message):
    with pytest.raises(InputError, match=message):
        TrainConfig(augment=augment)


def test_file_and_options_merge_augmentation_by_name(tmp_path):
    settings = tmp_path / "settings.yaml"
    settings.write_text("augment:\n  crop_scale: [0.5, 1]\n  jitter_p: 0.5\n")
    cfg = resolve_config({"augment": {"jitter_p": 0.3}}, config_file=settings)
    assert cfg.augment == {"crop_scale": [0.5, 1], "jitter_p": 0.3}
    assert cfg.augment_spec().crop_scale == (0.5, 1.0) and cfg.augment_spec().jitter_p == 0.3


def test_resuming_with_other_augmentation_is_a_change(tmp_path):
    saved = TrainConfig(augment={"jitter_p": 0.3})
    (tmp_path / "config.json").write_text(__import__("json").dumps(saved.to_dict()))
    same = resolve_config({"resume": True}, out=tmp_path)
    assert same.changes_against(saved) == {}
    other = resolve_config({"resume": True, "augment": {"blur_p": 0.0}}, out=tmp_path)
    assert other.changes_against(saved) == {"augment": ({"jitter_p": 0.3, "blur_p": 0.0}, {"jitter_p": 0.3})}


def test_synthetic_screen_recipe_file_is_valid():
    """configs/synthetic-screen.yaml (what `make demo` trains with) resolves to the documented views."""
    from pathlib import Path

    recipe = Path(__file__).resolve().parents[1] / "configs" / "synthetic-screen.yaml"
    cfg = resolve_config({"epochs": 2}, config_file=recipe)
    assert cfg.epochs == 2 and cfg.view_size == 48
    spec = cfg.augment_spec()
    assert not spec.random_crop and not spec.jitter and not spec.gamma_in_batch
    assert spec.blur and spec.blur_sigma == (0.1, 1.4) and spec.dihedral


def test_files_of_older_fastcell_are_upgraded(tmp_path):
    """Runs saved before `shards` held one folder and `view_size` the resolved views' side still read:
    a one-item `shards` list is that folder, `crop_size` (the old name of the views' side) is view_size."""
    old = TrainConfig(batch_size=8).to_dict() | {"shards": ["/data/shards"], "crop_size": 48, "view_size": None}
    (tmp_path / "config.json").write_text(json.dumps(old))
    resumed = resolve_config({"resume": True}, out=tmp_path)
    assert resumed.shards == "/data/shards" and resumed.view_size == 48 and resumed.batch_size == 8
    from_checkpoint = TrainConfig.from_dict(old, source="checkpoint.pt")
    assert (from_checkpoint.shards, from_checkpoint.view_size) == ("/data/shards", 48)
    assert TrainConfig.from_dict(old | {"shards": []}).shards is None
    # only a hand-written file could give both: view_size made the views then, and still does
    assert TrainConfig.from_dict(old | {"view_size": 32}).view_size == 32


@pytest.mark.parametrize("name", ["settings.yaml", "template.json"])
def test_crop_size_in_a_config_file_does_not_set_the_views(tmp_path, name, capsys):
    """`crop_size` in a --config file (hand-written, or an older run's config.json copied as a template)
    never set the views: it is dropped, not read as view_size; the one-item `shards` list still upgrades."""
    (tmp_path / name).write_text('{"crop_size": 64, "shards": ["/data/shards"], "batch_size": 8}')
    cfg = resolve_config({}, config_file=tmp_path / name)
    assert (cfg.view_size, cfg.shards, cfg.batch_size) == (None, "/data/shards", 8)
    assert f"{name}: crop_size 64 ignored" in capsys.readouterr().err
    (tmp_path / name).write_text('{"crop_size": 64, "view_size": 32}')
    assert resolve_config({}, config_file=tmp_path / name).view_size == 32


@pytest.mark.parametrize("where", ["settings.yaml", "config.json"])
def test_a_list_of_shard_folders_is_refused_naming_its_file(tmp_path, where):
    (tmp_path / where).write_text('{"shards": ["/data/a", "/data/b"]}')  # JSON is YAML too
    with pytest.raises(InputError, match=rf"{where}: shards lists 2 folders \(/data/a, /data/b\); "
                                         "training reads one shard folder"):
        if where == "settings.yaml":
            resolve_config({}, config_file=tmp_path / where)
        else:
            resolve_config({"resume": True}, out=tmp_path)


def test_the_torch_loader_s_worker_count_is_part_of_a_resumed_run():
    """The torch loader's workers decide which samples share a batch: another count would train other batches;
    DALI's threads do not change its batches (0 and 1 torch workers are the same one worker)."""
    saved = TrainConfig(loader="torch", num_workers=2)
    assert TrainConfig(loader="torch", num_workers=3).changes_against(saved) == {"num_workers": (3, 2)}
    assert TrainConfig(loader="torch", num_workers=0).changes_against(TrainConfig(loader="torch", num_workers=1)) == {}
    assert TrainConfig(loader="dali", num_workers=3).changes_against(TrainConfig(loader="dali", num_workers=2)) == {}
