"""Shards on an object store: published to and streamed from a real S3-compatible server.

The server is moto's, in its own process on 127.0.0.1 (``s3_server`` / ``s3`` in conftest);
the project's code runs unchanged against it through s3fs, as against AWS.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from conftest import S3Server, chexpert_rows, cli, ingest_site

from cxrsynth import loader, manifest, shards, store
from cxrsynth.verify import verify_dataset

SPLIT = {"tune": 0.25, "seed": 0}


def _site(base, url=None, **options):
    rows = chexpert_rows(n_patients=8, studies=2, uncertain=False)
    return ingest_site(base, rows, size=24, shard_size=4, split=SPLIT, store=url, **options)


def _objects(url: str) -> dict[str, int]:
    fs, path = store.filesystem(url)
    return {p[len(path):].lstrip("/"): fs.info(p)["size"] for p in fs.find(path)}


def _corrupt(url: str, *, same_size: bool = True) -> None:
    """Change one byte in the middle of the object at ``url`` (or cut its last block)."""
    fs, path = store.filesystem(url)
    data = bytearray(fs.cat_file(path))
    if same_size:
        data[len(data) // 2] ^= 0xFF
    else:
        data = data[:-512]
    fs.pipe_file(path, bytes(data))


def test_publish_to_store_keeps_relative_names_and_verifies(tmp_path, s3):
    url = f"{s3}/projects/demo"
    root = _site(tmp_path / "remote", url)
    local = _site(tmp_path / "local")
    meta, frame = manifest.read_meta(root, "cxp"), manifest.read(root, "cxp")
    assert meta["store"] == url
    assert frame["shard"].str.startswith("data/shards/cxp/").all()  # store-relative names, as for a local dataset
    assert frame["shard"].tolist() == manifest.read(local, "cxp")["shard"].tolist()
    folder = shards.shard_dir(root, "cxp", meta["split_of"])
    assert not list(folder.glob("*.tar"))  # the store holds them now
    objects = _objects(url)
    local_folder = shards.shard_dir(local, "cxp", meta["split_of"])
    for tar in local_folder.glob("*.tar"):  # the same bytes as a local ingest, under the same names
        assert objects[f"data/shards/cxp/{meta['split_of']}/{tar.name}"] == tar.stat().st_size
    assert f"data/shards/cxp/{meta['split_of']}/index.json" in objects
    problems, checked = verify_dataset(root, "cxp")
    assert problems == [] and checked == len(objects) - 2  # every shard streamed and hashed
    assert "cxp: 4 shard(s) match index.json" in cli(root, "verify", "cxp")
    # images for these rows (sheet, audit, export): the same bytes from the store as from disk
    assert dict(shards.images(root, frame)) == dict(shards.images(local, manifest.read(local, "cxp")))


def test_cli_ingest_store_option_and_credentials_refused(tmp_path, s3):
    from conftest import write_chexpert

    csv = write_chexpert(tmp_path / "raw", chexpert_rows(n_patients=2, studies=1, uncertain=False))
    root = tmp_path / "proj"
    cli(None, "ingest", "chexpert", csv, "--name", "cxp", "--size", 16, "--workers", 1, "--store", f"{s3}/p", "--root", root)
    assert manifest.read_meta(root, "cxp")["store"] == f"{s3}/p"
    assert verify_dataset(root, "cxp")[0] == []
    out = cli(None, "ingest", "chexpert", csv, "--name", "cxq", "--size", 16, "--workers", 1, "--store",
              "s3://AKIAXX:secret@bucket/p", "--root", root, code=2)
    assert "credentials may not be part of a URL" in out and "secret" not in out


def test_loader_streams_the_same_batches_from_the_store(tmp_path, s3):
    remote, local = _site(tmp_path / "remote", f"{s3}/p"), _site(tmp_path / "local")
    config = loader.LoaderConfig(batch_size=4, image_size=24, workers=2, streams=4, seed=3)

    def epoch(root):
        data = loader.ShardLoader(root, loader.select(root, "cxp", "train"), config)
        return list(data.batches(epoch=1))

    got, want = epoch(remote), epoch(local)
    assert len(got) == len(want) > 1
    for a, b in zip(got, want):
        assert a["key"] == b["key"]
        assert np.array_equal(a["image"].numpy(), b["image"].numpy())
        assert np.array_equal(a["labels"].numpy(), b["labels"].numpy())


def test_changed_object_is_refused(tmp_path, s3):
    url = f"{s3}/p"
    root = _site(tmp_path, url)
    frame = manifest.read(root, "cxp")
    first = sorted(frame["shard"].unique())[0]
    _corrupt(store.join(url, first))
    problems, _ = verify_dataset(root, "cxp")
    assert any("sha256 mismatch" in p and first in p for p in problems), problems
    with pytest.raises(store.ObjectChanged, match="sha256 mismatch"):
        dict(shards.images(root, frame.loc[frame["shard"] == first]))
    rows = loader.select(root, "cxp", None)
    with pytest.raises(store.ObjectChanged, match="sha256 mismatch"):  # through a DataLoader worker too
        list(loader.ShardLoader(root, rows, loader.LoaderConfig(batch_size=2, train=False, workers=1)).batches())
    second = sorted(frame["shard"].unique())[1]
    _corrupt(store.join(url, second), same_size=False)
    with pytest.raises(store.ObjectChanged, match="size mismatch"):  # refused before a byte is used
        dict(shards.images(root, frame.loc[frame["shard"] == second]))


def test_missing_object_and_missing_bucket(tmp_path, s3):
    url = f"{s3}/p"
    root = _site(tmp_path, url)
    frame = manifest.read(root, "cxp")
    last = sorted(frame["shard"].unique())[-1]
    fs, path = store.filesystem(store.join(url, last))
    fs.rm(path)
    problems, _ = verify_dataset(root, "cxp")
    assert f"missing shard: {store.join(url, last)}" in problems
    with pytest.raises(store.ObjectMissing, match="missing object"):
        dict(shards.images(root, frame.loc[frame["shard"] == last]))
    with pytest.raises(store.ObjectMissing, match="missing index"):
        store.index_entries("s3://no-such-bucket-here/p")


def test_store_going_away_mid_epoch_fails_cleanly(tmp_path, monkeypatch):
    pytest.importorskip("moto.server")
    server = S3Server()
    try:
        server.configure(monkeypatch)
        root = _site(tmp_path, f"{server.bucket('gone')}/p")
        rows = loader.select(root, "cxp", None)
        config = loader.LoaderConfig(batch_size=1, train=False, workers=2, streams=8, prefetch=1)
        batches = loader.ShardLoader(root, rows, config).batches()
        next(batches)
        server.stop()
        started = time.monotonic()
        with pytest.raises(store.StoreUnreachable, match="failed 3 times.*is the store reachable"):
            for _ in batches:
                pass
        assert time.monotonic() - started < 30  # bounded retries and timeouts, not a hang
    finally:
        server.stop()
