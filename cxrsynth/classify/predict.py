"""Predictions of a trained classifier: one probability per finding per image, in parquet.

``predict(model_dir, root, name, split)`` streams every selected row — uncertain findings
included (evaluation masks them per finding) — resized to the classifier's input size,
never augmented, and returns a frame sorted by key: ``key``, ``dataset``, then one
float32 sigmoid probability per finding named as :data:`cxrsynth.labels.FINDING_COLUMNS`.
:func:`write` stores it with the parquet schema metadata ``cxrsynth`` = JSON
``{"model": <classifier.json>, "data": {"name", "version", "split"}, "rows": n}``, so
whatever reads the predictions knows what the model was trained on and what it predicted.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from cxrsynth import loader, manifest, runtime
from cxrsynth.classify.model import load_classifier
from cxrsynth.classify.train import autocast, fast_paths, to_device
from cxrsynth.errors import CxrsynthError
from cxrsynth.labels import FINDING_COLUMNS

METADATA_KEY = b"cxrsynth"


def predict(
    model_dir: str | Path,
    root: str | Path,
    name: str,
    split: str | None = "test",
    *,
    batch_size: int | None = None,
    workers: int = 0,
    device: str | None = None,
    progress: Callable[[int], None] | None = None,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Predict every selected row of ``name``/``split`` with the classifier in ``model_dir``.

    Args:
        model_dir: A ``classifier train`` output (``model.safetensors`` + ``classifier.json``).
        root: Project root.
        name: Dataset or mix to predict (any site's).
        split: Split (``None``: every row).
        batch_size: Images per forward (default: the training batch size).
        workers: Loader worker processes.
        device: Default CUDA when available.
        progress: Called with the number of images of each batch done.

    Under ``torchrun`` each rank predicts a disjoint share of the rows (the loader's
    inference split) and every rank returns all of them, in the same key order as one
    process; the CLI writes the file on rank 0 only.

    Returns:
        ``(frame, metadata)``: predictions sorted by key and the parquet metadata dict.

    Raises:
        CxrsynthError: A selected row got no prediction, or one got two.
    """
    dev = runtime.device(device)
    fast = fast_paths(dev)
    model, meta = load_classifier(model_dir, dev)
    if fast["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    config = meta["config"]
    rows = loader.select(root, name, split, exclude_uncertain=False)
    ranks = runtime.distributed()  # under torchrun: each rank predicts its own share of the rows
    data = loader.ShardLoader(root, rows, loader.LoaderConfig(  # the order does not matter: one stream per worker
        batch_size=batch_size or int(config["batch_size"]), image_size=int(config["image_size"]), train=False,
        augment=None, workers=workers, streams=max(1, workers), pin_memory=fast["pin_memory"]),
        rank=ranks.rank, world=ranks.world)
    keys: list[str] = []
    datasets: list[str] = []
    probs: list[torch.Tensor] = []
    with torch.no_grad():
        for batch in data.batches(0):
            with autocast(dev, fast):
                logits = model(to_device(batch["image"], dev, fast))  # (B, 14)
            probs.append(torch.sigmoid(logits.float()).cpu())
            keys += batch["key"]
            datasets += batch["dataset"]
            if progress is not None:
                progress(len(batch["key"]))
    p = torch.cat(probs).numpy().astype(np.float32) if probs else np.zeros((0, len(FINDING_COLUMNS)), np.float32)
    if ranks.world > 1:  # every rank gets every share (gloo or nccl: picklable objects)
        import torch.distributed as dist

        shares: list[Any] = [None] * ranks.world
        dist.all_gather_object(shares, (keys, datasets, p))
        keys = [k for share in shares for k in share[0]]
        datasets = [d for share in shares for d in share[1]]
        p = np.concatenate([share[2] for share in shares])
    want = rows["key"].astype(str)
    if len(keys) != len(want) or set(keys) != set(want):
        missing = sorted(set(want) - set(keys))[:3]
        raise CxrsynthError(f"{name}/{split}: {len(keys)} predictions for {len(want)} rows (missing e.g. {missing})")
    frame = pd.DataFrame({"key": pd.array(keys, dtype="string"), "dataset": pd.array(datasets, dtype="string")})
    for k, column in enumerate(FINDING_COLUMNS):
        frame[column] = p[:, k]
    frame = frame.sort_values("key", kind="stable").reset_index(drop=True)
    metadata = {
        "model": meta,
        "data": {"name": name, "version": str(manifest.read_meta(root, name).get("version")), "split": split},
        "rows": len(frame),
    }
    return frame, metadata


def schema():
    """The predictions' arrow schema: key, dataset, 14 float32 probabilities."""
    import pyarrow as pa

    return pa.schema([("key", pa.string()), ("dataset", pa.string()), *[(c, pa.float32()) for c in FINDING_COLUMNS]])


def write(frame: pd.DataFrame, metadata: dict[str, Any], path: str | Path) -> Path:
    """Write predictions atomically as parquet with ``metadata`` under the schema key ``cxrsynth``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pandas(frame, schema=schema(), preserve_index=False)
    table = table.replace_schema_metadata({METADATA_KEY: json.dumps(metadata, sort_keys=True).encode()})
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, path)
    return path


def read(path: str | Path) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Predictions and their metadata (the inverse of :func:`write`)."""
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise CxrsynthError(f"predictions file not found: {path}")
    try:
        table = pq.read_table(path)
    except (OSError, ValueError) as exc:  # ArrowInvalid is a ValueError: not parquet, truncated
        raise CxrsynthError(f"{path} is not a predictions parquet: {' '.join(str(exc).split())[:200]}") from None
    try:
        meta = json.loads((table.schema.metadata or {}).get(METADATA_KEY, b"{}").decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CxrsynthError(f"{path}: its cxrsynth metadata is not UTF-8 JSON ({type(exc).__name__})") from None
    if not isinstance(meta, dict):
        raise CxrsynthError(f"{path}: its prediction metadata is {type(meta).__name__}, not a JSON object")
    return table.to_pandas(), meta
