"""CheXpert (Irvin et al. 2019): ``train.csv`` / ``valid.csv`` plus images.

Quirks handled here:

- ``Path`` starts with ``CheXpert-v1.0/`` or ``CheXpert-v1.0-small/`` (or anything else);
  rows are matched on the part from ``train/``, ``valid/`` or ``test/`` on.
- Patient and study come from the path: ``train/patient00003/study1/view1_frontal.jpg``.
- ``Age`` 0 means unknown; ``Sex`` may be ``Unknown``.
- Lateral images have a blank ``AP/PA``; their view is ``LATERAL``.
- Race is not in the CSV: it comes from the optional demographics file (CheXpert's
  ``CHEXPERT DEMO.xlsx``, or a CSV export: PATIENT, GENDER, AGE_AT_CXR, PRIMARY_RACE),
  joined by patient. Its GENDER and AGE_AT_CXR fill in a *missing* Sex or Age (blank,
  ``Unknown``, age 0), counted as ``sex from demographics`` / ``age from demographics``;
  a CSV value that is invalid (age 300, sex ``X``) is rejected, never replaced. A patient
  listed twice with different values in the demographics file is a conflict: its rows
  are rejected (``conflicting_demographics``).
- ``--include``: a CSV with a ``Path`` column (a published split) restricts the rows;
  the rows it leaves out are recorded as rejects (``not_included``) and the listed paths
  that match no row are counted in ``info["include_not_found"]``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from cxrsynth import labels
from cxrsynth.sources import SourceTable, derive_keys, finish, make_rejects, read_table, require_columns, unique_lookup

REQUIRED = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *labels.FINDINGS)
DEMOGRAPHICS_REQUIRED = ("PATIENT", "GENDER", "AGE_AT_CXR", "PRIMARY_RACE")
_RELATIVE = r"((?:train|valid|test)/(patient\d+)/(study\d+)/[^/]+)$"


def relative_path(paths: pd.Series) -> pd.DataFrame:
    """Split CheXpert paths into ``rel`` (from train/valid/test on), ``patient``, ``study``."""
    parts = paths.astype("string").str.replace("\\", "/", regex=False).str.extract(_RELATIVE)
    parts.columns = ["rel", "patient", "study"]
    return parts


def read(
    csv: str | Path,
    images: str | Path | None = None,
    demographics: str | Path | None = None,
    include: str | Path | None = None,
) -> SourceTable:
    """Read a CheXpert CSV into the common record table.

    Args:
        csv: ``train.csv`` or ``valid.csv``.
        images: Folder holding ``train/``/``valid/`` (or the folder above, holding
            ``CheXpert-v1.0/``). Defaults to the CSV's folder.
        demographics: Optional CheXpert demographics table (CSV, parquet or xlsx).
        include: Optional CSV with a ``Path`` column restricting the rows.

    Raises:
        SourceError: a file is missing or lacks required columns.
    """
    table = read_table(csv, "CheXpert CSV")
    require_columns(table, REQUIRED, f"CheXpert CSV {csv}")
    rows_in = len(table)
    parts = relative_path(table["Path"])
    frame = pd.DataFrame(
        {
            "row": np.arange(rows_in, dtype=np.int64),
            "key": derive_keys(parts["rel"].str.replace(r"\.[A-Za-z0-9]+$", "", regex=True), parts["rel"]),
            "patient_id": parts["patient"],
            "study_id": parts["patient"] + "_" + parts["study"],
            "source_path": table["Path"],
            "rel": parts["rel"],
            "split": pd.Series(pd.NA, index=table.index, dtype="string"),
            "sex": table["Sex"],
            "age": table["Age"],
            "race": pd.Series(pd.NA, index=table.index, dtype="string"),
            "view": table["AP/PA"].mask(
                table["Frontal/Lateral"].str.strip().str.lower() == "lateral", "LATERAL"
            ),
        }
    )
    rejects = []
    bad_path = frame["rel"].isna().to_numpy()
    rejects.append(make_rejects(frame, bad_path, "bad_path", "Path has no train|valid|test/patientN/studyN/ part"))
    info: dict = {}

    if include is not None:
        listed = read_table(include, "include list")
        require_columns(listed, ("Path",), f"include list {include}")
        wanted = set(relative_path(listed["Path"])["rel"].dropna())
        present = frame["rel"].isin(wanted).fillna(False).to_numpy(dtype=bool)
        dropped = ~present & ~bad_path
        rejects.append(make_rejects(frame, dropped, "not_included", f"not listed in {Path(include).name}"))
        info["include_listed"] = len(wanted)
        info["include_not_found"] = len(wanted - set(frame["rel"].dropna()))
        bad_path = bad_path | dropped
    frame = frame.loc[~bad_path]

    normalized: dict[str, int] = {}
    if demographics is not None:
        demo = read_table(demographics, "CheXpert demographics")
        require_columns(demo, DEMOGRAPHICS_REQUIRED, f"demographics {demographics}")
        demo, conflicts = unique_lookup(demo.loc[:, list(DEMOGRAPHICS_REQUIRED)], ["PATIENT"], "demographics file")
        conflicting = frame["patient_id"].isin(conflicts["PATIENT"]).fillna(False).to_numpy(dtype=bool)
        detail = frame["patient_id"].map(conflicts.set_index("PATIENT")["detail"]) if len(conflicts) else ""
        rejects.append(make_rejects(frame, conflicting, "conflicting_demographics", detail))
        frame = frame.loc[~conflicting]
        patient = frame["patient_id"]
        frame["race"] = patient.map(demo["PRIMARY_RACE"]).astype("string")
        for column, source in (("sex", "GENDER"), ("age", "AGE_AT_CXR")):
            given = getattr(labels, f"normalize_{column}")(frame[column])
            known = patient.map(demo[source]).astype("string")
            fill = (given.values.isna().to_numpy(dtype=bool) & ~given.bad & known.notna().to_numpy(dtype=bool)
                    & known.str.strip().ne("").fillna(False).to_numpy(dtype=bool))
            frame[column] = frame[column].mask(fill, known)
            if fill.any():
                normalized[f"{column} from demographics"] = int(fill.sum())

    frame["image_path"] = _image_paths(frame, csv, images)
    raw = {name: table.loc[frame.index, name] for name in labels.FINDINGS}
    return finish(frame.drop(columns=["rel"]), raw, rejects, rows_in, info, normalized=normalized,
                  images_root=_images_root(csv, images))


def _images_root(csv: str | Path, images: str | Path | None) -> Path:
    return Path(images) if images is not None else Path(csv).resolve().parent


def _image_paths(frame: pd.DataFrame, csv: str | Path, images: str | Path | None) -> pd.Series:
    """Resolve image files: ``images/<rel>`` or ``images/<original Path>``, whichever exists."""
    root = _images_root(csv, images)
    first = frame["source_path"].str.split("/", n=1).str[0]
    is_dir = {p: (root / p).is_dir() for p in first.dropna().unique()}
    starts_at_split = frame["source_path"].str.match(r"^(train|valid|test)/").fillna(False).astype(bool)
    with_prefix = first.map(is_dir).fillna(False).astype(bool) & ~starts_at_split
    base = str(root.resolve()) + "/"
    return (base + frame["source_path"].where(with_prefix, frame["rel"])).astype("string")
