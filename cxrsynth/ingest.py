"""The one writer: a source's record table → shards + manifest + rejects.

Every adapter in :mod:`cxrsynth.sources` returns a :class:`~cxrsynth.sources.SourceTable`;
:func:`ingest` turns it into a dataset version:

1. The version is a short hash of the records (identity, demographics, labels), the
   image file sizes and the parameters, unless a version name is given.
2. Rows are cut into fixed units of ``shard_size`` input rows; each unit becomes one
   shard (see :mod:`cxrsynth.shards`), written in parallel processes, skipped when a
   previous run already finished it.
3. Each image is read, preprocessed (:mod:`cxrsynth.imaging`) and stored as PNG beside
   its manifest row as JSON. Missing or corrupt images become rejects.
4. The manifest and the rejects ledger are written; rows in = kept + rejected.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pandas as pd

from cxrsynth import __version__, manifest, shards
from cxrsynth.imaging import ImageError, Preprocess, encode_png, preprocess, read_image
from cxrsynth.sources import SourceTable

#: Record fields copied into each sample's JSON (the manifest row minus mutable columns).
SAMPLE_FIELDS = tuple(c for c in manifest.COLUMNS if c not in ("shard", "split"))


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


def sample_records(frame: pd.DataFrame, extra: tuple[str, ...] = ()) -> list[dict]:
    """Plain-Python rows of :data:`SAMPLE_FIELDS` (+ ``extra``): picklable, JSON-ready, nulls as None."""
    sub = frame.reindex(columns=[*extra, *SAMPLE_FIELDS]).astype(object)
    rows = sub.where(sub.notna(), None).to_dict("records")
    return [{k: (v.item() if isinstance(v, np.generic) else v) for k, v in r.items()} for r in rows]


def encode_sample(record: dict, image: np.ndarray) -> dict:
    """One WebDataset sample: ``<key>.png`` and ``<key>.json`` (the record's sample fields)."""
    meta = {k: record[k] for k in SAMPLE_FIELDS}
    return {"__key__": record["key"], "png": encode_png(image), "json": shards.json_bytes(meta)}


def _samples(rows: list[dict], params: Preprocess, rejects: list[dict], tick=None):
    for r in rows:
        if tick:
            tick(1)
        try:
            image = preprocess(read_image(r["image_path"]), params)
        except ImageError as exc:
            reason = "missing_image" if str(exc).startswith("missing") else "corrupt_image"
            rejects.append({"row": r["row"], "key": r["key"], "source_path": r["source_path"], "reason": reason, "detail": str(exc)})
            continue
        yield encode_sample(r, image)


def _write_unit(directory: Path, dataset: str, index: int, rows: list[dict], params: Preprocess, tick=None) -> shards.ShardResult:
    rejects: list[dict] = []
    return shards.write_shard(directory, dataset, index, _samples(rows, params, rejects, tick), rejects)


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
        kind: Adapter name, recorded in the manifest metadata.
        inputs: What was read (paths, options), recorded in the manifest metadata.
        labels_only: Write only the manifest (no images read).
        params: Preprocessing parameters.
        shard_size: Input rows per shard.
        workers: Processes for image work; default all cores; 1 runs in-process.
        version: Version name; default a content hash.
        progress: Optional callable ``progress(advance_rows)`` for a progress bar.
    """
    manifest.check_name(name)
    root = Path(root)
    records = source.records.copy()
    records.insert(1, "dataset", name)
    records["origin"] = "real"
    run_params = {"kind": kind, "labels_only": labels_only, "preprocess": params.as_dict(), "shard_size": shard_size}
    sizes = None if labels_only else _file_sizes(records["image_path"])
    version = version or content_version(records, run_params, sizes)
    records["version"] = version
    rejects = [source.rejects]
    resumed = 0
    results: list[shards.ShardResult] = []

    if labels_only:
        records["shard"] = pd.Series(pd.NA, index=records.index, dtype="string")
        if progress:
            progress(len(records))
    else:
        directory = shards.shard_dir(root, name, version)
        directory.mkdir(parents=True, exist_ok=True)
        rows = sample_records(records, extra=("row", "image_path"))
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
        shards.write_index(directory, name, version, results)
        shard_of = {k: str(Path(shards.SHARD_ROOT) / name / version / r.name) for r in results for k in r.keys}
        records["shard"] = records["key"].map(shard_of).astype("string")
        image_rejects = [rj for r in results for rj in r.rejects]
        if image_rejects:
            rejects.append(pd.DataFrame(image_rejects))
        records = records.loc[records["shard"].notna()]

    all_rejects = pd.concat([r for r in rejects if len(r)] or [source.rejects], ignore_index=True)
    all_rejects = all_rejects.sort_values("row", kind="stable").reset_index(drop=True)
    kept = len(records)
    if kept + len(all_rejects) != source.rows_in:
        raise AssertionError(f"accounting error: {kept} kept + {len(all_rejects)} rejected != {source.rows_in} rows in")
    by_reason = dict(sorted(Counter(all_rejects["reason"].astype(str)).items()))
    meta = {
        "dataset": name,
        "version": version,
        "kind": kind,
        "inputs": inputs,
        **run_params,
        "rows_in": source.rows_in,
        "kept": kept,
        "rejected": by_reason,
        "info": source.info,
        "cxrsynth": __version__,
    }
    manifest_file = manifest.write(root, name, records.drop(columns=["row", "image_path"]), meta)
    rejects_file = manifest.write_rejects(root, name, all_rejects)
    return IngestResult(
        name=name,
        version=version,
        rows_in=source.rows_in,
        kept=kept,
        rejected=by_reason,
        shards=len(results),
        manifest=manifest_file,
        rejects=rejects_file,
        info=source.info,
        resumed_shards=resumed,
    )

