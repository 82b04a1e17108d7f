"""The planted-copy bench: which embedding and copy criterion catch memorised images, measured.

From a real dataset with a training split and held-out patients
(:func:`cxrsynth.share.audit.real_sets`), at a chosen side ``size``:

1. the held-out patients are split in two, by patient: a *calibration* half, which plays
   the audit's held-out images (each criterion's thresholds, :func:`cxrsynth.share.copies.calibrate`),
   and a *new patients* half, which plays genuinely new radiographs among the synthetic ones:
   the false-flag rate is measured on images the calibration never saw;
2. ``per_transform`` training images are copied under every transform of
   :data:`cxrsynth.share.transforms.SUITE` (shift, crop, rotation, scale, brightness,
   contrast, gamma, noise, blur, JPEG 50, down-and-up sampling, the project's
   preprocessing twice, mixtures of two): the planted copies;
3. for every embedding (``pixels``, ``reid`` and ``sscd`` trained on the training split,
   ``classifier:DIR`` when given) and every criterion of :data:`cxrsynth.share.copies.CRITERIA`,
   and for the audit's own rules (``config.rules()``: its first rule and its detector rule, each
   calibrated at its share of the quantile, flagged when either flags: the ``union`` row),
   the audit's own search (:func:`cxrsynth.share.audit.neighbours`, with its test-time
   alignment when the config asks for it) and calibration run as
   :func:`cxrsynth.share.audit.audit` runs them, and the bench counts the planted copies
   flagged per transform, the new-patient images flagged, and (given a synthetic dataset)
   the synthetic images flagged.

The best configuration is the one whose new-patient false flags are consistent with the
audit's quantile (a one-sided binomial test at :data:`FALSE_FLAG_ALPHA` does not reject it:
2 of 187 at a 1% quantile is, 8 of 187 is not) and that detects the largest share of its
worst transform (then of all, on average).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
from scipy.stats import binomtest

from cxrsynth.share import audit as audit_lib
from cxrsynth.share import copies, embed
from cxrsynth.share.transforms import SUITE

DEFAULT_EMBEDDINGS = ("pixels", "reid", "sscd")
#: A configuration is eligible as the best when its new-patient false flags are consistent with the
#: audit's quantile: a one-sided binomial test of them against the quantile not rejected at this level.
FALSE_FLAG_ALPHA = 0.05


def split_patients(patient_ids, share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of the calibrating ``share`` of patients and rows of the rest (the new patients), seeded."""
    ids = np.asarray(patient_ids).astype(str)
    patients = np.array(sorted(set(ids)))
    if len(patients) < 2:
        raise audit_lib.AuditError(f"the planted bench needs held-out images of 2 or more patients, got {len(patients)}")
    order = np.random.default_rng(seed).permutation(len(patients))
    cut = max(1, min(len(patients) - 1, int(round(share * len(patients)))))
    calibrating = np.isin(ids, patients[order[:cut]])
    return np.flatnonzero(calibrating), np.flatnonzero(~calibrating)


def plant(train_images: np.ndarray, per_transform: int, seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{transform: (source rows, (per_transform, S, S) near-copies)}``, seeded per transform."""
    out = {}
    for t, (name, fn) in enumerate(SUITE.items()):
        rng = np.random.default_rng([seed, t])
        rows = rng.choice(len(train_images), min(per_transform, len(train_images)), replace=False)
        out[name] = (rows, np.stack([fn(train_images[r], rng) for r in rows]))
    return out


def bench_planted(
    root: str | Path,
    dataset: str,
    *,
    size: int = 64,
    per_transform: int = 40,
    embeddings: tuple[str, ...] = DEFAULT_EMBEDDINGS,
    synthetic: str | None = None,
    config: audit_lib.AuditConfig = audit_lib.AuditConfig(),
    calibration_share: float = 0.5,
    seed: int = 0,
    rules: list[audit_lib.Rule] | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Plant copies among new patients' images; detection and false-flag rates per embedding x criterion.

    Args:
        root: Project root.
        dataset: Real dataset with ``config.split`` and held-out patients.
        size: Side (px) every image is decoded at and every transform applied at.
        per_transform: Copies planted per transform.
        embeddings: Embedding specs (:func:`cxrsynth.share.embed.build`).
        synthetic: A synthetic dataset whose flagged share is reported too (a real replica).
        config: The audit's settings (split, k, quantile, alignment, reid and sscd networks).
        calibration_share: Share of held-out patients that calibrate; the rest are the new patients.
        seed: Seeds the patient halves and the plants.
        rules: The audit's rules measured as one (the ``union`` row; None: ``config.rules()``; one rule: no row).
        progress: Optional ``progress(message)``.

    Returns:
        The report: ``rows`` (one per embedding x criterion x transform), ``configs`` (one per
        embedding x criterion: false-flag rate, chance rate, worst and mean detection), ``best``.
    """
    from cxrsynth import runtime

    say = progress or (lambda message: None)
    root = Path(root)
    device = runtime.device(config.device)
    train, heldout, how = audit_lib.real_sets(root, dataset, config)
    cal_rows, new_rows = split_patients(heldout["patient_id"], calibration_share, seed)
    say(f"{dataset}: {len(train)} training images; held-out {len(heldout)} images ({how}): "
        f"{len(cal_rows)} calibrate, {len(new_rows)} are the new patients")
    train_images = audit_lib._load_array(root, train, size, config.batch)
    held_images = audit_lib._load_array(root, heldout, size, config.batch)
    queries = {"calibration": held_images[cal_rows], "new_patients": held_images[new_rows]}
    plants = plant(train_images, per_transform, seed)
    for name, (_, copied) in plants.items():
        queries[f"plant:{name}"] = copied
    if synthetic is not None:
        syn = audit_lib._rows_with_images(root, synthetic)
        queries["synthetic"] = audit_lib._load_array(root, syn, size, config.batch)
    say(f"planted {per_transform} copies under each of {len(plants)} transforms at {size} px")

    rows: list[dict[str, Any]] = []
    configs: list[dict[str, Any]] = []
    networks: dict[str, embed.Embedding] = {}  # a network trained once, whichever rule uses it
    searches: dict[tuple[str, int], dict[str, Any]] = {}

    def train_network(kind: str) -> embed.Embedding:
        if kind not in networks:
            cfg = config.reid if kind == "reid" else config.sscd
            say(f"training the {kind} network on {len(train_images)} images ({cfg.steps} steps)")
            small = embed.resize_images(train_images, cfg.size)
            networks[kind] = (embed.train_reid(small, train["patient_id"], cfg, device) if kind == "reid"
                              else embed.train_sscd(small, cfg, device))
        return networks[kind]

    def searched(spec: str, align: int) -> dict[str, Any]:
        """Every query part's neighbours by embedding ``spec`` registered onto ``align`` candidates (once each)."""
        if (spec, align) in searches:
            return searches[spec, align]
        started = time.perf_counter()
        emb = embed.build(spec, device=device, train=train_network, pixel_size=config.pixel_size, root=root)
        trained = time.perf_counter() - started
        search = audit_lib.Searcher(emb, train_images, config, device, align=align)
        found: dict[str, Any] = {"emb": emb, "dist": {}, "nearest": {}, "source_in_k": {}, "trained": trained}
        for part, array in queries.items():
            d, i = search(array)
            found["dist"][part], found["nearest"][part] = d, i[:, 0]
            if part.startswith("plant:"):
                found["source_in_k"][part] = (i == plants[part[6:]][0][:, None]).any(axis=1)
        found["seconds"] = time.perf_counter() - started
        say(f"{emb.name}{f' aligned onto {align}' if align else ''}: {found['seconds']:.1f} s (training {trained:.1f} s)")
        searches[spec, align] = found
        return found

    def measure(label: str, criterion: str, align: Any, parts: list[tuple[dict[str, Any], copies.Calibrated]]) -> None:
        """Rows and the config line of one way of flagging: the union of ``parts`` (search, calibrated criterion)."""
        def flag(part: str, how: str = "flag") -> np.ndarray:
            return copies.either([(rule, f["dist"][part]) for f, rule in parts], how)

        def hard(part: str) -> np.ndarray:
            return flag(part, "is_hard")

        first = parts[0][0]
        new_flagged = flag("new_patients")
        false_p = binomtest(int(new_flagged.sum()), len(new_flagged), config.quantile, alternative="greater").pvalue
        rates = []
        for name, (sources, _) in plants.items():
            part = f"plant:{name}"
            flagged = flag(part)
            rates.append(float(flagged.mean()))
            rows.append({"embedding": label, "criterion": criterion, "transform": name, "planted": len(sources),
                         "detected": int(flagged.sum()), "rate": round(rates[-1], 4), "hard": int(hard(part).sum()),
                         "nearest_is_source": round(float((first["nearest"][part] == sources).mean()), 4),
                         "source_in_k": round(float(np.any([f["source_in_k"][part] for f, _ in parts], axis=0).mean()), 4)})
        entry = {"embedding": label, "criterion": criterion, "align": align,
                 "new_patient_images": int(len(new_flagged)), "new_patients_flagged": int(new_flagged.sum()),
                 "false_flag_rate": round(float(new_flagged.mean()), 4),
                 "false_flag_p": round(false_p, 4), "false_flags_consistent": bool(false_p >= FALSE_FLAG_ALPHA),
                 "new_patients_hard": int(hard("new_patients").sum()),
                 "chance_rate": round(float(flag("calibration", "loo_flag").mean()), 4),
                 "thresholds": parts[0][1].thresholds if len(parts) == 1 else [rule.thresholds for _, rule in parts],
                 "worst_rate": round(min(rates), 4), "mean_rate": round(float(np.mean(rates)), 4),
                 "seconds": round(sum(f["seconds"] for f, _ in parts), 2),
                 "train_seconds": round(sum(f["trained"] for f, _ in parts), 2),
                 "nearest_distance": {part: audit_lib._summary(first["dist"][part][:, 0])
                                      for part in ("calibration", "new_patients")}}
        if "synthetic" in first["dist"]:
            entry["synthetic_flagged"] = round(float(flag("synthetic").mean()), 4)
            entry["synthetic_hard"] = int(hard("synthetic").sum())
        configs.append(entry)

    for spec in embeddings:
        found = searched(spec, config.align)
        for criterion in copies.CRITERIA:
            measure(found["emb"].name, criterion, config.align,
                    [(found, copies.calibrate(found["dist"]["calibration"], criterion, config.quantile))])
    rules = config.rules() if rules is None else rules
    if len(rules) > 1:  # the audit's default: each rule at its share of the quantile, flagged when either flags
        parts = []
        for r in rules:
            found = searched(r.embedding, r.align)
            parts.append((found, copies.calibrate(found["dist"]["calibration"], r.criterion, config.quantile / len(rules))))
        label = "|".join(f["emb"].name.split(":", 1)[0] for f, _ in parts)
        measure(label, "union", "+".join(str(r.align) for r in rules), parts)
        configs[-1]["rules"] = [r.describe(f["emb"].name) for r, (f, _) in zip(rules, parts)]

    eligible = [c for c in configs if c["false_flags_consistent"]] or configs
    best = max(eligible, key=lambda c: (c["worst_rate"], c["mean_rate"], -c["false_flag_rate"]))
    return {
        "format": "cxrsynth-planted/2", "dataset": dataset, "size": size, "per_transform": per_transform,
        "quantile": config.quantile, "k": config.k, "align": config.align, "seed": seed,
        "training": {"images": len(train), "patients": int(train["patient_id"].nunique())},
        "calibration": {"images": len(cal_rows), "patients": int(heldout.iloc[cal_rows]["patient_id"].nunique())},
        "new_patients": {"images": len(new_rows), "patients": int(heldout.iloc[new_rows]["patient_id"].nunique())},
        "synthetic": None if synthetic is None else {"name": synthetic, "images": len(queries["synthetic"])},
        "transforms": list(plants), "rows": rows, "configs": configs,
        "best": {**{k: best[k] for k in ("embedding", "criterion", "align", "false_flag_rate", "worst_rate", "mean_rate")},
                 "eligible": best["false_flags_consistent"]},
    }
