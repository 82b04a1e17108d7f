"""DDP on CPU (gloo) classifier training: ``torchrun --nproc-per-node 2`` ranks read disjoint data,
and two "nodes" of one process each (``--nnodes 2``, c10d rendezvous on 127.0.0.1), streaming the shards
from a local S3 server, give the same weights, byte for byte: results depend on the world size and the
ranks, not on where ranks run or where the shards are."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import chexpert_rows, ingest_site, torchrun, torchrun_two_nodes

from cxrsynth import labels, manifest

pytestmark = [pytest.mark.slow, pytest.mark.skipif(sys.platform != "linux", reason="torchrun + gloo on Linux")]
BATCH = 2


def _train_args(root: Path, out: Path) -> list:
    return ["classifier", "train", "--data", "cxp", "--preset", "small", "--epochs", 1, "--batch", BATCH,
            "--image-size", 32, "--workers", 2, "--device", "cpu", "--out", out, "--root", root]


@pytest.fixture(scope="module")
def one_node(tmp_path_factory) -> tuple[Path, Path, int, str]:
    """A 24-image project and a classifier trained on it by 1 node x 2 processes."""
    tmp = tmp_path_factory.mktemp("ddp-classifier")
    root = ingest_site(tmp, chexpert_rows(n_patients=12, studies=2, uncertain=False), shard_size=7,
                       split={"tune": 0.25, "seed": 0})
    frame = manifest.read(root, "cxp")
    n_train = int(((frame["split"] == "train") & ~labels.has_uncertain(frame)).sum())
    out = tmp / "cls-ddp"
    output = torchrun(*_train_args(root, out), cwd=tmp, timeout=300)
    return root, out, n_train, output


def test_torchrun_classifier_train_two_ranks_read_disjoint_data(one_node):
    root, out, n_train, output = one_node
    steps = n_train // (2 * BATCH)  # the fixed epoch length of each rank
    assert steps >= 3
    assert "written to" in output
    meta = json.loads((out / "classifier.json").read_text())
    assert meta["runtime"]["world"] == 2 and meta["trained_steps"] == steps and len(meta["history"]) == 1
    seen = meta["data_seen"]
    assert seen["images_per_rank"] == seen["distinct_keys_per_rank"] == [steps * BATCH] * 2
    assert seen["distinct_keys"] == 2 * steps * BATCH  # disjoint shares: 2 x 6 distinct images, not 6
    assert meta["best"]["tune_loss"] > 0 and (out / "model.safetensors").is_file()


def test_two_nodes_streaming_from_the_object_store_train_the_same_weights(one_node, tmp_path, s3, s3_server, monkeypatch):
    """Two nodes, each rank streaming its own share of the shards from the S3 server, train the weights
    that one node with two processes trained from the local disk, byte for byte."""
    import shutil

    from cxrsynth.publish import move_to_store

    root, out, _, _ = one_node
    remote = shutil.copytree(root, tmp_path / "project")
    move_to_store(remote, "cxp", f"{s3}/p")
    assert not list((remote / "data" / "shards").rglob("*.tar"))  # the shards are on the store only
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server.url)  # how the launched processes find the server
    nodes = tmp_path / "cls-2nodes"
    output = torchrun_two_nodes(*_train_args(remote, nodes), cwd=tmp_path, timeout=300)
    assert "written to" in output
    assert (nodes / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    one, two = (json.loads((d / "classifier.json").read_text()) for d in (out, nodes))
    assert two["runtime"]["world"] == 2 and two["data_seen"] == one["data_seen"]
    assert two["classifier_id"] == one["classifier_id"] and two["history"] == one["history"]


def test_torchrun_predict_writes_the_single_process_file(one_node, tmp_path):
    """`classifier predict` under torchrun: each of 2 ranks predicts half the rows, rank 0 writes the file one
    process writes, byte for byte (parquet, metadata included)."""
    import torch
    from conftest import cli

    from cxrsynth.classify.predict import read

    root, out, _, _ = one_node
    args = ["classifier", "predict", "--model", out, "--data", "cxp", "--split", "all", "--batch", 5, "--device", "cpu"]
    output = torchrun(*args, "--out", tmp_path / "ranks.parquet", "--root", root, cwd=tmp_path, timeout=300)
    assert output.count("predictions of cxp/all") == 1  # rank 0 alone reports and writes
    threads = torch.get_num_threads()
    try:
        cli(root, *args, "--out", tmp_path / "one.parquet", "--threads", 1)  # torchrun's ranks run one thread each
    finally:
        torch.set_num_threads(threads)
    frame, meta = read(tmp_path / "ranks.parquet")
    assert len(frame) == len(manifest.read(root, "cxp")) == meta["rows"] and frame["key"].is_monotonic_increasing
    assert (tmp_path / "ranks.parquet").read_bytes() == (tmp_path / "one.parquet").read_bytes()
