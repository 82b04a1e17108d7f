"""Targeted synthesis: condition rows drawn so that rare findings reach a target prevalence.

The paper replicates its training set without changing the disease prevalence and names
over-sampling of the rarest findings as future work. A rebalanced replica draws its
condition rows — whole real label vectors, so co-occurrence stays realistic — from the
source split with weights chosen by raking (iterative proportional fitting): every finding
whose prevalence is below ``target`` is pulled up to ``target``, and every other finding is
held at its source prevalence, as far as the real label vectors allow. Draws are seeded
and systematic (each row is drawn ``floor`` or ``ceil`` of its expected count), so the
drawn set follows the weights closely even for a small replica.
"""

from __future__ import annotations

import hashlib

import numpy as np

from cxrsynth.errors import CxrsynthError
from cxrsynth.labels import FINDING_COLUMNS, POSITIVE


def rebalance_weights(findings: np.ndarray, target: float, iterations: int = 1000, tol: float = 1e-6) -> np.ndarray:
    """Per-row sampling weights (summing to 1) that lift rare findings to ``target``.

    Args:
        findings: (N, 14) label codes (1 positive; 0 and -1 count as not positive).
        target: Prevalence in (0, 1) that every rarer finding is raised to.
        iterations: Raking passes at most.
        tol: Stop when every constrained prevalence is within ``tol`` of its goal.

    Returns:
        (N,) float64 weights.
    """
    if not 0.0 < target < 1.0:
        raise CxrsynthError(f"rebalance target must be a prevalence in (0, 1), got {target}")
    pos = np.asarray(findings) == POSITIVE  # (N, F)
    n = pos.shape[0]
    if n == 0:
        raise CxrsynthError("no condition rows to rebalance")
    source = pos.mean(axis=0)
    goal = np.where(source < target, target, source)
    active = (source > 0) & (source < 1)  # a finding no row (or every row) has cannot be moved
    w = np.full(n, 1.0 / n)
    for _ in range(iterations):
        for f in np.flatnonzero(active):
            p = w[pos[:, f]].sum()
            w = np.where(pos[:, f], w * (goal[f] / p), w * ((1 - goal[f]) / (1 - p)))
        w /= w.sum()
        if np.all(np.abs(pos[:, active].T @ w - goal[active]) < tol):
            break
    return w


def systematic_draw(weights: np.ndarray, count: int, seed: int) -> np.ndarray:
    """``count`` row indices drawn by systematic sampling on ``weights`` (seeded offset), in row order."""
    digest = hashlib.blake2b(f"rebalance:{seed}".encode(), digest_size=8).digest()
    offset = (int.from_bytes(digest, "big") >> 11) / float(1 << 53)  # uniform in [0, 1)
    edges = np.cumsum(weights) * count
    points = offset + np.arange(count)
    return np.minimum(np.searchsorted(edges, points, side="right"), len(weights) - 1)


def prevalence(findings: np.ndarray) -> dict[str, float]:
    """Share of rows positive for each finding, by manifest column name."""
    pos = np.asarray(findings) == POSITIVE
    return {name: float(v) for name, v in zip(FINDING_COLUMNS, pos.mean(axis=0))}
