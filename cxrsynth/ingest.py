"""Ingest: a source's record table → a real dataset version (shards + manifest + rejects).

Every adapter in :mod:`cxrsynth.sources` returns a :class:`~cxrsynth.sources.SourceTable`;
:func:`ingest` turns it into a dataset version:

1. The version is a short hash of the records (identity, demographics, labels), the
   image file sizes and the parameters, unless a version name is given.
2. Rows are cut into fixed units of ``shard_size`` input rows; each unit becomes one
   shard (see :mod:`cxrsynth.shards`), written in parallel processes, skipped when a
   previous run already finished it.
3. Each image is read, preprocessed (:mod:`cxrsynth.imaging`) and stored as PNG beside
   its manifest row as JSON. Missing, corrupt or too large images become rejects
   (``missing_image``, ``corrupt_image``, ``too_large``: over ``Preprocess.max_pixels``).
4. :func:`cxrsynth.publish.publish` finishes the version: shard index, manifest and the
   rejects ledger; rows in = kept + rejected.

Samples are encoded by :func:`cxrsynth.shards.encode_sample`; an image that cannot be read
is a :class:`~cxrsynth.shards.Reject` of its shard.
"""

from __future__ import annotations

import hashlib
import os
import re
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pandas as pd

from cxrsynth import manifest, shards
from cxrsynth.errors import CxrsynthError
from cxrsynth.imaging import ImageError, Preprocess, preprocess, read_image
from cxrsynth.publish import Metadata, publish
from cxrsynth.shards import SAMPLE_FIELDS, sample_records  # noqa: F401  (moved to shards; cxrsynth.share imports them from here)
from cxrsynth.sources import SourceTable

#: A version name given by hand: it becomes a folder name under ``data/shards/<name>/``.
VERSION_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass
class IngestResult:
    """Summary of an ingest, as printed by the CLI."""

    name: str
    version: str
    rows_in: int
    kept: int
    rejected: dict[str, int]
    shards: int
    manifest: Path
    rejects: Path
    info: dict = field(default_factory=dict)
    resumed_shards: int = 0


def check_version(version: str | None) -> str | None:
    """A version name given by hand must be one folder name (:data:`VERSION_PATTERN`)."""
    if version is not None and not VERSION_PATTERN.match(version):
        raise CxrsynthError(f"version name {version!r} must match {VERSION_PATTERN.pattern} (it becomes a folder name)")
    return version


def content_version(records: pd.DataFrame, params: dict, sizes: np.ndarray | None = None) -> str:
    """Short content hash of the records (minus local paths), image sizes and params."""
    digest = hashlib.sha256()
    stable = records.drop(columns=["image_path", "row"], errors="ignore")
    digest.update(pd.util.hash_pandas_object(stable, index=False).to_numpy().tobytes())
    digest.update(",".join(stable.columns).encode())
    if sizes is not None:
        digest.update(np.asarray(sizes, dtype=np.int64).tobytes())
    digest.update(shards.json_bytes(params))
    return digest.hexdigest()[:10]


def _file_sizes(paths: pd.Series) -> np.ndarray:
    def size(p) -> int:
        try:
            return os.stat(p).st_size
        except (OSError, TypeError):
            return -1

    return np.fromiter((size(p) for p in paths), dtype=np.int64, count=len(paths))


def _samples(rows: list[dict], params: Preprocess, tick=None):
    """A unit's samples: each row's image read and preprocessed, or a :class:`~cxrsynth.shards.Reject`."""
    for r in rows:
        if tick:
            tick(1)
        try:
            image = preprocess(read_image(r["image_path"], max_pixels=params.max_pixels), params)
        except ImageError as exc:
            reason = exc.reason  # missing_image, corrupt_image or too_large
            yield shards.Reject(row=r["row"], key=r["key"], source_path=r["source_path"], reason=reason, detail=str(exc))
            continue
        yield shards.encode_sample(r, image)


def _write_unit(directory: Path, dataset: str, index: int, rows: list[dict], params: Preprocess, tick=None) -> shards.ShardResult:
    return shards.write_shard(directory, dataset, index, _samples(rows, params, tick))


def _mp_context():
    """fork where available: workers only touch PIL and tar files, and fork needs no
    ``if __name__ == "__main__"`` guard in a user's script (spawn/forkserver do)."""
    import multiprocessing

    return get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")


def ingest(
    source: SourceTable,
    *,
    root: str | Path,
    name: str,
    kind: str,
    inputs: dict,
    labels_only: bool = False,
    params: Preprocess = Preprocess(),
    shard_size: int = 1000,
    workers: int | None = None,
    version: str | None = None,
    progress=None,
) -> IngestResult:
    """Write a source's records as a dataset version: shards (unless labels-only) + manifest.

    Args:
        source: An adapter's output.
        root: Project root (``manifests/`` and ``data/`` live under it).
        name: Dataset name (a SQL identifier).
        kind: Adapter name (``chexpert``, ``mimic``, ``table``...), recorded in the manifest
            metadata as the version's source.
        inputs: What was read (paths, options), recorded in the manifest metadata.
        labels_only: Write only the manifest (no images read).
        params: Preprocessing parameters.
        shard_size: Input rows per shard.
        workers: Processes for image work; default all cores; 1 runs in-process.
        version: Version name; default a content hash.
        progress: Optional callable ``progress(advance_rows)`` for a progress bar.

    Raises:
        CxrsynthError: a bad name, version name, shard size or worker count.
    """
    manifest.check_name(name)
    check_version(version)
    if shard_size < 1:
        raise CxrsynthError(f"shard size must be >= 1, got {shard_size}")
    if workers is not None and workers < 1:
        raise CxrsynthError(f"workers must be >= 1, got {workers}")
    root = Path(root)
    records = source.records.copy()
    records.insert(1, "dataset", name)
    records["origin"] = "real"
    run_params = {"kind": kind, "labels_only": labels_only, "preprocess": params.as_dict(), "shard_size": shard_size}
    sizes = None if labels_only else _file_sizes(records["image_path"])
    version = version or content_version(records, run_params, sizes)
    records["version"] = version
    resumed = 0
    results: list[shards.ShardResult] | None = None

    if labels_only:
        records["shard"] = pd.Series(pd.NA, index=records.index, dtype="string")
        if progress:
            progress(len(records))
    else:
        directory = shards.shard_dir(root, name, version)
        directory.mkdir(parents=True, exist_ok=True)
        rows = shards.sample_records(records, extra=("row", "image_path"))
        units = [rows[i : i + shard_size] for i in range(0, len(rows), shard_size)]
        todo = []
        by_index: dict[int, shards.ShardResult] = {}
        for i, unit in enumerate(units):
            done = shards.finished(directory, name, i)
            if done is not None:
                by_index[i] = done
                resumed += 1
                if progress:
                    progress(len(unit))
            else:
                todo.append(i)
        workers = workers or os.cpu_count() or 1
        if workers == 1 or len(todo) <= 1:
            for i in todo:
                by_index[i] = _write_unit(directory, name, i, units[i], params, tick=progress)
        else:
            import webdataset  # noqa: F401  (imports torch: once here, inherited by the forked workers)

            with ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=_mp_context()) as pool:
                futures = {pool.submit(_write_unit, directory, name, i, units[i], params): i for i in todo}
                for future in as_completed(futures):
                    i = futures[future]
                    by_index[i] = future.result()
                    if progress:
                        progress(len(units[i]))
        results = [by_index[i] for i in range(len(units))]

    made_by = {"inputs": inputs, **{k: v for k, v in run_params.items() if k != "kind"}, "info": source.info}
    done = publish(root, Metadata(name, version, "real", made_by, source=kind), records, rows_in=source.rows_in,
                   shard_results=results, rejects=source.rejects)
    return IngestResult(
        name=name,
        version=version,
        rows_in=done.rows_in,
        kept=done.kept,
        rejected=done.rejected,
        shards=len(results or ()),
        manifest=done.manifest,
        rejects=done.rejects,
        info=source.info,
        resumed_shards=resumed,
    )

