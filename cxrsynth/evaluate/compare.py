"""Compare models evaluated on the same test set: the paper's t-test and a paired bootstrap.

Two tests of "OTHER's AUROC differs from BASELINE's", per finding and for the macro mean:

* **t-test (the paper's)**: ``scipy.stats.ttest_ind`` on the two models' saved bootstrap
  replicate vectors (``METRICS.replicates.npz``). The replicates are not independent
  observations, so its p-value shrinks as the number of replicates grows; it is reported
  because the paper used it.
* **paired bootstrap (better)**: both models' predictions are resampled with the *same*
  draws (images or patients, as the baseline was evaluated, same seed), and the replicate
  differences ``delta* = AUROC*_other - AUROC*_baseline`` give a percentile 95% interval and
  the two-sided p-value ``min(1, 2 min((1 + #{delta* <= 0}) / (B + 1), (1 + #{delta* >= 0}) / (B + 1)))``.
  Its smallest possible value is ``2 / (B + 1)``.

Only metrics of the same test set, findings and bootstrap (kind, seed, replicates) are
compared (:func:`check_comparable`); anything else is refused, naming the difference. So are
saved replicates of another shape than the bootstrap recorded (:func:`check_replicates`) and
predictions that no longer give the AUROCs their metrics record (:func:`check_predictions_unchanged`).

Bonferroni: the family is every comparison made in one call — for each OTHER, each finding
with an AUROC for both models plus the macro mean — and each method is corrected over that
family on its own: ``p_bonferroni = min(1, p * family)``, significant when ``< alpha``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cxrsynth import labels
from cxrsynth.config import MAX_BOOTSTRAP, Config, setting
from cxrsynth.errors import CxrsynthError
from cxrsynth.evaluate.auroc import bootstrap_aurocs
from cxrsynth.evaluate.metrics import (
    TestSet,
    clusters,
    dumps,
    join,
    macro_of,
    point_estimates,
    predictions_of,
    read_metrics,
    read_predictions,
)

#: Test-set facts two metrics files must share.
_SAME = ("name", "version", "split", "images", "keys_sha256", "datasets")


@dataclass(frozen=True)
class CompareConfig(Config):
    """Settings of :func:`compare`: significance level and the paired bootstrap (defaults: the baseline's)."""

    kind = "compare config"  # how errors name these settings (a class attribute, not a field)

    alpha: float = setting(0.05, gt=0, lt=1)
    bootstrap: int | None = setting(None, ge=1, le=MAX_BOOTSTRAP)
    seed: int | None = None


def check_same_test(base: dict, other: dict, base_name: str, other_name: str) -> None:
    """Refuse two metrics files evaluated on different test sets, naming the first difference."""
    for key in _SAME:
        a, b = base["test"].get(key), other["test"].get(key)
        if a != b:
            raise CxrsynthError(f"{other_name} was evaluated on another test set than {base_name}: test.{key} is "
                                f"{b!r} there, {a!r} in the baseline")


def check_comparable(base: dict, other: dict, base_name: str, other_name: str) -> None:
    """Refuse two metrics files the t-test may not compare, naming the first difference: another
    test set (:func:`check_same_test`), other findings, or another bootstrap (kind, seed or
    replicate count: the replicate vectors of an image and a patient-cluster bootstrap, or of
    other draws, are not samples of the same thing)."""
    check_same_test(base, other, base_name, other_name)
    for metrics, name in ((base, base_name), (other, other_name)):
        if not isinstance(metrics["findings"], dict) or sorted(metrics["findings"]) != sorted(labels.FINDING_COLUMNS):
            found = sorted(metrics["findings"]) if isinstance(metrics["findings"], dict) else metrics["findings"]
            raise CxrsynthError(f"{name} has metrics of other findings ({', '.join(map(str, found))}) than this "
                                f"cxrsynth's ({', '.join(labels.FINDING_COLUMNS)})")
    a, b = base["bootstrap"], other["bootstrap"]
    if not (isinstance(a, dict) and isinstance(b, dict)):
        raise CxrsynthError(f"{base_name if not isinstance(a, dict) else other_name}: its bootstrap record is not a mapping")
    for key, default, what in (("cluster", "image", "bootstrap kind (--cluster)"), ("seed", None, "bootstrap seed (--seed)"),
                               ("n", None, "number of bootstrap replicates (--bootstrap)")):
        if a.get(key, default) != b.get(key, default):
            raise CxrsynthError(f"{other_name} was evaluated with another {what} than {base_name}: bootstrap.{key} is "
                                f"{b.get(key, default)!r} there, {a.get(key, default)!r} in the baseline; evaluate both "
                                f"the same way")


def check_replicates(metrics: dict, reps: dict[str, np.ndarray], path: str | Path) -> None:
    """Refuse saved replicates that are not this evaluation's: ``(n, findings)`` and ``(n,)`` for its ``bootstrap.n``."""
    n, width = metrics["bootstrap"].get("n"), len(labels.FINDING_COLUMNS)
    shapes = (reps["findings"].shape, reps["macro"].shape)
    if shapes != ((n, width), (n,)):
        raise CxrsynthError(f"{path}: its saved replicates have shapes {shapes[0]} and {shapes[1]}, its bootstrap.n is "
                            f"{n!r} ({width} findings): the replicates of another evaluation? Evaluate it again")


def check_predictions_unchanged(metrics: dict, test: TestSet, path: str | Path) -> None:
    """Refuse a metrics file whose predictions file no longer gives its recorded AUROCs: the
    paired bootstrap would then test other predictions than the t-test's saved replicates."""
    findings, _ = point_estimates(test.labels, test.scores)
    for column in labels.FINDING_COLUMNS:
        entry = metrics["findings"][column]
        now, recorded = findings[column]["auroc"], entry.get("auroc") if isinstance(entry, dict) else None
        same = recorded is None if now is None else isinstance(recorded, (int, float)) and abs(now - recorded) <= 1e-9
        if not same:
            raise CxrsynthError(f"{path}: its predictions ({metrics.get('predictions')}) give {column} AUROC {_shown(now)}, "
                                f"the metrics record {_shown(recorded)}: the predictions changed since they were evaluated; "
                                f"evaluate them again")


def _shown(value) -> str:
    return f"{value:.6g}" if isinstance(value, (int, float)) else repr(value)


def paired_p(delta: np.ndarray) -> float | None:
    """Two-sided bootstrap p-value of a difference's replicates (NaNs left out)."""
    d = delta[~np.isnan(delta)]
    if d.size == 0:
        return None
    below, above = (1 + np.sum(d <= 0)) / (d.size + 1), (1 + np.sum(d >= 0)) / (d.size + 1)
    return float(min(1.0, 2 * min(below, above)))


def ttest_p(a: np.ndarray, b: np.ndarray) -> float | None:
    """``scipy.stats.ttest_ind`` p-value of two replicate vectors (NaNs left out)."""
    from scipy import stats

    a, b = a[~np.isnan(a)], b[~np.isnan(b)]
    if a.size < 2 or b.size < 2:
        return None
    p = float(stats.ttest_ind(a, b).pvalue)
    return p if np.isfinite(p) else (1.0 if np.array_equal(a, b) else None)


def bonferroni(p: float | None, family: int) -> float | None:
    """``min(1, p * family)``."""
    return None if p is None else float(min(1.0, p * family))


def compare(root: str | Path, baseline: str | Path, others: list[str | Path], config: CompareConfig = CompareConfig(),
            threads: int | None = None) -> dict:
    """Compare each OTHER metrics file with BASELINE on the same test set.

    Args:
        root: Project root (the manifests the predictions are joined to).
        baseline: The baseline's ``METRICS.json`` (``cxrsynth evaluate``).
        others: One or more metrics files to compare with it.
        config: Alpha and the paired bootstrap's size and seed.
        threads: Bootstrap threads.

    Returns:
        The comparison table: ``{"baseline", "alpha", "family", "bootstrap", "test", "comparisons":
        [{"other", "rows": [{"finding", "baseline", "other", "delta", "delta_ci95", "p_ttest",
        "p_ttest_bonferroni", "significant_ttest", "p_paired", "p_paired_bonferroni",
        "significant_paired"}]}], "warnings"}``.
    """
    if not others:
        raise CxrsynthError("name at least one metrics file to compare with the baseline")
    if not 0 < config.alpha < 1:
        raise CxrsynthError(f"--alpha must be in (0, 1), got {config.alpha}")
    base_m, base_r = read_metrics(baseline)
    loaded = []
    for path in others:
        m, r = read_metrics(path)
        check_comparable(base_m, m, str(baseline), str(path))
        loaded.append((Path(path), m, r))
    b = base_m["bootstrap"]
    n_boot = int(config.bootstrap if config.bootstrap is not None else b["n"])
    seed = int(config.seed if config.seed is not None else b["seed"])
    if n_boot < 1:
        raise CxrsynthError("the paired bootstrap needs at least 1 replicate (--bootstrap)")
    for metrics, reps_, path in ((base_m, base_r, baseline), *((m, r, p) for p, m, r in loaded)):
        check_replicates(metrics, reps_, path)
    base_test = join(root, read_predictions(predictions_of(base_m, baseline)))
    tests = [join(root, read_predictions(predictions_of(m, path))) for path, m, _ in loaded]
    for metrics, test, path in ((base_m, base_test, baseline), *((m, t, p) for (p, m, _), t in zip(loaded, tests))):
        check_predictions_unchanged(metrics, test, path)
    for (path, _, _), t in zip(loaded, tests):
        if not (t.rows["key"].astype(str).to_numpy() == base_test.rows["key"].astype(str).to_numpy()).all():
            raise CxrsynthError(f"{path}: its predictions cover other images than the baseline's")
    codes = clusters(base_test.rows, b.get("cluster", "image"))
    reps = bootstrap_aurocs([base_test.scores, *(t.scores for t in tests)], base_test.labels, codes, n_boot, seed,
                            threads=threads)
    columns = list(labels.FINDING_COLUMNS)
    pairs = []
    for path, m, _ in loaded:
        defined = np.array([base_m["findings"][c]["auroc"] is not None and m["findings"][c]["auroc"] is not None
                            for c in columns])
        pairs.append(defined)
    family = int(sum(int(d.sum()) + 1 for d in pairs))
    comparisons = []
    for (path, m, r), other_reps, defined in zip(loaded, reps[1:], pairs):
        rows = []
        entries = [("macro", base_m["macro"]["auroc"], m["macro"]["auroc"], base_r["macro"], r["macro"],
                    macro_of(other_reps, defined) - macro_of(reps[0], defined))]
        entries += [(c, base_m["findings"][c]["auroc"], m["findings"][c]["auroc"], base_r["findings"][:, j],
                     r["findings"][:, j], other_reps[:, j] - reps[0][:, j]) for j, c in enumerate(columns) if defined[j]]
        for finding, a, o, ta, tb, delta in entries:
            if a is None or o is None:
                continue
            p_t, p_p = ttest_p(ta, tb), paired_p(delta)
            finite = delta[~np.isnan(delta)]
            ci = [float(x) for x in np.percentile(finite, [2.5, 97.5])] if finite.size else None
            p_tb, p_pb = bonferroni(p_t, family), bonferroni(p_p, family)
            rows.append({"finding": finding, "baseline": a, "other": o, "delta": o - a, "delta_ci95": ci,
                         "p_ttest": p_t, "p_ttest_bonferroni": p_tb,
                         "significant_ttest": bool(p_tb is not None and p_tb < config.alpha),
                         "p_paired": p_p, "p_paired_bonferroni": p_pb,
                         "significant_paired": bool(p_pb is not None and p_pb < config.alpha)})
        comparisons.append({"other": str(path), "model": m.get("model", {}).get("classifier_id"), "rows": rows})
    warnings = []
    floor = 2 / (n_boot + 1)
    if floor * family >= config.alpha:
        warnings.append(f"with {n_boot} paired replicates the smallest paired p is {floor:.2g}; after Bonferroni over "
                        f"{family} comparisons nothing can reach alpha {config.alpha}: use --bootstrap "
                        f"{int(np.ceil(2 * family / config.alpha))} or more")
    return {
        "baseline": str(baseline),
        "baseline_model": base_m.get("model", {}).get("classifier_id"),
        "alpha": config.alpha,
        "family": {"size": family, "definition": "for each OTHER: the findings with an AUROC for both models + the macro "
                                                  "mean; each method corrected over the whole family"},
        "bootstrap": {"n": n_boot, "seed": seed, "cluster": b.get("cluster", "image"),
                      "ttest_replicates": {"baseline": int(len(base_r["macro"])),
                                           **{str(p): int(len(r["macro"])) for p, _, r in loaded}}},
        "test": {k: base_m["test"].get(k) for k in ("name", "version", "split", "images")},
        "comparisons": comparisons,
        "warnings": warnings,
    }


def write(result: dict, out: str | Path) -> Path:
    """Write a :func:`compare` result as JSON to ``out`` (its folder created)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(dumps(result))
    return out
