"""Run one cell of the study: its training mix, its classifier, its evaluations.

``run_cell(root, params, family, tag)`` (``params``: :class:`~cxrsynth.study.params.StudyParams`):

0. checks that the test sets and the training sites have their rows
   (:func:`cxrsynth.study.plan.check_data`), before anything is trained;
1. builds the cell's training mix (:mod:`cxrsynth.mix`; a manifest named after the cell);
2. trains a classifier on it (:mod:`cxrsynth.classify.train`; ``classifier`` is a
   preset plus overrides) into ``data/study/<cell>/model`` — resumable after a kill from
   ``data/checkpoints/<cell>`` (kept out of the cell's outputs: DVC removes those before a
   stage runs, and the training log's wall-clock rates would make their bytes differ);
3. predicts and evaluates (:mod:`cxrsynth.evaluate.metrics`, ``evaluate``: bootstrap
   replicates, seed) the cell's own tuning split (the paper's Table 2 measure; the tuning
   rows are the model's own, so the leak guard records the overlap instead of refusing)
   and every test set;
4. writes the cell's summary, ``metrics/study/<cell>.json``: what it trained on, the
   classifier, and per evaluation the macro and per-finding AUROC with bootstrap SD/CI
   and the path of the full metrics (whose replicates ``cxrsynth compare`` reads).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable

from cxrsynth import __version__
from cxrsynth.study.params import StudyParams
from cxrsynth.study.plan import Cell, cell, check_data, tests

#: Where each cell's classifier keeps its resume state and training log (``<root>/data/checkpoints/<cell>``):
#: not in the cell's DVC outputs, whose bytes must not depend on the wall clock.
CHECKPOINT_ROOT = Path("data/checkpoints")

Log = Callable[[str], None]


def classifier_config(params: StudyParams | Mapping[str, Any]):
    """``(preset, config)``: the study's classifier, ``classifier.preset`` + its overrides."""
    section = StudyParams.of(params).classifier
    return section.preset, section.config()


def evaluations(params: StudyParams | Mapping[str, Any], c: Cell, tuned: bool = True) -> list[tuple[str, str, str]]:
    """``(label, dataset, split)`` of what a cell is evaluated on: its tuning split (when it has one), then the test sets."""
    return [("tune", c.name, "tune")] * tuned + [(f"{name}:{split}", name, split) for name, split in tests(params)]


def run_cell(root: str | Path, params: StudyParams | Mapping[str, Any], family: str, tag: str, *,
             device: str | None = None, log: Log = print) -> dict:
    """Mix, train, predict and evaluate one cell; returns (and writes) its summary."""
    from cxrsynth.classify.predict import predict, write
    from cxrsynth.classify.train import train
    from cxrsynth.evaluate import metrics
    from cxrsynth.mix import mix

    root = Path(root)
    params = StudyParams.of(params)
    c = cell(params, family, tag)
    check_data(root, params)
    counts = mix(root, c.name, c.mix)
    log(f"{c.name}: train {counts['train']:,} images ({counts['synthetic']:,} synthetic), tune {counts['tune']:,}")
    tuned = counts["tune"] > 0
    if not tuned:  # e.g. a small MIMIC export whose official split has no validate rows
        log(f"{c.name}: no tuning rows; the last epoch is kept and no tuning-set AUROC is reported")
    preset, config = classifier_config(params)
    directory = c.directory(root)
    facts = train(root, c.name, config, directory / "model", tune_split="tune" if tuned else None, preset=preset,
                  device=device, callback=_epoch_logger(c.name, log),
                  checkpoint_dir=root / CHECKPOINT_ROOT / c.name)  # out of the published model folder (wall-clock log)
    summary: dict[str, Any] = {
        "cell": c.name, "family": c.family, "tag": c.tag, "k": c.k, "replica": c.replica, "guidance": c.guidance,
        "tune": c.tune,
        "train": {"name": c.name, "real_images": counts["train"] - counts["synthetic"],
                  "synthetic_images": counts["synthetic"], "tune_images": counts["tune"]},
        "classifier": {"preset": preset, "classifier_id": facts["classifier_id"], "best": facts["best"]},
        "evaluations": {},
    }
    for label, dataset, split in evaluations(params, c, tuned):
        stem = label.replace(":", "-")
        frame, meta = predict(directory / "model", root, dataset, split, device=device)
        pred_path = write(frame, meta, directory / "predictions" / f"{stem}.parquet")
        result = metrics.evaluate(root, pred_path, params.evaluate.evaluate_config(allow_leak=label == "tune"))
        path, _ = metrics.write(result, directory / "metrics" / f"{stem}.json")
        m = result.metrics
        summary["evaluations"][label] = {
            "path": str(path.relative_to(root)), "images": m["test"]["images"], "macro": m["macro"],
            "findings": {f: {k: v for k, v in r.items() if k in ("auroc", "sd", "ci95", "n_pos", "n_neg", "reason")}
                         for f, r in m["findings"].items()},
        }
        log(f"{c.name} on {label}: macro AUROC {_fmt(m['macro']['auroc'])} (SD {_fmt(m['macro'].get('sd'))})")
    _card_evaluations(directory / "model", summary)
    out = c.metrics_path(root)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**summary, "cxrsynth": __version__}, indent=1, sort_keys=True) + "\n")
    return summary


def _card_evaluations(model_dir: Path, summary: dict[str, Any]) -> None:
    """Add the cell's macro AUROCs to the classifier's model card (header and an "Evaluation" section)."""
    from cxrsynth import cards

    rows = {label: ev["macro"] for label, ev in summary["evaluations"].items()}
    lines = [f"{label}: macro AUROC {_fmt(m.get('auroc'))} (bootstrap SD {_fmt(m.get('sd'))}), {ev['images']} images"
             for (label, m), ev in zip(rows.items(), summary["evaluations"].values())]
    text = (f"Study cell `{summary['cell']}` ({summary['train']['real_images']} real + {summary['train']['synthetic_images']} "
            f"synthetic training images), macro AUROC over the 14 findings (uncertain labels masked):\n\n"
            + cards.bullet_list(lines))
    cards.update(model_dir, {"evaluation": {label: m.get("auroc") for label, m in rows.items()}}, ("Evaluation", text))


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _epoch_logger(name: str, log: Log):
    def on_event(event: dict) -> None:
        if event.get("event") == "epoch":
            losses = "  ".join(f"{what} loss {event[key]:.4f}" for what, key in (("train", "train_loss"), ("tune", "tune_loss"))
                               if event.get(key) is not None)
            log(f"{name}: epoch {event.get('epoch')}  {losses}")
    return on_event
