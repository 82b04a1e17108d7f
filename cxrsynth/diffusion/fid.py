"""The generator side of ``cxrsynth generator fid``: a dataset's images as uint8 batches.

The Fréchet distances themselves (FID with Inception, the classifier distance) and their
feature extractors live in :mod:`cxrsynth.evaluate.frechet`; a trained classifier's
features are :meth:`cxrsynth.classify.model.Classifier.features`.
"""

from __future__ import annotations

from pathlib import Path


def dataset_images(root: Path, name: str, split: str | None, size: int, batch: int = 64, limit: int | None = None):
    """uint8 image batches (B, 1, size, size) of a dataset's shards, in key order."""
    from cxrsynth import stream

    frame = stream.select(root, name, split, exclude_uncertain=False).sort_values("key")
    if limit is not None:
        frame = frame.iloc[:limit]
    for b in stream.batches(root, name, split, batch, size, train=False, seed=0, exclude_uncertain=False, frame=frame):
        yield b["image"]
