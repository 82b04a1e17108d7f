"""The generator side of ``cxrsynth generator fid``: a dataset's images as uint8 batches.

The Fréchet distances themselves (FID with Inception, the classifier distance) and their
feature extractors live in :mod:`cxrsynth.evaluate.frechet`; a trained classifier's
features are :meth:`cxrsynth.classify.model.Classifier.features`.
"""

from __future__ import annotations

from pathlib import Path


def dataset_images(root: Path, name: str, split: str | None, size: int, batch: int = 64, limit: int | None = None):
    """uint8 image batches (B, 1, size, size) of a dataset's shards (the first ``limit`` keys), in shard order."""
    from cxrsynth import loader

    frame = loader.select(root, name, split, exclude_uncertain=False).sort_values("key")
    if limit is not None:
        frame = frame.iloc[:limit]
    config = loader.LoaderConfig(batch_size=batch, image_size=size, train=False, streams=1, uint8=True)
    for b in loader.ShardLoader(root, frame, config).batches():  # one stream: shards sorted, tar order
        yield b["image"]
