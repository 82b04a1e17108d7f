"""A paper-scale run of every stage of the study that needs no GPU, each beside its plain-library equivalent.

``cxrsynth bench scale`` fabricates the study's label tables at the paper's sizes times
``scale`` (CheXpert 223,414 rows, or the real ``train.csv`` when given; MIMIC 377,110; ten
replicas of 72,053 synthetic rows, written as manifests without images) and times, through
this project's library calls:

========================  ===============================================================
stage                     plain-library equivalent timed beside it, in the same run
========================  ===============================================================
labels-only ingest        pandas ``read_csv`` + label mapping + pyarrow parquet write
split                     pandas: unique patients, a seeded permutation, ``map``, parquet
mix at 1000%              pandas ``read_parquet`` + filters + ``concat`` + parquet write
DuckDB cohort query       pandas ``read_parquet`` of every manifest + filter + ``groupby``
evaluate (images)         scikit-learn loop: ``roc_auc_score`` per replicate per finding
evaluate (patients)       the same loop over resampled patients
compare, 11 cells         the loop over the 11 models' paired replicates
co-occurrence             pandas + numpy ``X.T @ X`` + the same annotated matplotlib heat maps + scipy
report, 30 cells          ``json.load`` + a pandas table (``to_html``) + a 15-panel matplotlib figure
neighbours, dim 256/1024  faiss-cpu ``IndexFlatIP`` (skipped, with a note, without faiss)
image ingest              a bare PIL decode, pad, resize, equalize, PNG encode, tar loop
========================  ===============================================================

The bootstrap loops of scikit-learn and the neighbour searches are timed on a slice
(replicates; queries) and extrapolated linearly to the full size (``extrapolated`` in the
row). Peak memory is the process's resident set sampled every few milliseconds during the
stage (``psutil``), the baseline included. Building inputs (fabricated tables, the other
cells' metrics, random embeddings) and importing the libraries are timed apart as ``setup_seconds``.
"""

from __future__ import annotations

import json
import platform
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxrsynth import labels
from cxrsynth.errors import CxrsynthError

#: The paper's sizes: CheXpert's train.csv, MIMIC-CXR-JPG's images, one replica (CheXpert's
#: 72,053 training images), the replicas of the 1000% mix, the test set evaluated, the cells
#: of one family (k = 0..10) and of the report, and the audit's search.
PAPER = {"chexpert": 223_414, "mimic": 377_110, "mimic_patients": 65_379, "replica": 72_053, "replicas": 10,
         "test": 72_053, "family": 11, "report_cells": 30, "queries": 720_530, "bank": 72_053}
#: CheXpert train.csv's label marginals (fraction positive, uncertain, negative; the rest blank),
#: measured on the real file; images per patient 223,414 / 64,540.
MARGINALS = {
    "No Finding": (0.1002, 0.0, 0.0), "Enlarged Cardiomediastinum": (0.0483, 0.0555, 0.0969),
    "Cardiomegaly": (0.1209, 0.0362, 0.0498), "Lung Opacity": (0.4726, 0.0251, 0.0295),
    "Lung Lesion": (0.0411, 0.0067, 0.0057), "Edema": (0.2339, 0.0581, 0.0928),
    "Consolidation": (0.0662, 0.1242, 0.1258), "Pneumonia": (0.0270, 0.0840, 0.0125),
    "Atelectasis": (0.1494, 0.1510, 0.0059), "Pneumothorax": (0.0870, 0.0141, 0.2522),
    "Pleural Effusion": (0.3858, 0.0520, 0.1584), "Pleural Other": (0.0158, 0.0119, 0.0014),
    "Fracture": (0.0405, 0.0029, 0.0112), "Support Devices": (0.5192, 0.0048, 0.0275),
}
IMAGES_PER_PATIENT = 223_414 / 64_540
BOOTSTRAP = 1000
#: Replicates of the scikit-learn loops actually run (the rest extrapolated).
SKLEARN_SLICE = {"evaluate": 10, "compare": 2}
NEIGHBOURS_K = 5
COHORT_SQL = """
SELECT dataset, origin, sex, count(*) AS images, avg(age) AS mean_age
FROM (SELECT * FROM images UNION ALL BY NAME SELECT * FROM {mix})
WHERE view IN ('AP', 'PA') AND age BETWEEN 40 AND 80 AND (pleural_effusion = 1 OR edema = 1)
GROUP BY ALL ORDER BY ALL
"""


@dataclass
class Stage:
    """One row of the table: our stage and its plain equivalent."""

    stage: str
    rows: int
    seconds: float
    peak_rss_gib: float
    plain: str | None = None
    plain_seconds: float | None = None
    plain_peak_rss_gib: float | None = None
    extrapolated: str | None = None
    note: str | None = None

    @property
    def ratio(self) -> float | None:
        """Ours / plain (< 1: ours is faster)."""
        return self.seconds / self.plain_seconds if self.plain_seconds else None

    def to_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "rows": self.rows, "seconds": self.seconds, "peak_rss_gib": self.peak_rss_gib,
                "plain": self.plain, "plain_seconds": self.plain_seconds, "plain_peak_rss_gib": self.plain_peak_rss_gib,
                "ratio": self.ratio, "extrapolated": self.extrapolated, "note": self.note}


class Peak:
    """Wall time and peak resident memory (GiB) of a block: RSS sampled every ``every`` seconds."""

    def __init__(self, every: float = 0.005) -> None:
        import psutil

        self.process, self.every = psutil.Process(), every
        self.seconds = self.peak = 0.0

    def __enter__(self) -> "Peak":
        self._stop = threading.Event()
        self.peak = self.process.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        self._start = time.perf_counter()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.every):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self._start
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss) / 2**30


def timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """``(fn(), seconds, peak RSS GiB)``."""
    with Peak() as p:
        out = fn()
    return out, p.seconds, p.peak


def sized(n: int, scale: float, least: int) -> int:
    return max(least, int(round(n * scale)))


# ------------------------------------------------------------------ fabricated tables


def _labels(rng: np.random.Generator, n: int, blank: str | int, pos, unc, neg) -> dict[str, np.ndarray]:
    """One column per finding drawn from :data:`MARGINALS` (``pos``/``unc``/``neg``/``blank`` values)."""
    out = {}
    for finding, (p, u, z) in MARGINALS.items():
        draw = rng.random(n)
        out[finding] = np.select([draw < p, draw < p + u, draw < p + u + z], [pos, unc, neg], blank)
    return out


def fabricate_chexpert(path: Path, n: int, seed: int = 0) -> Path:
    """A CheXpert-format ``train.csv`` of ``n`` rows with the real file's label marginals."""
    rng = np.random.default_rng(seed)
    patients = max(1, int(round(n / IMAGES_PER_PATIENT)))
    patient = np.sort(np.r_[np.arange(patients), rng.integers(0, patients, n - patients)])  # every patient has an image
    first = np.r_[True, patient[1:] != patient[:-1]]
    start = np.maximum.accumulate(np.where(first, np.arange(n), 0))
    within = np.arange(n) - start  # 0, 1, 2 ... inside each patient
    frontal = rng.random(n) < 0.855
    view = np.where(frontal, "frontal", "lateral")
    paths = [f"CheXpert-v1.0/train/patient{p + 1:05d}/study{w // 2 + 1}/view{w % 2 + 1}_{v}.jpg"
             for p, w, v in zip(patient.tolist(), within.tolist(), view.tolist())]
    frame = pd.DataFrame({
        "Path": paths, "Sex": np.where(rng.random(n) < 0.5937, "Male", "Female"),
        "Age": np.clip(rng.normal(61, 17, n), 18, 90).astype(int),
        "Frontal/Lateral": np.where(frontal, "Frontal", "Lateral"),
        "AP/PA": np.where(frontal, np.where(rng.random(n) < 0.7233 / 0.855, "AP", "PA"), ""),
        **_labels(rng, n, "", "1.0", "-1.0", "0.0"),
    })
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False)
    return path


def fabricate_mimic(n: int, patients: int, test_rows: int, seed: int = 1) -> pd.DataFrame:
    """MIMIC-sized manifest rows (labels, demographics, official-style splits): the first
    patients, about ``test_rows`` images, are the test split; the rest train and a few tune."""
    rng = np.random.default_rng(seed)
    patient = np.sort(rng.integers(0, patients, n))
    test = np.arange(n) < test_rows
    test |= np.isin(patient, patient[test])  # whole patients
    split = np.where(test, "test", np.where(patient % 50 == 0, "tune", "train"))
    ids = np.char.add("p", patient.astype(str))
    frame = pd.DataFrame({
        "key": [f"mimic-{i:07d}" for i in range(n)], "dataset": "mimic", "version": "fabricated", "shard": None,
        "split": split, "patient_id": ids, "study_id": np.char.add(ids, "-s"), "source_path": None,
        "sex": np.where(rng.random(n) < 0.52, "F", "M"), "age": np.clip(rng.normal(63, 17, n), 18, 91).round(),
        "race": rng.choice(["White", "Black", "Asian", "Hispanic/Latino", "Other"], n), "view": rng.choice(["AP", "PA"], n),
        "origin": "real",
    })
    for column, values in zip(labels.FINDING_COLUMNS, _labels(rng, n, 0, 1, -1, 0).values()):
        frame[column] = values.astype(np.int8)
    return frame


def replica_rows(conditions: pd.DataFrame, name: str, replicas: int) -> pd.DataFrame:
    """``replicas`` synthetic copies of the conditioning rows, as ``generate`` records them, without images."""
    parts = []
    keep = ["split", "sex", "age", "race", "view", *labels.FINDING_COLUMNS]
    for r in range(replicas):
        part = conditions.loc[:, keep].copy()
        part.insert(0, "key", (name + "-" + conditions["key"].astype(str) + f"-r{r}").to_numpy())
        part["dataset"], part["version"], part["shard"], part["origin"] = name, "fabricated", None, "synthetic"
        part["source_key"], part["replica"] = conditions["key"].to_numpy(), r
        part["seed"] = np.arange(len(part)) + r * len(part)
        part["guidance"], part["sampler"], part["steps"], part["generator_id"] = 1.0, "ddim", 200, "fabricated"
        parts.append(part)
    return pd.concat(parts, ignore_index=True)


# ------------------------------------------------------------------ plain-library equivalents


def plain_labels_only(csv: Path, out: Path) -> int:
    """pandas + pyarrow: what labels-only ingest produces, the plain way."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    raw = pd.read_csv(csv, dtype=str, keep_default_na=False)
    parts = raw["Path"].str.extract(r"(patient\d+)/(study\d+)")
    frame = pd.DataFrame({"key": raw["Path"].str.replace(r"\.jpg$", "", regex=True), "patient_id": parts[0],
                          "study_id": parts[0] + "/" + parts[1], "sex": raw["Sex"].map({"Male": "M", "Female": "F"}),
                          "age": pd.to_numeric(raw["Age"], errors="coerce").where(lambda a: a > 0),
                          "view": raw["AP/PA"].where(raw["AP/PA"] != "", raw["Frontal/Lateral"].str.upper())})
    codes = {"1.0": 1, "-1.0": -1, "0.0": 0, "": 0, "1": 1, "-1": -1, "0": 0}
    for finding, column in zip(labels.FINDINGS, labels.FINDING_COLUMNS):
        frame[column] = raw[finding].map(codes).fillna(0).astype(np.int8)
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), out)
    return len(frame)


def plain_split(manifest_file: Path, out: Path, seed: int = 0) -> int:
    frame = pd.read_parquet(manifest_file)
    eligible = frame["view"] == "AP"
    patients = np.sort(frame.loc[eligible, "patient_id"].unique())
    order = np.random.default_rng(seed).permutation(patients)
    n_test, n_tune = round(0.2 * len(order)), round(0.1 * len(order))
    split_of = dict.fromkeys(order[:n_test], "test") | dict.fromkeys(order[n_test:n_test + n_tune], "tune")
    split_of |= dict.fromkeys(order[n_test + n_tune:], "train")
    frame["split"] = frame["patient_id"].map(split_of).where(eligible)
    frame.to_parquet(out, index=False)
    return len(frame)


def plain_mix(real_file: Path, synthetic_file: Path, replicas: int, out: Path) -> int:
    real, syn = pd.read_parquet(real_file), pd.read_parquet(synthetic_file)
    parts = [real.loc[real["split"] == "train"], real.loc[real["split"] == "tune"], real.loc[real["split"] == "test"],
             syn.loc[(syn["split"] == "train") & (syn["replica"] < replicas)].assign(split="train")]
    rows = pd.concat(parts, ignore_index=True)
    if rows["key"].duplicated().any():
        raise CxrsynthError("keys collide")
    rows.to_parquet(out, index=False)
    return len(rows)


def plain_cohort(files: list[Path]) -> pd.DataFrame:
    columns = ["dataset", "origin", "sex", "age", "view", "pleural_effusion", "edema"]
    frame = pd.concat([pd.read_parquet(f, columns=columns) for f in files], ignore_index=True)
    hit = frame["view"].isin(["AP", "PA"]) & frame["age"].between(40, 80) & ((frame["pleural_effusion"] == 1) | (frame["edema"] == 1))
    return frame.loc[hit].groupby(["dataset", "origin", "sex"]).agg(images=("age", "size"), mean_age=("age", "mean")).reset_index()


def sklearn_bootstrap(y: np.ndarray, scores: list[np.ndarray], replicates: int, clusters: np.ndarray | None,
                      seed: int = 0) -> np.ndarray:
    """The straightforward loop: per replicate, resample (images or whole patients), then
    ``roc_auc_score`` per model per finding on its certain labels."""
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(seed)
    n = len(y)
    groups = None
    if clusters is not None:
        order = np.argsort(clusters, kind="stable")
        groups = np.split(order, np.flatnonzero(np.diff(clusters[order])) + 1)
    out = np.full((replicates, len(scores), y.shape[1]), np.nan)
    for b in range(replicates):
        if groups is None:
            idx = rng.integers(0, n, n)
        else:
            idx = np.concatenate([groups[g] for g in rng.integers(0, len(groups), len(groups))])
        yb = y[idx]
        for m, s in enumerate(scores):
            sb = s[idx]
            for j in range(y.shape[1]):
                certain = yb[:, j] >= 0
                t = yb[certain, j]
                if 0 < t.sum() < len(t):
                    out[b, m, j] = roc_auc_score(t, sb[certain, j])
    return out


def plain_cooccurrence(files: dict[str, Path], out: Path) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy import stats

    out.mkdir(parents=True, exist_ok=True)
    mats, rows = {}, 0
    for name, f in files.items():
        y = pd.read_parquet(f, columns=list(labels.FINDING_COLUMNS)).to_numpy(dtype=np.int8)
        rows += len(y)
        pos = (y == 1).astype(np.int64)
        mats[name] = pos.T @ pos
        share = mats[name] / len(y)
        fig, ax = plt.subplots(figsize=(11, 9.5), dpi=110)  # the same picture: 196 annotated cells, ticks, colour bar
        fig.colorbar(ax.imshow(share, cmap="viridis"), ax=ax)
        ax.set_xticks(range(len(labels.FINDINGS)), labels.FINDINGS, rotation=45, ha="right", fontsize=9)
        ax.set_yticks(range(len(labels.FINDINGS)), labels.FINDINGS, fontsize=9)
        for (i, j), value in np.ndenumerate(share):
            ax.text(j, i, f"{value:.2f}\n{mats[name][i, j]}", ha="center", va="center", fontsize=6)
        fig.tight_layout()
        fig.savefig(out / f"{name}.png")
        plt.close(fig)
    names = list(mats)
    pairs = [{"a": a, "b": b, "r": float(stats.pearsonr(mats[a].ravel(), mats[b].ravel()).statistic)}
             for i, a in enumerate(names) for b in names[i + 1:]]
    (out / "correlations.json").write_text(json.dumps({"pairs": pairs, "counts": {n: m.tolist() for n, m in mats.items()}}))
    return rows


def plain_report(cell_files: list[Path], out: Path) -> int:
    import base64
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    docs = [json.loads(f.read_text()) for f in cell_files]
    table = pd.DataFrame([{"cell": d["cell"], "family": d["family"], "k": d.get("k"), "test": test,
                           "macro": ev["macro"]["auroc"], **{c: f["auroc"] for c, f in ev["findings"].items()}}
                          for d in docs for test, ev in d["evaluations"].items()])
    columns = ["macro", *labels.FINDING_COLUMNS]  # the report's curves: AUROC against k, one panel per finding
    fig, axes = plt.subplots(3, 5, figsize=(16, 9))
    for ax, column in zip(axes.ravel(), columns):
        for family, part in table.dropna(subset=["k"]).groupby("family"):
            part = part.sort_values("k")
            ax.plot(part["k"], part[column], marker="o", label=family)
        ax.set_title(column, fontsize=8)
    axes[0, 0].legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    out.mkdir(parents=True, exist_ok=True)
    figure = base64.b64encode(buffer.getvalue()).decode()
    (out / "index.html").write_text(f'<html><body><img src="data:image/png;base64,{figure}">{table.to_html()}</body></html>')
    return len(docs)


def plain_images(csv: Path, size: int, out: Path) -> int:
    """Decode, pad to square, resize, equalize, PNG-encode each image and write a tar with webdataset's
    own ``TarWriter`` (one process)."""
    import io

    import webdataset as wds
    from PIL import Image, ImageOps

    paths = pd.read_csv(csv, usecols=["Path"])["Path"]
    base = csv.parent.parent
    with wds.TarWriter(str(out)) as tar:
        for i, rel in enumerate(paths):
            im = Image.open(base / rel).convert("L")
            side = max(im.size)
            square = Image.new("L", (side, side))
            square.paste(im, ((side - im.width) // 2, (side - im.height) // 2))
            im = ImageOps.equalize(square.resize((size, size), Image.Resampling.BILINEAR))
            buffer = io.BytesIO()
            im.save(buffer, format="PNG", compress_level=1)
            tar.write({"__key__": f"{i:07d}", "png": buffer.getvalue()})
    return len(paths)


# ------------------------------------------------------------------ the run


def _report_params(family: int) -> dict:
    """params.yaml of a 30-cell study: supplement k0..k10 (the family of 11), synthetic k1..k10, 9 cfg cells."""
    ks = list(range(family))
    return {"seed": 0,
            "replicas": {"w1": {"guidance": 1.0, "replicas": max(1, family - 1)}, "w5": {"guidance": 5.0, "replicas": 1},
                         "w8p5": {"guidance": 8.5, "replicas": 1}},
            "study": {"real": "cxp", "tests": ["mimic"]},
            "evaluate": {"bootstrap": BOOTSTRAP, "seed": 0, "alpha": 0.05},
            "cfg": {"replicas": ["w1", "w5", "w8p5"]},
            "supplement": {"replica": "w1", "k": ks},
            "synthetic": {"replica": "w1", "k": ks[1:]}}


def _report_cells(params: dict) -> list[tuple[str, str, int | None, str | None]]:
    cells = [(f"supplement_k{k}", "supplement", k, "w1" if k else None) for k in params["supplement"]["k"]]
    cells += [(f"synthetic_k{k}", "synthetic", k, "w1") for k in params["synthetic"]["k"]]
    for r in params["cfg"]["replicas"]:
        cells += [(f"cfg_{r}_real", "cfg", None, r), (f"cfg_{r}_synthetic", "cfg", None, r), (f"cfg_real_{r}", "cfg", None, r)]
    return cells


def run(scale: float = 1.0, threads: int | None = None, chexpert_csv: Path | None = None, work: Path | None = None,
        images: int | None = None, log: Callable[[str], None] = lambda line: None) -> dict:
    """Run every stage and its plain equivalent at ``scale`` x the paper's sizes; returns the result
    ``{"scale", "threads", "machine", "sizes", "stages": [...], "total", "setup_seconds"}``."""
    if not 0 < scale <= 1:
        raise CxrsynthError(f"--scale must be in (0, 1], got {scale}")
    if chexpert_csv is not None and not Path(chexpert_csv).is_file():
        raise CxrsynthError(f"CheXpert CSV not found: {chexpert_csv}")
    if work is None:
        with tempfile.TemporaryDirectory(prefix="cxrsynth-scale-") as tmp:
            return run(scale, threads, chexpert_csv, Path(tmp), images, log)
    import torch

    from cxrsynth.evaluate.auroc import available_cpus

    threads = threads or available_cpus()
    torch.set_num_threads(threads)
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    stages: list[Stage] = []
    setup = [0.0]

    def add(stage: Stage) -> Stage:
        stages.append(stage)
        plain = f", plain {stage.plain_seconds:.2f} s" if stage.plain_seconds is not None else ""
        log(f"{stage.stage}: {stage.rows:,} rows, {stage.seconds:.2f} s{plain}")
        return stage

    def prepare(fn: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        out = fn()
        setup[0] += time.perf_counter() - start
        return out

    sizes = {k: sized(v, scale, 1) for k, v in PAPER.items() if k not in ("family", "report_cells", "replicas")}
    sizes |= {"replicas": PAPER["replicas"], "family": PAPER["family"], "report_cells": PAPER["report_cells"]}
    prepare(_warm_imports)  # neither side pays an import inside its timing
    root = work / "proj"
    plain_dir = work / "plain"
    plain_dir.mkdir(exist_ok=True)
    ctx = _Context(root=root, plain=plain_dir, sizes=sizes, threads=threads, add=add, prepare=prepare)
    _tables(ctx, scale, chexpert_csv)
    _evaluations(ctx)
    _report(ctx)
    _neighbours(ctx)
    _images(ctx, images if images is not None else max(32, min(400, int(round(4000 * scale)))))
    ours = sum(s.seconds for s in stages)
    compared = [s for s in stages if s.plain_seconds]
    total = {"seconds": ours, "peak_rss_gib": max(s.peak_rss_gib for s in stages),
             "compared_seconds": sum(s.seconds for s in compared), "plain_seconds": sum(s.plain_seconds for s in compared)}
    total["ratio"] = total["compared_seconds"] / total["plain_seconds"] if total["plain_seconds"] else None
    return {"scale": scale, "threads": threads, "sizes": sizes,
            "chexpert": str(chexpert_csv) if chexpert_csv else "fabricated with CheXpert's label marginals",
            "machine": {"platform": platform.platform(), "machine": platform.machine(), "cpus": available_cpus(),
                        "memory_gib": round(_memory_gib(), 1), "python": platform.python_version()},
            "stages": [s.to_dict() for s in stages], "total": total, "setup_seconds": setup[0]}


def _warm_imports() -> None:
    import duckdb  # noqa: F401
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401
    import scipy.stats  # noqa: F401
    import sklearn.metrics  # noqa: F401


def _memory_gib() -> float:
    import psutil

    return psutil.virtual_memory().total / 2**30


@dataclass
class _Context:
    root: Path
    plain: Path
    sizes: dict[str, int]
    threads: int
    add: Callable[[Stage], Stage]
    prepare: Callable[[Callable[[], Any]], Any]
    family: dict | None = None  # the compare stage's result, which the report reads


def _tables(ctx: _Context, scale: float, chexpert_csv: Path | None) -> None:
    """Labels-only ingest, split, the replicas, mix at 1000% and the cohort query."""
    from cxrsynth import ingest, manifest, splits
    from cxrsynth.mix import MixParams, mix
    from cxrsynth.publish import Metadata, publish
    from cxrsynth.sources import chexpert

    root, s = ctx.root, ctx.sizes
    csv = Path(chexpert_csv) if chexpert_csv is not None else ctx.prepare(
        lambda: fabricate_chexpert(ctx.plain.parent / "raw" / "CheXpert-v1.0" / "train.csv", s["chexpert"]))
    result, sec, peak = timed(lambda: ingest.ingest(chexpert.read(csv), root=root, name="cxp", kind="chexpert",
                                                    inputs={"csv": str(csv)}, labels_only=True))
    n_cxp = result.rows_in
    _, psec, ppeak = timed(lambda: plain_labels_only(csv, ctx.plain / "cxp.parquet"))
    ctx.add(Stage("labels-only ingest", n_cxp, sec, peak, "pandas + pyarrow", psec, ppeak))

    params = splits.SplitParams(tune=0.1, test=0.2, view="AP", seed=0)
    _, sec, peak = timed(lambda: splits.split(root, "cxp", params))
    _, psec, ppeak = timed(lambda: plain_split(manifest.manifest_path(root, "cxp"), ctx.plain / "cxp_split.parquet"))
    ctx.add(Stage("split", n_cxp, sec, peak, "pandas", psec, ppeak))

    def replicas() -> int:
        real = manifest.read(root, "cxp")
        train = real.loc[(real["split"] == "train").fillna(False).to_numpy(dtype=bool)].sort_values("key")
        conditions = train.iloc[: s["replica"]]
        rows = replica_rows(conditions, "cxp_w1", s["replicas"])
        publish(root, Metadata("cxp_w1", "fabricated", "synthetic", {"conditions": "cxp"}), rows)
        manifest.write(root, "mimic", fabricate_mimic(s["mimic"], sized(PAPER["mimic_patients"], scale, 2), s["test"]),
                       {"dataset": "mimic", "version": "fabricated", "kind": "mimic"})
        return len(rows)

    n_syn = ctx.prepare(replicas)
    counts, sec, peak = timed(lambda: mix(root, "cxp_k10", MixParams(real="cxp", synthetic=float(s["replicas"]),
                                                                       synthetic_from="cxp_w1", seed=0)))
    n_mix = sum(counts[k] for k in ("train", "tune", "test"))
    _, psec, ppeak = timed(lambda: plain_mix(manifest.manifest_path(root, "cxp"), manifest.manifest_path(root, "cxp_w1"),
                                             s["replicas"], ctx.plain / "mix.parquet"))
    ctx.add(Stage(f"mix {100 * s['replicas']}%", n_mix, sec, peak, "pandas", psec, ppeak,
                  note=f"{counts['synthetic']:,} synthetic rows of {n_syn:,}"))

    names = ["cxp", "mimic", "cxp_w1", "cxp_k10"]
    scanned = sum(len(manifest.read(root, n)) for n in names)
    _, sec, peak = timed(lambda: manifest.query(root, COHORT_SQL.format(mix="cxp_k10")))
    _, psec, ppeak = timed(lambda: plain_cohort([manifest.manifest_path(root, n) for n in names]))
    ctx.add(Stage("cohort query", scanned, sec, peak, "pandas", psec, ppeak))


def _predictions(ctx: _Context, test: pd.DataFrame, seed: int, model: dict) -> Path:
    from cxrsynth.classify.predict import write

    rng = np.random.default_rng(seed)
    y = labels.findings_matrix(test).astype(float)
    common = np.random.default_rng(12345).normal(0, 1, y.shape)  # shared noise: paired models, as cells are
    logits = (0.8 + 0.02 * seed) * np.where(y < 0, 0.5, y) + common + rng.normal(0, 0.35, y.shape)
    frame = pd.DataFrame({"key": test["key"].astype(str).to_numpy(), "dataset": test["dataset"].astype(str).to_numpy()})
    for j, column in enumerate(labels.FINDING_COLUMNS):
        frame[column] = (1 / (1 + np.exp(-logits[:, j]))).astype(np.float32)
    meta = {"model": {**model, "classifier_id": f"clf{seed:02d}"}, "rows": len(frame),
            "data": {"name": "mimic", "version": "fabricated", "split": "test"}}
    return write(frame, meta, ctx.root / "data" / "bench" / "predictions" / f"cell{seed:02d}.parquet")


def _evaluations(ctx: _Context) -> None:
    """evaluate (images, patients), then compare of a family of 11 and the co-occurrence stage."""
    from cxrsynth import manifest
    from cxrsynth.evaluate import metrics
    from cxrsynth.evaluate.compare import CompareConfig, compare
    from cxrsynth.evaluate.cooccurrence import cooccurrence

    root = ctx.root
    mimic = manifest.read(root, "mimic")
    test = mimic.loc[(mimic["split"] == "test").to_numpy(dtype=bool)].sort_values("key").reset_index(drop=True)
    version = manifest.read_meta(root, "cxp")["version"]
    model = {"preset": "small", "data": {"name": "cxp", "version": version, "split": "train", "tune_split": "tune",
                                         "datasets": {"cxp": version}}}
    preds = ctx.prepare(lambda: [_predictions(ctx, test, i, model) for i in range(ctx.sizes["family"])])
    y = labels.findings_matrix(test)
    scores = [pd.read_parquet(p, columns=list(labels.FINDING_COLUMNS)).to_numpy(dtype=np.float64) for p in preds]
    codes = metrics.clusters(test, "patient")
    out = root / "metrics" / "bench"
    k = SKLEARN_SLICE["evaluate"]
    for cluster in ("image", "patient"):
        config = metrics.EvaluateConfig(bootstrap=BOOTSTRAP, seed=0, cluster=cluster)
        result, sec, peak = timed(lambda: metrics.evaluate(root, preds[0], config, threads=ctx.threads))
        metrics.write(result, out / f"cell00-{cluster}.json")
        _, psec, ppeak = timed(lambda: sklearn_bootstrap(y, scores[:1], k, codes if cluster == "patient" else None))
        ctx.add(Stage(f"evaluate, {cluster} bootstrap", len(test), sec, peak,
                      "sklearn loop", psec * BOOTSTRAP / k, ppeak, extrapolated=f"{k} of {BOOTSTRAP} replicates"))

    def family() -> list[Path]:
        paths = [out / "cell00-image.json"]
        for i, p in enumerate(preds[1:], start=1):
            evaluated = metrics.evaluate(root, p, metrics.EvaluateConfig(bootstrap=BOOTSTRAP, seed=0), threads=ctx.threads)
            paths.append(metrics.write(evaluated, out / f"cell{i:02d}-image.json")[0])
        return paths

    family_paths = ctx.prepare(family)
    k = SKLEARN_SLICE["compare"]
    result, sec, peak = timed(lambda: compare(root, family_paths[0], family_paths[1:], CompareConfig(), threads=ctx.threads))
    ctx.family = result
    _, psec, ppeak = timed(lambda: sklearn_bootstrap(y, scores, k, None))
    ctx.add(Stage(f"compare, {len(family_paths)} cells", len(test), sec, peak, "sklearn loop",
                  psec * BOOTSTRAP / k, ppeak, extrapolated=f"{k} of {BOOTSTRAP} paired replicates",
                  note=f"{len(family_paths)} models x {BOOTSTRAP} paired replicates"))

    names = ["cxp", "mimic", "cxp_w1"]
    rows = sum(len(manifest.read(root, n)) for n in names)
    _, sec, peak = timed(lambda: cooccurrence(root, names, root / "metrics" / "cooccurrence"))
    _, psec, ppeak = timed(lambda: plain_cooccurrence({n: manifest.manifest_path(root, n) for n in names},
                                                      ctx.plain / "cooccurrence"))
    ctx.add(Stage("co-occurrence", rows, sec, peak, "pandas+matplotlib", psec, ppeak))


def _report(ctx: _Context) -> None:
    """The report stage reading 30 cells as ``cxrsynth study cell`` writes them (and the family's comparison)."""
    from cxrsynth.study.plan import cell_metrics_problem
    from cxrsynth.study.report import write_report

    root = ctx.root
    params = _report_params(ctx.sizes["family"])

    def cells() -> list[Path]:
        metrics_files = sorted((root / "metrics" / "bench").glob("cell*-image.json"))
        files = []
        for i, (name, family, k, replica) in enumerate(_report_cells(params)):
            path = metrics_files[i % len(metrics_files)]
            m = json.loads(path.read_text())
            keep = ("auroc", "sd", "ci95", "n_pos", "n_neg", "reason")
            evaluation = {"path": str(path.relative_to(root)), "images": m["test"]["images"],
                          "macro": m["macro"], "findings": {c: {k2: v for k2, v in f.items() if k2 in keep}
                                                            for c, f in m["findings"].items()}}
            doc = {"cell": name, "family": family, "tag": name.split("_", 1)[1], "k": k, "replica": replica,
                   "guidance": {"w1": 1.0, "w5": 5.0, "w8p5": 8.5}.get(replica or ""), "tune": "real",
                   "train": {"name": name, "real_images": 0 if family == "synthetic" else 1000,
                             "synthetic_images": 1000 * (k or 0)},
                   "classifier": {"preset": "small", "classifier_id": m["model"].get("classifier_id"), "best": {"epoch": 3}},
                   "evaluations": {"mimic:test": evaluation}}
            problem = cell_metrics_problem(doc)
            if problem:
                raise AssertionError(f"bench cell {name}: {problem}")
            files.append(root / "metrics" / "study" / f"{name}.json")
            files[-1].parent.mkdir(parents=True, exist_ok=True)
            files[-1].write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
        family = dict(ctx.family or {})
        for comparison, (name, *_rest) in zip(family["comparisons"], _report_cells(params)[1:]):
            comparison["cell"] = name
        doc = {"family": "supplement", "baseline": "supplement_k0", "cells": [c["cell"] for c in family["comparisons"]],
               "tests": {"mimic:test": family}}
        (root / "metrics" / "compare").mkdir(parents=True, exist_ok=True)
        (root / "metrics" / "compare" / "supplement.json").write_text(json.dumps(doc, indent=1, default=str))
        return files

    files = ctx.prepare(cells)
    _, sec, peak = timed(lambda: write_report(root, params, root / "report"))
    _, psec, ppeak = timed(lambda: plain_report(files, ctx.plain / "report"))
    ctx.add(Stage(f"report, {len(files)} cells", len(files), sec, peak, "pandas+matplotlib", psec, ppeak))


def _neighbours(ctx: _Context) -> None:
    """The audit's nearest-neighbour search on a slice of queries, extrapolated to Q x N."""
    import torch

    from cxrsynth.share import embed

    try:
        import faiss
    except ImportError:
        faiss = None
    queries, bank = ctx.sizes["queries"], ctx.sizes["bank"]
    piece = min(queries, 1024)
    for dim in (256, 1024):
        gen = torch.Generator().manual_seed(dim)
        q, b = ctx.prepare(lambda: (torch.nn.functional.normalize(torch.randn(piece, dim, generator=gen), dim=1),
                                    torch.nn.functional.normalize(torch.randn(bank, dim, generator=gen), dim=1)))
        embed.nearest(q[:64], b, NEIGHBOURS_K)  # warm-up: allocations, thread pool
        (dist, idx), sec, peak = timed(lambda: embed.nearest(q, b, NEIGHBOURS_K))
        stage = Stage(f"neighbours, dim {dim}", queries * bank, sec * queries / piece, peak,
                      extrapolated=f"{piece:,} of {queries:,} queries against all {bank:,}")
        if faiss is None:
            stage.note = "faiss not installed: no plain comparison (pip install faiss-cpu)"
        else:
            faiss.omp_set_num_threads(ctx.threads)
            qn, bn = q.numpy(), b.numpy()

            def search():
                index = faiss.IndexFlatIP(dim)
                index.add(bn)
                return index.search(qn, NEIGHBOURS_K)

            search()  # warm-up
            (_, fidx), psec, ppeak = timed(search)
            stage.plain, stage.plain_seconds, stage.plain_peak_rss_gib = "faiss FlatIP", psec * queries / piece, ppeak
            agree = float((fidx[:, 0] == idx[:, 0].numpy()).mean())
            stage.note = f"top-1 agrees with faiss on {100 * agree:.1f}% of queries"
        ctx.add(stage)


def _images(ctx: _Context, n: int) -> None:
    """Image ingest of ``n`` phantom CheXpert images (one worker) against a bare PIL loop."""
    from cxrsynth import ingest
    from cxrsynth.imaging import Preprocess
    from cxrsynth.phantom import write_site
    from cxrsynth.sources import chexpert

    raw = ctx.plain.parent / "phantoms"
    ctx.prepare(lambda: write_site("cxp", n, raw, seed=0))
    csv = raw / "CheXpert-v1.0" / "train.csv"
    source = chexpert.read(csv)
    count = len(source.records)
    size = 256
    _, sec, peak = timed(lambda: ingest.ingest(source, root=ctx.root, name="cxpimages", kind="chexpert", inputs={},
                                               params=Preprocess(size=size), workers=1))
    _, psec, ppeak = timed(lambda: plain_images(csv, size, ctx.plain / "images.tar"))
    ctx.add(Stage("image ingest", count, sec, peak, "PIL loop", psec, ppeak))


def table_lines(result: dict) -> list[tuple[str, ...]]:
    """The printed table's rows: stage, rows, seconds, peak GiB, plain, plain seconds, ratio."""
    rows = []
    for s in result["stages"]:
        rows.append((s["stage"] + (" *" if s["extrapolated"] else ""), f"{s['rows']:,}", f"{s['seconds']:.2f}",
                     f"{s['peak_rss_gib']:.2f}", s["plain"] or "-",
                     "-" if s["plain_seconds"] is None else f"{s['plain_seconds']:.2f}",
                     "-" if s["ratio"] is None else f"{s['ratio']:.2f}"))
    t = result["total"]
    rows.append(("total", "", f"{t['seconds']:.2f}", f"{t['peak_rss_gib']:.2f}", "(stages with a plain equivalent)",
                 f"{t['plain_seconds']:.2f}", "-" if t["ratio"] is None else f"{t['ratio']:.2f}"))
    return rows

