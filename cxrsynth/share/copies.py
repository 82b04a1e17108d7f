"""When is a synthetic image a copy of a training image? The audit's criteria, calibrated on new patients.

Each synthetic (or held-out) image comes with the cosine distances to its ``k`` nearest
training images, ``d1 <= d2 <= ... <= dk`` (:func:`cxrsynth.share.embed.nearest`). Two
scores:

* ``absolute``: ``d1``. Closer than almost any new patient's radiograph comes to the
  training set. Misses a copy whose transform (a shift, a crop, a brightness change) moved it
  a little, because the training set's density varies: in a dense region a new image is as
  close as a shifted copy is in a sparse one (the first audit flagged 2 of 5 planted copies).
* ``relative``: ``d1 / mean(d2..dk)`` (Carlini et al., USENIX Security 2023: a copy's nearest
  neighbour is much closer than the rest). A copy of training image ``t`` sits next to ``t``
  and as far from the others as ``t`` does; a new image is about as far from its first
  neighbour as from the next ones. Density cancels out.

Criteria: ``absolute``, ``relative``, and ``combined`` (flagged when either score is below its
threshold, each calibrated at half the quantile). Every threshold is an order statistic of
the same score over ``n`` held-out images of patients outside the training split, chosen the
conformal way: the ``k``-th smallest with ``k = floor(q (n + 1))`` (at least 1), flagged when
strictly below it. A new patient's image, exchangeable with the held-out ones, then falls
below it with probability ``k / (n + 1) <= q`` (Vovk et al.; Angelopoulos & Bates 2021); a
plain quantile of a small held-out set (the 0.5% point of 166 images lies between its two
smallest) flags new images at about twice the rate it promises. The chance rate
(``chance_rate``) is the *leave-one-out* rate: each held-out image judged by the thresholds
fitted without it (it is flagged when it is among the ``k`` smallest), not the in-sample
rate, which is ``k - 1`` of ``n`` and too low. The gate tests the flagged count against it
(:mod:`cxrsynth.share.gate`). A held-out set smaller than ``uses / q - 1`` images cannot
support the quantile (``k`` is held at 1: the rate is ``1 / (n + 1)`` per score, above ``q``;
``supported`` says so and the chance rate shows it).

A *copy* beyond any doubt (``hard``): closer than half of the nearest any new patient came,
on every score the criterion uses: the gate refuses an export holding one, whatever the count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from cxrsynth.errors import CxrsynthError
from cxrsynth.registry import Registry

#: How far below the smallest new-patient score a *hard* copy lies (0.5: half of it).
HARD_FACTOR = 0.5
_EPS = 1e-12


def scores(dist: np.ndarray) -> dict[str, np.ndarray]:
    """``{"absolute": d1, "relative": d1 / mean(d2..dk)}`` of ``(N, k)`` sorted distances (``k >= 2`` for relative)."""
    dist = np.asarray(dist, dtype=np.float64)
    d1 = dist[:, 0]
    if dist.shape[1] < 2:
        rel = np.full(len(dist), np.nan)
    else:
        rel = d1 / np.maximum(dist[:, 1:].mean(axis=1), _EPS)
    return {"absolute": d1, "relative": rel}


@dataclass(frozen=True)
class Calibrated:
    """A criterion's thresholds, fitted on held-out new-patient images.

    Attributes:
        criterion: ``absolute``, ``relative`` or ``combined``.
        uses: The scores it uses.
        thresholds: Score name → flag below this value.
        hard: Score name → a hard copy lies below this value on every used score.
        chance_rate: Leave-one-out share of the held-out images the criterion flags (its false-flag rate on new
            patients' images).
        quantile: The quantile asked for.
        order: Score name → ``k``: its threshold is the ``k``-th smallest held-out score.
        heldout: ``n``, the held-out images calibrated on.
    """

    criterion: str
    uses: tuple[str, ...]
    thresholds: dict[str, float]
    hard: dict[str, float]
    chance_rate: float
    quantile: float
    order: dict[str, int]
    heldout: int

    @property
    def supported(self) -> bool:
        """Whether ``n`` held-out images support the quantile (``floor(q / uses x (n + 1)) >= 1`` for every score)."""
        return math.floor(self.quantile / len(self.uses) * (self.heldout + 1) + 1e-9) >= 1

    def loo_flag(self, heldout_dist: np.ndarray) -> np.ndarray:
        """``(M,)`` bool for the calibration images themselves: flagged by the thresholds fitted without each (at
        or below a threshold: among its ``k`` smallest)."""
        s = scores(heldout_dist)
        return np.any([s[name] <= self.thresholds[name] for name in self.uses], axis=0) if len(heldout_dist) \
            else np.zeros(0, bool)

    def flag(self, dist: np.ndarray) -> np.ndarray:
        """``(N,)`` bool: flagged by the criterion (any used score below its threshold)."""
        s = scores(dist)
        return np.any([s[name] < self.thresholds[name] for name in self.uses], axis=0) if len(dist) else np.zeros(0, bool)

    def is_hard(self, dist: np.ndarray) -> np.ndarray:
        """``(N,)`` bool: a copy beyond doubt (every used score below its hard bound)."""
        s = scores(dist)
        return np.all([s[name] < self.hard[name] for name in self.uses], axis=0) if len(dist) else np.zeros(0, bool)

    def describe(self) -> str:
        parts = {"absolute": "its nearest training image is closer", "relative": "its nearest training image is closer, "
                 "relative to its next nearest ones (d1 / mean(d2..dk)),"}
        tail = " or ".join(parts[u] for u in self.uses)
        ks = ", ".join(f"{self.order[u]}" for u in self.uses)
        short = "" if self.supported else (f"; {self.heldout} held-out images cannot support the {self.quantile:g} quantile "
                                           f"({math.ceil(len(self.uses) / self.quantile) - 1} needed)")
        return (f"{self.criterion}: flagged when {tail} than for {100 * (1 - self.quantile):g}% of genuinely new patients' "
                f"images (threshold: the {ks}-th smallest of {self.heldout}; leave-one-out false-flag rate on them: "
                f"{100 * self.chance_rate:.2f}%{short})")

    def to_dict(self) -> dict:
        return {"criterion": self.criterion, "uses": list(self.uses), "thresholds": self.thresholds, "hard": self.hard,
                "chance_rate": self.chance_rate, "quantile": self.quantile, "order": self.order,
                "heldout": self.heldout, "supported": self.supported, "rule": self.describe(),
                "hard_rule": f"a hard copy: every used score below {HARD_FACTOR:g} x the smallest a new patient's image had"}


#: Criterion name → the scores it uses (each calibrated at ``quantile / len(uses)``).
CRITERIA: Registry[tuple[str, ...]] = Registry("copy criterion")
CRITERIA.register("absolute", ("absolute",))
CRITERIA.register("relative", ("relative",))
CRITERIA.register("combined", ("absolute", "relative"))


def calibrate(heldout_dist: np.ndarray, criterion: str, quantile: float) -> Calibrated:
    """Fit ``criterion``'s thresholds on the ``(M, k)`` neighbour distances of held-out new-patient images."""
    uses = CRITERIA[criterion]
    if len(heldout_dist) == 0:
        raise CxrsynthError("no held-out images to calibrate the copy criterion on")
    s = scores(heldout_dist)
    if "relative" in uses and np.isnan(s["relative"]).all():
        raise CxrsynthError(f"the {criterion} criterion needs k >= 2 neighbours per image")
    per, n = quantile / len(uses), len(heldout_dist)
    k = min(n, max(1, math.floor(per * (n + 1) + 1e-9)))  # conformal: a new image falls below with probability k/(n+1)
    thresholds = {u: float(np.sort(s[u])[k - 1]) for u in uses}
    hard = {u: float(HARD_FACTOR * np.min(s[u])) for u in uses}
    fitted = Calibrated(criterion, uses, thresholds, hard, 0.0, quantile, {u: k for u in uses}, n)
    return replace(fitted, chance_rate=float(fitted.loo_flag(heldout_dist).mean()))


def either(parts: list[tuple[Calibrated, np.ndarray]], how: str = "flag") -> np.ndarray:
    """``(N,)`` bool: what any of several calibrated rules says, each on its own ``(N, k)`` neighbour distances of the
    same N images (the audit's union): ``how`` is ``flag``, ``is_hard`` or ``loo_flag``."""
    return np.any([getattr(rule, how)(dist) for rule, dist in parts], axis=0)
