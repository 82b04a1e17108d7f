"""A generic table (CSV or parquet) with a column mapping, for in-house data.

``--map COLUMN=FIELD`` names which table column holds which record field. Fields:
``path`` (image file, relative to ``--images`` or the table's folder), ``key``,
``patient_id``, ``study_id``, ``sex``, ``age``, ``race``, ``view``, ``split``, and any
finding (display name such as ``Pleural Effusion`` or column name ``pleural_effusion``).
Findings whose column is named exactly like the finding need no mapping. Images may be
PNG, JPEG or DICOM. Without a ``key`` mapping the key is the image path without its
extension, made WebDataset-safe (:func:`~cxrsynth.sources.derive_keys`: a short hash keeps
paths distinct that differ only in characters a key cannot hold, or in their extension).
Split values are ``train`` / ``tune`` / ``test`` or a counted spelling of them
(``training``, ``validate``...; :func:`cxrsynth.labels.normalize_split`); any other value is
rejected (``bad_split``). Images must lie under the images root (relative paths with
``../`` and absolute paths elsewhere are rejected as ``outside_root`` unless the ingest
allows them).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from cxrsynth import labels
from cxrsynth.sources import SourceError, SourceTable, derive_keys, finish, read_table, require_columns

FIELDS = ("path", "key", "patient_id", "study_id", "sex", "age", "race", "view", "split")
_FINDING_BY_ANY = {**{f: f for f in labels.FINDINGS}, **{c: f for f, c in labels.COLUMN_OF.items()}}


def parse_mapping(pairs: list[str] | dict[str, str]) -> dict[str, str]:
    """``["Col=field", ...]`` → {field: column}; fails on unknown fields or bad syntax."""
    if isinstance(pairs, dict):
        items = list(pairs.items())
    else:
        items = []
        for pair in pairs:
            column, sep, target = pair.rpartition("=")
            if not sep or not column or not target:
                raise SourceError(f"--map expects COLUMN=FIELD, got {pair!r}")
            items.append((column, target))
    mapping: dict[str, str] = {}
    for column, target in items:
        target = target.strip()
        if target not in FIELDS and target not in _FINDING_BY_ANY:
            raise SourceError(
                f"--map {column}={target}: unknown field {target!r}; "
                f"fields are {', '.join(FIELDS)} and the 14 findings"
            )
        mapping[_FINDING_BY_ANY.get(target, target)] = column
    return mapping


def read(
    path: str | Path,
    mapping: list[str] | dict[str, str],
    images: str | Path | None = None,
) -> SourceTable:
    """Read an in-house table into the common record table.

    Args:
        path: CSV (optionally gzipped) or parquet file.
        mapping: ``COLUMN=FIELD`` pairs (see module docstring).
        images: Folder that image paths are relative to; defaults to the table's folder.
    """
    table = read_table(path, "table")
    fields = parse_mapping(mapping)
    for finding in labels.FINDINGS:
        if finding not in fields and finding in table.columns:
            fields[finding] = finding
    missing_fields = [f for f in ("path", "patient_id") if f not in fields]
    if missing_fields:
        raise SourceError(f"--map must name a column for: {', '.join(missing_fields)}")
    require_columns(table, sorted(set(fields.values())), f"table {path}")
    missing_findings = [f for f in labels.FINDINGS if f not in fields]
    if missing_findings:
        raise SourceError(
            f"table {path} has no column for finding(s): {', '.join(missing_findings)} "
            "(name them like the finding or map them with --map COLUMN=FINDING)"
        )
    rows_in = len(table)
    root = Path(images) if images is not None else Path(path).resolve().parent

    def column(field: str) -> pd.Series:
        if field in fields:
            return table[fields[field]].astype("string")
        return pd.Series(pd.NA, index=table.index, dtype="string")

    source = column("path")  # verbatim: " a.png" is not a.png (stripped, it took that file's pixels)
    absolute = source.str.startswith("/").fillna(False).astype(bool)
    image_path = source.where(absolute, str(root.resolve()) + "/" + source)
    if "key" in fields:
        key = derive_keys(column("key"))
    else:
        key = derive_keys(source.str.replace(r"\.[A-Za-z0-9]+$", "", regex=True), source)
    frame = pd.DataFrame(
        {
            "row": np.arange(rows_in, dtype=np.int64),
            "key": key,
            "patient_id": column("patient_id").str.strip(),
            "study_id": column("study_id").str.strip(),
            "source_path": source,
            "image_path": image_path,
            "split": column("split"),
            "sex": column("sex"),
            "age": column("age"),
            "race": column("race"),
            "view": column("view"),
        }
    )
    raw = {finding: table[fields[finding]] for finding in labels.FINDINGS}
    return finish(frame, raw, [], rows_in, images_root=root)
