"""``DATASHEET.md`` of an export, in the sections of Gebru et al., "Datasheets for Datasets" (2021).

Written only from what the package itself carries (the scrubbed manifest rows and
metadata, the audit's public summary), so nothing in it can name a real patient; the
sections the exporting site alone can fill (who, licence, contact) say so.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from cxrsynth import labels


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _share(count: int, total: int) -> str:
    return f"{100 * count / total:.1f}%" if total else "-"


def prevalence(frame: pd.DataFrame) -> str:
    """Positive / uncertain / negative counts per finding."""
    n = len(frame)
    matrix = labels.findings_matrix(frame) if n else None
    rows = []
    for i, finding in enumerate(labels.FINDINGS):
        pos = int((matrix[:, i] == labels.POSITIVE).sum()) if n else 0
        unc = int((matrix[:, i] == labels.UNCERTAIN).sum()) if n else 0
        rows.append([finding, pos, _share(pos, n), unc, n - pos - unc])
    return _table(["finding", "positive", "prevalence", "uncertain", "negative"], rows)


def counts_table(frame: pd.DataFrame, column: str, title: str, order: list[str] | None = None) -> str:
    """Images per value of one column (unknown as its own row)."""
    values = frame[column].astype("string").fillna("unknown")
    counts = values.value_counts()
    keys = [k for k in (order or []) if k in counts.index] + sorted(k for k in counts.index if k not in (order or []))
    return _table([title, "images", "share"], [[k, int(counts[k]), _share(int(counts[k]), len(frame))] for k in keys])


def age_table(frame: pd.DataFrame) -> str:
    ages = pd.to_numeric(frame["age"], errors="coerce")
    decade = ages.map(lambda a: f"{int(a)}-{int(a) + 9}" if not pd.isna(a) else "unknown").astype("string")
    return counts_table(frame.assign(age_band=decade), "age_band", "age (decade)",
                        order=[f"{d}-{d + 9}" for d in range(0, 120, 10)] + ["unknown"])


def _audit_section(meta: dict[str, Any]) -> str:
    audit = meta.get("audit") or {}
    decision = meta.get("export_decision", "")
    if not audit.get("counts"):
        return f"Not audited. {audit.get('why', '')} {decision}".strip()
    c, t, r = audit["counts"], audit["threshold"], audit["reid_auroc"]
    tr = audit["training"]
    rows: list[list[Any]] = [
        ["real training images compared", f"{tr['name']}@{tr['version']} split {tr['split']}: {tr['images']} images, "
                                          f"{tr['patients']} patients"],
    ]
    for rule in audit.get("rules") or [{"name": "first", "align": 0, "embedding": audit["embedding"], "reid_auroc": r,
                                        "threshold": t}]:
        e, rt, rr = rule["embedding"], rule["threshold"], rule["reid_auroc"]
        aligned = f", each image registered onto its {rule['align']} nearest" if rule.get("align") else ""
        rows += [
            [f"{rule['name']} rule: embedding", f"{e['name']} ({e.get('dim')} dimensions){aligned}"],
            [f"{rule['name']} rule: patient re-identification AUROC", f"{rr.get('training_split')} on training pairs, "
                                                                      f"{rr.get('heldout')} on held-out patients' pairs"],
            [f"{rule['name']} rule: copy criterion", f"{rt.get('criterion', 'absolute')}: distance below {rt.get('distance')}"
                                                     + (f" or nearest/next ratio below {rt['ratio']}"
                                                        if rt.get("ratio") is not None else "")
                                                     + f" (calibrated at {rt.get('quantile')})"],
        ]
    rows += [
        ["flagging rule", audit["calibration"]],
        ["synthetic images audited", c["synthetic"]],
        ["flagged as likely copies", c["flagged"]],
        ["flagged by chance alone (the rules' leave-one-out rate on new patients' images x images)", c["expected_by_chance"]],
        ["hard copies (closer than any new patient's image, by a wide margin)", c.get("copies", "not counted")],
        ["share of synthetic images flagged (Dar et al.: copies)", c.get("synthetic_flagged_fraction", "n/a")],
        ["share of training images copied at least once (Dar et al.)", c.get("training_copied_fraction", "n/a")],
        ["gate", (audit.get("gate") or {}).get("test", "not tested")],
        [f"median nearest distance, synthetic / held-out real ({(audit.get('rules') or [{}])[0].get('name', 'first')} rule)",
         f"{(audit['distances']['synthetic_to_train'] or {}).get('median')} / "
         f"{(audit['distances']['heldout_to_train'] or {}).get('median')}"],
    ]
    gate = audit.get("gate")
    if gate:
        fraction = gate.get("training_copied_fraction")
        rows += [
            ["test", gate["test"]],
            ["result", f"{gate['flagged']} flagged of {gate['synthetic']}, {gate['expected']} expected by chance "
                       f"(chance rate {gate['chance_rate']}); p = {gate['p_value']}, alpha {gate['alpha']}; "
                       f"{gate['copies']} pair(s) below the hard copy threshold"
                       + (f"; cap {gate['max_flagged']} flagged" if gate.get("max_flagged") is not None else "")],
            ["decision", "passed" if gate["passed"] else "refused: " + "; ".join(gate["reasons"])],
            ["synthetic images flagged as copies (Dar et al.)", f"{100 * gate['synthetic_flagged_fraction']:.2f}%"],
            ["training images copied at least once (Dar et al.)",
             f"{gate['training_copied']} of {gate['training_images']}"
             + (f" ({100 * fraction:.2f}%)" if fraction is not None else "")],
        ]
    text = _table(["", ""], rows)
    return (text + "\n\n" + decision).strip()


def render(frame: pd.DataFrame, meta: dict[str, Any]) -> str:
    """The datasheet of an export: ``frame`` its (scrubbed) manifest rows, ``meta`` its (scrubbed) metadata."""
    gen, cond, sampling = meta["generator"], meta["conditions"], meta["sampling"]
    n = len(frame)
    replicas = sorted(int(r) for r in frame["replica"].dropna().unique())
    splits = frame["split"].astype("string").fillna("none").value_counts().to_dict()
    guidance_note = ("standard formula: 1 is the conditional model alone, the paper's 'CFG 0'"
                     if sampling.get("cfg_formula", "standard") == "standard" else f"formula {sampling.get('cfg_formula')}")
    sections = [
        f"# Datasheet: {meta['dataset']} (version {meta['version']})",
        "Synthetic chest radiographs exported by cxrsynth (`cxrsynth share export`). Every image was made by a "
        "conditional diffusion model; none is a real radiograph.",
        "## Motivation",
        "- **Purpose.** Synthetic replicas of a real training split, made so that another site can train and test "
        "chest X-ray classifiers without receiving any patient's image (Khosravi et al., eBioMedicine 2024: synthetic "
        "data alone, at 2-3x the real count, matched real data; added to real data, it improved AUROC).\n"
        "- **Created by / funded by.** The exporting site (to be filled in by the sender).",
        "## Composition",
        f"- **Instances.** {n} images: 8-bit grayscale PNG, {meta.get('image_size') or '?'} px, each with a JSON record "
        f"(its manifest row). Replicas: {', '.join(map(str, replicas)) or 'none'}; splits (the role of the real row each "
        f"replica was conditioned on): {', '.join(f'{k} {v}' for k, v in sorted(splits.items()))}.\n"
        "- **Labels.** The 14 CheXpert findings (1 positive, 0 negative, -1 uncertain), sex, race, age decade and view "
        "are the *conditions* the generator was given (copied from one real training row each), not reads of the "
        "synthetic image; the real labels came from the CheXpert labeler (rule-based, with its errors).\n"
        "- **Identifiers.** None: no patient, study or file path of a real patient, no link to a real row (keys are "
        "renumbered in an order set by a keyed hash whose secret is not exported; per-image seeds, which are derived "
        "from the real row's key, are withheld; exact ages are coarsened to the decade the generator was conditioned on).",
        "### Finding prevalence (conditions)",
        prevalence(frame),
        "### Demographics (conditions)",
        counts_table(frame, "sex", "sex", ["F", "M", "unknown"]),
        "",
        age_table(frame),
        "",
        counts_table(frame, "race", "race", [*labels.RACES, "unknown"]),
        "",
        counts_table(frame, "view", "view"),
        "## Collection process",
        _table(["", ""], [
            ["generator id (sha256 of its weights)", gen.get("id")],
            ["generator preset", gen.get("preset") or "not recorded"],
            ["generator training data", gen.get("trained_on") or "not recorded (imported weights?)"],
            ["conditions", f"{cond.get('name')}@{cond.get('version')}, split {cond.get('split')}, "
                           "rows without an uncertain finding"],
            ["sampler", f"{sampling.get('sampler')}, {sampling.get('steps')} steps, eta {sampling.get('eta')}"],
            ["guidance", f"{sampling.get('guidance')} ({guidance_note})"],
            ["seeds", f"base seed {sampling.get('seed')}; each image's own seed is derived from (base seed, replica, the "
                      "real row's key) and is therefore not exported"],
        ]),
        "## Preprocessing",
        f"- Images are the generator's output at {meta.get('image_size') or '?'} px, unchanged except that PNG metadata "
        "chunks are dropped. The real images the generator learnt from were padded to square, resized and "
        "histogram-equalised (256 bins), as in the paper"
        + (f" (training data preprocessing: {meta['preprocess']})" if meta.get("preprocess") else "") + ".\n"
        "- Rows: real identifiers and provenance links removed, keys renumbered, ages coarsened to decades (above).",
        "## Uses",
        "- **Intended.** Training classifiers on synthetic data alone or as a supplement to real data; research on "
        "synthetic data (fidelity, diversity, label co-occurrence).\n"
        "- **Not intended.** Clinical use or diagnosis; testing a model meant for the source site (a test set from the "
        "generator's own source inflates measured gains: keep test sets from another distribution); any attempt to "
        "re-identify patients or to link images back to the source table.",
        "## Distribution",
        "- A folder: `manifest.parquet` (plain parquet, DuckDB reads it), `shards/*.tar` (plain WebDataset: "
        "`<key>.png` + `<key>.json`), `shards/index.json`, this datasheet, and `index.json` (sha256 and size of every "
        "file). Check with `cxrsynth share verify DIR`; register with `cxrsynth share import DIR --name NAME`.\n"
        "- Licence and terms of use: to be set by the sender.",
        "## Maintenance",
        f"- Version {meta['version']} of {meta['dataset']} (from synthetic dataset version {meta['source']['version']}). "
        "Contact and errata: the sender.",
        "## Known limits",
        "- Each image carries the exact conditions of one real training row (sex, race, age decade, view, findings): "
        "together they are a tabular release of the training cohort's labels. Whoever holds the source table can link "
        "an image to the few real rows that share its conditions.\n"
        "- The audit below catches images close to a training image *by its rules* (an embedding each, the detector's "
        "after registering the image onto its nearest training images); a rule whose embedding has a low "
        "re-identification AUROC would miss a leaked patient shown differently (another study of the same patient is "
        "not a copy). It is a screen, not a proof of privacy.\n"
        "- Synthetic images reproduce the generator's training distribution and its biases (site, scanner, view mix); "
        "they capture other sites' data poorly (the paper's external-site results).",
        "## Memorization audit",
        _audit_section(meta),
    ]
    return "\n\n".join(sections).replace("\n\n\n", "\n\n") + "\n"
