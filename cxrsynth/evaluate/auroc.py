"""AUROC point estimates and a vectorised (cluster) bootstrap of them.

Point estimates are scikit-learn's ``roc_auc_score``. The bootstrap never materialises a
resampled data set: a replicate is a vector of multiplicities (how often each image, or
each patient's whole set of images, was drawn), and the AUROC of the resampled data is the
weighted Mann-Whitney statistic

    AUROC = sum_{i pos} sum_{j neg} w_i w_j ([s_i > s_j] + 0.5 [s_i = s_j]) / (W_pos W_neg),

which is exactly what ``roc_auc_score`` returns on the explicitly resampled arrays (ties
count one half). Per finding, the smaller class S is sorted by score once, and for each
image j of the other class O, ``lo_j`` / ``hi_j`` = how many S images score strictly below /
at most it (``searchsorted``). With ``C`` the cumulative S weight in score order (a leading
0), ``sum_j w_j (C[lo_j] + C[hi_j])`` is twice the weighted count of (S below O) pairs plus
the tied pairs: the Mann-Whitney numerator (times 2) when S are the negatives, its
complement to ``2 W_pos W_neg`` when S are the positives. Per finding and chunk of
replicates that is three gathers and one cumulative sum (of the smaller class), in exact
integer arithmetic; findings run in threads.

Draws: replicate ``r`` draws ``n_clusters`` cluster indices with
``rng.integers(0, n_clusters, size=(chunk, n_clusters))`` from ``numpy.random.default_rng(seed)``,
chunk after chunk; the stream does not depend on the chunk size (tested), so the same seed
gives the same replicates on any machine and for any memory budget.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from cxrsynth.labels import NEGATIVE, POSITIVE

#: Elements (replicates x images) per chunk: small blocks stay in cache (4-8 replicates of 56K images measured fastest).
CHUNK_ELEMENTS = 300_000


def auroc(labels: np.ndarray, scores: np.ndarray) -> tuple[float | None, str | None]:
    """scikit-learn's AUROC of one finding, uncertain labels masked out.

    Args:
        labels: (N,) int codes 1 / 0 / -1 (uncertain, masked out).
        scores: (N,) predicted probabilities.

    Returns:
        ``(auroc, None)``, or ``(None, reason)`` when only one class is present.
    """
    from sklearn.metrics import roc_auc_score

    labels = np.asarray(labels)
    keep = labels != -1
    y, s = labels[keep], np.asarray(scores, dtype=np.float64)[keep]
    n_pos, n_neg = int((y == POSITIVE).sum()), int((y == NEGATIVE).sum())
    reason = one_class_reason(n_pos, n_neg)
    if reason is not None:
        return None, reason
    return float(roc_auc_score(y, s)), None


def one_class_reason(n_pos: int, n_neg: int) -> str | None:
    """Why an AUROC is undefined (``None`` when both classes are present)."""
    if n_pos and n_neg:
        return None
    if not n_pos and not n_neg:
        return "no certain labels (all uncertain or no images)"
    return f"only one class present ({n_pos} positive, {n_neg} negative)"


def available_cpus() -> int:
    """CPUs this process may run on."""
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity is not None else (os.cpu_count() or 1)


def chunk_size(n: int) -> int:
    """Replicates per chunk so that one chunk's per-image weights hold about :data:`CHUNK_ELEMENTS`."""
    return max(1, CHUNK_ELEMENTS // max(1, n))


def resample_draws(rng: np.random.Generator, n_clusters: int, replicates: int, chunk: int | None = None) -> Iterator[np.ndarray]:
    """The bootstrap's draws: chunks of ``(c, n_clusters)`` cluster indices, ``replicates`` rows in all."""
    chunk = chunk or chunk_size(n_clusters)
    done = 0
    while done < replicates:
        c = min(chunk, replicates - done)
        yield rng.integers(0, n_clusters, size=(c, n_clusters))
        done += c


def counts_of(draws: np.ndarray, width: int) -> np.ndarray:
    """Multiplicity of each cluster in each replicate: ``(c, width)`` int64 from ``(c, k)`` draws in ``[0, width)``."""
    c = draws.shape[0]
    offset = (draws + (np.arange(c, dtype=np.int64) * width)[:, None]).ravel()
    return np.bincount(offset, minlength=c * width).reshape(c, width)


@dataclass(frozen=True)
class _Prepared:
    """One finding of one model, sorted once.

    The smaller class ("S") is ordered by score; for each image of the other class ("O"),
    ``lo`` / ``hi`` count the S images scoring strictly below / at most it (indices into
    the cumulative S weights, whose entry 0 is a zero-weight sentinel). ``ties`` are the O
    images with ``hi != lo``. Gathers from the replicate counts run in image order
    (``*_clusters`` ascending, cache-friendly); the score order is applied to the small S block.
    """

    small_clusters: np.ndarray  # (m + 1,) the sentinel cluster, then S's clusters in image order
    small_order: np.ndarray  # (m + 1,) 0, then 1 + S's argsort by score: positions into small_clusters
    other_clusters: np.ndarray  # (n - m,) O's clusters in image order
    lo: np.ndarray  # (n - m,)
    hi_at_ties: np.ndarray  # (t,)
    ties: np.ndarray  # (t,) positions in O
    positives_sorted: bool  # True: S are the positives


def _prepare(labels: np.ndarray, scores: np.ndarray, clusters: np.ndarray, sentinel: int) -> _Prepared:
    pos, neg = labels == POSITIVE, labels == NEGATIVE
    positives_sorted = int(pos.sum()) <= int(neg.sum())
    small, other = (pos, neg) if positives_sorted else (neg, pos)
    order = np.argsort(scores[small], kind="stable")
    small_scores = scores[small][order]
    lo = np.searchsorted(small_scores, scores[other], side="left")
    hi = np.searchsorted(small_scores, scores[other], side="right")
    ties = np.flatnonzero(hi != lo)
    return _Prepared(
        small_clusters=np.concatenate([[sentinel], clusters[small]]).astype(np.intp),
        small_order=np.concatenate([[0], order + 1]).astype(np.intp),
        other_clusters=clusters[other].astype(np.intp),
        lo=lo.astype(np.intp),
        hi_at_ties=hi[ties].astype(np.intp),
        ties=ties.astype(np.intp),
        positives_sorted=positives_sorted,
    )


def _weighted_auroc(p: _Prepared, counts: np.ndarray) -> np.ndarray:
    """AUROC of each replicate (rows of ``counts``, int64 with a zero sentinel column); NaN where a class is missing.

    With S the sorted class and O the other, cumulative S weights ``cum`` (entry k = weight
    of the k lowest-scoring S images) give, for each O image j, the S weight strictly
    below it, ``cum[lo_j]``, and at most it, ``cum[hi_j]``. Then
    ``sum_j w_j (cum[lo_j] + cum[hi_j]) = 2 * (pairs with S below O) + (tied pairs)``,
    which is twice the Mann-Whitney count when S are the negatives, and
    ``2 W_pos W_neg`` minus it when S are the positives.
    """
    w_small = np.take(np.take(counts, p.small_clusters, axis=1), p.small_order, axis=1)  # (c, m + 1), by score
    cum = np.cumsum(w_small, axis=1)  # int64 in, int64 out: numpy's fast cumsum path
    w_other = np.take(counts, p.other_clusters, axis=1)  # (c, n - m)
    at = np.take(cum, p.lo, axis=1)  # (c, n - m): S weight strictly below each O image
    both = 2 * np.einsum("ij,ij->i", w_other, at)
    if p.ties.size:  # + S weight tied with each O image (hi - lo > 0 only there)
        tied = np.take(cum, p.hi_at_ties, axis=1) - np.take(at, p.ties, axis=1)
        both += np.einsum("ij,ij->i", np.take(w_other, p.ties, axis=1), tied)
    w_s, w_o = cum[:, -1], w_other.sum(axis=1)
    denom = 2 * w_s * w_o
    twice_num = both if not p.positives_sorted else denom - both
    out = np.full(counts.shape[0], np.nan)
    ok = denom > 0
    out[ok] = twice_num[ok] / denom[ok]
    return out


def bootstrap_aurocs(
    scores: Sequence[np.ndarray],
    labels: np.ndarray,
    clusters: np.ndarray | None,
    replicates: int,
    seed: int,
    chunk: int | None = None,
    threads: int | None = None,
) -> list[np.ndarray]:
    """Bootstrap AUROC replicates of one or more models on the same resampled images.

    Every model sees the same draws (a paired bootstrap when several are given).

    Args:
        scores: One ``(N, F)`` score matrix per model.
        labels: ``(N, F)`` int codes 1 / 0 / -1; uncertain (-1) is masked out per finding.
        clusters: ``(N,)`` int cluster index in ``[0, K)`` of each image (a patient), or None
            to resample images.
        replicates: Number of bootstrap replicates B.
        seed: Seed of ``numpy.random.default_rng``.
        chunk: Replicates per chunk (default: :func:`chunk_size`); does not change the result.
        threads: Findings computed at once in threads (numpy releases the GIL in its gathers and
            sums); default: the CPUs this process may use. Does not change the result.

    Returns:
        One ``(B, F)`` float64 array per model; NaN where a replicate drew no positive or no
        negative of a finding.
    """
    labels = np.asarray(labels)
    n, f = labels.shape
    if clusters is None:
        clusters = np.arange(n, dtype=np.int64)
    clusters = np.asarray(clusters, dtype=np.int64)
    n_clusters = int(clusters.max()) + 1 if n else 0
    if n_clusters == 0:
        return [np.full((replicates, f), np.nan) for _ in scores]
    prepared = [[_prepare(labels[:, j], np.asarray(s[:, j], dtype=np.float64), clusters, n_clusters) for j in range(f)]
                for s in scores]
    out = [np.full((replicates, f), np.nan) for _ in scores]
    rng = np.random.default_rng(seed)
    tasks = [(m, j, p) for m, per_finding in enumerate(prepared) for j, p in enumerate(per_finding)]
    threads = max(1, min(threads or available_cpus(), len(tasks)))
    start = 0
    with ThreadPoolExecutor(threads) as pool:
        for draws in resample_draws(rng, n_clusters, replicates, chunk or chunk_size(n)):
            counts = counts_of(draws, n_clusters + 1)  # column n_clusters: the zero-weight sentinel (never drawn)
            stop = start + counts.shape[0]
            for (m, j, _), values in zip(tasks, pool.map(lambda t: _weighted_auroc(t[2], counts), tasks)):
                out[m][start:stop, j] = values
            start = stop
    return out


def summarize(replicates: np.ndarray) -> dict:
    """SD (ddof=1) and percentile 95% interval of bootstrap replicates, NaNs (undefined replicates) left out."""
    values = replicates[~np.isnan(replicates)]
    if values.size < 2:
        return {"sd": None, "ci95": None, "undefined_replicates": int(replicates.size - values.size)}
    lo, hi = np.percentile(values, [2.5, 97.5])
    return {"sd": float(np.std(values, ddof=1)), "ci95": [float(lo), float(hi)],
            "undefined_replicates": int(replicates.size - values.size)}
