"""The report's words: plain-language sentences computed from the numbers, and the texts around them.

:func:`summary` writes one sentence per experiment family (whatever the sign of its
change), the CAS, co-occurrence and Fréchet distances, and what is missing; the helpers
format numbers and test sets the same way everywhere. The glossary, the families' titles
and the figures' captions are here too, written for the demo's site names (``cxp``
replicated, ``mimic`` the external family's site): :func:`sites` puts params.yaml's in.
"""

from __future__ import annotations

import re

import numpy as np

from cxrsynth.study import figures
from cxrsynth.study.params import StudyParams
from cxrsynth.study.report.load import (
    COOCCURRENCE_DIR,
    RARE,
    Study,
    cas_rows,
    cfg_replicas,
    external_site,
    family_ks,
    k_text,
    rare_changes,
    read_json,
    real_site,
)


def f3(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def signed(x: float | None) -> str:
    return "n/a" if x is None else f"{x:+.3f}"


def p_text(p: float | None) -> str:
    if p is None:
        return "n/a"
    return "< 0.001" if p < 0.001 else f"{p:.3g}"


def pct(share: float | None, digits: int = 1) -> str:
    return "–" if share is None else f"{100 * share:.{digits}f}%"


def test_label(test: str) -> str:
    """``cxp:test`` → ``cxp test``; the cell's own tuning split → ``tuning set``."""
    return "tuning set" if test == "tune" else " ".join(test.split(":"))


def _and(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def sites(params: StudyParams, text: str) -> str:
    """``text`` written for the demo's sites (cxp replicated, mimic the external training site) with
    params.yaml's site names put in (without an external family, whose texts are then not shown, mimic stays)."""
    names = {"cxp": real_site(params), "mimic": external_site(params) or "mimic"}
    return re.sub(r"\b(cxp|mimic)\b", lambda m: names[m.group(1)], text)


def _delta(study: Study, family: str, test: str, cell: str, base: str) -> float | None:
    row = study.row(family, test, cell)
    if row is not None and row.get("delta") is not None:
        return float(row["delta"])
    a, _ = study.macro(base, test)
    b, _ = study.macro(cell, test)
    return None if a is None or b is None else b - a


def significance_clause(study: Study, family: str, cell: str, tests: list[str]) -> str:
    """Which of ``tests`` the change of ``cell`` is significant on (paired bootstrap after Bonferroni), in words."""
    rows = {t: study.row(family, t, cell) for t in tests}
    compared = [t for t in tests if rows[t] is not None and rows[t].get("p_paired_bonferroni") is not None]
    if not compared:
        return "no paired comparison was run, so no significance test"
    sig = [t for t in compared if rows[t].get("significant_paired")]
    sizes = sorted({n for t in compared if (n := study.family_size(family, t))})
    method = "paired bootstrap, Bonferroni over " + "/".join(map(str, sizes)) + " comparisons" if sizes else "paired bootstrap"
    n = len(compared)
    count = {2: "both", 3: "all three", 4: "all four"}.get(n, f"all {n}")
    if len(sig) == n:
        text = "significant" + ("" if n == 1 else f" on {count} test sets")
    elif not sig:
        text = "not significant" + ("" if n == 1 else " on either test set" if n == 2 else " on any test set")
    else:
        text = f"significant on {_and([test_label(t) for t in sig])} only"
    rest = [t for t in tests if t not in compared]
    return f"{text} after Bonferroni ({method})" + (f"; not compared on {_and([test_label(t) for t in rest])}" if rest else "")


def _changes(study: Study, family: str, cell: str, base: str) -> tuple[list[str], list[str]]:
    """``["+0.012 on emory test (0.739 → 0.751)", ...]`` and the test sets they are on."""
    parts, tests = [], []
    for test in study.tests:
        a, _ = study.macro(base, test)
        b, _ = study.macro(cell, test)
        if a is not None and b is not None:
            parts.append(f"{signed(_delta(study, family, test, cell, base))} on {test_label(test)} ({a:.3f} → {b:.3f})")
            tests.append(test)
    return parts, tests


def _change_sentence(study: Study, family: str, cell: str, base: str, what: str) -> str | None:
    parts, tests = _changes(study, family, cell, base)
    if not parts:
        return None
    return f"{what} changed the macro AUROC by {_and(parts)}; {significance_clause(study, family, cell, tests)}."


def _largest(study: Study, family: str) -> tuple[float, str] | None:
    ks = [(k, name) for k, name in family_ks(study, family) if k > 0]
    return ks[-1] if ks else None


def summary(study: Study) -> list[str]:
    """Plain-language sentences computed from the numbers (whatever their sign): one per experiment family."""
    out = []
    real, ext = real_site(study.params), external_site(study.params)
    top = _largest(study, "supplement")
    if top:
        k, cell = top
        s = _change_sentence(study, "supplement", cell, study.baseline("supplement"),
                             f"Adding {figures.percent(k)} synthetic images (k = {k_text(k)}) to the real {real} training set")
        out += [s] if s else []
    top = _largest(study, "synthetic")
    if top:
        k, cell = top
        s = _change_sentence(study, "synthetic", cell, study.baseline("synthetic"),
                             f"Training on {figures.percent(k)} synthetic images alone (k = {k_text(k)}) instead of the real "
                             f"{real} images")
        if s:
            out.append(s + " " + _matched(study))
    top = _largest(study, "external")
    if top and ext is not None:
        k, cell = top
        s = _change_sentence(study, "external", cell, study.baseline("external"),
                             f"Adding {figures.percent(k)} {real} synthetic images (k = {k_text(k)}) "
                             f"to the real {ext} training set")
        out += [s] if s else []
    out += _cfg_sentences(study)
    out += _rebalance_sentences(study)
    cas = cas_rows(study)
    if cas:
        macro = cas["macro"]
        out.append(f"Classification Accuracy Score (a classifier trained on 100% synthetic images alone, tested on real "
                   f"{test_label(cas['test'])}): macro AUROC {f3(macro['cas'])}"
                   + (f" (SD {macro['sd']:.3f})" if macro.get("sd") is not None else "")
                   + (f", against {macro['real']:.3f} for real training" if macro.get("real") is not None else "")
                   + " and 0.5 for chance.")
    out += _cooccurrence_sentences(study)
    out += memorisation_sentences(study)
    fids = [(r, d) for r, d in study.fid.items() if d.get("fid") is not None]
    if fids:
        out.append("Fréchet distance of each replica to the real training images ("
                   + ", ".join(sorted({str(d.get("feature", "image")) for _, d in fids})) + " features; lower is closer): "
                   + ", ".join(f"{r} {d['fid']:.2f}" + (f" (real-vs-real floor {d['real_halves']:.2f})"
                                                          if d.get("real_halves") is not None else "") for r, d in fids) + ".")
    missing = study.missing()
    if missing:
        out.append(f"{len(missing)} classifier{'s' if len(missing) > 1 else ''} expected by params.yaml "
                   f"{'have' if len(missing) > 1 else 'has'} no results yet: {', '.join(c for _, c in missing)}.")
    return out


def _matched(study: Study) -> str:
    """From which k synthetic-only training matched real-only training, per test set."""
    base, ks = study.baseline("synthetic"), family_ks(study, "synthetic")
    first: dict[str, list[str]] = {}
    below = []
    for test in study.tests:
        a, _ = study.macro(base, test)
        if a is None or not ks:
            continue
        hit = next((k for k, name in ks if (study.macro(name, test)[0] or -1.0) >= a), None)
        if hit is None:
            below.append(test_label(test))
        else:
            first.setdefault(k_text(hit), []).append(test_label(test))
    parts = [f"from k = {k} on {_and(tests)}" for k, tests in first.items()]
    if below:
        parts.append(f"at no k up to {k_text(ks[-1][0])} on {_and(below)}")
    return f"Synthetic-only training matched or beat real-only training {_and(parts)}." if parts else ""


def _cfg_sentences(study: Study) -> list[str]:
    real, _ = study.macro(study.expected.get("cfg", ["supplement_k0"])[0], "tune")
    parts = []
    for r in cfg_replicas(study.params):
        v, _ = study.macro(f"cfg_{r}_real", "tune")
        if v is not None:
            g = study.guidance(r)
            parts.append(f"{v:.3f} ({r}" + (f", w = {g:g}" if g is not None else "") + ")")
    if not parts:
        return []
    text = ("On the real tuning set, classifiers trained on a synthetic replica instead of the real images reached "
            + ", ".join(parts))
    return [text + (f", against {real:.3f} for real training." if real is not None else ".")]


def _rebalance_sentences(study: Study) -> list[str]:
    if "rebalance_targeted" not in study.cells:
        return []
    s = _change_sentence(study, "rebalance", "rebalance_targeted", study.baseline("rebalance"),
                         "Targeted synthesis (rare findings over-sampled) instead of plain replicas of the same size")
    if s is None:
        return []
    rare = []
    for test in study.tests:
        changes = rare_changes(study, test)
        if changes:
            sig = sum(x for _, _, x in changes)
            rare.append(f"{signed(float(np.mean([d for _, d, _ in changes])))} on {test_label(test)} ({len(changes)} "
                        f"finding{'s' if len(changes) > 1 else ''}, {sig} significant)")
    if rare:
        s += f" On the findings under {RARE:.0%} prevalence the mean change was {_and(rare)}."
    return [s]


def _cooccurrence_sentences(study: Study) -> list[str]:
    doc = read_json(study.root / COOCCURRENCE_DIR / "correlations.json", []) \
        if (study.root / COOCCURRENCE_DIR / "correlations.json").is_file() else None
    pairs = [(p["a"], p["b"], (p.get("pearson") or {}).get("r")) for p in (doc or {}).get("pairs") or []]
    pairs = [p for p in pairs if p[2] is not None]
    if len(pairs) < 2:
        return []
    hi, lo = max(pairs, key=lambda p: p[2]), min(pairs, key=lambda p: p[2])
    return [f"Label co-occurrence matrices correlated most between {hi[0]} and {hi[1]} (Pearson r = {hi[2]:.3f}) and least "
            f"between {lo[0]} and {lo[1]} (r = {lo[2]:.3f})."]


def flagged_text(r: dict) -> str:
    """``60 of 64 images flagged (93.8%; 0.64 expected by chance, one-sided binomial p < 0.001)``."""
    n, k, chance = r.get("images"), r.get("flagged"), r.get("expected_by_chance")
    if n is None or k is None:
        return "no flagged count"
    text = f"{k:,} of {n:,} images flagged ({pct(k / n if n else None)}"
    if chance is not None:
        text += f"; {chance:g} expected by chance"
    p = r.get("p_value")
    if p is not None:
        text += ", one-sided binomial p " + ("< 0.001" if p < 0.001 else f"= {p:.3g}")
    return text + ")"


def memorisation_sentences(study: Study) -> list[str]:
    """Whether the audit caught the overfitted generator and whether the demo generator is flagged at chance."""
    doc = study.memorisation
    if not doc:
        return []
    control, demo = doc.get("control") or {}, doc.get("demo") or {}
    alpha = doc.get("alpha")
    out = []
    if control:
        gen = control.get("generator") or {}
        what = (f"a generator overfitted on {control.get('training_subset', '?')} {real_site(study.params)} training images "
                f"for {gen.get('steps', '?')} steps")
        caught = control.get("beyond_chance")
        verdict = ("caught: flagged far beyond chance" if caught else "NOT caught: the audit did not flag it beyond chance"
                   if caught is False else "not decided (no chance rate)")
        near = control.get("nearest_in_subset")
        out.append(f"Memorisation audit, positive control ({what}): {flagged_text(control)}; {verdict}"
                   + (f"; the nearest training image of {pct(near)} of its images is one it was trained on" if near is not None
                      else "") + ".")
    if demo:
        beyond = demo.get("beyond_chance")
        below = (demo.get("flagged") or 0) < (demo.get("expected_by_chance") or 0)
        verdict = ("flagged less often than chance predicts: no sign of memorisation" if beyond is False and below else
                   "flagged at the rate chance predicts" if beyond is False else
                   f"flagged MORE than chance predicts (α = {alpha:g}): look at its closest pairs" if beyond else
                   "not decided (no chance rate)")
        out.append(f"Memorisation audit of the demo generator (replica {demo.get('dataset', '?')}): {flagged_text(demo)}; "
                   f"{verdict}.")
    return out


MEMORISATION_TEXT = (
    "The memorisation audit (<code>cxrsynth share audit</code>) flags a synthetic image whose nearest real training image "
    "is closer than the audit's calibrated threshold, by either of its rules (downsampled pixels; the copy detector with "
    "each image registered onto its nearest training images); by construction a small share of any replica is flagged by chance "
    "alone (<i>expected by chance</i>). To show that it can catch a copy, the pipeline trains a <b>positive control</b>: "
    "the demo generator's architecture trained for many steps on a handful of training images only, then sampled on those "
    "same images' conditions. It memorises them, and the audit must flag it far beyond chance. The demo generator's "
    "replica, audited with the same settings, should be flagged at the chance rate. <i>p</i>: one-sided binomial test of "
    "the flagged count against the chance rate. <i>Copies</i>: training images that are some flagged image's nearest "
    "neighbour (copied at least once).")


GLOSSARY = (
    ("AUROC", "area under the receiver operating characteristic curve of one finding's classifier output: 0.5 is chance, "
              "1 is perfect. <i>Macro AUROC</i>: the mean over the findings that have positives and negatives in the test set."),
    ("k", "how many synthetic replicas of the training set were added: k = 2 is 200% supplementation (twice as many "
          "synthetic images as real ones); k = 0 is the real-only baseline."),
    ("SD", "standard deviation of the AUROC over bootstrap resamples of the test set (error bars and ± bands)."),
    ("Δ / change", "AUROC of a classifier minus its family's baseline on the same test set."),
    ("Significant ▲ ▼", "paired bootstrap (both classifiers resampled with the same draws) after Bonferroni correction "
                        "over every comparison of the family on that test set, α = 0.05. Hover a table cell for the CI "
                        "and p-value."),
    ("CFG, w", "classifier-free guidance scale. This report uses the standard formula uncond + w (cond − uncond), where "
               "w = 1 is the conditional model alone; the paper's CFG values are w − 1 (its CFG 0 / 4 / 7.5 are "
               "w = 1 / 5 / 8.5)."),
    ("FID", "Fréchet distance between feature statistics of real and synthetic images; lower is closer."),
    ("CAS", "Classification Accuracy Score: AUROC on real test images of a classifier trained on synthetic images alone."),
    ("rare", f"a finding with under {RARE:.0%} positives in that test set."),
)


FAMILY_TITLE = {"supplement": "Supplementation: cxp real + synthetic", "synthetic": "Synthetic images only",
                "external": "External mixing: mimic real + cxp synthetic",
                "cfg": "CFG study (Table 2's classifiers on the test sets)"}


FAMILY_TEXT = {
    "supplement": "cxp real training set + k × 100% synthetic replicas (tuning set real), against the real-only "
                  "baseline (k = 0).",
    "synthetic": "k × 100% synthetic replicas alone (tuning set real), against the real-only classifier (cxp real, k = 0).",
    "external": "mimic real training set + k × 100% synthetic replicas of cxp, against mimic real only (k = 0).",
    "cfg": "the CFG study's classifiers (synthetic training and/or tuning sets) on the test sets, against real training "
           "and tuning.",
}


CURVES = {
    "supplement": ("synthetic images added (k x 100% of the real training set)", "Figure 3",
                   "Macro AUROC of classifiers trained on the real cxp training set plus k × 100% synthetic images (blue) and "
                   "on k × 100% synthetic images alone (orange, dashed), on each test set. Horizontal line: the real-only "
                   "baseline (k = 0), shaded ±1 bootstrap SD; error bars: ±1 bootstrap SD; the two curves are drawn slightly "
                   "apart at the same k."),
    "external": ("cxp synthetic images added (k x 100% of mimic's training set)", "Figure 4",
                 "Macro AUROC of classifiers trained on the real mimic training set plus k × 100% synthetic images made from "
                 "cxp (green), on each test set. Horizontal line: mimic real only (k = 0), shaded ±1 SD; grey dotted: the cxp "
                 "real-only classifier, for reference."),
}
