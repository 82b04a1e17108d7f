"""Publishing a dataset version: the one way every writer finishes one.

Ingest (real data), generate (synthetic replicas) and mix (a training set drawn from
other datasets) each decide their rows, their version and what made them; then each calls
:func:`publish`, which finishes the version the same way for all:

1. when the version has shards of its own, writes their ``index.json`` and points every
   row at its shard (the ``shard`` column: key → ``data/shards/<name>/<version>/<shard>``);
   rows the shards did not take (an unreadable image) are in the shards' rejects;
2. checks that nothing is lost: rows in = rows kept + rows rejected;
3. writes the manifest, with the version's :class:`Metadata` in its parquet metadata, and
   the rejects ledger beside it (rows in input order, each with its reason).

:class:`Metadata` is the typed record of a version (its ``kind``: ``real``, ``synthetic``
or ``mix``). Its stored layout (:meth:`Metadata.to_dict`) is the one manifests have always
had, so existing manifests read back unchanged: a real version stores its source adapter
(``chexpert``, ``mimic``, ``table``...) under ``kind``, and what made a version sits at the
top level beside the common fields.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pandas as pd

from cxrsynth import __version__, manifest, shards
from cxrsynth.errors import CxrsynthError, UnknownNameError

Kind = Literal["real", "synthetic", "mix"]
KINDS: tuple[str, ...] = ("real", "synthetic", "mix")
#: Stored ``kind`` values that are not a real dataset's adapter name.
_STORED_KINDS = ("synthetic", "mix")
#: Top-level metadata keys :func:`publish` fills in; ``made_by`` may not use them.
RESERVED = ("dataset", "version", "kind", "rows_in", "kept", "rejected", "cxrsynth")


@dataclass(frozen=True)
class Metadata:
    """What a dataset version records about itself.

    Attributes:
        dataset: Dataset name.
        version: Version name (a content hash unless named).
        kind: ``real`` (ingested), ``synthetic`` (generated) or ``mix`` (drawn from others).
        made_by: What made the version, JSON-able and kind-specific: a real version's
            inputs, preprocessing, shard size and adapter facts; a synthetic version's
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


def publish(
    root: str | Path,
    meta: Metadata,
    rows: pd.DataFrame,
    *,
    rows_in: int | None = None,
    shard_results: list[shards.ShardResult] | None = None,
    rejects: pd.DataFrame | None = None,
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

    Returns:
        The files written and the counts.

    Raises:
        AssertionError: rows in != rows kept + rows rejected (a bug in the writer).
    """
    root = Path(root)
    rows_in = len(rows) if rows_in is None else rows_in
    ledger = [empty_rejects() if rejects is None else rejects]
    if shard_results is not None:
        directory = shards.shard_dir(root, meta.dataset, meta.version)
        shards.write_index(directory, meta.dataset, meta.version, shard_results)
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
    manifest_file = manifest.write(root, meta.dataset, rows, meta.to_dict(rows_in, kept, by_reason))
    rejects_file = manifest.write_rejects(root, meta.dataset, ledger_frame)
    return Published(manifest=manifest_file, rejects=rejects_file, rows_in=rows_in, kept=kept, rejected=by_reason)
