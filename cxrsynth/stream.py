"""Stream a dataset's shards as training batches (generator and classifier training).

The manifest decides *which* samples (split, no uncertain findings); the shards supply
the pixels. The sample order is deterministic for a seed and epoch: shards in a seeded
order, then a seeded shuffle buffer. Samples are dealt round-robin to the
``world * workers`` streams (DDP ranks × DataLoader workers) *before* decoding, so every
PNG is decoded once, by the stream that uses it.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd

from cxrsynth import labels, manifest
from cxrsynth.config import SHUFFLE_BUFFER
from cxrsynth.errors import CxrsynthError


def dataset_version(root: str | Path, name: str) -> str:
    """The version of dataset ``name`` (its content hash or given name)."""
    return str(manifest.read_meta(root, name)["version"])


def select(root: str | Path, name: str, split: str | None, exclude_uncertain: bool = True) -> pd.DataFrame:
    """Manifest rows of ``split`` that have shards, without uncertain findings if asked."""
    frame = manifest.read(root, name)
    keep = frame["shard"].notna().to_numpy(dtype=bool).copy()
    if split is not None:
        keep &= (frame["split"] == split).fillna(False).to_numpy(dtype=bool)
    if exclude_uncertain:
        keep &= ~labels.has_uncertain(frame)
    return frame.loc[keep].reset_index(drop=True)


def _raw_samples(root: Path, shard_paths: list[str]) -> Iterator[dict]:
    import webdataset as wds

    for path in shard_paths:
        with open(root / path, "rb") as stream:
            files = wds.tariterators.tar_file_expander([{"stream": stream, "url": str(path)}])
            yield from wds.tariterators.group_by_keys(files)


def samples(
    root: str | Path,
    frame: pd.DataFrame,
    *,
    train: bool,
    seed: int,
    epoch: int = 0,
    stream: int = 0,
    streams: int = 1,
    shuffle_buffer: int = SHUFFLE_BUFFER,
) -> Iterator[tuple[str, bytes]]:
    """Yield ``(key, png_bytes)`` of the rows in ``frame`` for one of ``streams`` streams."""
    root = Path(root)
    wanted = set(frame["key"].astype(str))
    shard_paths = sorted(frame["shard"].astype(str).unique())
    rng = random.Random(f"{seed}:{epoch}")
    if train:
        rng.shuffle(shard_paths)
    buffer: list[tuple[str, bytes]] = []
    position = 0

    def mine() -> bool:
        nonlocal position
        ours = position % streams == stream
        position += 1
        return ours

    for sample in _raw_samples(root, shard_paths):
        key = sample["__key__"]
        if key not in wanted:
            continue
        item = (key, sample["png"])
        if not train:
            if mine():
                yield item
            continue
        buffer.append(item)
        if len(buffer) >= shuffle_buffer:
            j = rng.randrange(len(buffer))
            buffer[j], buffer[-1] = buffer[-1], buffer[j]
            out = buffer.pop()
            if mine():
                yield out
    rng.shuffle(buffer)
    for out in buffer:
        if mine():
            yield out


def decode(png: bytes, size: int, key: str | None = None, shard: str | None = None) -> np.ndarray:
    """PNG bytes → ``(size, size) uint8`` (bilinear resize when the shard size differs).

    Raises:
        CxrsynthError: the bytes are not a readable PNG (naming ``key`` and ``shard`` when given).
    """
    import io

    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(png)) as im:
            im = im.convert("L")
            if im.size != (size, size):
                im = im.resize((size, size), Image.Resampling.BILINEAR)
            return np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:  # PIL's ways of saying "not a PNG"
        where = f"sample {key!r}" + (f" in {shard}" if shard else "") if key else "a sample"
        raise CxrsynthError(f"{where}: corrupt PNG ({type(exc).__name__}: {' '.join(str(exc).split())[:120]}); "
                            f"cxrsynth verify names every damaged shard") from None


def batches(
    root: str | Path,
    name: str,
    split: str | None,
    batch_size: int,
    size: int,
    *,
    train: bool,
    seed: int,
    rank: int = 0,
    world: int = 1,
    exclude_uncertain: bool = True,
    epoch: int = 0,
    frame: pd.DataFrame | None = None,
) -> Iterator[dict]:
    """Batches ``{"image": uint8 (B, 1, size, size), "cond": float32 (B, 22), "key": list}``.

    Args:
        root: Project root.
        name: Dataset name.
        split: Split to read (``None``: all rows).
        batch_size: Images per batch (the last batch may be smaller unless ``train``).
        size: Image side; shards are resized on the fly when they differ.
        train: Shuffle (seeded) and drop the last incomplete batch.
        seed: Seed of the order.
        rank, world: This process's share of the stream (DDP).
        exclude_uncertain: Drop images with any uncertain finding (training, as the paper).
        epoch: Mixed into the seed so each epoch has its own order.
        frame: Pre-selected manifest rows (skips :func:`select`).
    """
    import torch

    frame = select(root, name, split, exclude_uncertain) if frame is None else frame
    cond = labels.conditioning_vectors(frame)
    row_of = {k: i for i, k in enumerate(frame["key"].astype(str))}
    shard_of = dict(zip(frame["key"].astype(str), frame["shard"].astype(str)))
    keys: list[str] = []
    images: list[np.ndarray] = []
    for key, png in samples(root, frame, train=train, seed=seed, epoch=epoch, stream=rank, streams=world):
        keys.append(key)
        images.append(decode(png, size, key, shard_of.get(key)))
        if len(keys) == batch_size:
            yield _collate(keys, images, cond, row_of, torch)
            keys, images = [], []
    if keys and not train:
        yield _collate(keys, images, cond, row_of, torch)


def _collate(keys, images, cond, row_of, torch) -> dict:
    rows = [row_of[k] for k in keys]
    return {
        "image": torch.from_numpy(np.stack(images)[:, None]),  # (B, 1, H, W) uint8
        "cond": torch.from_numpy(cond[rows]),  # (B, 22) float32
        "key": list(keys),
    }
