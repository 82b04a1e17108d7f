"""Ingest: a source's record table → a real dataset version (shards + manifest + rejects).

Every adapter in :mod:`cxrsynth.sources` returns a :class:`~cxrsynth.sources.SourceTable`;
:func:`ingest` turns it into a dataset version, holding the dataset's writer lock
(:func:`cxrsynth.publish.writer_lock`) for the whole write:

1. Rows whose image resolves outside the images root are rejected (``outside_root``)
   unless allowed (:func:`cxrsynth.sources.reject_outside_root`; symbolic links are
   followed, except in a labels-only ingest, which reads no image).
2. The version is a short hash of the records (identity, demographics, labels), the
   sha256 of every image file's bytes (:mod:`cxrsynth.digests`: read once, then cached by
   stat; ``rehash`` re-reads them all) and the parameters, unless a version name is given.
   So a changed image, even of the same byte size, is a new version.
3. Rows are cut into fixed units of ``shard_size`` input rows; each unit becomes one
   shard (see :mod:`cxrsynth.shards`), written in parallel processes. A unit is skipped
   only when a previous run finished it *from the same inputs*: its receipt records a
   digest of its rows, image digests and parameters (:func:`unit_inputs`), so under a
   named version a changed image or label redoes its unit. (A changed input under a
   content version is another version, written in full: each sample's JSON names it.)
4. Each image is read, preprocessed (:mod:`cxrsynth.imaging`) and stored as PNG beside
   its manifest row as JSON. Missing, corrupt or too large images become rejects
   (``missing_image``, ``corrupt_image``, ``too_large``: over ``Preprocess.max_pixels``).
5. :func:`cxrsynth.publish.publish` finishes the version: shard index, manifest and the
   rejects ledger; rows in = kept + rejected.

Worker processes die with the ingest: each sets ``PR_SET_PDEATHSIG`` (Linux) so the kernel
kills it when the ingest dies, even by ``kill -9``, and checks the parent's process id
before each unit (elsewhere, a worker stops at its next unit). An ingest killed mid-run is
resumed by running it again.

Samples are encoded by :func:`cxrsynth.shards.encode_sample`; an image that cannot be read
is a :class:`~cxrsynth.shards.Reject` of its shard.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import pandas as pd

from cxrsynth import digests as digests_lib
from cxrsynth import manifest, shards
from cxrsynth.config import SHARD_SIZE
from cxrsynth.errors import CxrsynthError
from cxrsynth.imaging import ImageError, Preprocess, preprocess, read_image
from cxrsynth.publish import Metadata, check_target, publish, writer_lock
from cxrsynth.sources import SourceTable, reject_outside_root

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
    normalized: dict = field(default_factory=dict)


def check_version(version: str | None) -> str | None:
    """A version name given by hand must be one folder name (:data:`VERSION_PATTERN`)."""
    if version is not None and not VERSION_PATTERN.fullmatch(version):
        raise CxrsynthError(f"version name {version!r} must match {VERSION_PATTERN.pattern} (it becomes a folder name)")
    return version


def content_version(records: pd.DataFrame, params: dict, digests: list[str] | None = None) -> str:
    """Short content hash of the records (minus local paths), the images' sha256 and params."""
    digest = hashlib.sha256()
    stable = records.drop(columns=["image_path", "row"], errors="ignore")
    digest.update(pd.util.hash_pandas_object(stable, index=False).to_numpy().tobytes())
    digest.update(",".join(stable.columns).encode())
    if digests is not None:
        digest.update("\n".join(digests).encode())
    digest.update(shards.json_bytes(params))
    return digest.hexdigest()[:10]


def unit_inputs(rows: list[dict], digests: list[str], params: dict) -> str:
    """Digest of what one unit is made from: its rows (sample fields), image digests and parameters."""
    body = {"params": params, "rows": [{k: r[k] for k in shards.SAMPLE_FIELDS} for r in rows], "images": digests}
    return hashlib.sha256(shards.json_bytes(body)).hexdigest()


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


def _write_unit(directory: Path, dataset: str, index: int, rows: list[dict], params: Preprocess, tick=None,
                inputs: str | None = None) -> shards.ShardResult:
    _exit_if_orphaned()
    return shards.write_shard(directory, dataset, index, _samples(rows, params, tick), inputs=inputs)


_PARENT: int | None = None  # set in worker processes: the ingest's process id


def _die_with_parent(parent: int) -> None:
    """Pool initializer: have the kernel kill this worker when the ingest dies (Linux), and
    leave now if it is already gone (it died before the signal was armed)."""
    global _PARENT
    _PARENT = parent
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    _exit_if_orphaned()


def _exit_if_orphaned() -> None:
    if _PARENT is not None and os.getppid() != _PARENT:
        os._exit(1)  # the ingest is gone: nobody would use this work


class _Workers:
    """A process pool started on first use (a resumed ingest with nothing to do starts none)."""

    def __init__(self, workers: int) -> None:
        self.workers, self.pool = workers, None

    def get(self) -> ProcessPoolExecutor:
        if self.pool is None:
            import webdataset  # noqa: F401  (imports torch: once here, inherited by the forked workers)

            self.pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=_mp_context(),
                                            initializer=_die_with_parent, initargs=(os.getpid(),))
        return self.pool

    def map_chunks(self, fn, chunks):
        chunks = list(chunks)
        if self.workers == 1 or len(chunks) <= 1:
            return map(fn, chunks)
        return self.get().map(fn, chunks)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


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
    shard_size: int = SHARD_SIZE,
    workers: int | None = None,
    version: str | None = None,
    progress=None,
    rehash: bool = False,
    allow_outside_root: bool = False,
    force: bool = False,
    store: str | None = None,
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
        rehash: Re-read every image for its digest instead of trusting the stat cache.
        allow_outside_root: Keep rows whose image lies outside the images root.
        force: Write over an existing dataset of another kind (a mix, a synthetic set).
        store: Publish the shards to this fsspec URL (``s3://bucket/prefix``; see
            :func:`cxrsynth.publish.publish`); None keeps them on the local disk.

    Raises:
        CxrsynthError: a bad name, version name, shard size or worker count; the dataset
            is in use by another writer, or may not be written (:func:`cxrsynth.publish.check_target`).
    """
    manifest.check_name(name)
    check_version(version)
    if shard_size < 1:
        raise CxrsynthError(f"shard size must be >= 1, got {shard_size}")
    if workers is not None and workers < 1:
        raise CxrsynthError(f"workers must be >= 1, got {workers}")
    root = Path(root)
    with writer_lock(root, name):
        check_target(root, name, "real", force=force)
        pool = _Workers(workers or os.cpu_count() or 1)
        try:
            return _ingest(source, root=root, name=name, kind=kind, inputs=inputs, labels_only=labels_only, params=params,
                           shard_size=shard_size, pool=pool, version=version, progress=progress, rehash=rehash,
                           allow_outside_root=allow_outside_root, force=force, store=store)
        finally:
            pool.close()


def _on_store(root: Path, name: str, version: str, store: str, source: SourceTable) -> IngestResult | None:
    """The result of an ingest already published at ``version`` to ``store``, or None.

    Its local shards were removed once put on the store, so a rerun with the same inputs
    would write and upload every shard again; instead it changes nothing (``cxrsynth verify``
    checks the objects).
    """
    from cxrsynth import store as store_lib

    try:
        meta = manifest.read_meta(root, name)
    except CxrsynthError:
        return None
    if meta.get("version") != version or meta.get("store") != store_lib.check_url(store):
        return None
    folder = store_lib.join(meta["store"], shards.SHARD_ROOT.as_posix(), name, version)
    count = len(store_lib.index_entries(folder, fresh=True))
    return IngestResult(name=name, version=version, rows_in=int(meta.get("rows_in", 0)), kept=int(meta.get("kept", 0)),
                        rejected=dict(meta.get("rejected") or {}), shards=count, manifest=manifest.manifest_path(root, name),
                        rejects=manifest.rejects_path(root, name), info=source.info, resumed_shards=count,
                        normalized=source.normalized)


def _ingest(source: SourceTable, *, root: Path, name: str, kind: str, inputs: dict, labels_only: bool, params: Preprocess,
            shard_size: int, pool: _Workers, version: str | None, progress, rehash: bool, allow_outside_root: bool,
            force: bool, store: str | None = None) -> IngestResult:
    source = reject_outside_root(source, allow=allow_outside_root, follow_links=not labels_only)
    records = source.records.copy()
    records.insert(1, "dataset", name)
    records["origin"] = "real"
    run_params = {"kind": kind, "labels_only": labels_only, "preprocess": params.as_dict(), "shard_size": shard_size}
    image_digests = None
    if not labels_only:
        image_digests = digests_lib.digests(records["image_path"].tolist(), digests_lib.cache_path(root, name),
                                            rehash=rehash, map_chunks=pool.map_chunks)
    version = version or content_version(records, run_params, image_digests)
    records["version"] = version
    if store and not labels_only:
        done = _on_store(root, name, version, store, source)
        if done is not None:
            return done
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
        starts = range(0, len(rows), shard_size)
        units = [rows[i : i + shard_size] for i in starts]
        fingerprints = [unit_inputs(rows[i : i + shard_size], image_digests[i : i + shard_size], run_params) for i in starts]
        todo = []
        by_index: dict[int, shards.ShardResult] = {}
        for i, unit in enumerate(units):
            done = shards.finished(directory, name, i, inputs=fingerprints[i])
            if done is not None:
                by_index[i] = done
                resumed += 1
                if progress:
                    progress(len(unit))
            else:
                todo.append(i)
        if pool.workers == 1 or len(todo) <= 1:
            for i in todo:
                by_index[i] = _write_unit(directory, name, i, units[i], params, tick=progress, inputs=fingerprints[i])
        else:
            executor = pool.get()
            futures = {executor.submit(_write_unit, directory, name, i, units[i], params, inputs=fingerprints[i]): i
                       for i in todo}
            for future in as_completed(futures):
                i = futures[future]
                by_index[i] = future.result()
                if progress:
                    progress(len(units[i]))
        results = [by_index[i] for i in range(len(units))]

    made_by = {"inputs": inputs, **{k: v for k, v in run_params.items() if k != "kind"}, "info": source.info,
               "normalized": source.normalized}
    if allow_outside_root:
        made_by["allow_outside_root"] = True
    done = publish(root, Metadata(name, version, "real", made_by, source=kind), records, rows_in=source.rows_in,
                   shard_results=results, rejects=source.rejects, force=force, store=store)
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
        normalized=source.normalized,
    )
