"""``cxrsynth verify``: a dataset's shards against its index and manifest."""

from __future__ import annotations

from pathlib import Path

from cxrsynth import manifest, shards


def verify_dataset(root: str | Path, name: str) -> tuple[list[str], int]:
    """Re-hash every shard of dataset ``name``; return ``(problems, shards checked)``.

    Checks that ``index.json`` exists, every shard it lists exists with the recorded
    size and sha256, and that the manifest's rows per shard match the index counts.
    """
    frame = manifest.read(root, name)
    meta = manifest.read_meta(root, name)
    if meta.get("labels_only"):
        return [], 0  # labels-only: nothing to verify
    directory = shards.shard_dir(root, name, meta["version"])
    counts = {Path(s).name: int(c) for s, c in frame["shard"].value_counts().items()}
    problems = shards.verify(directory, counts)
    checked = len(counts)
    return problems, checked
