"""Evaluate a classifier's predictions: AUROC per finding and macro, bootstrap, subgroups.

The predictions parquet (written by ``cxrsynth classifier predict``) has one row per image:
``key``, ``dataset`` and one probability per finding named as :data:`cxrsynth.labels.FINDING_COLUMNS`;
its schema metadata ``cxrsynth`` holds ``{"model": classifier.json, "data": {"name",
"version", "split"}, "rows"}``. :func:`evaluate` joins it to the labels of that manifest
split (every prediction must find its row and every row its prediction), runs the leakage
guard, and computes:

* per finding: scikit-learn's AUROC with the uncertain labels of that finding masked out
  (``null`` and a ``reason`` when one class is absent), bootstrap SD (ddof 1) and
  percentile 95% interval;
* macro: the mean over findings with an AUROC; its bootstrap SD/CI come from the macro of
  each replicate (replicates where one of those findings drew a single class are left out
  and counted);
* subgroups (``--by``): point estimates per value, no bootstrap.

The bootstrap resamples images, or with ``cluster="patient"`` whole patients (every image
of a drawn patient; rows without a patient id, synthetic ones included, are their own
cluster). Rows are ordered by key before resampling, so the replicates do not depend on the
predictions' row order and two models on one test set see the same draws.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cxrsynth import __version__, labels, manifest
from cxrsynth.config import MAX_BOOTSTRAP, Config, read_json, setting
from cxrsynth.errors import CxrsynthError
from cxrsynth.evaluate import leakage
from cxrsynth.evaluate.auroc import auroc, bootstrap_aurocs, summarize

#: Schema-metadata key of the predictions parquet.
META_KEY = b"cxrsynth"
CLUSTERS = ("image", "patient")
#: ``--by`` columns computed here rather than read from the manifest.
DERIVED = ("age_band",)
UNKNOWN = "unknown"
#: Example keys named in a join error.
EXAMPLES = 5
REPLICATES_SUFFIX = ".replicates.npz"


@dataclass(frozen=True)
class EvaluateConfig(Config):
    """How :func:`evaluate` runs (recorded in the metrics).

    Attributes:
        bootstrap: Bootstrap replicates (0: point estimates only).
        seed: Seed of ``numpy.random.default_rng`` for the draws.
        by: Subgroup columns: manifest columns (``view``, ``sex``, ``race``, ...) or ``age_band``.
        cluster: ``image`` or ``patient`` (resample whole patients).
        allow_leak: Record patient overlap with the training data instead of refusing.
    """

    kind = "evaluate config"  # how errors name these settings (a class attribute, not a field)

    bootstrap: int = setting(1000, ge=0, le=MAX_BOOTSTRAP)
    seed: int = 0
    by: tuple[str, ...] = ()
    cluster: str = "image"
    allow_leak: bool = False


@dataclass
class Predictions:
    """A predictions file: its rows and its metadata."""

    path: Path
    frame: pd.DataFrame
    meta: dict


@dataclass
class TestSet:
    """Predictions joined to their manifest rows, ordered by key."""

    name: str
    version: str | None
    split: str | None
    rows: pd.DataFrame  # manifest rows, by key
    scores: np.ndarray  # (N, 14) float64
    labels: np.ndarray  # (N, 14) int8: 1 / 0 / -1


@dataclass
class Evaluation:
    """What :func:`evaluate` returns: the metrics dict and the bootstrap replicate vectors."""

    metrics: dict
    findings_replicates: np.ndarray  # (B, 14), NaN where undefined
    macro_replicates: np.ndarray  # (B,)


def read_predictions(path: str | Path) -> Predictions:
    """Read and check a predictions parquet (columns, probabilities, metadata)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise CxrsynthError(f"no predictions file {path}")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise CxrsynthError(f"{path} is not a parquet file: {exc}") from None
    raw = (table.schema.metadata or {}).get(META_KEY)
    if raw is None:
        raise CxrsynthError(f"{path} has no cxrsynth metadata: not written by `cxrsynth classifier predict`")
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CxrsynthError(f"{path}: the cxrsynth metadata is not UTF-8 JSON ({type(exc).__name__})") from None
    if not isinstance(meta, dict):
        raise CxrsynthError(f"{path}: the cxrsynth metadata is a JSON {type(meta).__name__}, not an object")
    missing = [c for c in ("key", "dataset", *labels.FINDING_COLUMNS) if c not in table.column_names]
    if missing:
        raise CxrsynthError(f"{path} lacks column(s) {', '.join(missing)}")
    extra = [c for c in table.column_names if c not in ("key", "dataset", *labels.FINDING_COLUMNS)]
    if extra:  # a misspelt finding would also be missing (refused above); an extra one is read past, said aloud
        import warnings

        from cxrsynth.errors import CxrsynthWarning

        warnings.warn(f"{path}: column(s) {', '.join(extra[:EXAMPLES])}{' ...' if len(extra) > EXAMPLES else ''} "
                      "are not predictions of a finding and are ignored", CxrsynthWarning, stacklevel=2)
    data = meta.get("data")
    if not isinstance(data, dict) or not isinstance(data.get("name"), str) or not data["name"] \
            or not isinstance(data.get("split"), (str, type(None))) or not isinstance(data.get("version"), (str, type(None))):
        raise CxrsynthError(f"{path}: the metadata names no test data (data.name, data.split and data.version as text)")
    frame = table.select(["key", "dataset", *labels.FINDING_COLUMNS]).to_pandas()
    frame["key"] = frame["key"].astype("string")
    scores = frame.loc[:, list(labels.FINDING_COLUMNS)]
    for column in labels.FINDING_COLUMNS:
        if not pd.api.types.is_float_dtype(scores[column]):
            raise CxrsynthError(f"{path}: column {column} is {scores[column].dtype}, not a float probability")
    check_probabilities(path, frame["key"], scores.to_numpy(dtype=np.float64))
    if frame["key"].isna().any() or frame["key"].duplicated().any():
        dup = frame.loc[frame["key"].duplicated(), "key"].head(EXAMPLES).tolist()
        raise CxrsynthError(f"{path}: keys must be unique and non-null (duplicates: {', '.join(map(str, dup))})")
    if meta.get("rows") is not None and (not isinstance(meta["rows"], int) or meta["rows"] != len(frame)):
        raise CxrsynthError(f"{path}: the metadata says {meta['rows']} rows, the file has {len(frame)}")
    return Predictions(path=path, frame=frame, meta=meta)


def check_probabilities(path: Path, keys: pd.Series, scores: np.ndarray) -> None:
    """Refuse scores that are not probabilities (NaN, infinite, or outside [0, 1]), naming each
    offending column with its count and a key: an AUROC of such scores is computed without
    complaint, so nothing later would say they were never a model's output."""
    with np.errstate(invalid="ignore"):
        bad = ~(np.isfinite(scores) & (scores >= 0) & (scores <= 1))
    if not bad.any():
        return
    columns = []
    for j in np.flatnonzero(bad.any(axis=0)):
        column = scores[:, j]
        kinds = [f"{n} {what}" for n, what in ((int(np.isnan(column).sum()), "NaN"), (int(np.isinf(column).sum()), "infinite"),
                                                (int((np.isfinite(column) & ((column < 0) | (column > 1))).sum()),
                                                 "outside [0, 1]")) if n]
        at = int(np.argmax(bad[:, j]))
        columns.append(f"{labels.FINDING_COLUMNS[j]} ({', '.join(kinds)}; e.g. key {keys.iloc[at]}: {column[at]:.4g})")
    more = f"; and {len(columns) - EXAMPLES} more column(s)" if len(columns) > EXAMPLES else ""
    raise CxrsynthError(f"{path}: {int(bad.sum())} score(s) in {len(columns)} column(s) are not probabilities in [0, 1]: "
                        f"{'; '.join(columns[:EXAMPLES])}{more}")


def read_manifest(root: str | Path, name: str) -> pd.DataFrame:
    """``manifest.read`` with the package's error type."""
    try:
        return manifest.read(root, name)
    except manifest.ManifestError as exc:
        raise CxrsynthError(str(exc)) from None


def _examples(values) -> str:
    values = sorted(map(str, values))
    return ", ".join(values[:EXAMPLES]) + (", ..." if len(values) > EXAMPLES else "")


def join(root: str | Path, predictions: Predictions) -> TestSet:
    """Join predictions to the labels of their manifest split; both sides must match exactly."""
    data = predictions.meta["data"]
    name, split = str(data["name"]), data.get("split")
    frame = read_manifest(root, name)
    version = str(manifest.read_meta(root, name).get("version"))
    if data.get("version") is None:  # predict always records it: without it, a re-versioned dataset would pass
        raise CxrsynthError(f"{predictions.path}: its metadata records no version of {name} (data.version), so it cannot "
                            f"be checked against {name}@{version}: predict again with `cxrsynth classifier predict`")
    if str(data["version"]) != version:
        raise CxrsynthError(f"{predictions.path} was predicted on {name}@{data['version']}, the manifest is now "
                            f"{name}@{version}: predict again")
    rows = frame if split is None else frame.loc[(frame["split"] == split).fillna(False).to_numpy(dtype=bool)]
    where = f"{name}" + (f" split {split}" if split is not None else "")
    if rows.empty and predictions.frame.empty:
        raise CxrsynthError(f"{predictions.path}: no predictions, and {where} has no rows")
    pred_keys = set(predictions.frame["key"].astype(str))
    row_keys = set(rows["key"].astype(str))
    missing = pred_keys - row_keys
    if missing:
        other = missing & set(frame["key"].astype(str))
        detail = f" ({len(other)} of them are in another split)" if other else ""
        raise CxrsynthError(f"{len(missing)} prediction key(s) not found in {where}{detail}: {_examples(missing)}")
    unpredicted = row_keys - pred_keys
    if unpredicted:
        raise CxrsynthError(f"{len(unpredicted)} row(s) of {where} have no prediction in {predictions.path}: "
                            f"{_examples(unpredicted)}")
    rows = rows.sort_values("key", kind="stable").reset_index(drop=True)
    pred = predictions.frame.set_index(predictions.frame["key"].astype(str)).loc[rows["key"].astype(str)]
    wrong = (pred["dataset"].astype(str).to_numpy() != rows["dataset"].astype(str).to_numpy())
    if wrong.any():
        k = int(np.flatnonzero(wrong)[0])
        raise CxrsynthError(f"{wrong.sum()} prediction(s) name another dataset than their manifest row, e.g. key "
                            f"{rows['key'].iloc[k]}: {pred['dataset'].iloc[k]} vs {rows['dataset'].iloc[k]}")
    return TestSet(name=name, version=version, split=split, rows=rows,
                   scores=pred.loc[:, list(labels.FINDING_COLUMNS)].to_numpy(dtype=np.float64),
                   labels=labels.findings_matrix(rows))


def clusters(rows: pd.DataFrame, how: str) -> np.ndarray | None:
    """Cluster index per row for the bootstrap: None for images; patients by ``(dataset, patient_id)``."""
    if how == "image":
        return None
    if how != "patient":
        raise CxrsynthError(f"--cluster must be one of {', '.join(CLUSTERS)}, got {how!r}")
    pid = rows["patient_id"].astype("string")
    real = (rows["origin"].fillna("real") != "synthetic").to_numpy(dtype=bool)
    has = real & pid.notna().to_numpy(dtype=bool) & (pid.fillna("").str.strip() != "").to_numpy(dtype=bool)
    ident = np.where(has, "p\x1f" + rows["dataset"].astype(str) + "\x1f" + pid.fillna("").astype(str),
                     "k\x1f" + rows["key"].astype(str))
    codes, _ = pd.factorize(pd.Series(ident), sort=True)
    return codes.astype(np.int64)


def age_band(age: pd.Series) -> pd.Series:
    """Decade bins ``"60-69"`` of an age column; ``"unknown"`` when missing."""
    years = pd.to_numeric(age, errors="coerce").astype("Float64")
    low = (np.floor(years / 10) * 10).astype("Int64")
    return pd.Series([UNKNOWN if pd.isna(v) else f"{v}-{v + 9}" for v in low], index=age.index, dtype="string")


def _group_values(rows: pd.DataFrame, column: str) -> pd.Series:
    if column == "age_band":
        return age_band(rows["age"])
    if column not in rows.columns:
        known = ", ".join([*DERIVED, *[c for c in manifest.COLUMNS if c not in labels.FINDING_COLUMNS]])
        raise CxrsynthError(f"--by column {column!r} is neither a manifest column nor derived; known: {known}")
    return rows[column].astype("string").fillna(UNKNOWN)


def finding_point(y: np.ndarray, s: np.ndarray) -> dict:
    """``{auroc, n_pos, n_neg, n_uncertain}`` (and ``reason`` when undefined) of one finding."""
    n_pos, n_neg, n_unc = int((y == 1).sum()), int((y == 0).sum()), int((y == -1).sum())
    value, reason = auroc(y, s)
    out = {"auroc": value, "n_pos": n_pos, "n_neg": n_neg, "n_uncertain": n_unc}
    if reason is not None:
        out["reason"] = reason
    return out


def point_estimates(test_labels: np.ndarray, scores: np.ndarray) -> tuple[dict, float | None]:
    """Per-finding point estimates and their macro mean (None when no finding has an AUROC)."""
    findings = {c: finding_point(test_labels[:, j], scores[:, j]) for j, c in enumerate(labels.FINDING_COLUMNS)}
    defined = [f["auroc"] for f in findings.values() if f["auroc"] is not None]
    return findings, (float(np.mean(defined)) if defined else None)


def subgroups(test: TestSet, by: tuple[str, ...]) -> dict:
    """Point estimates per value of each ``by`` column (no bootstrap)."""
    out = {}
    for column in by:
        values = _group_values(test.rows, column)
        groups = {}
        for value in sorted(values.dropna().unique()):
            mask = (values == value).to_numpy(dtype=bool)
            findings, macro = point_estimates(test.labels[mask], test.scores[mask])
            groups[str(value)] = {"n": int(mask.sum()), "macro": macro, "findings": findings}
        out[column] = groups
    return out


def macro_of(replicates: np.ndarray, defined: np.ndarray) -> np.ndarray:
    """Per-replicate macro AUROC over the ``defined`` findings; NaN where one of them is undefined."""
    if not defined.any():
        return np.full(replicates.shape[0], np.nan)
    return replicates[:, defined].mean(axis=1)


def keys_digest(keys: pd.Series) -> str:
    """SHA-256 of the sorted test keys (one per line): compare checks models saw the same images."""
    return hashlib.sha256("\n".join(sorted(keys.astype(str))).encode()).hexdigest()


def describe_test(test: TestSet) -> dict:
    """Names, versions and image counts of the test rows' datasets."""
    per = {}
    for dataset, part in test.rows.groupby(test.rows["dataset"].astype(str), sort=True):
        versions = sorted(part["version"].dropna().astype(str).unique()) if "version" in part else []
        per[dataset] = {"images": int(len(part)), "versions": versions}
    return {"name": test.name, "version": test.version, "split": test.split, "images": int(len(test.rows)),
            "datasets": per, "keys_sha256": keys_digest(test.rows["key"])}


def model_facts(meta: dict) -> dict:
    """The classifier.json facts of the predictions, without the per-epoch history."""
    model = meta.get("model") or {}
    return {k: v for k, v in model.items() if k != "history"}


def evaluate(root: str | Path, predictions_path: str | Path, config: EvaluateConfig = EvaluateConfig(),
             threads: int | None = None) -> Evaluation:
    """Join, guard against leakage, and compute the metrics of a predictions file.

    Args:
        root: Project root (manifests).
        predictions_path: The predictions parquet.
        config: Bootstrap, subgroups, clustering, leak override.
        threads: Bootstrap threads (default: the CPUs available); results do not depend on it.

    Returns:
        An :class:`Evaluation`; write it with :func:`write`.
    """
    if config.cluster not in CLUSTERS:
        raise CxrsynthError(f"--cluster must be one of {', '.join(CLUSTERS)}, got {config.cluster!r}")
    if config.bootstrap < 0:
        raise CxrsynthError(f"--bootstrap must be >= 0, got {config.bootstrap}")
    for column in config.by:
        if column not in DERIVED and column not in manifest.COLUMNS:
            _group_values(pd.DataFrame(), column)  # raises, naming the known columns
    predictions = read_predictions(predictions_path)
    test = join(root, predictions)
    label = test.name + (f" split {test.split}" if test.split is not None else "")
    leak = leakage.check(root, predictions.meta.get("model") or {}, test.rows, label, allow=config.allow_leak)
    findings, macro = point_estimates(test.labels, test.scores)
    defined = np.array([findings[c]["auroc"] is not None for c in labels.FINDING_COLUMNS])
    codes = clusters(test.rows, config.cluster)
    if config.bootstrap:
        reps = bootstrap_aurocs([test.scores], test.labels, codes, config.bootstrap, config.seed, threads=threads)[0]
    else:
        reps = np.full((0, len(labels.FINDING_COLUMNS)), np.nan)
    macro_reps = macro_of(reps, defined)
    for j, column in enumerate(labels.FINDING_COLUMNS):
        if findings[column]["auroc"] is None or not config.bootstrap:
            findings[column].update({"sd": None, "ci95": None})
        else:
            findings[column].update(summarize(reps[:, j]))
    macro_out = {"auroc": macro, "findings": int(defined.sum()),
                 **(summarize(macro_reps) if config.bootstrap and macro is not None else {"sd": None, "ci95": None})}
    n_clusters = len(test.rows) if codes is None else int(codes.max()) + 1 if len(codes) else 0
    metrics = {
        "findings": findings,
        "macro": macro_out,
        "bootstrap": {"n": config.bootstrap, "seed": config.seed, "cluster": config.cluster, "clusters": n_clusters,
                      "sd": "ddof=1", "ci95": "percentile (numpy linear)", "subgroups": "point estimates only"},
        "subgroups": subgroups(test, config.by),
        "test": describe_test(test),
        "model": model_facts(predictions.meta),
        "leak": leak,
        "config": config.to_dict() | {"by": list(config.by)},
        "predictions": str(predictions.path),
        "cxrsynth": __version__,
    }
    return Evaluation(metrics=metrics, findings_replicates=reps, macro_replicates=macro_reps)


def _clean(value):
    """JSON-ready: numpy scalars to Python, floats to 12 significant digits, NaN to null."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return None if not math.isfinite(value) else float(f"{value:.12g}")
    return value


def dumps(metrics: dict) -> str:
    """The metrics as JSON text: sorted keys, fixed float precision (same bytes for the same input)."""
    return json.dumps(_clean(metrics), indent=2, sort_keys=True) + "\n"


def replicates_path(metrics_path: str | Path) -> Path:
    """``METRICS.replicates.npz`` beside ``METRICS.json``."""
    p = Path(metrics_path)
    return p.with_name((p.name[:-5] if p.name.endswith(".json") else p.name) + REPLICATES_SUFFIX)


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """``numpy.savez`` with fixed member timestamps (same bytes for the same arrays), written atomically."""
    import zipfile

    tmp = path.with_name(path.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as archive:
        for name, array in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            with archive.open(info, "w", force_zip64=True) as handle:
                np.lib.format.write_array(handle, np.asanyarray(array), allow_pickle=False)
    tmp.replace(path)


def write(evaluation: Evaluation, out: str | Path) -> tuple[Path, Path]:
    """Write ``out`` (JSON) and the replicate vectors beside it; the predictions path is stored relative to ``out``."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    npz = replicates_path(out)
    metrics = dict(evaluation.metrics)
    pred = Path(metrics["predictions"]).resolve()
    metrics["predictions"] = os.path.relpath(pred, out.parent.resolve())
    metrics["replicates"] = npz.name
    save_npz(npz, {"findings": evaluation.findings_replicates, "macro": evaluation.macro_replicates,
                   "columns": np.array(labels.FINDING_COLUMNS)})
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(dumps(metrics))
    tmp.replace(out)
    return out, npz


def read_metrics(path: str | Path) -> tuple[dict, dict[str, np.ndarray]]:
    """A metrics JSON and its replicate vectors (``findings`` (B, 14), ``macro`` (B,))."""
    path = Path(path)
    metrics = read_json(path, missing=f"no metrics file {path}", invalid=f"{path} is not a metrics JSON")
    if not isinstance(metrics, dict) or not {"findings", "macro", "test", "bootstrap"} <= set(metrics):
        raise CxrsynthError(f"{path} is not written by `cxrsynth evaluate` (needs findings, macro, test, bootstrap)")
    name = str(metrics.get("replicates") or replicates_path(path).name)
    if Path(name).name != name or name in (".", ".."):
        raise CxrsynthError(f"{path}: its replicates {name!r} must be a file name beside it, not a path")
    npz = path.with_name(name)
    if not npz.is_file():
        raise CxrsynthError(f"{path}: its bootstrap replicates {npz} are missing")
    try:
        with np.load(npz) as data:
            reps = {"findings": data["findings"], "macro": data["macro"]}
    except (OSError, ValueError, KeyError) as exc:
        raise CxrsynthError(f"{npz} is not a replicates file: {exc}") from None
    return metrics, reps


def predictions_of(metrics: dict, metrics_path: str | Path) -> Path:
    """The predictions file a metrics JSON was computed from (stored relative to the JSON)."""
    rel = metrics.get("predictions")
    if not rel:
        raise CxrsynthError(f"{metrics_path} records no predictions path")
    path = Path(rel) if Path(rel).is_absolute() else Path(metrics_path).parent / rel
    if not path.is_file():
        raise CxrsynthError(f"{metrics_path}: its predictions {path} are missing (the paired test needs them)")
    return path


def summary_line(metrics: dict) -> str:
    """One line: macro AUROC, SD, CI and the test set."""
    m, t = metrics["macro"], metrics["test"]
    if m["auroc"] is None:
        return f"macro AUROC undefined on {t['name']} ({t['images']} images)"
    sd = f" (SD {m['sd']:.4f}, 95% CI {m['ci95'][0]:.4f}-{m['ci95'][1]:.4f})" if m.get("sd") is not None else ""
    return f"macro AUROC {m['auroc']:.4f}{sd} over {m['findings']} findings on {t['name']}" + \
        (f" split {t['split']}" if t.get("split") else "") + f", {t['images']} images"
