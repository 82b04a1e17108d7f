"""MIMIC-CXR-JPG 2.0 (Johnson et al. 2019): metadata, CheXpert labels, split, patients.

Quirks handled here:

- Labels are per *study* (``mimic-cxr-2.0.0-chexpert.csv.gz``: subject_id, study_id and
  the 14 findings, alphabetical); the metadata table has one row per image (dicom_id).
  They join on subject_id + study_id; an image whose study has no label row is rejected
  (``no_labels``). A study with two label rows is kept when the rows agree and its
  images rejected when they differ (``conflicting_labels``): no row wins silently.
- The official split (``mimic-cxr-2.0.0-split.csv.gz``) says train / validate / test;
  validate becomes ``tune`` (counted). A dicom_id listed twice with different splits is
  rejected (``conflicting_split``); so is a subject listed twice in ``patients`` with
  different values (``conflicting_patients``).
- Sex and age come from the MIMIC-IV ``patients`` table (gender, anchor_age).
- Race comes from the optional MIMIC-IV ``admissions`` table (``race``, or ``ethnicity``
  in MIMIC-IV < 2.0), one row per admission: a subject's most frequent known category
  over admissions (ties: the first in :data:`cxrsynth.labels.RACES` order); otherwise null.
- Image path: ``files/p{first two digits}/p{subject_id}/s{study_id}/{dicom_id}.jpg``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from cxrsynth import labels
from cxrsynth.sources import SourceTable, derive_keys, finish, make_rejects, read_table, require_columns, unique_lookup

METADATA_REQUIRED = ("dicom_id", "subject_id", "study_id", "ViewPosition")
LABELS_REQUIRED = ("subject_id", "study_id", *labels.FINDINGS)
SPLIT_REQUIRED = ("dicom_id", "split")
PATIENTS_REQUIRED = ("subject_id", "gender", "anchor_age")


def _ids(column: pd.Series) -> pd.Series:
    """Integer-like id strings without a trailing ``.0`` (pandas may have floated them)."""
    return column.astype("string").str.strip().str.replace(r"\.0$", "", regex=True)


def image_relpath(subject_id: pd.Series, study_id: pd.Series, dicom_id: pd.Series) -> pd.Series:
    """MIMIC-CXR-JPG's image path for each row."""
    return "files/p" + subject_id.str[:2] + "/p" + subject_id + "/s" + study_id + "/" + dicom_id + ".jpg"


def read(
    metadata: str | Path,
    label_table: str | Path,
    split: str | Path | None = None,
    patients: str | Path | None = None,
    images: str | Path | None = None,
    admissions: str | Path | None = None,
) -> SourceTable:
    """Read MIMIC-CXR-JPG tables into the common record table (one row per image).

    Args:
        metadata: ``mimic-cxr-2.0.0-metadata.csv(.gz)``.
        label_table: ``mimic-cxr-2.0.0-chexpert.csv(.gz)`` (or negbio).
        split: Optional ``mimic-cxr-2.0.0-split.csv(.gz)``.
        patients: Optional MIMIC-IV ``patients.csv(.gz)``.
        images: Folder holding ``files/``; defaults to the metadata file's folder.
        admissions: Optional MIMIC-IV ``admissions.csv(.gz)`` (subject_id, race).
    """
    meta = read_table(metadata, "MIMIC metadata")
    require_columns(meta, METADATA_REQUIRED, f"MIMIC metadata {metadata}")
    lab = read_table(label_table, "MIMIC label table")
    require_columns(lab, LABELS_REQUIRED, f"MIMIC label table {label_table}")
    rows_in = len(meta)
    normalized: dict[str, int] = {}

    subject, study, dicom = _ids(meta["subject_id"]), _ids(meta["study_id"]), meta["dicom_id"].str.strip()
    rel = image_relpath(subject, study, dicom)
    root = Path(images) if images is not None else Path(metadata).resolve().parent
    frame = pd.DataFrame(
        {
            "row": np.arange(rows_in, dtype=np.int64),
            "key": derive_keys(dicom),
            "patient_id": subject,
            "study_id": study,
            "source_path": rel,
            "image_path": str(root.resolve()) + "/" + rel,
            "split": pd.Series(pd.NA, index=meta.index, dtype="string"),
            "sex": pd.Series(pd.NA, index=meta.index, dtype="string"),
            "age": pd.Series(pd.NA, index=meta.index, dtype="string"),
            "race": pd.Series(pd.NA, index=meta.index, dtype="string"),
            "view": meta["ViewPosition"],
        }
    )

    lab = lab.assign(subject_id=_ids(lab["subject_id"]), study_id=_ids(lab["study_id"]))
    lab, conflicts = unique_lookup(lab.loc[:, list(LABELS_REQUIRED)], ["subject_id", "study_id"], "label table")
    at = pd.MultiIndex.from_arrays([subject, study])
    has_labels = at.isin(lab.index)
    disputed = _index(conflicts, ["subject_id", "study_id"])
    conflicting = at.isin(disputed)
    rejects = [make_rejects(frame, ~has_labels & ~conflicting, "no_labels", "study has no row in the label table")]
    detail = pd.Series(at.map(dict(zip(disputed, conflicts["detail"]))), index=frame.index, dtype="string")
    rejects.append(make_rejects(frame, conflicting, "conflicting_labels", detail))
    frame = frame.loc[has_labels]
    found = lab.reindex(pd.MultiIndex.from_arrays([frame["patient_id"], frame["study_id"]]))
    raw = {name: pd.Series(found[name].to_numpy(), index=frame.index) for name in labels.FINDINGS}

    if split is not None:
        sp = read_table(split, "MIMIC split")
        require_columns(sp, SPLIT_REQUIRED, f"MIMIC split {split}")
        sp = sp.assign(dicom_id=sp["dicom_id"].str.strip(), split=sp["split"].str.strip())
        sp, conflicts = unique_lookup(sp.loc[:, list(SPLIT_REQUIRED)], ["dicom_id"], "split file")
        dicoms = meta.loc[frame.index, "dicom_id"].str.strip()
        bad = dicoms.isin(conflicts["dicom_id"]).fillna(False).to_numpy(dtype=bool)
        rejects.append(make_rejects(frame, bad, "conflicting_split", dicoms.map(conflicts.set_index("dicom_id")["detail"])))
        frame, dicoms = frame.loc[~bad], dicoms.loc[~bad]
        frame["split"] = dicoms.map(sp["split"]).astype("string")  # raw spellings: finish() maps and counts them
        missing = frame["split"].isna().to_numpy(dtype=bool)
        if missing.any():
            normalized["split: not in the split file -> none"] = int(missing.sum())
    if patients is not None:
        pt = read_table(patients, "MIMIC patients")
        require_columns(pt, PATIENTS_REQUIRED, f"MIMIC patients {patients}")
        pt = pt.assign(subject_id=_ids(pt["subject_id"]))
        pt, conflicts = unique_lookup(pt.loc[:, list(PATIENTS_REQUIRED)], ["subject_id"], "patients table")
        bad = frame["patient_id"].isin(conflicts["subject_id"]).fillna(False).to_numpy(dtype=bool)
        rejects.append(make_rejects(frame, bad, "conflicting_patients",
                                    frame["patient_id"].map(conflicts.set_index("subject_id")["detail"])))
        frame = frame.loc[~bad]
        frame["sex"] = frame["patient_id"].map(pt["gender"]).astype("string")
        frame["age"] = frame["patient_id"].map(pt["anchor_age"]).astype("string")
    if admissions is not None:
        frame["race"] = frame["patient_id"].map(subject_race(admissions)).astype("string")
    raw = {name: column.loc[frame.index] for name, column in raw.items()}
    return finish(frame, raw, rejects, rows_in, normalized=normalized, images_root=root)


def _index(frame: pd.DataFrame, keys: list[str]) -> pd.MultiIndex:
    return pd.MultiIndex.from_frame(frame.loc[:, keys]) if len(frame) else pd.MultiIndex.from_arrays([[]] * len(keys), names=keys)


def subject_race(admissions: str | Path) -> pd.Series:
    """subject_id → race category: the most frequent known one over a subject's admissions."""
    adm = read_table(admissions, "MIMIC admissions")
    column = "race" if "race" in adm.columns else "ethnicity"
    require_columns(adm, ("subject_id", column), f"MIMIC admissions {admissions}")
    known = pd.DataFrame({"subject_id": _ids(adm["subject_id"]), "race": labels.normalize_race(adm[column]).values}).dropna()
    if known.empty:
        return pd.Series(dtype="string")
    order = {race: i for i, race in enumerate(labels.RACES)}
    counts = known.value_counts(["subject_id", "race"]).rename("n").reset_index()
    counts["rank"] = counts["race"].map(order)
    counts = counts.sort_values(["subject_id", "n", "rank"], ascending=[True, False, True])
    return counts.drop_duplicates("subject_id").set_index("subject_id")["race"]
