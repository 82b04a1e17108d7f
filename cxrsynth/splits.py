"""Patient-level train / tune / test splits, published as a new version of the dataset.

Patients are ordered by a seeded hash of their id and cut at exact patient counts, so a
split is deterministic for a seed, independent of row order, and no patient is ever in
two splits. ``view`` restricts which images take part (the others get a null split).

A split is a writer like any other (:mod:`cxrsynth.publish`): it publishes a new version of
the dataset, whose name is a short hash of the version it was made from, the split's
parameters and the resulting assignment (:func:`split_version`). Everything keyed by a
dataset's version (a classifier's or a generator's recorded training data, the leakage
guard, a replica set's conditions, a mix's sources) therefore sees a re-split with other
parameters as another dataset, while a rerun with the same parameters gives the same
version and the same manifest bytes (``dvc repro`` sees nothing new). The version made from
is the one the dataset had before any split (recorded as ``split_of``), so splitting again,
with any parameters, starts from the same rows, and the version follows from the
parameters alone, not from the splits made before. The shards are not rewritten: a sample
holds no split (:data:`cxrsynth.shards.SAMPLE_FIELDS`), so the rows keep pointing at the
shards of the version made from (``data/shards/<name>/<split_of>/``).
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cxrsynth import manifest, shards
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
        super().__post_init__()  # every number finite
        if not (0 <= self.tune <= 1 and 0 <= self.test <= 1 and self.tune + self.test <= 1):
            raise CxrsynthError(f"--tune {self.tune} and --test {self.test} must be in [0, 1] and sum to at most 1")


def _order(patients: np.ndarray, seed: int) -> np.ndarray:
    """A seeded pseudo-random order of patient ids (stable: a hash, not a shuffle)."""
    salt = str(seed).encode()
    digests = [hashlib.blake2b(salt + b"\0" + str(p).encode(), digest_size=8).digest() for p in patients]
    return np.argsort(np.array([int.from_bytes(d, "big") for d in digests], dtype=np.uint64), kind="stable")


def assign(frame: pd.DataFrame, params: SplitParams) -> pd.Series:
    """The split of each row (train/tune/test, or null for rows outside ``view``).

    Raises:
        CxrsynthError: ``view`` is given and no row has it (naming the views present).
    """
    eligible = np.ones(len(frame), dtype=bool)
    if params.view is not None:
        eligible = (frame["view"].astype("string").str.upper() == params.view.upper()).fillna(False).to_numpy(dtype=bool)
        if len(frame) and not eligible.any():  # every row would lose its split
            present = sorted(frame["view"].dropna().astype(str).unique())
            raise CxrsynthError(f"--view {params.view}: no image has that view, so every split would be wiped; views "
                                f"present: {', '.join(present) or 'none (no row records a view)'}")
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


def split_version(of: str, params: SplitParams, keys: pd.Series, assignment: pd.Series) -> str:
    """Short hash of the version split (``of``), the parameters and each key's split."""
    pairs = "\n".join(f"{k}\t{'' if pd.isna(s) else s}" for k, s in sorted(zip(keys.astype(str), assignment.astype(object))))
    body = {"of": of, "split": asdict(params), "assignment": hashlib.sha256(pairs.encode()).hexdigest()}
    return hashlib.sha256(shards.json_bytes(body)).hexdigest()[:10]


def split(root: str | Path, name: str, params: SplitParams) -> dict[str, int]:
    """Assign splits in dataset ``name`` and publish them as its new version (holding its
    writer lock); returns images per split.

    Raises:
        CxrsynthError: ``name`` has no readable manifest, is not a real dataset (a synthetic
            set's rows have no patients; a mix's splits are the roles of its rows), or is
            being written by another process.
    """
    from cxrsynth.publish import republish, stored_kind, writer_lock

    with writer_lock(root, name):
        frame = manifest.read(root, name)
        meta = manifest.read_meta(root, name)
        kind = stored_kind(meta)
        if kind != "real":
            raise CxrsynthError(f"{name} is a {kind} dataset: split assigns the patients of a real dataset")
        frame["split"] = assign(frame, params)
        check_disjoint(frame)
        of = str(meta.get("split_of") or meta["version"])
        version = split_version(of, params, frame["key"], frame["split"])
        republish(root, name, frame, version, {"split": asdict(params), "split_of": of})
    return {s: int((frame["split"] == s).sum()) for s in SPLITS} | {"none": int(frame["split"].isna().sum())}


def check_disjoint(frame: pd.DataFrame) -> None:
    """Raise if any patient appears in more than one split."""
    assigned = frame.loc[frame["split"].notna(), ["patient_id", "split"]].drop_duplicates()
    shared = assigned["patient_id"].duplicated(keep=False)
    if shared.any():
        raise AssertionError(f"patients in more than one split: {sorted(assigned.loc[shared, 'patient_id'].unique())[:5]}")
