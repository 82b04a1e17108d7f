"""The label contract: the one place where raw labels and demographics are converted.

Every source adapter (CheXpert, MIMIC-CXR, generic tables, the phantom) hands its raw
values to the functions here; nothing else in cxrsynth converts a label.

Findings are stored per image as ``int8``: 1 positive, 0 negative, -1 uncertain. A blank
("not mentioned") is negative, as in Khosravi et al. Training excludes images with any
uncertain finding; evaluation keeps them and masks the uncertain finding out of that
finding's AUROC (see :func:`has_uncertain`).

Demographics and splits go through the ``normalize_*`` functions, which return a
:class:`Normalized`: the values, a mask of values outside the contract (the caller rejects
those rows: ``bad_sex``, ``bad_age``, ``bad_split``) and the normalisations made, counted
(``age 0 -> unknown``, ``split training -> train``), which the caller reports. Nothing is
changed without a word.
"""

from __future__ import annotations

import re
from typing import NamedTuple

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


class Normalized(NamedTuple):
    """What a ``normalize_*`` function made of one raw column.

    Attributes:
        values: The contract's values (null where the value is unknown or bad).
        bad: Boolean mask of rows whose raw value is outside the domain: the caller rejects
            them (with the reason the function's docstring names), never keeps them as null.
        changed: Counted normalisations that change what the raw value said, by what was
            done (e.g. ``{"age 0 -> unknown": 3}``): the caller reports them.
    """

    values: pd.Series
    bad: np.ndarray
    changed: dict[str, int]


Conversion = tuple[object, bool, str | None]  # (value or None, bad, what was changed or None)


def _per_value(raw: pd.Series, convert, dtype: str) -> Normalized:
    """Apply ``convert(stripped text) -> (value, bad, change)`` once per distinct raw value.

    Demographic columns hold few distinct values, so this costs one hash pass over the
    column (``pd.factorize``) however many rows it has.
    """
    codes, uniques = pd.factorize(raw, use_na_sentinel=True)
    results: list[Conversion] = [convert(str(u).strip()) for u in uniques]
    value_of = np.array([r[0] for r in results] + [None], dtype=object)  # code -1 (missing) -> the last entry
    bad_of = np.array([r[1] for r in results] + [False], dtype=bool)
    values = pd.Series(value_of[codes], index=raw.index, dtype=object).astype(dtype)
    counts = np.bincount(codes[codes >= 0], minlength=len(uniques))
    changed: dict[str, int] = {}
    for (_, _, change), n in zip(results, counts):
        if change and n:
            changed[change] = changed.get(change, 0) + int(n)
    return Normalized(values, bad_of[codes], changed)


_SEX = {"F": "F", "FEMALE": "F", "WOMAN": "F", "M": "M", "MALE": "M", "MAN": "M"}
#: Spellings of "sex not recorded": null, counted.
SEX_UNKNOWN = ("U", "UNK", "UNKNOWN")


def _sex(text: str) -> Conversion:
    upper = text.upper()
    if not upper:
        return None, False, None
    if upper in _SEX:
        return _SEX[upper], False, None
    if upper in SEX_UNKNOWN:
        return None, False, "sex Unknown -> unknown"
    return None, True, None


def normalize_sex(raw: pd.Series) -> Normalized:
    """Sex/gender spellings → "F", "M" or null.

    Blank is null (missing). ``Unknown`` / ``U`` / ``UNK`` are null, counted. Anything else
    (``X``, ``O``, a typo) is outside the domain: ``bad`` (reject reason ``bad_sex``).
    """
    return _per_value(raw, _sex, "string")


#: Oldest age accepted, in years; an older one is a data error (reject ``bad_age``).
AGE_MAX = 120


def _age(text: str) -> Conversion:
    if not text:
        return None, False, None
    try:
        age = float(text)
    except ValueError:
        return None, True, None
    if not (0 <= age <= AGE_MAX):  # also NaN and infinities
        return None, True, None
    if age == 0:
        return None, False, "age 0 -> unknown"
    return age, False, None


def normalize_age(raw: pd.Series) -> Normalized:
    """Age in years as float; null when missing or 0.

    CheXpert writes 0 for unknown ages, hence zero is null (the demographics contract),
    counted. A value that is not a number, negative or above :data:`AGE_MAX` is ``bad``
    (reject reason ``bad_age``).
    """
    return _per_value(raw, _age, "Float64")


_RACE_PATTERNS: tuple[tuple[re.Pattern, str], ...] = tuple((re.compile(p), race) for p, race in (
    # Order matters: "Native Hawaiian" and "American Indian" before plain words.
    (r"hawaiian|pacific islander", RACES[3]),
    (r"american indian|alaska", RACES[0]),
    (r"black|african", RACES[1]),
    (r"\basian", RACES[4]),  # not "Caucasian"
    (r"white|caucasian", RACES[2]),
))


def _race(text: str) -> Conversion:
    if not text:
        return None, False, None
    lower = text.lower()
    for pattern, race in _RACE_PATTERNS:
        if pattern.search(lower):
            return race, False, None
    return None, False, "race outside the 5 categories -> unknown"


def normalize_race(raw: pd.Series) -> Normalized:
    """Map free-text race (CheXpert's PRIMARY_RACE, MIMIC's, in-house) to :data:`RACES`.

    Spellings such as "White, non-Hispanic" or "Black or African American" map to their
    category. A value that names none of them ("Other", "Race and Ethnicity Unknown",
    "Patient Refused", mixed) is null, counted (race is free text: nothing is rejected).
    """
    return _per_value(raw, _race, "string")


def normalize_view(raw: pd.Series) -> Normalized:
    """Upper-case view position (AP, PA, LL, LATERAL, ...); null when blank. Nothing is bad."""
    return _per_value(raw, lambda text: (text.upper() or None, False, None), "string")


SPLITS: tuple[str, ...] = ("train", "tune", "test")
#: Spellings of the splits (lower case) besides their own names; each use is counted.
SPLIT_SPELLINGS: dict[str, str] = {
    "training": "train", "tr": "train",
    "val": "tune", "valid": "tune", "validate": "tune", "validation": "tune", "dev": "tune", "tuning": "tune",
    "testing": "test",
}


def _split(text: str) -> Conversion:
    lower = text.lower()
    if not lower:
        return None, False, None
    if lower in SPLITS:
        return lower, False, None
    if lower in SPLIT_SPELLINGS:
        return SPLIT_SPELLINGS[lower], False, f"split {lower} -> {SPLIT_SPELLINGS[lower]}"
    return None, True, None


def normalize_split(raw: pd.Series) -> Normalized:
    """``train`` / ``tune`` / ``test`` (any case) or a spelling of :data:`SPLIT_SPELLINGS`
    (``training``, ``validate``...), counted; blank is null; anything else is ``bad``
    (reject reason ``bad_split``)."""
    return _per_value(raw, _split, "string")


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
