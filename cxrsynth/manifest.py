"""Parquet manifests (one per dataset) and the DuckDB views over them.

A manifest has one row per image with the columns of :data:`COLUMNS`; the dataset-level
facts (version, source, preprocessing, counts) live in the parquet file's key-value
metadata under ``cxrsynth`` as JSON, with ``rows_sha256``, a checksum of the row data that
:func:`write` computes (:func:`rows_checksum`) and ``cxrsynth verify`` checks, so an edit
made outside cxrsynth shows. Rejected input rows sit beside it in ``<name>.rejects.parquet``.

DuckDB sees every manifest as a view named after its dataset and all of them as the
union view ``images``, so ``cxrsynth query`` and the DuckDB CLI see the same files.
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from cxrsynth import labels
from cxrsynth.errors import CxrsynthError, CxrsynthWarning

MANIFEST_DIR = "manifests"
#: A dataset name, matched whole (``fullmatch``: ``$`` alone also matches before a final newline).
NAME_PATTERN = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
#: Longest dataset name: it becomes a SQL view name and part of file names (manifest,
#: rejects ledger, shard folder and ``<name>-000000.tar``), well under 255 bytes.
NAME_MAX = 64

#: Manifest columns and their arrow types, in order.
#: What each manifest column holds, written into the parquet schema (each field's ``description``
#: metadata, kept in the file's arrow schema), so a reader without cxrsynth sees it:
#: ``pyarrow.parquet.read_schema(path).field("age").metadata[b"description"]``.
DESCRIPTIONS: dict[str, str] = {
    "key": "the sample's unique key in its shards (<key>.png + <key>.json)",
    "dataset": "the dataset (manifest) name", "version": "the dataset version the row belongs to",
    "shard": "the WebDataset tar holding the image, relative to the project root; null for labels-only rows",
    "split": "train, tune or test; null before `cxrsynth split`",
    "patient_id": "the source's patient identifier (real rows; null for synthetic rows)",
    "study_id": "the source's study identifier (real rows; null for synthetic rows)",
    "source_path": "the image path as the source table gave it (real rows)",
    "sex": "F, M or null (unknown)",
    "age": "age in years; null when unknown (a source's 0, CheXpert's code for unknown, is stored as null)",
    "race": "one of five categories or null (unknown or another answer)",
    "view": "view position, upper case (AP, PA, LATERAL, LL...); null when unknown",
    **{c: f"{f}: 1 positive, 0 negative (or blank in the source), -1 uncertain"
       for f, c in zip(labels.FINDINGS, labels.FINDING_COLUMNS)},
    "origin": "real or synthetic",
    "source_key": "synthetic rows: the key of the real row whose labels and demographics conditioned the image",
    "replica": "synthetic rows: which replica of the conditioning rows (0, 1, ...)",
    "seed": "synthetic rows: the image's sampling seed",
    "guidance": "synthetic rows: classifier-free guidance scale w (standard formula; the paper's CFG is w - 1)",
    "sampler": "synthetic rows: the sampler (ddim, dpmpp...)", "steps": "synthetic rows: sampler steps",
    "generator_id": "synthetic rows: short sha256 of the generator's weights",
}
_TYPES = [
    ("key", pa.string()),
    ("dataset", pa.string()),
    ("version", pa.string()),
    ("shard", pa.string()),
    ("split", pa.string()),
    ("patient_id", pa.string()),
    ("study_id", pa.string()),
    ("source_path", pa.string()),
    ("sex", pa.string()),
    ("age", pa.float64()),
    ("race", pa.string()),
    ("view", pa.string()),
    *[(c, pa.int8()) for c in labels.FINDING_COLUMNS],
    ("origin", pa.string()),
    ("source_key", pa.string()),
    ("replica", pa.int32()),
    ("seed", pa.int64()),
    ("guidance", pa.float64()),
    ("sampler", pa.string()),
    ("steps", pa.int32()),
    ("generator_id", pa.string()),
]
SCHEMA = pa.schema([pa.field(name, kind, metadata={"description": DESCRIPTIONS[name]}) for name, kind in _TYPES])
COLUMNS: tuple[str, ...] = tuple(SCHEMA.names)
#: Metadata key of the row checksum (:func:`rows_checksum`) that :func:`write` records.
CHECKSUM_KEY = "rows_sha256"
REJECT_SCHEMA = pa.schema(
    [("row", pa.int64()), ("key", pa.string()), ("source_path", pa.string()), ("reason", pa.string()), ("detail", pa.string())]
)


class ManifestError(CxrsynthError):
    """A manifest that does not exist, cannot be read or is not valid, or a query that fails."""


def check_name(name: str) -> str:
    """Dataset names become SQL view names: letters, digits and underscores."""
    if len(name) > NAME_MAX:
        raise ManifestError(f"dataset name {name[:20]!r}... has {len(name)} characters; at most {NAME_MAX} characters")
    if not NAME_PATTERN.fullmatch(name):
        raise ManifestError(f"dataset name {name!r} must match {NAME_PATTERN.pattern} (it becomes a SQL view name)")
    if name.lower() == "images":
        raise ManifestError("'images' is reserved for the union view of all manifests")
    return name


def manifest_path(root: str | Path, name: str) -> Path:
    return Path(root) / MANIFEST_DIR / f"{name}.parquet"


def rejects_path(root: str | Path, name: str) -> Path:
    return Path(root) / MANIFEST_DIR / f"{name}.rejects.parquet"


def conform(frame: pd.DataFrame) -> pa.Table:
    """Order and type a frame's columns as :data:`SCHEMA`; absent columns become null."""
    data = {}
    for field in SCHEMA:
        if field.name in frame.columns:
            column = frame[field.name]
            if pa.types.is_string(field.type):
                column = column.astype("string")
            data[field.name] = pa.array(column, type=field.type, from_pandas=True)
        else:
            data[field.name] = pa.nulls(len(frame), type=field.type)
    return pa.table(data, schema=SCHEMA)


def rows_checksum(table: pa.Table) -> str:
    """sha256 of a manifest's row data: every :data:`SCHEMA` column in order, values and nulls.

    Computed from the arrow buffers (validity bits, then the values; strings as lengths and
    bytes), so it is the same for the same rows whatever wrote the file. A column the
    table lacks counts as all null; one that cannot be cast to its schema type raises.
    """
    import numpy as np
    import pyarrow.compute as pc

    digest = hashlib.sha256()
    for field in SCHEMA:
        if field.name in table.column_names:
            column = table.column(field.name).cast(field.type).combine_chunks()
        else:
            column = pa.nulls(table.num_rows, type=field.type)
        digest.update(field.name.encode() + b"\0")
        digest.update(np.packbits(column.is_valid().to_numpy(zero_copy_only=False)).tobytes())
        if pa.types.is_string(field.type):
            filled = pc.fill_null(column, "")
            lengths = pc.binary_length(filled).to_numpy(zero_copy_only=False).astype("<i8")
            digest.update(lengths.tobytes())
            offsets = np.frombuffer(filled.buffers()[1], dtype=np.int32)[filled.offset : filled.offset + len(filled) + 1]
            data = filled.buffers()[2]
            if data is not None and len(offsets):
                digest.update(memoryview(data)[int(offsets[0]) : int(offsets[-1])])
        else:
            values = pc.fill_null(column, 0).to_numpy(zero_copy_only=False)
            digest.update(values.astype(values.dtype.newbyteorder("<")).tobytes())
    return digest.hexdigest()


def stored_checksum(root: str | Path, name: str) -> tuple[str | None, str]:
    """``(recorded, computed)``: the row checksum in a manifest's metadata and that of its rows now.

    Raises:
        ManifestError: the manifest cannot be read, or a column is not of its schema type.
    """
    path = manifest_path(root, name)
    try:
        table = pq.read_table(path)
        computed = rows_checksum(table)
    except (pa.ArrowException, OSError) as exc:
        raise _unreadable(path, exc) from None
    return read_meta(root, name).get(CHECKSUM_KEY), computed


def _atomic_write(table: pa.Table, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp, compression="zstd")
    tmp.replace(path)


def write(root: str | Path, name: str, frame: pd.DataFrame, meta: dict) -> Path:
    """Write a manifest atomically, with ``meta`` (JSON-able) and the rows' checksum
    (:data:`CHECKSUM_KEY`) in its parquet metadata."""
    check_name(name)
    table = conform(frame)
    keys = table.column("key")
    if keys.null_count or len(pa.compute.unique(keys)) != len(keys):
        raise ManifestError(f"manifest {name}: keys must be unique and non-null")
    meta = {**meta, CHECKSUM_KEY: rows_checksum(table)}
    table = table.replace_schema_metadata({"cxrsynth": json.dumps(meta, sort_keys=True, default=str)})
    path = manifest_path(root, name)
    _atomic_write(table, path)
    return path


def write_rejects(root: str | Path, name: str, rejects: pd.DataFrame) -> Path:
    table = pa.Table.from_pandas(rejects.loc[:, list(REJECT_SCHEMA.names)], schema=REJECT_SCHEMA, preserve_index=False)
    path = rejects_path(root, name)
    _atomic_write(table, path)
    return path


def read(root: str | Path, name: str) -> pd.DataFrame:
    """Read a manifest as a pandas frame (nullable dtypes)."""
    path = manifest_path(root, name)
    if not path.is_file():
        known = ", ".join(list_names(root)) or "none"
        raise ManifestError(f"no manifest named {name!r} under {Path(root) / MANIFEST_DIR} (known: {known})")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:  # truncated, empty or not parquet
        raise _unreadable(path, exc) from None
    return table.to_pandas(types_mapper=pd.ArrowDtype).pipe(_to_nullable)


def _unreadable(path: Path, exc: Exception) -> ManifestError:
    reason = re.sub(r"Could not open Parquet input source '[^']*': ", "", " ".join(str(exc).split())) or type(exc).__name__
    return ManifestError(f"manifest {path} is unreadable ({reason}); restore it (git, DVC) or remove it")


def _to_nullable(frame: pd.DataFrame) -> pd.DataFrame:
    out = {}
    for column in frame.columns:
        dtype = frame[column].dtype
        kind = getattr(dtype, "pyarrow_dtype", None)
        if kind is not None and pa.types.is_string(kind):
            out[column] = frame[column].astype("string")
        elif kind is not None and pa.types.is_int8(kind):
            out[column] = frame[column].astype("int8") if not frame[column].isna().any() else frame[column].astype("Int8")
        elif kind is not None and pa.types.is_floating(kind):
            out[column] = frame[column].astype("Float64")
        elif kind is not None and pa.types.is_integer(kind):
            out[column] = frame[column].astype("Int64")
        else:
            out[column] = frame[column]
    return pd.DataFrame(out)


def read_meta(root: str | Path, name: str) -> dict:
    """The dataset-level metadata stored with a manifest."""
    path = manifest_path(root, name)
    if not path.is_file():
        raise ManifestError(f"no manifest named {name!r} under {Path(root) / MANIFEST_DIR}")
    try:
        raw = pq.read_schema(path).metadata or {}
        return json.loads(raw.get(b"cxrsynth", b"{}"))
    except (pa.ArrowException, OSError, ValueError) as exc:  # not parquet, or metadata not JSON
        raise _unreadable(path, exc) from None


def list_names(root: str | Path) -> list[str]:
    """Dataset names with a manifest under ``root``, sorted."""
    folder = Path(root) / MANIFEST_DIR
    return sorted(p.name[: -len(".parquet")] for p in folder.glob("*.parquet") if not p.name.endswith(".rejects.parquet"))


def views_sql(root: str | Path, relative: bool = False) -> str:
    """SQL creating a view per manifest and the union view ``images`` (all but mixes).

    With ``relative=True`` the parquet paths are relative to ``root``, for the DuckDB CLI
    started there: ``cxrsynth query --views > views.sql && duckdb -init views.sql``.

    A manifest that cannot be read (a junk or truncated ``.parquet``) does not break the
    others: it is left out of ``images`` with a :class:`~cxrsynth.errors.CxrsynthWarning`
    naming the file, and its own view raises that the file is unreadable when queried.
    """
    names = list_names(root)
    statements = []
    metas: dict[str, dict] = {}
    for name in names:
        try:
            metas[name] = read_meta(root, name)
        except ManifestError as exc:
            warnings.warn(f"{exc}; left out of the view images", CxrsynthWarning, stacklevel=2)
            message = str(exc).replace("'", "''")
            statements.append(f'CREATE OR REPLACE VIEW "{name}" AS SELECT CAST(NULL AS VARCHAR) AS key FROM '
                              f"(SELECT error('{message}') AS unreadable) WHERE unreadable IS NULL;")
    names = [n for n in names if n in metas]
    union_names = [n for n in names if metas[n].get("kind") != "mix"]  # a mix repeats others' rows
    for name in names:
        path = manifest_path(root, name)
        path = path.relative_to(root) if relative else path.resolve()
        literal = str(path).replace("'", "''")
        statements.append(f'CREATE OR REPLACE VIEW "{name}" AS SELECT * FROM read_parquet(\'{literal}\');')
    if union_names:
        union = " UNION ALL BY NAME ".join(f'SELECT * FROM "{n}"' for n in union_names)
    else:
        columns = ", ".join(f'CAST(NULL AS VARCHAR) AS "{c}"' for c in COLUMNS)
        union = f"SELECT {columns} WHERE false"
    statements.append(f"CREATE OR REPLACE VIEW images AS {union};")
    return "\n".join(statements) + "\n"


def connect(root: str | Path, database: str = ":memory:"):
    """A DuckDB connection with a view per manifest and the union view ``images``."""
    import duckdb

    if not Path(root).is_dir():
        raise ManifestError(f"project root {root} does not exist (--root names the folder holding manifests/)")
    con = duckdb.connect(database)
    con.execute(views_sql(root))
    return con


def query(root: str | Path, sql: str) -> pd.DataFrame:
    """Run SQL over all manifests (views per dataset + ``images``) and return a frame.

    Raises:
        ManifestError: the SQL is empty or fails (DuckDB's message), or ``root`` does not exist.
    """
    import duckdb

    if not sql or not sql.strip():
        raise ManifestError("empty SQL: give a statement, e.g. SELECT count(*) FROM images")
    con = connect(root)
    try:
        result = con.execute(sql)
        if result is None or result.description is None:
            raise ManifestError(f"the SQL returns no rows to show (no SELECT?): {sql.strip()[:80]!r}")
        return result.fetchdf()
    except duckdb.Error as exc:
        raise ManifestError(" ".join(str(exc).split())) from None
    finally:
        con.close()
