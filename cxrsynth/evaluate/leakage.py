"""The leakage guard: a test set must not share patients with what the model learnt from.

Khosravi et al. (Discussion) show that a test set drawn from the same patients as the
generative model's training data inflates the measured gain. The guard collects, from a
classifier's ``classifier.json`` facts (recorded in its predictions):

* the classifier's training and tuning rows (``data.name`` rows of ``data.split`` /
  ``data.tune_split``); their real rows' patients;
* for each synthetic dataset among those rows, (a) the patients of the rows its generator
  was trained on (the dataset's metadata names the ``generator`` directory, whose
  ``generator.json`` records ``data_version = "NAME@VERSION"``; it does not record the
  split, so the rows of NAME in the split the replicas were conditioned on — the synthetic
  dataset's ``split`` — stand for it), and (b) the patients of the real rows the images were
  conditioned on (``source_key`` in the ``conditions`` dataset);

and refuses a test set that shares any of those patients, naming the overlap.

A patient is ``(dataset, patient_id)`` of a real row: patient ids are only meaningful within
the site that issued them (MIMIC's and Emory's numeric ids can coincide by chance), and
every row of the project keeps its own dataset's name (mix rows, synthetic rows via their
``conditions``), so lineage is followed exactly. The same site ingested under two dataset
names is not recognised as one. Synthetic test rows stand for the patients they were
conditioned on.

What cannot be checked (a training manifest missing or re-versioned since the model or the
generator was trained) is refused too: with ``allow_leak`` both are recorded instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from cxrsynth import manifest
from cxrsynth.config import read_json
from cxrsynth.errors import CxrsynthError

#: Example patient ids named in a refusal.
EXAMPLES = 5


class LeakError(CxrsynthError):
    """The test set shares patients with the model's training data, or that cannot be checked."""


Patient = tuple[str, str]  # (dataset, patient_id)


@dataclass
class _Collector:
    """Patient sets by label, notes, and what could not be checked."""

    root: Path
    sets: dict[str, set[Patient]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    unverifiable: list[str] = field(default_factory=list)
    _frames: dict[str, pd.DataFrame | None] = field(default_factory=dict)

    def frame(self, name: str) -> pd.DataFrame | None:
        if name not in self._frames:
            try:
                self._frames[name] = manifest.read(self.root, name)
            except manifest.ManifestError:
                self._frames[name] = None
        return self._frames[name]

    def version(self, name: str) -> str | None:
        try:
            return str(manifest.read_meta(self.root, name).get("version"))
        except manifest.ManifestError:
            return None


def _split_rows(frame: pd.DataFrame, split: str | None) -> pd.DataFrame:
    if split is None:
        return frame
    return frame.loc[(frame["split"] == split).fillna(False).to_numpy(dtype=bool)]


def real_patients(rows: pd.DataFrame) -> set[Patient]:
    """``(dataset, patient_id)`` of the real rows that have a patient id."""
    real = (rows["origin"].fillna("real") != "synthetic").to_numpy(dtype=bool)
    pid = rows["patient_id"].astype("string")
    has = real & pid.notna().to_numpy(dtype=bool) & (pid.fillna("").str.strip() != "").to_numpy(dtype=bool)
    return set(zip(rows["dataset"].astype(str).to_numpy()[has], pid.astype(str).to_numpy()[has]))


def _synthetic_meta(c: _Collector, dataset: str) -> dict | None:
    try:
        return manifest.read_meta(c.root, dataset)
    except manifest.ManifestError:
        c.unverifiable.append(f"synthetic rows of {dataset!r}: no manifest named {dataset!r} (its provenance is unknown)")
        return None


def _source_patients(c: _Collector, dataset: str, source_keys: pd.Series) -> set[Patient] | None:
    """Patients of the real rows that synthetic rows of ``dataset`` were conditioned on."""
    meta = _synthetic_meta(c, dataset)
    if meta is None:
        return None
    conditions = meta.get("conditions")
    cond = c.frame(conditions) if conditions else None
    if cond is None:
        c.unverifiable.append(f"synthetic {dataset!r}: its conditions dataset {conditions!r} has no manifest")
        return None
    keys = source_keys.dropna().astype(str).unique()
    found = cond.loc[cond["key"].astype(str).isin(keys)]
    missing = len(keys) - len(found)
    if missing or source_keys.isna().any():
        c.unverifiable.append(f"synthetic {dataset!r}: {missing + int(source_keys.isna().sum())} source_key(s) not found "
                              f"in {conditions!r}")
    return real_patients(found)


def _resolve_generator(c: _Collector, path: str) -> Path | None:
    candidates = [Path(path)] if Path(path).is_absolute() else [c.root / path, Path.cwd() / path]
    return next((p for p in candidates if (p / "generator.json").is_file()), None)


def _generator_patients(c: _Collector, dataset: str) -> tuple[str, set[Patient]] | None:
    """(label, patients) of the rows the generator behind synthetic ``dataset`` was trained on."""
    meta = _synthetic_meta(c, dataset)
    if meta is None:
        return None
    split, conditions, gen_id = meta.get("split"), meta.get("conditions"), meta.get("generator_id", "?")
    gen_dir = _resolve_generator(c, str(meta.get("generator") or ""))
    info = read_json(gen_dir / "generator.json", missing=f"{gen_dir} has no generator.json",
                     invalid=f"{gen_dir / 'generator.json'} is not valid JSON") if gen_dir is not None else {}
    data_version = info.get("data_version")
    if gen_dir is None:
        c.notes.append(f"generator {gen_id} of {dataset!r} ({meta.get('generator')!r}) not found: its training rows are "
                       f"taken to be {conditions!r} split {split!r}, the rows its replicas were conditioned on")
        name, version = conditions, None
    elif not data_version or "@" not in str(data_version):
        c.notes.append(f"generator {gen_id} records no training data (data_version {data_version!r}; imported weights?): "
                       f"its training rows are taken to be {conditions!r} split {split!r}")
        name, version = conditions, None
    else:
        name, version = str(data_version).rsplit("@", 1)
        c.notes.append(f"generator {gen_id} trained on {data_version}; generator.json records no split, so the split its "
                       f"replicas were conditioned on ({split!r}) stands for it")
    frame = c.frame(name) if name else None
    if frame is None:
        c.unverifiable.append(f"generator {gen_id} of {dataset!r}: its training data {name!r} has no manifest")
        return None
    current = c.version(name)
    if version is not None and current != version:
        c.unverifiable.append(f"generator {gen_id} was trained on {name}@{version}, the manifest is now {name}@{current}")
        return None
    return f"generator {gen_id} training rows ({name} split {split})", real_patients(_split_rows(frame, split))


def _add_rows(c: _Collector, label: str, rows: pd.DataFrame) -> None:
    c.sets[label] = real_patients(rows)
    synthetic = rows.loc[(rows["origin"] == "synthetic").fillna(False).to_numpy(dtype=bool)]
    for dataset, part in synthetic.groupby(synthetic["dataset"].astype(str), sort=True):
        gen = _generator_patients(c, dataset)
        if gen is not None:
            c.sets.setdefault(gen[0], set()).update(gen[1])
        sources = _source_patients(c, dataset, part["source_key"])
        if sources is not None:
            c.sets.setdefault(f"real rows the synthetic {dataset} images were conditioned on", set()).update(sources)


def tested_patients(root: str | Path, rows: pd.DataFrame) -> tuple[set[Patient], list[str]]:
    """Patients of the test rows (synthetic rows: the patients they were conditioned on) and what could not be traced."""
    c = _Collector(Path(root))
    out = real_patients(rows)
    synthetic = rows.loc[(rows["origin"] == "synthetic").fillna(False).to_numpy(dtype=bool)]
    for dataset, part in synthetic.groupby(synthetic["dataset"].astype(str), sort=True):
        out |= _source_patients(c, dataset, part["source_key"]) or set()
    return out, c.unverifiable


def _fmt(p: Patient) -> str:
    return f"{p[0]}:{p[1]}"


def check(root: str | Path, model: dict, test_rows: pd.DataFrame, test_label: str, allow: bool = False) -> dict:
    """Refuse (:class:`LeakError`) a test set sharing patients with the model's training data.

    Args:
        root: Project root.
        model: The classifier's ``classifier.json`` dict (from the predictions' metadata).
        test_rows: The test set's manifest rows.
        test_label: How the message names the test set (e.g. ``"cxp split test"``).
        allow: Record overlaps and unverifiable sets instead of refusing.

    Returns:
        ``{"allowed", "overlap": {set: {"patients", "examples"}}, "checked": {set: patients},
        "test_patients", "notes", "unverifiable"}``.
    """
    c = _Collector(Path(root))
    data = model.get("data") or {}
    name = data.get("name")
    if not name:
        c.unverifiable.append("the predictions' model records no training data (model.data.name)")
    else:
        frame = c.frame(name)
        current = c.version(name)
        if frame is None:
            c.unverifiable.append(f"the classifier's training data {name!r} has no manifest under {Path(root)}")
        elif data.get("version") is not None and str(data["version"]) != current:
            c.unverifiable.append(f"the classifier was trained on {name}@{data['version']}, the manifest is now {name}@{current}")
        else:
            if data.get("split") is not None:
                _add_rows(c, f"classifier training rows ({name} split {data['split']})", _split_rows(frame, data["split"]))
            else:
                c.unverifiable.append("the predictions' model records no training split (model.data.split)")
            if data.get("tune_split") is not None:
                tune = data["tune_split"]
                _add_rows(c, f"classifier tuning rows ({name} split {tune})", _split_rows(frame, tune))
    tested, untraced = tested_patients(root, test_rows)
    c.unverifiable = list(dict.fromkeys([*c.unverifiable, *(f"test set: {u}" for u in untraced)]))
    overlap = {}
    for label in sorted(c.sets):
        shared = sorted(tested & c.sets[label])
        if shared:
            overlap[label] = {"patients": len(shared), "examples": [_fmt(p) for p in shared[:EXAMPLES]]}
    if (overlap or c.unverifiable) and not allow:
        parts = [f"{label}: {o['patients']} patient(s), e.g. {', '.join(o['examples'])}" for label, o in overlap.items()]
        if parts:
            message = f"test set {test_label} shares patients with " + "; ".join(parts)
        else:
            message = f"cannot check test set {test_label} for leakage"
        if c.unverifiable:
            message += ("; also " if parts else ": ") + "; ".join(c.unverifiable)
        raise LeakError(message + " (pass --allow-leak to evaluate anyway and record it)")
    return {
        "allowed": bool(allow),
        "overlap": overlap,
        "checked": {label: len(p) for label, p in sorted(c.sets.items())},
        "test_patients": len(tested),
        "notes": c.notes,
        "unverifiable": c.unverifiable,
    }
