"""Patient-level train / tune / test splits, written into the manifest.

Patients are ordered by a seeded hash of their id and cut at exact patient counts, so a
split is deterministic for a seed, independent of row order, and no patient is ever in
two splits. ``view`` restricts which images take part (the others get a null split).
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cxrsynth import manifest
from cxrsynth.config import Config
from cxrsynth.errors import CxrsynthError

SPLITS = ("train", "tune", "test")


@dataclass(frozen=True)
class SplitParams(Config):
    """Fractions are of patients. ``view`` keeps only images of that view (e.g. AP)."""

    kind = "split"  # how errors name these settings (a class attribute, not a field)

    tune: float = 0.1
    test: float = 0.0
    view: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not (0 <= self.tune <= 1 and 0 <= self.test <= 1 and self.tune + self.test <= 1):
            raise CxrsynthError(f"--tune {self.tune} and --test {self.test} must be in [0, 1] and sum to at most 1")


def _order(patients: np.ndarray, seed: int) -> np.ndarray:
    """A seeded pseudo-random order of patient ids (stable: a hash, not a shuffle)."""
    salt = str(seed).encode()
    digests = [hashlib.blake2b(salt + b"\0" + str(p).encode(), digest_size=8).digest() for p in patients]
    return np.argsort(np.array([int.from_bytes(d, "big") for d in digests], dtype=np.uint64), kind="stable")


def assign(frame: pd.DataFrame, params: SplitParams) -> pd.Series:
    """The split of each row (train/tune/test, or null for rows outside ``view``)."""
    eligible = np.ones(len(frame), dtype=bool)
    if params.view is not None:
        eligible = (frame["view"].astype("string").str.upper() == params.view.upper()).fillna(False).to_numpy(dtype=bool)
    patients = np.sort(frame.loc[eligible, "patient_id"].astype(str).unique())
    order = patients[_order(patients, params.seed)]
    n_test = int(round(params.test * len(order)))
    n_tune = int(round(params.tune * len(order)))
    split_of = {p: "test" for p in order[:n_test]}
    split_of.update({p: "tune" for p in order[n_test : n_test + n_tune]})
    split_of.update({p: "train" for p in order[n_test + n_tune :]})
    out = frame["patient_id"].astype(str).map(split_of).astype("string")
    out[~eligible] = pd.NA
    return out


def split(root: str | Path, name: str, params: SplitParams) -> dict[str, int]:
    """Assign splits in manifest ``name`` and rewrite it (holding its writer lock); returns images per split."""
    from cxrsynth.publish import writer_lock

    with writer_lock(root, name):
        frame = manifest.read(root, name)
        meta = manifest.read_meta(root, name)
        frame["split"] = assign(frame, params)
        check_disjoint(frame)
        meta["split"] = asdict(params)
        manifest.write(root, name, frame, meta)
    return {s: int((frame["split"] == s).sum()) for s in SPLITS} | {"none": int(frame["split"].isna().sum())}


def check_disjoint(frame: pd.DataFrame) -> None:
    """Raise if any patient appears in more than one split."""
    assigned = frame.loc[frame["split"].notna(), ["patient_id", "split"]].drop_duplicates()
    shared = assigned["patient_id"].duplicated(keep=False)
    if shared.any():
        raise AssertionError(f"patients in more than one split: {sorted(assigned.loc[shared, 'patient_id'].unique())[:5]}")
