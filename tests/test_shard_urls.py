"""Inputs by URL: a screen in an S3 bucket (a moto server on 127.0.0.1) and over HTTP; clear errors."""

from __future__ import annotations

import json

import fsspec
import numpy as np
import pandas as pd
import pytest
from fault_helpers import cli_runner
from shard_screens import write_screen

from fastcell.errors import InputError
from fastcell.shard.pipeline import ShardConfig, shard_screen
from fastcell.shard.sources import load_screen, read_field

pytest.importorskip("moto.server")
cli = pytest.fixture(cli_runner)


@pytest.fixture(scope="module")
def bucket(tmp_path_factory):
    """A local S3 server holding one small screen in bucket `screen`; yields (local table, endpoint)."""
    import s3fs
    from moto.server import ThreadedMotoServer

    table = write_screen(tmp_path_factory.mktemp("screen"), plates=("P1",), wells=("A01", "B01"))
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    settings = {"endpoint_url": endpoint, "key": "testing", "secret": "testing"}
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(fsspec.config.conf, "s3", settings)  # this process's readers
        mp.setenv("FSSPEC_S3", json.dumps(settings))  # worker processes started from here
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        fs = s3fs.S3FileSystem(
            skip_instance_cache=True, s3_additional_kwargs={"ACL": "public-read"}
        )  # for http
        fs.mkdir("screen")
        fs.put(str(table.parent) + "/", "screen/", recursive=True)
        yield table, endpoint
    server.stop()


def test_a_screen_in_a_bucket_gives_the_shards_of_its_local_copy(bucket, tmp_path):
    table, _ = bucket
    options = dict(crop_size=24, shard_size=10, workers=1)
    remote = shard_screen(ShardConfig(source="s3://screen/fields.csv", out=tmp_path / "s3", **options))
    local = shard_screen(ShardConfig(source=table, out=tmp_path / "local", **options))
    assert remote.n_cells == local.n_cells > 0
    names = sorted(p.name for p in local.out.iterdir() if p.suffix in (".tar", ".idx", ".npz"))
    for name in names:
        assert (remote.out / name).read_bytes() == (local.out / name).read_bytes(), name
    config = json.loads((remote.out / "index.json").read_text())["config"]
    assert config["source"] == "s3://screen/fields.csv" and list(config["inputs"]) == [
        "s3://screen/fields.csv"
    ]


def test_dask_workers_read_the_urls_themselves(bucket, tmp_path):
    result = shard_screen(ShardConfig(source="s3://screen/fields.csv", out=tmp_path / "dask", crop_size=24,
                                      dask="local:1"))  # fmt: skip
    assert result.n_cells > 0 and not result.fields_skipped


def test_http_urls(bucket):
    _, endpoint = bucket
    screen = load_screen(f"{endpoint}/screen/fields.csv")
    assert str(screen.fields[0].paths[0]) == f"{endpoint}/screen/P1/A01/s1_DNA.tif"
    assert read_field(screen.fields[0]).shape == (3, 96, 128)


def test_missing_objects_are_named(bucket, tmp_path):
    with pytest.raises(InputError, match=r"s3://screen/nothing\.csv: not found"):
        load_screen("s3://screen/nothing.csv")
    screen = load_screen("s3://screen/fields.csv")
    field = screen.fields[0]
    missing = type(field)(
        **{**vars(field), "paths": (field.paths[0].with_name("gone.tif"), *field.paths[1:])}
    )
    with pytest.raises(InputError, match=r"s3://screen/P1/A01/gone\.tif: not found"):
        read_field(missing)


def test_refused_credentials_are_named(bucket, monkeypatch):
    from moto import settings

    monkeypatch.setattr(settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)  # the server now checks credentials
    with pytest.raises(InputError, match=r"s3://screen/fields\.csv: access refused .*credentials"):
        load_screen("s3://screen/fields.csv")


def test_a_local_table_may_name_images_by_url(bucket, tmp_path):
    table, _ = bucket
    fields = pd.read_csv(table)
    for channel in ("DNA", "AGP", "Mito"):
        fields[channel] = "s3://screen/" + fields[channel]
    fields.to_csv(tmp_path / "fields.csv", index=False)
    screen = load_screen(tmp_path / "fields.csv")
    assert str(screen.fields[1].paths[2]) == "s3://screen/P1/A01/s2_Mito.tif"
    assert np.array_equal(read_field(screen.fields[1]), read_field(load_screen(table).fields[1]))


def test_the_command_line_takes_urls(bucket, tmp_path, cli):
    outcome = cli("shard", "s3://screen/fields.csv", str(tmp_path / "out"), "--crop", "24", "--workers", "1",
                  "--locations", "s3://screen/cells.csv", "--no-progress")  # fmt: skip
    assert outcome.code == 0, outcome.err
    config = json.loads((tmp_path / "out" / "index.json").read_text())["config"]
    assert (config["source"], config["locations"]) == ("s3://screen/fields.csv", "s3://screen/cells.csv")
    outcome = cli("shard", "s3://screen/none.csv", str(tmp_path / "none"), "--no-progress")
    assert outcome.code == 2 and "s3://screen/none.csv: not found" in outcome.err


def test_an_ome_zarr_plate_in_a_bucket(bucket, tmp_path):
    import s3fs
    from test_shard_omezarr import write_plate

    table, _ = bucket
    plate = write_plate(table, tmp_path / "P1.zarr", "P1", 3)
    s3fs.S3FileSystem(skip_instance_cache=True).put(str(plate) + "/", "screen/P1.zarr/", recursive=True)
    remote, local = load_screen("s3://screen/P1.zarr"), load_screen(plate)
    assert remote.kind == "ome-zarr" and [f.key for f in remote.fields] == [f.key for f in local.fields]
    assert np.array_equal(read_field(remote.fields[2]), read_field(local.fields[2]))


def test_remote_tables_are_fetched_once(bucket, tmp_path, monkeypatch):
    """The field and locations tables are downloaded once each: their digests in the configuration record
    are taken from the bytes read."""
    import hashlib

    import s3fs

    table, _ = bucket
    opened, real = [], s3fs.S3FileSystem._open
    monkeypatch.setattr(s3fs.S3FileSystem, "_open", lambda fs, path, *args, **kwargs: opened.append(path)
                        or real(fs, path, *args, **kwargs))  # fmt: skip
    result = shard_screen(ShardConfig(source="s3://screen/fields.csv", locations="s3://screen/cells.csv",
                                      out=tmp_path / "out", crop_size=24, workers=1))  # fmt: skip
    assert sorted(path for path in opened if path.endswith(".csv")) == ["screen/cells.csv", "screen/fields.csv"]
    assert result.manifest.config["inputs"] == {
        f"s3://screen/{name}": hashlib.sha256((table.parent / name).read_bytes()).hexdigest()
        for name in ("fields.csv", "cells.csv")
    }
