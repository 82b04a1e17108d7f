"""DDP on CPU: ``torchrun --nproc-per-node 2`` (gloo) classifier training; ranks read disjoint data."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import chexpert_rows, ingest_site, torchrun

from cxrsynth import labels, manifest

pytestmark = [pytest.mark.slow, pytest.mark.skipif(sys.platform != "linux", reason="torchrun + gloo on Linux")]


def _torchrun(*args, cwd: Path, timeout: int = 300) -> str:
    return torchrun(*args, cwd=cwd, timeout=timeout)


def test_torchrun_classifier_train_two_ranks_read_disjoint_data(tmp_path):
    root = ingest_site(tmp_path, chexpert_rows(n_patients=12, studies=2, uncertain=False), shard_size=7,
                       split={"tune": 0.25, "seed": 0})
    frame = manifest.read(root, "cxp")
    n_train = int(((frame["split"] == "train") & ~labels.has_uncertain(frame)).sum())
    batch = 2
    steps = n_train // (2 * batch)  # the fixed epoch length of each rank
    assert steps >= 3
    out = tmp_path / "cls-ddp"
    output = _torchrun("classifier", "train", "--data", "cxp", "--preset", "small", "--epochs", 1, "--batch", batch,
                       "--image-size", 32, "--workers", 2, "--device", "cpu", "--out", out, "--root", root, cwd=tmp_path)
    assert "written to" in output
    meta = json.loads((out / "classifier.json").read_text())
    assert meta["runtime"]["world"] == 2 and meta["trained_steps"] == steps and len(meta["history"]) == 1
    seen = meta["data_seen"]
    assert seen["images_per_rank"] == seen["distinct_keys_per_rank"] == [steps * batch] * 2
    assert seen["distinct_keys"] == 2 * steps * batch  # disjoint shares: 2 x 6 distinct images, not 6
    assert meta["best"]["tune_loss"] > 0 and (out / "model.safetensors").is_file()
