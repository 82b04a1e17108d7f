"""Publishing a dataset version: the one way every writer finishes one.

Ingest (real data), generate (synthetic replicas) and mix (a training set drawn from
other datasets) each decide their rows, their version and what made them; then each calls
:func:`publish`, which finishes the version the same way for all (``split``, which only
changes the rows of a published version, finishes its new version with :func:`republish`):

1. when the version has shards of its own, writes their ``index.json`` and points every
   row at its shard (the ``shard`` column: key → ``data/shards/<name>/<version>/<shard>``);
   rows the shards did not take (an unreadable image) are in the shards' rejects;
2. checks that nothing is lost: rows in = rows kept + rows rejected;
3. writes the manifest, with the version's :class:`Metadata` in its parquet metadata (and
   the rows' checksum, :func:`cxrsynth.manifest.rows_checksum`), and the rejects ledger
   beside it (rows in input order, each with its reason).

Given a ``store`` (an fsspec URL: ``--store`` or ``CXRSYNTH_STORE``), step 1 also puts the
version's shards there (index last) and removes their local files, and the metadata records
the URL; the rows keep their store-relative ``shard`` names (:mod:`cxrsynth.store`).
:func:`move_to_store` does the same for a version published before (``cxrsynth push``).

Rules every writer inherits (:func:`check_target`, run by :func:`publish` and, before any
work, by each writer):

* a dataset is never written over one of its own sources (``mix --real ds --name ds``,
  ``generate --conditions ds --name ds``): that would destroy what it is made from;
* nor over an existing dataset of another kind (a real dataset over a mix...) unless
  ``force`` (the writers' ``--force``);
* names are unique case-insensitively: DuckDB's view names ignore case, so ``CX`` beside
  ``cx`` would make ``query`` read the wrong one; the second is refused, naming the first.

Writers of one dataset exclude each other (:func:`writer_lock`): an ``flock`` on
``data/.cxrsynth/locks/<name>.lock`` (the name in lower case, as the view names collide),
held for the whole write. Ingest, mix, import and split hold it exclusively; the parts of
a ``generate`` (job-array parts, torchrun ranks) hold it *shared*, so they run together
while no other writer can, and each shard they write is serialised by its own unit lock
(:func:`cxrsynth.shards.unit_lock`). A writer that cannot take the lock fails at once with
"dataset NAME is in use by PID n", from the record (``<name>.lock.holders/<host>-<pid>``)
each holder writes beside the lock file and removes when it lets go. The lock is not in the
dataset's shard folder on purpose: that folder is a DVC output (a file holding a process id would change its hash), and a
mix or a labels-only dataset has no folder. The kernel drops the lock when its process
dies, so a killed writer never leaves the dataset locked.

:class:`Metadata` is the typed record of a version (its ``kind``: ``real``, ``synthetic``
or ``mix``). Its stored layout (:meth:`Metadata.to_dict`) is the one manifests have always
had, so existing manifests read back unchanged: a real version stores its source adapter
(``chexpert``, ``mimic``, ``table``...) under ``kind``, and what made a version sits at the
top level beside the common fields.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import pandas as pd

from cxrsynth import __version__, manifest, shards
from cxrsynth import store as store_lib
from cxrsynth.errors import CxrsynthError, UnknownNameError

Kind = Literal["real", "synthetic", "mix"]
KINDS: tuple[str, ...] = ("real", "synthetic", "mix")
#: Stored ``kind`` values that are not a real dataset's adapter name.
_STORED_KINDS = ("synthetic", "mix")
#: Top-level metadata keys :func:`publish` fills in; ``made_by`` may not use them.
RESERVED = ("dataset", "version", "kind", "rows_in", "kept", "rejected", "cxrsynth", "store", manifest.CHECKSUM_KEY)
LOCK_DIR = Path("data") / ".cxrsynth" / "locks"


class PublishError(CxrsynthError):
    """A dataset version that may not be written where it was asked to be, or a dataset in use."""


@dataclass(frozen=True)
class Metadata:
    """What a dataset version records about itself.

    Attributes:
        dataset: Dataset name.
        version: Version name (a content hash unless named).
        kind: ``real`` (ingested), ``synthetic`` (generated) or ``mix`` (drawn from others).
        made_by: What made the version, JSON-able and kind-specific: a real version's
            inputs, preprocessing, shard size and adapter facts (and a split version's
            ``split`` parameters and ``split_of``, the version it splits); a synthetic version's
            conditions, generator and sampling parameters; a mix's ``params`` and
            ``sources`` (dataset → version). Stored at the top level of the metadata.
        source: For ``real``: the adapter that read it (``chexpert``, ``mimic``, ``table``).
    """

    dataset: str
    version: str
    kind: Kind
    made_by: dict[str, Any] = field(default_factory=dict)
    source: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise UnknownNameError("dataset kind", self.kind, KINDS)
        if (self.kind == "real") != (self.source is not None) or self.source in _STORED_KINDS:
            raise CxrsynthError(f"{self.dataset}: a real version names its adapter in source, and only a real one "
                                f"(kind {self.kind}, source {self.source!r})")
        clash = sorted(set(self.made_by) & set(RESERVED))
        if clash:
            raise CxrsynthError(f"{self.dataset}: made_by may not set {', '.join(clash)} (publish fills them in)")

    def to_dict(self, rows_in: int, kept: int, rejected: dict[str, int]) -> dict[str, Any]:
        """The stored metadata: the common fields, the counts and :attr:`made_by`."""
        return {
            "dataset": self.dataset,
            "version": self.version,
            "kind": self.source if self.kind == "real" else self.kind,
            **self.made_by,
            "rows_in": rows_in,
            "kept": kept,
            "rejected": rejected,
            "cxrsynth": __version__,
        }

    @property
    def sources(self) -> tuple[str, ...]:
        """The datasets this version is made from: a mix's sources, a synthetic version's conditions."""
        if self.kind == "mix":
            return tuple(self.made_by.get("sources") or ())
        if self.kind == "synthetic" and self.made_by.get("conditions"):
            return (str(self.made_by["conditions"]),)
        return ()

    @classmethod
    def from_dict(cls, stored: dict[str, Any]) -> "Metadata":
        """The record of stored metadata (:func:`cxrsynth.manifest.read_meta`)."""
        made_by = {k: v for k, v in stored.items() if k not in RESERVED}
        stored_kind = stored.get("kind")
        if stored_kind in _STORED_KINDS:
            return cls(stored["dataset"], stored["version"], stored_kind, made_by)
        return cls(stored["dataset"], stored["version"], "real", made_by, source=stored_kind)


@dataclass(frozen=True)
class Published:
    """What :func:`publish` wrote."""

    manifest: Path
    rejects: Path
    rows_in: int
    kept: int
    rejected: dict[str, int]


def empty_rejects() -> pd.DataFrame:
    """A rejects ledger with no rows (what generate and mix publish)."""
    return pd.DataFrame(columns=list(manifest.REJECT_SCHEMA.names))


def stored_kind(stored: dict[str, Any]) -> str:
    """The kind (``real``, ``synthetic``, ``mix``) of stored metadata."""
    return stored.get("kind") if stored.get("kind") in _STORED_KINDS else "real"


def check_target(root: str | Path, name: str, kind: Kind, sources: tuple[str, ...] = (), force: bool = False) -> None:
    """Refuse writing dataset ``name`` (of ``kind``, made from ``sources``) where it would do harm.

    Raises:
        PublishError: ``name`` is one of ``sources``; another dataset's name differs from it
            only in case; or a dataset ``name`` of another kind exists (or is unreadable)
            and not ``force``.
    """
    for source in sources:
        if source.lower() == name.lower():
            raise PublishError(f"dataset {name} is one of its own sources ({source}): writing it would overwrite "
                               f"the data it is made from; choose another name")
    for existing in manifest.list_names(root):
        if existing != name and existing.lower() == name.lower():
            raise PublishError(f"dataset name {name!r} collides with the existing dataset {existing!r}: names are "
                               f"case-insensitive (DuckDB's views ignore case); use {existing!r} or another name")
    if not manifest.manifest_path(root, name).is_file() or force:
        return
    try:
        stored = manifest.read_meta(root, name)
    except manifest.ManifestError as exc:
        raise PublishError(f"{exc}; pass --force to write {name} over it") from None
    existing_kind = stored_kind(stored)
    if existing_kind != kind:
        what = f"{existing_kind} dataset" + (f" ({stored.get('kind')})" if existing_kind == "real" and stored.get("kind") else "")
        raise PublishError(f"dataset {name} exists as a {what}; writing a {kind} dataset over it needs --force")


_HELD: dict[str, str] = {}  # lock file -> "exclusive" | "shared": the writer locks this process holds


def lock_path(root: str | Path, name: str) -> Path:
    return Path(root) / LOCK_DIR / f"{name.lower()}.lock"


@contextlib.contextmanager
def writer_lock(root: str | Path, name: str, *, shared: bool = False) -> Iterator[None]:
    """Hold dataset ``name``'s writer lock for the block (see the module docstring).

    Re-entrant within a process: a block inside another holding the lock of the same
    dataset (e.g. :func:`publish` inside an ingest, or inside a ``generate`` part holding
    it shared, whose publishing is serialised by its own finalize lock) takes nothing more.

    Raises:
        PublishError: another process holds the lock (exclusively, or at all when
            ``shared`` is False), naming its process id.
    """
    import fcntl

    path = lock_path(root, name)
    held = str(path.absolute())
    if held in _HELD:
        yield
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a")
    except OSError as exc:  # data/ is a file, a read-only folder...
        raise PublishError(f"cannot write under {Path(root) / 'data'}: {exc.strerror}: {exc.filename}") from None
    with handle:
        try:
            fcntl.flock(handle, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PublishError(f"dataset {name} is in use by {_holders(path)}; wait for it to finish, or choose "
                               f"another name") from None
        record = _holder_dir(path) / f"{socket.gethostname()}-{os.getpid()}"
        record.parent.mkdir(exist_ok=True)
        record.write_text("shared\n" if shared else "exclusive\n")
        _HELD[held] = "shared" if shared else "exclusive"
        try:
            yield
        finally:
            del _HELD[held]
            record.unlink(missing_ok=True)
            fcntl.flock(handle, fcntl.LOCK_UN)


def _holder_dir(lock: Path) -> Path:
    """Where the holders of ``lock`` record themselves: one file ``<host>-<pid>`` each."""
    return lock.with_name(lock.name + ".holders")


def _holders(lock: Path) -> str:
    """``PID n`` (``PIDs n, m``): the holders of ``lock`` as they recorded themselves, live local ones only."""
    here, pids = socket.gethostname(), []
    records = sorted(_holder_dir(lock).glob("*")) if _holder_dir(lock).is_dir() else []
    for record in records:
        host, _, pid = record.name.rpartition("-")
        if not pid.isdigit():
            continue
        if host == here:
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                record.unlink(missing_ok=True)  # a holder killed before it could remove its record
                continue
            except PermissionError:
                pass
        pids.append(pid if host == here else f"{pid} on {host}")
    if not pids:
        return "another process"
    return ("PID " if len(pids) == 1 else "PIDs ") + ", ".join(pids)


def publish(
    root: str | Path,
    meta: Metadata,
    rows: pd.DataFrame,
    *,
    rows_in: int | None = None,
    shard_results: list[shards.ShardResult] | None = None,
    rejects: pd.DataFrame | None = None,
    force: bool = False,
    store: str | None = None,
) -> Published:
    """Finish dataset version ``meta``: shard index, shard column, manifest, rejects.

    Args:
        root: Project root.
        meta: The version's record.
        rows: Its rows (manifest columns; extra columns are not stored). Rows of a version
            with shards get their ``shard`` here; a mix's or a labels-only version's rows
            keep theirs.
        rows_in: Input rows read (default: ``len(rows)``, nothing rejected before).
        shard_results: The version's shards, in order (None: it has none of its own).
            Rows whose key no shard holds were rejected by the shards.
        rejects: Rows rejected before the shards (an adapter's ledger); default none.
        force: Write over an existing dataset of another kind (:func:`check_target`).
        store: An fsspec URL (``s3://bucket/prefix``): the version's shards, written
            locally, are put there (:func:`cxrsynth.store.publish_version`: shards, then
            ``features.json`` and ``index.json``), the local shard files removed, and the
            metadata records the URL as ``store`` (never credentials: a URL with user info
            is refused). The rows keep their store-relative ``shard`` names. None: local.

    Returns:
        The files written and the counts.

    Raises:
        PublishError: :func:`check_target` refuses, or another process writes the dataset.
        AssertionError: rows in != rows kept + rows rejected (a bug in the writer).
    """
    store = store_lib.check_url(store) if store else None
    with writer_lock(root, meta.dataset):
        check_target(root, meta.dataset, meta.kind, meta.sources, force)
        return _publish(Path(root), meta, rows, rows_in=rows_in, shard_results=shard_results, rejects=rejects,
                        store=store)


def _publish(root: Path, meta: Metadata, rows: pd.DataFrame, *, rows_in: int | None,
             shard_results: list[shards.ShardResult] | None, rejects: pd.DataFrame | None,
             store: str | None = None) -> Published:
    rows_in = len(rows) if rows_in is None else rows_in
    ledger = [empty_rejects() if rejects is None else rejects]
    if shard_results is not None:
        directory = shards.shard_dir(root, meta.dataset, meta.version)
        shards.write_index(directory, meta.dataset, meta.version, shard_results)
        if store is not None:  # the shards' home is the store: put them there before any manifest names them
            folder = store_lib.join(store, shards.SHARD_ROOT.as_posix(), meta.dataset, meta.version)
            store_lib.publish_version(directory, folder, [r.name for r in shard_results],
                                      (shards.HF_FEATURES_NAME, shards.INDEX_NAME),
                                      sizes={r.name: r.bytes for r in shard_results})
        shard_of = {k: shards.shard_path(meta.dataset, meta.version, r.name) for r in shard_results for k in r.keys}
        rows = rows.assign(shard=rows["key"].map(shard_of).astype("string"))
        rows = rows.loc[rows["shard"].notna()]
        shard_rejects = [rj for r in shard_results for rj in r.rejects]
        if shard_rejects:
            ledger.append(pd.DataFrame(shard_rejects))
    ledger_frame = pd.concat([r for r in ledger if len(r)] or ledger[:1], ignore_index=True)
    ledger_frame = ledger_frame.sort_values("row", kind="stable").reset_index(drop=True)
    kept = len(rows)
    if kept + len(ledger_frame) != rows_in:
        raise AssertionError(f"accounting error: {kept} kept + {len(ledger_frame)} rejected != {rows_in} rows in")
    by_reason = dict(sorted(Counter(ledger_frame["reason"].astype(str)).items()))
    stored = meta.to_dict(rows_in, kept, by_reason)
    if store is not None and shard_results is not None:
        stored["store"] = store
    manifest_file = manifest.write(root, meta.dataset, rows, stored)
    rejects_file = manifest.write_rejects(root, meta.dataset, ledger_frame)
    return Published(manifest=manifest_file, rejects=rejects_file, rows_in=rows_in, kept=kept, rejected=by_reason)


def republish(root: str | Path, name: str, rows: pd.DataFrame, version: str, made_by: dict[str, Any]) -> Published:
    """Publish ``rows`` as version ``version`` of dataset ``name``, made from its published
    version by a writer that changes only columns the shards do not hold (``split``).

    The new version keeps the dataset's kind, what made it and its counts, with ``made_by``
    added; its rows keep their shards (those of the version made from) and its rejects
    ledger (the same input rows) is left as it is. Holds the dataset's writer lock.

    Raises:
        PublishError: another process writes the dataset.
        AssertionError: ``rows`` are not the published version's rows (a bug in the writer).
    """
    with writer_lock(root, name):
        stored = manifest.read_meta(root, name)
        meta = Metadata.from_dict(stored)
        meta = replace(meta, version=version, made_by={**meta.made_by, **made_by})
        kept = int(stored.get("kept", len(rows)))
        if len(rows) != kept:
            raise AssertionError(f"{name}: {len(rows)} rows republished, {kept} published")
        rows_in, rejected = int(stored.get("rows_in", kept)), dict(stored.get("rejected") or {})
        record = meta.to_dict(rows_in, kept, rejected)
        if stored.get("store"):  # the rows keep their shards, and so where those live
            record["store"] = stored["store"]
        path = manifest.write(root, name, rows.assign(version=version), record)
        return Published(manifest=path, rejects=manifest.rejects_path(root, name), rows_in=rows_in, kept=kept,
                         rejected=rejected)


def move_to_store(root: str | Path, name: str, url: str, *, keep_local: bool = False) -> list[str]:
    """Put dataset ``name``'s published local shards on the store ``url`` and record it there.

    For a dataset published before it had a store (or moved between stores after copying
    its objects with the store's own tools: then the folders are already there and only
    the metadata changes, ``keep_local`` or not). Each of its shard folders
    (``data/shards/<name>/<version>/``: its shards, ``features.json``, ``index.json``) is
    checked against its index and uploaded; the manifest is rewritten with the same rows
    and ``store`` set, so its rows checksum is unchanged. Holds the dataset's writer lock.

    Returns:
        The URLs of the version folders on the store.

    Raises:
        PublishError: a mix or labels-only dataset (no shards of its own), a package used
            in place, or shards that do not match their index.
    """
    url = store_lib.check_url(url)
    with writer_lock(root, name):
        root = Path(root)
        stored, frame = manifest.read_meta(root, name), manifest.read(root, name)
        if stored.get("kind") == "mix" or stored.get("labels_only"):
            raise PublishError(f"{name} has no shards of its own to put on a store (a mix or a labels-only dataset)")
        folders = sorted({Path(s).parent for s in frame["shard"].dropna().astype(str)})
        own = shards.SHARD_ROOT / name
        if any(f.is_absolute() or f.parent != own for f in folders):
            raise PublishError(f"{name}: its shards are not under {own}/ (a package imported in place?); import it with "
                               f"--copy first")
        current = stored.get("store")
        urls = []
        for folder in folders:
            target = store_lib.join(url, folder.as_posix())
            if current and store_lib.check_url(current) == url:
                urls.append(target)
                continue
            if current:  # moved by the store's own tools: the objects must be there, as indexed
                problems = shards.verify(target)
                if problems:
                    raise PublishError(f"{name}: cannot point it at {target}: {problems[0]}")
                urls.append(target)
                continue
            directory = root / folder
            problems = shards.verify(directory)
            if problems:
                raise PublishError(f"{name}: {problems[0]}; `cxrsynth verify {name}` lists every problem")
            index = json.loads((directory / shards.INDEX_NAME).read_text())
            store_lib.publish_version(directory, target, [e["name"] for e in index["shards"]],
                                      (shards.HF_FEATURES_NAME, shards.INDEX_NAME), keep_local=keep_local)
            urls.append(target)
        manifest.write(root, name, frame, {**{k: v for k, v in stored.items() if k != manifest.CHECKSUM_KEY}, "store": url})
        return urls
