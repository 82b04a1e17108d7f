"""The export gate: does an audit show more copies than chance explains?

The audit's threshold is a quantile of genuinely new patients' distances, so a clean replica
has about ``chance_rate x synthetic`` images flagged by chance alone; a fixed limit on the
flagged count (``--max-flagged 0``) blocks every large export and any other number is
arbitrary. The gate instead asks whether the flagged count is *more than chance explains*:
a one-sided binomial test of ``flagged`` out of ``synthetic`` against ``chance_rate``
(:func:`scipy.stats.binomtest`, ``alternative="greater"``), refused when ``p < alpha``. It
also refuses when any pair is a copy outright (closer than the audit's hard copy threshold:
``counts.copies``), whatever the count: one leaked radiograph is one too many, and a test
on counts cannot see it among thousands.

Read from ``audit.json``: ``counts.flagged``, ``counts.synthetic``, ``counts.chance_rate``
(falls back to ``threshold.quantile`` where the audit does not record it), ``counts.copies``
(falls back to the flagged pairs at or below ``copy_distance``, 0.001: a correlation of 0.999
in the pixel embedding, a copy up to a grey level of noise) and the flagged pairs, closest first, to name in a refusal.

Dar et al. (arXiv 2402.01054) report memorisation as the fraction of synthetic images that
are copies and the fraction of training images copied at least once; :func:`decide` reports
both (``flagged / synthetic`` and unique flagged training keys ``/ training images``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cxrsynth.config import Config, setting
from cxrsynth.errors import CheckFailed

#: A flagged pair this close (cosine distance) counts as a copy when the audit records no ``copies``.
COPY_DISTANCE = 1e-3


class MemorizationError(CheckFailed):
    """The audit flagged more synthetic images than chance explains, or found a copy."""


@dataclass(frozen=True)
class GateConfig(Config):
    """When an export is refused.

    Attributes:
        alpha: Level of the one-sided binomial test (flagged count above chance).
        max_flagged: Optional extra cap on the flagged count (None: the test alone).
        copy_distance: Fallback hard copy threshold (cosine distance) for audits that record no ``copies``.
        show: Closest pairs a refusal names.
    """

    kind = "gate config"

    alpha: float = setting(0.01, gt=0.0, lt=1.0)
    max_flagged: int | None = None
    copy_distance: float = setting(COPY_DISTANCE, ge=0.0)
    show: int = setting(5, ge=1)


@dataclass(frozen=True)
class Decision:
    """The gate's verdict on one audit, with every number the datasheet states."""

    passed: bool
    flagged: int
    synthetic: int
    chance_rate: float
    expected: float
    p_value: float
    alpha: float
    copies: int
    max_flagged: int | None
    reasons: tuple[str, ...]
    closest: tuple[tuple[str, str, float, str | None], ...]
    synthetic_copied_fraction: float
    training_copied: int
    training_images: int | None

    @property
    def training_copied_fraction(self) -> float | None:
        return self.training_copied / self.training_images if self.training_images else None

    def test_text(self) -> str:
        """The test and its result, in one sentence (no key)."""
        return (f"one-sided binomial test of {self.flagged} flagged of {self.synthetic} against the chance rate "
                f"{self.chance_rate:g} ({self.expected:.2f} expected): p = {self.p_value:.3g}, alpha {self.alpha:g}; "
                f"{self.copies} pair(s) below the hard copy threshold")

    def public(self) -> dict[str, Any]:
        """What an export may record (no key)."""
        return {
            "test": "one-sided binomial (scipy.stats.binomtest, alternative='greater') of flagged out of synthetic "
                    "against the chance rate; refused when p < alpha or any pair is below the hard copy threshold",
            "flagged": self.flagged, "synthetic": self.synthetic, "chance_rate": self.chance_rate,
            "expected": round(self.expected, 4), "p_value": float(f"{self.p_value:.6g}"), "alpha": self.alpha,
            "copies": self.copies, "max_flagged": self.max_flagged, "passed": self.passed, "reasons": list(self.reasons),
            "synthetic_flagged_fraction": round(self.synthetic_copied_fraction, 6),
            "training_copied": self.training_copied, "training_images": self.training_images,
            "training_copied_fraction": (None if self.training_copied_fraction is None
                                         else round(self.training_copied_fraction, 6)),
        }

    def refusal(self, name: str, where: str) -> str:
        """The message of a refused export: why, the p-value and the closest pairs (real keys: local only)."""
        pairs = "; ".join(f"{s} -> {t} (distance {d:.4g}{f', {rule} rule' if rule else ''})"
                          for s, t, d, rule in self.closest) or "none flagged"
        return (f"{name}: export refused: {' and '.join(self.reasons)} ({self.test_text()}). "
                f"Closest pairs (synthetic -> training): {pairs}. See {where}; --force exports anyway and the "
                f"datasheet records the override")


def decide(summary: dict[str, Any], config: GateConfig = GateConfig()) -> Decision:
    """The gate's decision on an ``audit.json`` summary."""
    from scipy.stats import binomtest

    counts = summary["counts"]
    flagged, synthetic = int(counts["flagged"]), int(counts["synthetic"])
    rate = counts.get("chance_rate")
    if rate is None:
        rate = (summary.get("threshold") or {}).get("quantile", (summary.get("config") or {}).get("quantile"))
    rate = float(rate)
    # strongest evidence first: the share of new patients' images as close (comparable across the audit's rules, whose
    # distances are not), then the distance
    pairs = sorted(summary.get("flagged") or [], key=lambda p: (p.get("heldout_below") or 0.0, p["distance"]))
    copies = counts.get("copies")
    if copies is None:
        copies = sum(1 for p in pairs if p["distance"] <= config.copy_distance)
    copies = int(copies)
    p_value = float(binomtest(flagged, synthetic, rate, alternative="greater").pvalue) if synthetic else 1.0
    reasons = []
    if p_value < config.alpha:
        reasons.append(f"{flagged} of {synthetic} flagged is more than chance explains "
                       f"({rate * synthetic:.2f} expected, p = {p_value:.3g} < alpha {config.alpha:g})")
    if copies:
        reasons.append(f"{copies} pair(s) closer than the hard copy threshold")
    if config.max_flagged is not None and flagged > config.max_flagged:
        reasons.append(f"{flagged} flagged exceeds --max-flagged {config.max_flagged}")
    training_images = (summary.get("training") or {}).get("images")
    return Decision(
        passed=not reasons, flagged=flagged, synthetic=synthetic, chance_rate=rate, expected=rate * synthetic,
        p_value=p_value, alpha=config.alpha, copies=copies, max_flagged=config.max_flagged, reasons=tuple(reasons),
        closest=tuple((str(p["synthetic_key"]), str(p["training_key"]), float(p["distance"]), p.get("rule"))
                      for p in pairs[: config.show]),
        synthetic_copied_fraction=flagged / synthetic if synthetic else 0.0,
        training_copied=len({p["training_key"] for p in pairs}),
        training_images=int(training_images) if training_images else None,
    )
