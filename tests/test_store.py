"""Shards on an object store: published to and streamed from a real S3-compatible server.

The server is moto's, in its own process on 127.0.0.1 (``s3_server`` / ``s3`` in conftest);
the project's code runs unchanged against it through s3fs, as against AWS.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from conftest import S3Server, chexpert_rows, cli, ingest_site, plain_audit

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
    cli(root, "sheet", "cxp", "--n", 4, "--out", root / "sheet.png")
    cli(local, "sheet", "cxp", "--n", 4, "--out", local / "sheet.png")
    assert (root / "sheet.png").read_bytes() == (local / "sheet.png").read_bytes()


def test_cli_ingest_store_option_and_credentials_refused(tmp_path, s3, monkeypatch):
    from conftest import write_chexpert

    csv = write_chexpert(tmp_path / "raw", chexpert_rows(n_patients=2, studies=1, uncertain=False))
    root = tmp_path / "proj"
    cli(None, "ingest", "chexpert", csv, "--name", "cxp", "--size", 16, "--workers", 1, "--store", f"{s3}/p", "--root", root)
    assert manifest.read_meta(root, "cxp")["store"] == f"{s3}/p"
    assert verify_dataset(root, "cxp")[0] == []
    written = manifest.manifest_path(root, "cxp").stat().st_mtime_ns
    monkeypatch.setenv("CXRSYNTH_STORE", f"{s3}/p/")  # the project setting; published there already: nothing rewritten
    cli(None, "ingest", "chexpert", csv, "--name", "cxp", "--size", 16, "--workers", 1, "--root", root)
    assert manifest.manifest_path(root, "cxp").stat().st_mtime_ns == written
    assert not list((root / "data" / "shards").rglob("*.tar"))
    monkeypatch.delenv("CXRSYNTH_STORE")
    out = cli(None, "ingest", "chexpert", csv, "--name", "cxq", "--size", 16, "--workers", 1, "--store",
              "s3://AKIAXX:secret@bucket/p", "--root", root, code=2)
    assert "credentials may not be part of a URL" in out and "secret" not in out
    for url in ("https://host/p?X-Amz-Signature=abc", "data/shards"):
        with pytest.raises(store.StoreError, match="query string|not a URL"):
            store.check_url(url)


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


def test_denied_request_names_the_credentials(tmp_path, s3, monkeypatch):
    root = _site(tmp_path, f"{s3}/p")
    guarded = S3Server(auth=True)  # checks credentials: the dummy ones are refused
    try:
        guarded.configure(monkeypatch)
        monkeypatch.setattr(store, "_INDEXES", {})
        problems, _ = verify_dataset(root, "cxp")
        assert problems and all("access denied" in p and "credentials" in p for p in problems), problems
        with pytest.raises(store.AccessDenied, match="access denied: s3://.*check the credentials"):
            dict(shards.images(root, manifest.read(root, "cxp")))
    finally:
        guarded.stop()


@pytest.mark.slow
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


@pytest.mark.slow
def test_generate_publishes_to_the_store(tmp_path, s3):
    from conftest import micro_generator

    from cxrsynth.diffusion import replicas as generate

    root = _site(tmp_path)
    gen = micro_generator(tmp_path / "gen")
    config = generate.GenerateConfig(replicas=1, sampler="ddim", steps=1, seed=5, shard_size=4, batch_size=8)
    common = {"root": root, "generator_dir": gen, "conditions": "cxp", "split": "train", "config": config, "device": "cpu"}
    generate.generate(name="syn", **common)
    summary = generate.generate(name="syn_s", store=f"{s3}/g", **common)
    assert summary["complete"] and summary["written"] == summary["units"] > 1
    again = generate.generate(name="syn_s", store=f"{s3}/g/", **common)  # published: nothing is sampled again
    assert again["complete"] and again["written"] == 0
    assert manifest.read_meta(root, "syn_s")["store"] == f"{s3}/g"
    assert verify_dataset(root, "syn_s")[0] == []
    local, remote = manifest.read(root, "syn"), manifest.read(root, "syn_s")
    assert list(dict(shards.images(root, local)).values()) == list(dict(shards.images(root, remote)).values())


def test_job_array_parts_with_no_shared_disk_meet_on_the_store(tmp_path, s3):
    """`generate --part i/N --store URL` on two "nodes" that share no disk (each its own copy of the
    project): each part puts only its own shards and receipts on the store; the last one, and the
    project afterwards, assemble the index; the result is one local run's bytes."""
    import shutil

    from conftest import micro_generator

    from cxrsynth.diffusion import replicas as generate

    root = _site(tmp_path / "project")
    gen = micro_generator(tmp_path / "gen")
    config = generate.GenerateConfig(replicas=2, sampler="ddim", steps=1, seed=5, shard_size=3, batch_size=8)
    common = {"generator_dir": gen, "conditions": "cxp", "split": "train", "config": config, "device": "cpu",
              "name": "syn"}
    reference = shutil.copytree(root, tmp_path / "reference")
    one = generate.generate(root=reference, **common)  # one process, local disk
    version, url = one["version"], f"{s3}/study"
    nodes = [shutil.copytree(root, tmp_path / f"node{i}") for i in range(2)]
    first = generate.generate(root=nodes[0], part="0/2", store=url, **common)
    folder = f"{url}/data/shards/syn/{version}"
    assert not first["complete"] and first["written"] == (one["units"] + 1) // 2
    on_store = _objects(folder)
    assert "index.json" not in on_store and len([n for n in on_store if n.endswith(".tar")]) == first["written"]
    assert sorted(n for n in on_store if n.startswith(".progress/")) == sorted(
        f".progress/{n}.json" for n in on_store if n.endswith(".tar"))
    assert not list(shards.shard_dir(nodes[0], "syn", version).glob("*.tar"))  # nothing stays on the node's disk
    second = generate.generate(root=nodes[1], part="1/2", store=url, **common)
    assert second["complete"] and second["written"] == one["units"] - first["written"]
    # The project (a third machine) assembles: every unit is on the store, nothing is sampled again.
    final = generate.generate(root=root, store=url, **common)
    assert final["complete"] and final["written"] == 0
    local = shards.shard_dir(reference, "syn", version)
    for name in ["index.json", *sorted(p.name for p in local.glob("*.tar"))]:
        assert store.read_bytes(f"{folder}/{name}") == (local / name).read_bytes(), name
    assert manifest.read(root, "syn").equals(manifest.read(reference, "syn"))
    assert manifest.read_meta(root, "syn")["store"] == url and verify_dataset(root, "syn")[0] == []
    # A receipt whose shard is gone from the store is redone, not trusted.
    fs, path = store.filesystem(f"{folder}/syn-000000.tar")
    fs.rm(path)
    redo = generate.generate(root=nodes[0], part="0/2", store=url, **common)
    assert redo["written"] == 1 and store.read_bytes(f"{folder}/syn-000000.tar") == (local / "syn-000000.tar").read_bytes()


@pytest.mark.slow
def test_share_export_from_the_store_and_import_to_it(share_project, tmp_path, s3):
    from cxrsynth.share import export as export_lib
    from cxrsynth.share import package

    url = f"{s3}/site"
    local, remote = share_project.copy(tmp_path / "local"), share_project.copy(tmp_path / "remote")
    for name in ("cxp", "syn"):
        assert url in remote.cli("push", name, url)
    assert not list((remote.root / "data" / "shards").rglob("*.tar"))
    assert verify_dataset(remote.root, "syn")[0] == []
    packages, secret = {}, tmp_path / "secret"
    secret.write_bytes(b"0123456789abcdef0123")  # one key secret: repeatable exports
    for side, project in (("local", local), ("remote", remote)):
        out = tmp_path / side / "syn_pkg"
        config = export_lib.ExportConfig(audit=plain_audit(), shard_size=8, audit_out=tmp_path / side / "audit",
                                         secret_file=secret)
        export_lib.export(project.root, "syn", out, config)
        packages[side] = out
    files = {side: {e["path"]: e["sha256"] for e in package.read_index(p)["files"]} for side, p in packages.items()}
    tars = {side: {k: v for k, v in f.items() if k.endswith(".tar")} for side, f in files.items()}
    assert tars["local"] and tars["local"] == tars["remote"]  # the same package, audit included, from the store
    out = remote.cli("share", "import", packages["remote"], "--name", "received", "--copy", "--store", f"{url}/in")
    assert f"{url}/in" in out
    assert manifest.read_meta(remote.root, "received")["store"] == f"{url}/in"
    assert "shard(s) match" in remote.cli("verify", "received")
    from cxrsynth.share import importer

    with pytest.raises(importer.ShareError, match="add --copy"):
        importer.import_package(remote.root, packages["remote"], "again", store=f"{url}/in")


@pytest.mark.slow
def test_dvc_push_and_pull_through_an_s3_remote(tmp_path, s3, s3_server):
    """The synthetic data's DVC remote on the S3 server (dvc-s3): push, drop every local copy, pull, same bytes."""
    import os
    import shutil
    import subprocess
    import sys

    pytest.importorskip("dvc_s3")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}

    def sh(*args, cwd):
        result = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, f"{args}:\n{result.stdout}\n{result.stderr}"
        return result.stdout

    repo = tmp_path / "repo"
    shutil.copytree(_site(tmp_path / "site"), repo)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "init.defaultBranch=main"]
    sh(*git, "init", "-q", cwd=repo)
    sh("dvc", "init", "-q", cwd=repo)
    sh("dvc", "remote", "add", "-d", "synthetic", f"{s3}/dvc", cwd=repo)
    sh("dvc", "remote", "modify", "synthetic", "endpointurl", s3_server.url, cwd=repo)  # the server, not credentials
    sh("dvc", "add", "data/shards/cxp", cwd=repo)
    before = {p.relative_to(repo).as_posix(): p.read_bytes() for p in sorted((repo / "data/shards/cxp").rglob("*.tar"))}
    sh("dvc", "push", cwd=repo)
    shutil.rmtree(repo / "data/shards/cxp")
    shutil.rmtree(repo / ".dvc" / "cache")
    sh("dvc", "pull", cwd=repo)
    after = {p.relative_to(repo).as_posix(): p.read_bytes() for p in sorted((repo / "data/shards/cxp").rglob("*.tar"))}
    assert before and after == before
    assert verify_dataset(repo, "cxp")[0] == []


@pytest.mark.slow
def test_classifier_trains_from_the_store_to_the_same_weights(tmp_path, s3):
    """`classifier train` with 2 DataLoader workers on a dataset on the store: the weights of the same run on disk."""
    from conftest import tiny_classifier

    remote, local = _site(tmp_path / "remote", f"{s3}/p"), _site(tmp_path / "local")
    weights = {}
    for tag, root in (("remote", remote), ("local", local)):
        out = tiny_classifier(root, tmp_path / f"clf_{tag}", "--workers", 2, image_size=24)
        weights[tag] = (out / "model.safetensors").read_bytes()
    assert weights["remote"] == weights["local"]


def test_generator_order_streams_the_same_from_the_store(tmp_path, s3):
    """The generator's loader (one shuffle buffer, this process) reads the store's shards as the disk's."""
    remote, local = _site(tmp_path / "remote", f"{s3}/p"), _site(tmp_path / "local")
    config = loader.LoaderConfig(batch_size=4, image_size=24, augment=None, seed=1, order="buffer", cond=True, uint8=True)
    got, want = ([b["key"] for b in loader.ShardLoader(r, loader.select(r, "cxp", "train"), config).batches(2)]
                 for r in (remote, local))
    assert got == want and len(got) > 1


def test_file_store_then_moved_to_an_http_server(tmp_path):
    """A ``file://`` store (a shared disk), then the same objects served over plain HTTP (no ranged reads,
    read-only): ``push`` checks them there and changes only the manifest's ``store``; readers follow."""
    import functools
    import http.server
    import threading

    from cxrsynth import publish

    folder = tmp_path / "shared"
    root = _site(tmp_path, f"file://{folder}")
    before = manifest.read(root, "cxp")
    assert verify_dataset(root, "cxp")[0] == [] and (folder / "data" / "shards" / "cxp").is_dir()
    pngs = dict(shards.images(root, before))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        assert publish.move_to_store(root, "cxp", url)[0].startswith(url)
        assert manifest.read_meta(root, "cxp")["store"] == url
        assert manifest.read(root, "cxp").equals(before)  # the rows are not rewritten
        assert verify_dataset(root, "cxp")[0] == []
        assert dict(shards.images(root, before)) == pngs
        rows = loader.select(root, "cxp", "train")
        data = loader.ShardLoader(root, rows, loader.LoaderConfig(batch_size=4, image_size=24, workers=2, streams=4))
        assert sum(len(b["key"]) for b in data.batches()) == len(rows) // 4 * 4
        with pytest.raises(publish.PublishError, match="missing index"):
            publish.move_to_store(root, "cxp", f"{url}/elsewhere")  # nothing there: refused, the record kept
        assert manifest.read_meta(root, "cxp")["store"] == url
    finally:
        server.shutdown()


class _CuttingProxy:
    """A TCP proxy to the S3 server that, while armed, cuts each connection that has passed ``after``
    bytes server → client, ``times`` times (a network that drops a shard's download midway)."""

    def __init__(self, port: int, after: int, times: int = 1) -> None:
        import socket
        import threading

        self.port, self.after, self.times, self.armed, self.cuts = port, after, times, False, 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket
        import threading

        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.port))
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, source, sink, downstream: bool) -> None:
        import socket

        passed = 0
        try:
            while data := source.recv(1024):
                passed += len(data)
                if downstream and self.armed and passed > self.after:
                    self.cuts += 1
                    self.armed = self.cuts < self.times
                    for s in (source, sink):
                        s.shutdown(socket.SHUT_RDWR)
                    return
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.close()
                except OSError:
                    pass

    def close(self) -> None:
        self.listener.close()


@pytest.mark.parametrize("times", [1, pytest.param(6, marks=pytest.mark.slow)])
def test_a_dropped_download_is_retried_to_the_same_bytes(tmp_path, s3, s3_server, monkeypatch, times):
    """Cut once, the client's own retries read it again; cut 6 times, more than s3fs retries (5),
    the reader reopens the object at the byte it had reached (ranged read) and goes on (with
    ``ATTEMPTS = 1`` the 6-cut case fails: these are the reader's retries)."""
    import fsspec.config

    root = _site(tmp_path, f"{s3}/p")
    frame = manifest.read(root, "cxp")
    want = dict(shards.images(root, frame))
    monkeypatch.setattr(store, "BLOCK", 4096)  # ranged reads of 4 KiB: cuts fall inside the object, not only at its start
    proxy = _CuttingProxy(s3_server.port, after=4000, times=times)
    try:
        monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": proxy.url})
        monkeypatch.setattr(store, "_INDEXES", {})
        store.index_entries(f"{s3}/p/data/shards/cxp/{manifest.read_meta(root, 'cxp')['split_of']}")  # before arming
        proxy.armed = True
        assert dict(shards.images(root, frame)) == want  # a shard's download was cut, and read again
        assert proxy.cuts == times
        assert verify_dataset(root, "cxp")[0] == []
    finally:
        proxy.close()
