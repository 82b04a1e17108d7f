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
    if meta.get("kind") == "mix":  # a mix owns no shards: verify the datasets it draws from
        problems, checked = [], 0
        for source, version in meta["sources"].items():
            now = manifest.read_meta(root, source).get("version")
            if now != version:
                problems.append(f"{name} was mixed from {source}@{version}, which is now @{now}")
            found, n = verify_dataset(root, source)
            problems += found
            checked += n
        return problems, checked
    if meta.get("labels_only"):
        return [], 0  # labels-only: nothing to verify
    directory = shards.shard_dir(root, name, meta["version"])
    counts = {Path(s).name: int(c) for s, c in frame["shard"].value_counts().items()}
    problems = shards.verify(directory, counts)
    checked = len(counts)
    return problems, checked
