"""Table-1-style cohort summaries of a manifest (the paper's Table 1 layout)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from cxrsynth import labels, manifest
from cxrsynth.errors import UnknownNameError
from cxrsynth.splits import SPLITS


def cohort_stats(frame: pd.DataFrame) -> dict:
    """Images, patients, female patients (distinct, as in Table 1), age IQR over images,
    and per finding the positive and uncertain image counts, keyed by the manifest's
    snake_case column (``pleural_effusion``), as every other output names findings."""
    n = len(frame)
    female = frame.loc[frame["sex"] == "F", "patient_id"].nunique()
    ages = pd.to_numeric(frame["age"], errors="coerce").dropna().to_numpy(dtype=float)
    iqr = [float(np.percentile(ages, 25)), float(np.percentile(ages, 75))] if len(ages) else None
    findings = labels.findings_matrix(frame) if n else np.zeros((0, len(labels.FINDINGS)), np.int8)
    return {
        "images": int(n),
        "patients": int(frame["patient_id"].nunique()),
        "female_patients": int(female),
        "age_iqr": iqr,
        "labels": {
            name: {"pos": int((findings[:, i] == labels.POSITIVE).sum()), "unc": int((findings[:, i] == labels.UNCERTAIN).sum())}
            for i, name in enumerate(labels.FINDING_COLUMNS)
        },
    }


def dataset_stats(root: str | Path, name: str, split: str | None = None) -> dict:
    """:func:`cohort_stats` of a manifest, optionally of one split (train, tune or test)."""
    if split is not None and split not in SPLITS:
        raise UnknownNameError("split", split, SPLITS)
    frame = manifest.read(root, name)
    if split is not None:
        frame = frame.loc[(frame["split"] == split).fillna(False).to_numpy(dtype=bool)]
    return cohort_stats(frame)
