"""DDP on CPU: ``torchrun --nproc-per-node 2`` (gloo) for generator training and generation, and
two "nodes" of one process each (``--nnodes 2``, c10d rendezvous on 127.0.0.1) for training.

Each test launches two real processes with torchrun on a tiny ingested project (micro
preset, 32 px). Training must finish, write one generator, and its ``data_seen``
record must show that the two ranks consumed disjoint images. Generation split over
two ranks must give exactly the bytes (shards, index, manifest) of a single process.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from conftest import chexpert_rows, ingest_site, torchrun, torchrun_two_nodes
from typer.testing import CliRunner

from cxrsynth import manifest
from cxrsynth.cli import app

pytestmark = [pytest.mark.slow, pytest.mark.skipif(sys.platform != "linux", reason="torchrun + gloo on Linux")]


def _torchrun(*args, cwd: Path, timeout: int = 240) -> str:
    return torchrun(*args, cwd=cwd, timeout=timeout)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """20 images (no uncertain findings) at 32 px, split ~16 train / 4 tune."""
    tmp = tmp_path_factory.mktemp("ddp")
    return tmp, ingest_site(tmp, chexpert_rows(n_patients=10, studies=2, uncertain=False), split={"tune": 0.2, "seed": 0})


BATCH, STEPS = 2, 3


def _train_args(root: Path, out: Path) -> list:
    return ["generator", "train", "--data", "cxp", "--preset", "micro", "--steps", STEPS, "--batch", BATCH,
            "--warmup", 1, "--save-every", 2, "--device", "cpu", "--out", out, "--root", root]


@pytest.fixture(scope="module")
def trained(project) -> Path:
    """A generator trained by 1 node x 2 processes."""
    tmp, root = project
    out = tmp / "gen-ddp"
    _torchrun(*_train_args(root, out), cwd=tmp)
    return out


def test_torchrun_train_two_ranks_read_disjoint_data(project, trained):
    tmp, root = project
    n_train = int(manifest.query(root, "SELECT count(*) AS n FROM cxp WHERE split = 'train'")["n"].iloc[0])
    batch, steps, out = BATCH, STEPS, trained
    assert n_train // 2 // batch > steps  # the run stays inside one epoch, where shares are disjoint
    meta = json.loads((out / "generator.json").read_text())
    assert meta["trained_steps"] == steps and meta["world"] == 2
    seen = meta["data_seen"]
    assert seen["images_per_rank"] == [steps * batch] * 2
    assert seen["distinct_keys_per_rank"] == [steps * batch] * 2
    # Disjoint shares: the union is as large as the two shares together (6 + 6, not 6).
    assert seen["distinct_keys"] == 2 * steps * batch
    assert len(list(out.glob("*.safetensors"))) == 1
    ckpt = out / "checkpoints" / meta["run_id"]  # the run's own directory (world 2 is part of its id)
    assert [p.name for p in (out / "checkpoints").iterdir()] == [meta["run_id"]]
    assert (ckpt / "latest.pt").is_file() and sorted(p.name for p in ckpt.glob("step-*.pt")) == [
        "step-00000002.pt", "step-00000003.pt"]


def test_two_nodes_train_the_same_generator_as_one_node_with_two_processes(project, trained, tmp_path):
    """``--nnodes 2 --nproc-per-node 1`` (c10d on 127.0.0.1): the same weights, byte for byte, and the same data seen."""
    _, root = project
    out = tmp_path / "gen-2nodes"
    torchrun_two_nodes(*_train_args(root, out), cwd=tmp_path)
    (one,), (two,) = (sorted(d.glob("*.safetensors")) for d in (trained, out))
    assert one.name == two.name and one.read_bytes() == two.read_bytes()
    a, b = (json.loads((d / "generator.json").read_text()) for d in (trained, out))
    assert a == b  # the same generator id, world, steps and data seen


def test_torchrun_generate_matches_one_process(project):
    tmp, root = project
    gen = tmp / "gen-one"
    result = CliRunner().invoke(app, ["generator", "train", "--data", "cxp", "--preset", "micro", "--steps", "1",
                                      "--batch", "2", "--warmup", "1", "--device", "cpu", "--out", str(gen),
                                      "--root", str(root)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    # Same project twice: one for the two ranks, one for a single process.
    solo = tmp / "proj-solo"
    shutil.copytree(root, solo)
    args = ["generate", "--generator", gen, "--conditions", "cxp", "--name", "syn", "--replicas", 2,
            "--sampler", "dpmpp", "--steps", 2, "--batch", 4, "--shard-size", 5, "--device", "cpu"]
    output = _torchrun(*args, "--root", root, cwd=tmp)
    assert "complete" in output
    # The ranks run with torchrun's OMP_NUM_THREADS=1; CPU kernels round by thread count, so the
    # single process holds it equal (the version records it: another count is another version).
    import torch

    threads = torch.get_num_threads()
    try:
        result = CliRunner().invoke(app, [str(a) for a in args] + ["--threads", "1", "--root", str(solo)], catch_exceptions=False)
    finally:
        torch.set_num_threads(threads)
    assert result.exit_code == 0 and "complete" in result.output, result.output
    meta = manifest.read_meta(root, "syn")
    version = meta["version"]
    assert version == manifest.read_meta(solo, "syn")["version"]
    assert meta["numerics"]["device"] == "cpu" and meta["numerics"]["threads"] == 1

    def files(project_root: Path) -> dict[str, bytes]:
        d = project_root / "data" / "shards" / "syn" / version
        out = {p.name: p.read_bytes() for p in d.iterdir() if p.is_file()}
        out["manifest"] = manifest.manifest_path(project_root, "syn").read_bytes()
        return out

    two, one = files(root), files(solo)
    assert sorted(two) == sorted(one) and len([n for n in two if n.endswith(".tar")]) >= 3
    for name in one:
        assert two[name] == one[name], name
    index = json.loads((root / "data" / "shards" / "syn" / version / "index.json").read_text())
    assert index["samples"] == len(manifest.read(root, "syn"))
