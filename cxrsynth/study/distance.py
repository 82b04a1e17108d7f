"""Fréchet distance of a synthetic replica to its real source, in a real-trained classifier's features.

No Inception weights ship with the demo (nothing is downloaded), so the study measures
each replica where it matters for the experiment: in the pooled features of the study's
own real-only classifier (the ``supplement_k0`` cell, trained on the real training split).
It compares the replica's training-split images with the real training images they were
conditioned on, with the exact Fréchet distance of :func:`cxrsynth.evaluate.frechet.frechet_distance`.
Given a local Inception file, ``cxrsynth generator fid`` gives the usual FID as well.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from cxrsynth import __version__
from cxrsynth.study.params import StudyParams
from cxrsynth.study.plan import DISTANCE_DIR, baseline, replica_dataset


def pooled_features(model_dir: Path, root: Path, name: str, split: str, device: str | None = None) -> np.ndarray:
    """(N, D) pooled features (the layer before the head) of ``name``/``split``'s images."""
    import torch

    from cxrsynth import loader, runtime
    from cxrsynth.classify.model import load_classifier

    dev = runtime.device(device)
    model, meta = load_classifier(model_dir, dev)
    rows = loader.select(root, name, split, exclude_uncertain=False)
    data = loader.ShardLoader(root, rows, loader.LoaderConfig(
        batch_size=64, image_size=int(meta["config"]["image_size"]), train=False, augment=None))
    out = []
    with torch.no_grad():
        for batch in data.batches(0):
            out.append(model.features(batch["image"].to(dev)).float().cpu().numpy())
    return np.concatenate(out)


def replica_distance(root: str | Path, params: StudyParams | dict[str, Any], replica: str, device: str | None = None) -> dict:
    """Fréchet distance of replica ``replica`` (training split) to the real training split; writes ``metrics/distance/<replica>.json``."""
    from cxrsynth.evaluate.frechet import feature_distance

    root = Path(root)
    params = StudyParams.of(params)
    model_dir = baseline(params, "supplement").directory(root) / "model"
    real_name = params.study.real
    syn_name = replica_dataset(params, replica)
    real = pooled_features(model_dir, root, real_name, "train", device)
    syn = pooled_features(model_dir, root, syn_name, "train", device)
    half = len(real) // 2  # the distance between two halves of the real set: the floor a replica is read against
    result = {
        "replica": replica, "dataset": syn_name, "guidance": params.guidance(replica),
        "feature": "classifier", "classifier": str(model_dir.relative_to(root)),
        "fid": feature_distance(real, syn),
        "real_halves": feature_distance(real[:half], real[half:]),
        "n_real": int(len(real)), "n_synthetic": int(len(syn)),
    }
    path = root / DISTANCE_DIR / f"{replica}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**result, "cxrsynth": __version__}, indent=1, sort_keys=True) + "\n")
    return result
