"""The label contract: the one place where raw labels and demographics are converted.

Every source adapter (CheXpert, MIMIC-CXR, generic tables, the phantom) hands its raw
values to the functions here; nothing else in cxrsynth converts a label.

Findings are stored per image as ``int8``: 1 positive, 0 negative, -1 uncertain. A blank
("not mentioned") is negative, as in Khosravi et al. Training excludes images with any
uncertain finding; evaluation keeps them and masks the uncertain finding out of that
finding's AUROC (see :func:`has_uncertain`).
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

#: The 14 CheXpert findings, in the order of CheXpert's train.csv.
FINDINGS: tuple[str, ...] = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)

#: Manifest column names for the findings (snake_case, so SQL needs no quoting).
FINDING_COLUMNS: tuple[str, ...] = tuple(
    re.sub(r"[^a-z0-9]+", "_", f.lower()).strip("_") for f in FINDINGS
)
COLUMN_OF: dict[str, str] = dict(zip(FINDINGS, FINDING_COLUMNS))

POSITIVE, NEGATIVE, UNCERTAIN = 1, 0, -1

#: Race categories of the generator's conditioning vector, in its order (paper code).
RACES: tuple[str, ...] = (
    "American Indian or Alaska Native",
    "Black or African American",
    "White",
    "Native Hawaiian or Other Pacific Islander",
    "Asian",
)

SEXES: tuple[str, ...] = ("F", "M")

#: Length of the generator conditioning vector: age decade, sex (2), race (5), findings.
CONDITION_SIZE = 1 + len(SEXES) + len(RACES) + len(FINDINGS)


def encode_findings(raw: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Map one raw finding column to the contract's int8 codes.

    Accepts CheXpert's conventions: 1.0 / 0.0 / -1.0 (as numbers or strings), and blank
    (NaN, None or empty string) meaning "not mentioned", which is negative.

    Args:
        raw: The raw column, any dtype.

    Returns:
        ``(codes, bad)``: int8 codes (0 where ``bad``) and a boolean mask of values
        outside the domain, which the caller must reject, not silently keep.
    """
    as_text = raw.astype("string").str.strip()
    blank = raw.isna().to_numpy() | (as_text.fillna("") == "").to_numpy()
    values = pd.to_numeric(as_text.mask(blank), errors="coerce").to_numpy(dtype=float)
    ok = blank | np.isin(values, (1.0, 0.0, -1.0))
    codes = np.where(ok & ~blank, np.nan_to_num(values), 0).astype(np.int8)
    return codes, ~ok


def normalize_sex(raw: pd.Series) -> pd.Series:
    """Map sex/gender spellings to "F", "M" or null (unknown)."""
    text = raw.astype("string").str.strip().str.upper()
    mapped = text.map(
        {"F": "F", "FEMALE": "F", "WOMAN": "F", "M": "M", "MALE": "M", "MAN": "M"},
        na_action="ignore",
    )
    return mapped.astype("string")


def normalize_age(raw: pd.Series) -> pd.Series:
    """Age in years as float; null when missing, not a number, zero or negative.

    CheXpert writes 0 for unknown ages, hence zero is null (the demographics contract).
    """
    age = pd.to_numeric(raw, errors="coerce").astype("Float64")
    return age.mask(age <= 0)


_RACE_PATTERNS: tuple[tuple[str, str], ...] = (
    # Order matters: "Native Hawaiian" and "American Indian" before plain words.
    (r"hawaiian|pacific islander", RACES[3]),
    (r"american indian|alaska", RACES[0]),
    (r"black|african", RACES[1]),
    (r"\basian", RACES[4]),  # not "Caucasian"
    (r"white|caucasian", RACES[2]),
)


def normalize_race(raw: pd.Series) -> pd.Series:
    """Map free-text race (CheXpert's PRIMARY_RACE, MIMIC's, in-house) to :data:`RACES`.

    Spellings such as "White, non-Hispanic" or "Black or African American" map to their
    category; mixed ("Other", "Race and Ethnicity Unknown", "Patient Refused") is null.
    """
    text = raw.astype("string").str.strip().str.lower()
    out = pd.Series(pd.NA, index=raw.index, dtype="string")
    for pattern, race in _RACE_PATTERNS:
        hit = text.str.contains(pattern, regex=True).fillna(False).astype(bool) & out.isna()
        out[hit] = race
    return out


def normalize_view(raw: pd.Series) -> pd.Series:
    """Upper-case view position (AP, PA, LL, LATERAL, ...); null when blank."""
    text = raw.astype("string").str.strip().str.upper()
    return text.mask(text == "")


def findings_matrix(frame: pd.DataFrame) -> np.ndarray:
    """The (N, 14) int8 finding matrix of a manifest frame, in :data:`FINDINGS` order."""
    return frame.loc[:, list(FINDING_COLUMNS)].to_numpy(dtype=np.int8)


def has_uncertain(frame: pd.DataFrame) -> np.ndarray:
    """Boolean mask of rows with any uncertain finding (excluded from training)."""
    return (findings_matrix(frame) == UNCERTAIN).any(axis=1)


def conditioning_vectors(frame: pd.DataFrame) -> np.ndarray:
    """The generator's (N, 22) float32 conditioning vectors, as in the paper's code.

    Layout: ``[age // 10, sex one-hot (F, M), race one-hot (RACES), 14 findings]``.
    Unknowns are zeros: an unknown age gives decade 0, an unknown sex or race an
    all-zero one-hot. Uncertain findings (-1) are passed through as -1; training sets
    exclude them, so a generator never sees them.
    """
    n = len(frame)
    out = np.zeros((n, CONDITION_SIZE), dtype=np.float32)
    age = pd.to_numeric(frame["age"], errors="coerce").to_numpy(dtype=float, na_value=np.nan)
    out[:, 0] = np.nan_to_num(np.floor(age / 10.0), nan=0.0)
    sex = frame["sex"].astype("string")
    for i, s in enumerate(SEXES):
        out[:, 1 + i] = (sex == s).fillna(False).to_numpy(dtype=bool)
    race = frame["race"].astype("string")
    for i, r in enumerate(RACES):
        out[:, 1 + len(SEXES) + i] = (race == r).fillna(False).to_numpy(dtype=bool)
    out[:, 1 + len(SEXES) + len(RACES):] = findings_matrix(frame)
    return out
