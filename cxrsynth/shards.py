"""WebDataset tar shards: the sample encoder, deterministic atomic writing, an index, verification.

Layout: ``data/shards/<dataset>/<version>/<dataset>-%06d.tar`` with ``index.json``
beside the shards. A sample is ``<key>.png`` (8-bit grayscale) and ``<key>.json`` (its
manifest row minus the columns a later step may change, :data:`SAMPLE_FIELDS`), made by
:func:`encode_sample` from a plain record (:func:`sample_records`). Tar members carry a
fixed mtime, owner and mode, so the same samples give byte-identical shards, which is
what lets DVC cache them.

Shards are planned as fixed work units (one unit of input rows → one shard), each
written with webdataset's :class:`~webdataset.ShardWriter` under a ``.partial`` name and
renamed only once complete, with a small progress record, the unit's receipt
(``.progress/<shard>.json``: count, bytes, sha256, keys, rejects and ``inputs``, a digest
of what the unit was made from). A killed job therefore never leaves a shard that a
later run would trust, and a restarted job skips finished units whose inputs are still
the recorded ones; units are independent, so they also run in parallel processes. Each
unit is written under an exclusive ``flock`` on ``.progress/<shard>.lock``, so two
processes that both write a unit (two parts of one job started twice) take turns instead
of writing one ``.partial`` file at once. A unit's input rows that
cannot become samples (an unreadable image) come to the writer as :class:`Reject` items
in the sample stream; :func:`write_shard` returns them with the shard, so rows in = samples
written + rows rejected holds per shard.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from cxrsynth import manifest
from cxrsynth.imaging import encode_png

#: Record fields copied into each sample's JSON (the manifest row minus mutable columns).
SAMPLE_FIELDS = tuple(c for c in manifest.COLUMNS if c not in ("shard", "split"))

SHARD_ROOT = Path("data") / "shards"
INDEX_NAME = "index.json"
PROGRESS_DIR = ".progress"
TAR_OWNER = "cxrsynth"
TAR_MTIME = 0


@dataclass
class ShardResult:
    """What writing one shard produced.

    Attributes:
        name: Shard file name (no folder).
        count: Samples written.
        bytes: File size.
        sha256: Hex digest of the file.
        keys: Sample keys in write order.
        rejects: Input rows not written, as dicts with ``row``, ``key``, ``source_path``,
            ``reason`` and ``detail``.
        inputs: Digest of what the unit was made from (its rows, image contents and
            parameters), or None when the writer records none.
    """

    name: str
    count: int
    bytes: int
    sha256: str
    keys: list[str] = field(default_factory=list)
    rejects: list[dict] = field(default_factory=list)
    inputs: str | None = None


@dataclass(frozen=True)
class Reject:
    """An input row that did not become a sample, as its rejects-ledger row."""

    row: int | None
    key: str | None
    source_path: str | None
    reason: str
    detail: str


def sample_records(frame: pd.DataFrame, extra: tuple[str, ...] = ()) -> list[dict]:
    """Plain-Python rows of :data:`SAMPLE_FIELDS` (+ ``extra``): picklable, JSON-ready, nulls as None."""
    sub = frame.reindex(columns=[*extra, *SAMPLE_FIELDS]).astype(object)
    rows = sub.where(sub.notna(), None).to_dict("records")
    return [{k: (v.item() if isinstance(v, np.generic) else v) for k, v in r.items()} for r in rows]


def encode_sample(record: dict, image: np.ndarray) -> dict:
    """One WebDataset sample: ``<key>.png`` and ``<key>.json`` (the record's sample fields)."""
    meta = {k: record[k] for k in SAMPLE_FIELDS}
    return {"__key__": record["key"], "png": encode_png(image), "json": json_bytes(meta)}


def shard_dir(root: str | Path, dataset: str, version: str) -> Path:
    return Path(root) / SHARD_ROOT / dataset / version


def shard_path(dataset: str, version: str, name: str) -> str:
    """A shard's path relative to the project root, as the manifest's ``shard`` column holds it."""
    return str(SHARD_ROOT / dataset / version / name)


def shard_name(dataset: str, index: int) -> str:
    return f"{dataset}-{index:06d}.tar"


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def json_bytes(obj: dict) -> bytes:
    """Canonical JSON (sorted keys, no spaces) for sample metadata and progress files."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str).encode()


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def finished(directory: Path, dataset: str, index: int, inputs: str | None = None) -> ShardResult | None:
    """The result of an already finished shard, or None if it must be (re)written.

    A shard counts as finished only if its progress record exists, the file's size and
    sha256 match it and, when ``inputs`` is given, the record's ``inputs`` equal it (a
    unit made from other rows or other image bytes is redone).
    """
    name = shard_name(dataset, index)
    record, path = directory / PROGRESS_DIR / f"{name}.json", directory / name
    if not (record.is_file() and path.is_file()):
        return None
    try:
        stored = json.loads(record.read_text())
        result = ShardResult(**{k: v for k, v in stored.items() if k in ShardResult.__dataclass_fields__})
    except (ValueError, TypeError):  # a damaged receipt: the unit is redone
        return None
    if inputs is not None and result.inputs != inputs:
        return None
    if path.stat().st_size != result.bytes or sha256_file(path) != result.sha256:
        return None
    return result


@contextlib.contextmanager
def unit_lock(directory: Path, name: str):
    """Hold an exclusive ``flock`` on ``.progress/<name>.lock`` (waiting for it) for the block."""
    import fcntl

    (directory / PROGRESS_DIR).mkdir(parents=True, exist_ok=True)
    with open(directory / PROGRESS_DIR / f"{name}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def write_shard(directory: Path, dataset: str, index: int, samples: Iterable[dict | Reject],
                inputs: str | None = None) -> ShardResult:
    """Write one shard from samples ``{"__key__": str, "png": bytes, "json": bytes}``.

    ``samples`` may also yield :class:`Reject` items (the rows whose image failed to
    load): they are not written, and the result lists them, in stream order, as
    ``rejects``. ``inputs`` (what the unit was made from) goes into its receipt. The
    unit is written under :func:`unit_lock`.
    """
    directory.mkdir(parents=True, exist_ok=True)
    name = shard_name(dataset, index)
    with unit_lock(directory, name):
        return _write_shard(directory, dataset, index, samples, inputs)


def _write_shard(directory: Path, dataset: str, index: int, samples: Iterable[dict | Reject], inputs: str | None) -> ShardResult:
    import webdataset as wds

    rejects: list[dict] = []
    name = shard_name(dataset, index)
    final, partial = directory / name, directory / f"{name}.partial"
    keys: list[str] = []
    writer = wds.ShardWriter(
        str(directory / f"{dataset}-%06d.tar.partial"),
        maxcount=1 << 40,  # one writer, one shard: the unit of work decides the size
        maxsize=float("inf"),
        start_shard=index,
        verbose=0,
        encoder=False,
        mtime=TAR_MTIME,
        user=TAR_OWNER,
        group=TAR_OWNER,
        mode=0o444,
    )
    try:
        for sample in samples:
            if isinstance(sample, Reject):
                rejects.append(asdict(sample))
                continue
            writer.write(sample)
            keys.append(sample["__key__"])
    finally:
        writer.close()
    result = ShardResult(name=name, count=len(keys), bytes=partial.stat().st_size, sha256=sha256_file(partial), keys=keys,
                         rejects=rejects, inputs=inputs)
    _atomic_write_bytes(directory / PROGRESS_DIR / f"{name}.json", json_bytes(asdict(result)))
    os.replace(partial, final)
    return result


def write_index(directory: Path, dataset: str, version: str, results: list[ShardResult]) -> Path:
    """Write ``index.json`` (shard, count, bytes, sha256) and drop stale partial files.

    The per-shard progress records stay (``.progress/``): they hold each shard's keys
    and rejects, so a rerun of a finished job reuses every shard instead of redoing it.
    """
    index = {
        "dataset": dataset,
        "version": version,
        "samples": sum(r.count for r in results),
        "shards": [{"name": r.name, "count": r.count, "bytes": r.bytes, "sha256": r.sha256} for r in results],
    }
    path = directory / INDEX_NAME
    _atomic_write_bytes(path, json.dumps(index, indent=1, sort_keys=True).encode() + b"\n")
    for stale in directory.glob("*.partial"):
        if not _being_written(directory, stale.name[: -len(".partial")]):
            stale.unlink(missing_ok=True)
    return path


def _being_written(directory: Path, name: str) -> bool:
    """Whether another process holds shard ``name``'s :func:`unit_lock` now."""
    import fcntl

    lock = directory / PROGRESS_DIR / f"{name}.lock"
    if not lock.is_file():
        return False
    with open(lock, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
    return False


def verify(directory: Path, expected_counts: dict[str, int] | None = None) -> list[str]:
    """Re-hash every shard listed in ``index.json``; return the problems found.

    Args:
        directory: A version folder holding ``index.json``.
        expected_counts: Optional shard name → sample count from the manifest.

    Returns:
        Human-readable problems (empty when everything matches).
    """
    path = directory / INDEX_NAME
    if not path.is_file():
        return [f"missing index: {path}"]
    try:
        index = json.loads(path.read_text())
        entries = index["shards"]
        if not all({"name", "count", "bytes", "sha256"} <= set(e) for e in entries):
            raise ValueError("a shard entry lacks name, count, bytes or sha256")
    except (ValueError, KeyError, TypeError) as exc:  # not JSON, or not a shard index
        return [f"unreadable index: {path}: {type(exc).__name__}: {exc}"]
    problems = []
    for entry in entries:
        shard = directory / entry["name"]
        if not shard.is_file():
            problems.append(f"missing shard: {shard}")
            continue
        size = shard.stat().st_size
        if size != entry["bytes"]:
            problems.append(f"size mismatch: {shard}: {size} bytes, index says {entry['bytes']}")
        digest = sha256_file(shard)
        if digest != entry["sha256"]:
            problems.append(f"sha256 mismatch: {shard}: {digest[:12]}…, index says {entry['sha256'][:12]}…")
    if expected_counts is not None:
        listed = {e["name"]: e["count"] for e in index["shards"]}
        for name, count in sorted(expected_counts.items()):
            if listed.get(name) != count:
                problems.append(f"count mismatch: {name}: manifest has {count} rows, index says {listed.get(name)}")
    return problems
