"""The export gate: does the audit show more copies than chance explains?

Every criterion of :mod:`cxrsynth.share.copies` flags a known share of genuinely new
patients' images (``chance_rate``), so a replica with no copy at all still has about
``chance_rate x N`` flagged images: refusing any flagged image would refuse every large
export, and any fixed limit is arbitrary. The gate asks instead whether the flagged count
is more than chance explains — a one-sided binomial test of ``flagged`` out of ``N`` against
``chance_rate`` (H0: the synthetic images are as new as new patients' images) at level
``alpha`` — and refuses outright when any pair is a *hard* copy (closer than any new
patient's image came, by a wide margin). ``--force`` exports anyway and the datasheet says so.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

#: Flagged pairs named in a refusal.
SHOWN = 5


@dataclass(frozen=True)
class Decision:
    """The gate's verdict on one audit.

    Attributes:
        passed: No hard copy, and the flagged count is within chance at ``alpha`` (and under ``max_flagged``).
        flagged: Flagged synthetic images.
        synthetic: Audited synthetic images.
        chance_rate: The criterion's false-flag rate on new patients' images.
        expected: ``chance_rate x synthetic``.
        p_value: One-sided binomial P(X >= flagged) under the chance rate.
        alpha: The test's level.
        copies: Hard copies.
        max_flagged: An extra cap on the count, when given.
        reason: Why it passed or failed, in words.
        closest: The closest flagged pairs (synthetic key, training key, distance, ratio).
    """

    passed: bool
    flagged: int
    synthetic: int
    chance_rate: float
    expected: float
    p_value: float
    alpha: float
    copies: int
    max_flagged: int | None
    reason: str
    closest: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def test_text(self) -> str:
        """The test and its result, for the datasheet (no key: the closest pairs stay with the sender)."""
        return (f"one-sided binomial test of {self.flagged} flagged of {self.synthetic} synthetic images against the "
                f"criterion's chance rate on new patients' images ({100 * self.chance_rate:.2f}%, {self.expected:.2f} "
                f"expected): p = {self.p_value:.3g} at alpha {self.alpha:g}; hard copies: {self.copies}")


def decide(summary: dict[str, Any], alpha: float = 0.01, max_flagged: int | None = None) -> Decision:
    """The gate's decision on an ``audit.json`` summary (:func:`cxrsynth.share.audit.audit`)."""
    from scipy.stats import binomtest

    counts = summary["counts"]
    n, flagged = int(counts["synthetic"]), int(counts["flagged"])
    rate = float(counts.get("chance_rate", summary["threshold"].get("quantile", 0.01)))
    copies = int(counts.get("copies", 0))
    p = float(binomtest(flagged, n, min(max(rate, 0.0), 1.0), alternative="greater").pvalue) if n else 1.0
    closest = [{k: f.get(k) for k in ("synthetic_key", "training_key", "distance", "ratio_to_next", "hard_copy")}
               for f in summary.get("flagged", [])[:SHOWN]]
    failures = []
    if copies:
        failures.append(f"{copies} hard cop{'y' if copies == 1 else 'ies'} (closer than any new patient's image came, "
                        "by a wide margin)")
    if p < alpha:
        failures.append(f"{flagged} flagged of {n} where chance explains {n * rate:.2f} (binomial p = {p:.3g} < {alpha:g})")
    if max_flagged is not None and flagged > max_flagged:
        failures.append(f"{flagged} flagged, more than --max-flagged {max_flagged}")
    if failures:
        reason = "; ".join(failures)
    else:
        reason = f"{flagged} flagged of {n}, {n * rate:.2f} expected by chance (binomial p = {p:.3g} >= {alpha:g}); no hard copy"
    return Decision(passed=not failures, flagged=flagged, synthetic=n, chance_rate=rate, expected=round(n * rate, 3),
                    p_value=p, alpha=alpha, copies=copies, max_flagged=max_flagged, reason=reason, closest=closest)


def pairs_text(decision: Decision) -> str:
    """The closest flagged pairs, one per line, for a refusal."""
    lines = []
    for c in decision.closest:
        ratio = c.get("ratio_to_next")
        lines.append(f"  {c['synthetic_key']} -> {c['training_key']}: distance {c['distance']:.4g}"
                     + (f", {ratio:.3g} of the next neighbours'" if ratio is not None else "")
                     + (" (hard copy)" if c.get("hard_copy") else ""))
    return "\n".join(lines)
