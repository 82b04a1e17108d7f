"""Label co-occurrence matrices of datasets and their Pearson correlation (the paper's Figures E1-E3).

For a dataset (optionally one split), ``counts[i, j]`` is the number of images positive
(label 1) for both finding i and finding j; the diagonal is each finding's positive count
(prevalence). Uncertain (-1) counts as not positive. ``normalized = counts / images``.

The paper "compared the similarity between [the matrices] using Pearson's correlation
coefficient" without saying which entries; here ``pearson`` is ``scipy.stats.pearsonr`` of
the two flattened 14 x 14 matrices (all 196 entries, the heat map as drawn), and
``pearson_upper`` that of the 105 distinct entries (upper triangle with the diagonal),
which does not count each off-diagonal pair twice. Pearson's r does not change when a
matrix is scaled, so counts and normalized matrices give the same r.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pandas as pd

from cxrsynth import __version__, labels, manifest
from cxrsynth.errors import CxrsynthError
from cxrsynth.evaluate.metrics import dumps, read_manifest


def matrix(frame: pd.DataFrame) -> np.ndarray:
    """The (14, 14) int64 co-occurrence counts of a manifest frame."""
    positive = (labels.findings_matrix(frame) == labels.POSITIVE).astype(np.int64)  # (N, 14)
    return positive.T @ positive


def _rows(root: str | Path, name: str, split: str | None) -> pd.DataFrame:
    frame = read_manifest(root, name)
    if split is not None:
        frame = frame.loc[(frame["split"] == split).fillna(False).to_numpy(dtype=bool)]
    if frame.empty:
        raise CxrsynthError(f"{name}" + (f" split {split}" if split else "") + " has no images")
    return frame


def correlation(a: np.ndarray, b: np.ndarray) -> dict:
    """Pearson r (and p) of two co-occurrence matrices: all entries, and the upper triangle with the diagonal."""
    from scipy import stats

    upper = np.triu_indices(a.shape[0])
    out = {}
    for key, x, y in (("pearson", a.ravel(), b.ravel()), ("pearson_upper", a[upper], b[upper])):
        if np.ptp(x) == 0 or np.ptp(y) == 0:
            out[key] = {"r": None, "p": None, "reason": "a matrix is constant"}
        else:
            r = stats.pearsonr(x.astype(np.float64), y.astype(np.float64))
            out[key] = {"r": float(r.statistic), "p": float(r.pvalue)}
    return out


def heatmap(normalized: np.ndarray, counts: np.ndarray, title: str, path: Path) -> None:
    """A labelled heat map of a normalized co-occurrence matrix (each cell: share, and count) as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(labels.FINDINGS)
    fig, ax = plt.subplots(figsize=(11, 9.5), dpi=110)
    image = ax.imshow(normalized, cmap="viridis", vmin=0, vmax=max(float(normalized.max()), 1e-9))
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", rotation_mode="anchor", fontsize=9)
    ax.set_yticks(range(len(names)), names, fontsize=9)
    threshold = 0.6 * float(normalized.max())
    for i, j in itertools.product(range(len(names)), repeat=2):
        ax.text(j, i, f"{normalized[i, j]:.2f}\n{counts[i, j]}", ha="center", va="center", fontsize=6,
                color="black" if normalized[i, j] > threshold else "white")
    ax.set_title(title, fontsize=11)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of images positive for both")
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})  # no version string: same bytes for the same matrix
    plt.close(fig)


def cooccurrence(root: str | Path, names: list[str], out: str | Path, split: str | None = None) -> dict:
    """Write each dataset's matrix (JSON + PNG) and the pairwise correlations into ``out``.

    Args:
        root: Project root.
        names: Datasets (two or more for correlations).
        out: Output directory: ``<name>.json``, ``<name>.png``, ``correlations.json``.
        split: Only this split of each dataset (default: all rows).

    Returns:
        The correlations document (also written to ``out/correlations.json``).
    """
    if not names:
        raise CxrsynthError("name at least one dataset")
    if len(set(names)) != len(names):
        raise CxrsynthError(f"a dataset is named twice: {', '.join(names)}")
    frames = {name: _rows(root, name, split) for name in names}  # every dataset is readable before anything is written
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    matrices, files = {}, {}
    for name, frame in frames.items():
        counts = matrix(frame)
        normalized = counts / len(frame)
        matrices[name] = counts
        version = manifest.read_meta(root, name).get("version")
        doc = {"dataset": name, "version": version, "split": split, "images": int(len(frame)),
               "findings": list(labels.FINDING_COLUMNS), "counts": counts.tolist(), "normalized": normalized.tolist(),
               "cxrsynth": __version__}
        (out / f"{name}.json").write_text(dumps(doc))
        where = f"{name}" + (f" split {split}" if split else "") + f" @ {version}"
        heatmap(normalized, counts, f"Label co-occurrence: {where} ({len(frame):,} images)", out / f"{name}.png")
        files[name] = {"json": f"{name}.json", "png": f"{name}.png"}
    pairs = [{"a": a, "b": b, **correlation(matrices[a], matrices[b])} for a, b in itertools.combinations(names, 2)]
    result = {"datasets": names, "split": split, "files": files, "pairs": pairs,
              "method": "scipy.stats.pearsonr of the flattened 14x14 co-occurrence matrices (pearson: all 196 entries; "
                        "pearson_upper: the 105 entries of the upper triangle with the diagonal); scale-invariant, so "
                        "counts and normalized matrices give the same r",
              "cxrsynth": __version__}
    (out / "correlations.json").write_text(dumps(result))
    return json.loads(dumps(result))
