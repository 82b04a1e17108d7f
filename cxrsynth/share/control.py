"""The memorisation audit's positive control: a generator made to copy, and the demo's beside it.

An audit that never flags anything proves nothing: it may be blind. So the pipeline runs it
on a generator that certainly memorised its training images — the demo's own architecture
(``generator`` preset) trained for many steps on a few dozen training images (a seeded
draw from the real training split) — and on a replica of the demo's generator, with the
same settings. The control's replica is conditioned on exactly the rows it learnt from, so
its images should be near-copies of them: the audit must flag far more of them than chance
explains (``expected_by_chance``). The demo generator, trained on the whole split for a
few minutes, should be flagged about as often as chance predicts.

:func:`memorisation` does it all and writes ``out/memorisation.json`` (per generator:
images audited, flagged, expected by chance, a one-sided binomial p-value of the flagged
count against that rate, training images copied at least once, the nearest-distance
summaries and the closest pairs) with the two audits' folders (``control/`` and ``demo/``:
``audit.json``, ``distances.png``, ``pairs.png``...). Each generator is judged by the export
gate itself (:func:`cxrsynth.share.gate.decide`): the control must fail it for being flagged
beyond chance, the demo must pass.

Everything here holds real keys and real images (the control *is* a copy machine): the
outputs stay with the data owner (``push: false`` in dvc.yaml).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from cxrsynth import __version__, manifest, shards
from cxrsynth.config import Config, setting
from cxrsynth.errors import CxrsynthError

MEMORISATION_JSON = "memorisation.json"
FORMAT = "cxrsynth-memorisation/1"


class ControlError(CxrsynthError):
    """A positive control that cannot be built as asked (too few training images, no replica...)."""


@dataclass(frozen=True)
class ControlConfig(Config):
    """How the overfitted generator is made and both generators are audited.

    Attributes:
        images: Training images the control generator sees (a seeded draw from the training split).
        steps: Its optimizer steps (many: it must memorise).
        batch: Images per step.
        lr: Peak AdamW learning rate.
        warmup: Linear warm-up steps.
        ema: EMA decay of the weights it samples with.
        preset: Generator preset (the demo's).
        image_size: Generator side in px (the demo's).
        replicas: Synthetic images per training image of the control.
        guidance: Guidance scale w of the control's replica (1: the conditional model alone).
        sampler: Sampler of the control's replica.
        sample_steps: Sampling steps.
        sample_batch: Images sampled at a time.
        seed: Seeds the draw, the training and the sampling.
        embedding: The audit's embedding (None: the audit's default).
        quantile: The audit's calibration quantile (None: the audit's default).
        criterion: The audit's copy criterion (None: the audit's default).
        align: The audit's alignment candidates (None: the audit's default).
        align_size: The audit's registration side (None: the audit's default).
        detector: The audit's detector rule (``sscd:DIR``; None: the audit's default; ``none``: no detector rule).
        detector_align: The detector rule's alignment candidates (None: the audit's default).
        alpha: Significance level of the binomial test against chance.
        show: Closest pairs kept per generator.
        device: Torch device (default: cuda when available).
    """

    kind = "memorisation control config"  # how errors name these settings (a class attribute, not a field)

    images: int = setting(16, ge=2)
    steps: int = setting(600, ge=1)
    batch: int = setting(16, ge=1)
    lr: float = setting(3e-3, gt=0)
    warmup: int = setting(20, ge=0)
    ema: float = setting(0.99, ge=0, lt=1)
    preset: str = "tiny"
    image_size: int | None = setting(32, ge=8)
    replicas: int = setting(2, ge=1)
    guidance: float = setting(1.0, ge=0)
    sampler: str = "dpmpp"
    sample_steps: int = setting(10, ge=1)
    sample_batch: int = setting(64, ge=1)
    seed: int = 0
    embedding: str | None = None
    quantile: float | None = setting(None, gt=0, lt=1)
    criterion: str | None = None
    align: int | None = setting(None, ge=0)
    align_size: int | None = setting(None, ge=16)
    detector: str | None = None
    detector_align: int | None = setting(None, ge=0)
    alpha: float = setting(0.01, gt=0, lt=1)
    show: int = setting(8, ge=1)
    device: str | None = None


def subset_rows(root: str | Path, real: str, split: str, n: int, seed: int) -> pd.DataFrame:
    """``n`` trainable rows of ``real``'s ``split`` (no uncertain finding, with an image), a seeded draw, in key order."""
    from cxrsynth import loader

    rows = loader.select(root, real, split, exclude_uncertain=True)
    if len(rows) < n:
        raise ControlError(f"{real}/{split}: {len(rows)} trainable images, fewer than the {n} the control asks for")
    pick = np.random.default_rng([seed, n]).choice(len(rows), size=n, replace=False)
    return rows.iloc[np.sort(pick)].sort_values("key", kind="stable").reset_index(drop=True)


def publish_subset(root: str | Path, name: str, real: str, rows: pd.DataFrame, seed: int) -> str:
    """Publish ``rows`` (of ``real``) as a mix ``name`` with one split, ``train``: the control's training set.

    A mix points at ``real``'s shards (no image is copied) and stays out of the union view.
    Returns its version.
    """
    from cxrsynth.publish import Metadata, publish

    versions = {real: manifest.read_meta(root, real).get("version")}
    params = {"control_of": real, "images": len(rows), "seed": seed,
              "keys_sha256": hashlib.sha256("\n".join(rows["key"].astype(str)).encode()).hexdigest()}
    version = hashlib.sha256(shards.json_bytes({"params": params, "versions": versions})).hexdigest()[:10]
    publish(root, Metadata(name, version, "mix", {"params": params, "sources": versions}), rows.assign(split="train"),
            force=True)
    return version


def train_control(root: str | Path, subset: str, out: Path, config: ControlConfig) -> Path:
    """Train the overfitted generator on mix ``subset`` into ``out`` (checkpoints in a temporary folder)."""
    from cxrsynth.diffusion.presets import get_preset
    from cxrsynth.diffusion.train import TrainConfig, train_dataset

    gen_config = get_preset(config.preset, **({} if config.image_size is None else {"image_size": config.image_size}))
    tc = TrainConfig(steps=config.steps, batch_size=min(config.batch, config.images), lr=config.lr,
                     warmup_steps=config.warmup, ema_decay=config.ema, seed=config.seed, save_every=config.steps,
                     log_every=max(1, config.steps // 10), keep_checkpoints=0)
    if out.exists():
        shutil.rmtree(out)
    with tempfile.TemporaryDirectory(prefix="cxrsynth-control-") as ck:
        train_dataset(root, subset, gen_config, tc, out, split="train", checkpoints=ck, resume=False,
                      device=config.device)
    return out


def _audit_config(config: ControlConfig):
    from cxrsynth.share.audit import AuditConfig

    return AuditConfig().override(embedding=config.embedding, quantile=config.quantile, criterion=config.criterion,
                                  align=config.align, align_size=config.align_size, detector=config.detector,
                                  detector_align=config.detector_align, seed=config.seed, device=config.device)


def _nearest(audit_dir: Path) -> pd.DataFrame:
    """Each synthetic image's nearest training image by the first rule (``neighbours.parquet``, rank 1), closest first."""
    frame = pd.read_parquet(audit_dir / "neighbours.parquet")
    first = frame["rule"] == "first" if "rule" in frame else True
    frame = frame.loc[(frame["rank"] == 1) & first, ["synthetic_key", "training_key", "distance"]]
    return frame.sort_values(["distance", "synthetic_key"], kind="stable").reset_index(drop=True)


def _closest(audit_dir: Path, n: int) -> list[dict[str, Any]]:
    """The ``n`` closest (synthetic, nearest training image) pairs."""
    return [{"synthetic_key": str(r.synthetic_key), "training_key": str(r.training_key),
             "distance": round(float(r.distance), 6)} for r in _nearest(audit_dir).head(n).itertuples()]


def generator_result(label: str, audit_dir: Path, summary: dict[str, Any], config: ControlConfig) -> dict[str, Any]:
    """One generator's line of ``memorisation.json``: the export gate's decision on its audit (at ``config.alpha``)
    with the distances and the closest pairs."""
    from cxrsynth.share.gate import GateConfig, decide

    decision = decide(summary, GateConfig(alpha=config.alpha, show=config.show))
    caught = [reason for reason in decision.reasons if "more than chance" in reason]
    return {
        "label": label,
        "dataset": summary["synthetic"]["name"],
        "version": summary["synthetic"]["version"],
        "embedding": summary["embedding"]["name"],
        "criterion": summary["threshold"]["criterion"],
        "rules": [{"name": r["name"], "embedding": r["embedding"]["name"], "align": r["align"],
                   "criterion": r["threshold"]["criterion"], "flagged": r["flagged"]} for r in summary.get("rules", [])],
        "images": decision.synthetic,
        "flagged": decision.flagged,
        "flagged_fraction": decision.synthetic_copied_fraction,
        "expected_by_chance": round(decision.expected, 4),
        "chance_fraction": decision.chance_rate,
        "p_value": float(f"{decision.p_value:.6g}"),
        "beyond_chance": bool(caught),
        "hard_copies": decision.copies,
        "gate_passed": decision.passed,
        "copies": decision.training_copied,  # training images copied at least once (Dar et al.)
        "copies_fraction": decision.training_copied_fraction,
        "threshold": summary["threshold"]["distance"],
        "nearest": summary["distances"]["synthetic_to_train"],
        "heldout_nearest": summary["distances"]["heldout_to_train"],
        "closest": _closest(audit_dir, config.show),
        "files": {name: f"{audit_dir.name}/{name}" for name in ("audit.json", "distances.png", "pairs.png")
                  if (audit_dir / name).is_file()},
    }


def memorisation(
    root: str | Path,
    real: str,
    demo: str,
    out: str | Path,
    config: ControlConfig = ControlConfig(),
    *,
    split: str = "train",
    control: str | None = None,
    generator_out: str | Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Build the positive control, audit it and the demo replica ``demo`` against ``real``'s ``split``.

    Args:
        root: Project root.
        real: The real dataset both generators learnt from.
        demo: A replica of the demo generator (a synthetic dataset of ``real``'s conditions).
        out: Folder for ``memorisation.json`` and the two audits (``control/``, ``demo/``).
        config: The control's and the audits' settings.
        split: ``real``'s training split.
        control: Name of the control's replica (default ``<real>_control``); its training
            subset is the mix ``<control>_train``.
        generator_out: Folder of the control generator (default ``data/generators/<control>``).
        progress: Optional ``progress(message)`` for each phase.

    Returns:
        The ``memorisation.json`` content.
    """
    from cxrsynth.diffusion import replicas
    from cxrsynth.share.audit import audit

    started = time.perf_counter()
    say = progress or (lambda message: None)
    root, out = Path(root), Path(out)
    control = control or f"{real}_control"
    subset_name = f"{control}_train"
    gen_dir = Path(generator_out) if generator_out is not None else root / "data" / "generators" / control
    demo_meta = manifest.read_meta(root, demo)
    if demo_meta.get("kind") != "synthetic":
        raise ControlError(f"{demo} is not a synthetic dataset (kind {demo_meta.get('kind')!r}): give a replica of the "
                           "demo generator")

    rows = subset_rows(root, real, split, config.images, config.seed)
    publish_subset(root, subset_name, real, rows, config.seed)
    say(f"training the control generator ({config.preset}) on {len(rows)} {real}/{split} images for {config.steps} steps")
    t0 = time.perf_counter()
    train_control(root, subset_name, gen_dir, config)
    train_seconds = time.perf_counter() - t0
    say(f"sampling {config.replicas} image(s) per training image of the control ({control})")
    t0 = time.perf_counter()
    gen = replicas.generate(root=root, generator_dir=gen_dir, conditions=subset_name, split="train", name=control,
                            config=replicas.GenerateConfig(replicas=config.replicas, guidance=config.guidance,
                                                           sampler=config.sampler, steps=config.sample_steps,
                                                           batch_size=config.sample_batch, seed=config.seed),
                            device=config.device, force=True)
    sample_seconds = time.perf_counter() - t0

    results, summaries = {}, {}
    audit_config = _audit_config(config)
    for label, name in (("control", control), ("demo", demo)):
        folder = out / label
        if folder.exists():
            shutil.rmtree(folder)
        say(f"auditing {name} against {real}/{split}")
        summary = summaries[label] = audit(root, name, real, folder, audit_config.override(split=split), progress=say)
        results[label] = generator_result(label, folder, summary, config)

    nearest = _nearest(out / "control")["training_key"].astype(str)
    subset_keys = set(rows["key"].astype(str))
    c = results["control"]
    c["training_subset"] = len(rows)
    c["nearest_in_subset"] = float(nearest.isin(subset_keys).mean())  # its images' nearest real image is one it saw
    c["subset_copied"] = len({str(p["training_key"]) for p in summaries["control"]["flagged"]} & subset_keys)
    c["generator"] = {"preset": config.preset, "image_size": config.image_size, "steps": config.steps,
                      "batch": min(config.batch, config.images), "trained_on": f"{subset_name} ({len(rows)} images)"}
    d = results["demo"]
    d["generator"] = {"dir": str(demo_meta.get("generator") or ""), "generator_id": demo_meta.get("generator_id"),
                      "guidance": demo_meta.get("guidance")}

    doc = {
        "format": FORMAT,
        "cxrsynth": __version__,
        "real": {"name": real, "split": split, "version": manifest.read_meta(root, real).get("version")},
        "alpha": config.alpha,
        "control": c,
        "demo": d,
        "verdict": {
            "control_caught": c["beyond_chance"],
            "demo_at_chance": None if d["beyond_chance"] is None else not d["beyond_chance"],
        },
        "config": config.to_dict(),
        "control_version": gen.get("version"),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / MEMORISATION_JSON).write_text(json.dumps(doc, indent=1, sort_keys=True, default=str) + "\n")
    say(f"control: trained in {train_seconds:.0f} s, sampled in {sample_seconds:.0f} s; "
        f"everything in {time.perf_counter() - started:.0f} s")
    return doc

