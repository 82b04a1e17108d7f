"""The memorization audit: is any synthetic image a copy of a real training image?

For every synthetic image, its ``k`` nearest real training images by an embedding
(:mod:`cxrsynth.share.embed`; unit vectors, cosine distance, chunked matrix products on
the GPU when there is one). A synthetic image is *flagged* when its nearest training image
is closer than the ``quantile`` (default 1%) of the distances from genuinely new real
images — held-out images of patients outside the training split — to their nearest
training image: closer to a training image than almost any new patient's radiograph is.
The threshold is thus calibrated on real data, not picked by hand (conformally: an order
statistic, :mod:`cxrsynth.share.copies`); about ``chance_rate x synthetic images`` are flagged
by chance alone (``expected_by_chance``; the leave-one-out rate on the held-out images, at most
the quantile when there are enough of them).

Two rules, measured on planted copies (``cxrsynth bench audit --planted``, README): the
*first* (``embedding``, default downsampled ``pixels`` with the ``combined`` criterion)
catches photometric edits, resampling and a generator's blurred re-syntheses of what it
memorised; the *detector* (``detector``, default an ``sscd`` copy-detection network, each
image registered onto its ``detector_align`` nearest, the ``absolute`` criterion) catches
shifted, cropped, rotated and rescaled copies, which pixels miss. An image is flagged when
either rule flags it; each is calibrated at half the quantile on the same held-out images,
and the union's observed rate on them is the chance rate the gate tests against.

An embedding that cannot recognise a patient in two of their radiographs cannot catch a
leaked patient either (Packhäuser et al., Sci Rep 2022), so the audit also reports the
embedding's patient verification AUROC on real pairs: same patient (different studies
where the manifest knows studies) against different patients, on the training split and
on the held-out patients.

Outputs (in ``out``): ``audit.json`` (the summary, flagged pairs with their training keys; the
top-level ``embedding``, ``reid``, ``threshold`` and ``distances`` are the first rule's, ``rules``
holds each rule's), ``neighbours.parquet`` (every synthetic image's ``k`` neighbours by each
rule), ``distances.png`` (synthetic→train and held-out→train distance histograms with the
thresholds, a panel per rule) and
``pairs.png`` (the flagged pairs side by side, or the closest pairs when none is flagged).
These hold real keys and real images: they stay with the data owner. :func:`public_summary`
is the part an export may carry.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from cxrsynth import __version__, manifest
from cxrsynth.config import Config
from cxrsynth.errors import CxrsynthError
from cxrsynth.share import copies, embed

AUDIT_JSON = "audit.json"


class AuditError(CxrsynthError):
    """An audit that cannot run as asked (no images, no held-out patients...)."""


@dataclass(frozen=True)
class AuditConfig(Config):
    """What an audit compares and how (recorded in ``audit.json``).

    Attributes:
        split: The training split of ``against`` (the rows the generator learnt from).
        heldout_split: Split of ``against`` whose images calibrate the threshold; None: every
            row with an image whose patient is not in ``split``. Training patients are never used.
        embedding: The first rule's embedding: ``pixels``, ``classifier:DIR``, ``reid[:DIR]`` or ``sscd[:DIR]``.
        criterion: Its criterion: ``absolute``, ``relative`` or ``combined`` (:mod:`cxrsynth.share.copies`).
        k: Neighbours kept per image (the relative score uses 2..k).
        quantile: The criterion's false-flag rate on new patients' images (its calibration quantile).
        pixel_size: Side of the ``pixels`` embedding.
        align: Candidates (the embedding's nearest) each image is registered onto and re-scored by
            test-time alignment (:mod:`cxrsynth.share.align`) in the first rule; 0: the embedding's distances.
        detector: The second rule's embedding, the copy detector: ``sscd`` trains one on the training
            split, ``sscd:DIR`` reads one (``cxrsynth share detector``); None or ``none``: the first rule alone.
        detector_criterion: The detector rule's criterion.
        detector_align: Candidates each image is registered onto in the detector rule (0: none).
        align_size: Side (px) of the registration (both rules).
        reid: The ``reid`` network's settings.
        sscd: The ``sscd`` copy-detection network's settings.
        pairs: Most same-patient (and as many different-patient) pairs for each AUROC.
        seed: Seeds the pair sample and the reid network.
        chunk: Query rows per similarity block.
        batch: Images decoded and embedded at a time.
        show: Most pairs drawn in ``pairs.png``.
        device: Torch device (default: cuda when available).
    """

    kind = "audit config"  # how errors name these settings (a class attribute, not a field)

    split: str = "train"
    heldout_split: str | None = None
    embedding: str = "pixels"
    criterion: str = "combined"
    k: int = 5
    quantile: float = 0.01
    pixel_size: int = 32
    align: int = 0
    detector: str | None = "sscd"
    detector_criterion: str = "absolute"
    detector_align: int = 16
    align_size: int = 64
    reid: embed.ReidConfig = embed.ReidConfig()
    sscd: embed.SscdConfig = embed.SscdConfig()
    pairs: int = 20000
    seed: int = 0
    chunk: int = 4096
    batch: int = 256
    show: int = 16
    device: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()  # every number finite
        if not 0 < self.quantile < 1:
            raise AuditError(f"quantile must be in (0, 1), got {self.quantile}")
        for name in ("k", "pixel_size", "pairs", "chunk", "batch"):
            if getattr(self, name) < 1:
                raise AuditError(f"audit config: {name} must be >= 1, got {getattr(self, name)}")
        for rule in self.rules():
            copies.CRITERIA[rule.criterion]  # a clean error naming the known criteria
            if rule.align < 0:
                raise AuditError(f"audit config: {rule.name} align must be >= 0, got {rule.align}")
            if rule.criterion != "absolute" and self.k < 2:
                raise AuditError(f"audit config: the {rule.criterion} criterion needs k >= 2 neighbours, got {self.k}")
        if self.align_size < 16:
            raise AuditError(f"audit config: align_size must be >= 16, got {self.align_size}")

    def rules(self) -> list["Rule"]:
        """The audit's rules: the first (``embedding``) and, unless ``detector`` is None, the detector."""
        first = [Rule("first", self.embedding, self.criterion, self.align)]
        if self.detector is None or self.detector.lower() == "none":
            return first
        return first + [Rule("detector", self.detector, self.detector_criterion, self.detector_align)]


@dataclass(frozen=True)
class Rule:
    """One way to find copies: an embedding's nearest training images (registered onto when ``align``) and a criterion."""

    name: str
    embedding: str
    criterion: str
    align: int

    def describe(self, emb_name: str | None = None) -> str:
        aligned = f", registered onto its {self.align} nearest" if self.align else ""
        return f"{emb_name or self.embedding}{aligned}, {self.criterion}"


def _rows_with_images(root: Path, name: str) -> pd.DataFrame:
    frame = manifest.read(root, name)
    return frame.loc[frame["shard"].notna().to_numpy(dtype=bool)].reset_index(drop=True)


def _in_split(frame: pd.DataFrame, split: str) -> np.ndarray:
    return (frame["split"] == split).fillna(False).to_numpy(dtype=bool)


def real_sets(root: Path, against: str, config: AuditConfig) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """The training rows and the held-out calibration rows of ``against``, and how held-out was chosen."""
    frame = _rows_with_images(root, against)
    if frame.empty:
        raise AuditError(f"{against} has no images (labels-only?): the audit compares images")
    train = frame.loc[_in_split(frame, config.split)].reset_index(drop=True)
    if train.empty:
        raise AuditError(f"{against} has no images in split {config.split!r}")
    patients = set(train["patient_id"].dropna().astype(str))
    known = frame["patient_id"].notna().to_numpy(dtype=bool)
    outside = known & ~frame["patient_id"].astype(str).isin(patients).to_numpy(dtype=bool)
    if config.heldout_split is not None:
        chosen = _in_split(frame, config.heldout_split)
        how = f"{against} split {config.heldout_split!r}, patients not in split {config.split!r}"
    else:
        chosen = ~_in_split(frame, config.split)
        how = f"every {against} image whose patient is not in split {config.split!r}"
    heldout = frame.loc[chosen & outside].reset_index(drop=True)
    if heldout.empty:
        raise AuditError(f"{against}: no held-out real images ({how}) to calibrate the threshold on; "
                         f"split {against} with a tuning or test share (`cxrsynth split`)")
    return train, heldout, how


def _summary(values: np.ndarray) -> dict[str, float] | None:
    if len(values) == 0:
        return None
    q = np.quantile(values, [0.0, 0.01, 0.05, 0.25, 0.5, 0.75, 1.0])
    return {name: round(float(v), 6) for name, v in zip(("min", "p1", "p5", "p25", "median", "p75", "max"), q)}


def patient_pairs(frame: pd.DataFrame, n_pairs: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """Row pairs ``(i, j, same_patient)`` for a verification AUROC, and what the positives are.

    Positives: pairs of images of one patient from different studies (any two images when
    the manifest has no studies), at most ``n_pairs``, sampled uniformly. Negatives: as many
    uniformly drawn pairs of images of different patients.
    """
    rng = np.random.default_rng(seed)
    patient = pd.factorize(frame["patient_id"].astype(str))[0]
    has_study = frame["study_id"].notna().all() if "study_id" in frame else False
    study = pd.factorize(frame["study_id"].astype(str))[0] if has_study else np.arange(len(frame))
    order = np.argsort(patient, kind="stable")
    groups = np.split(order, np.flatnonzero(np.diff(patient[order])) + 1) if len(order) else []
    pos_i, pos_j = [], []
    for g in groups:
        if len(g) < 2:
            continue
        a, b = np.triu_indices(len(g), k=1)
        keep = study[g[a]] != study[g[b]]
        pos_i.append(g[a][keep])
        pos_j.append(g[b][keep])
    i = np.concatenate(pos_i) if pos_i else np.zeros(0, dtype=np.int64)
    j = np.concatenate(pos_j) if pos_j else np.zeros(0, dtype=np.int64)
    if len(i) > n_pairs:
        pick = rng.choice(len(i), n_pairs, replace=False)
        i, j = i[pick], j[pick]
    n = len(i)
    neg_i, neg_j = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    if n and len(groups) >= 2:
        while len(neg_i) < n:
            a, b = rng.integers(0, len(frame), size=(2, 4 * n))
            keep = patient[a] != patient[b]
            neg_i, neg_j = np.concatenate([neg_i, a[keep]]), np.concatenate([neg_j, b[keep]])
        neg_i, neg_j = neg_i[:n], neg_j[:n]
    same = np.concatenate([np.ones(n, dtype=bool), np.zeros(len(neg_i), dtype=bool)])
    what = "images of one patient from different studies" if has_study else "two images of one patient"
    return np.concatenate([i, neg_i]), np.concatenate([j, neg_j]), same, what


def reid_auroc(frame: pd.DataFrame, vectors, n_pairs: int, seed: int) -> dict[str, Any]:
    """Patient verification AUROC of unit ``vectors`` (rows of ``frame``): cosine similarity as the score."""
    import torch
    from sklearn.metrics import roc_auc_score

    i, j, same, what = patient_pairs(frame, n_pairs, seed)
    out: dict[str, Any] = {"same_patient_pairs": int(same.sum()), "different_patient_pairs": int((~same).sum()),
                           "positives": what}
    if same.sum() == 0 or (~same).sum() == 0:
        out["auroc"] = None
        out["why_none"] = "no patient with two images from different studies" if same.sum() == 0 else "a single patient"
        return out
    ii, jj = torch.from_numpy(i).to(vectors.device), torch.from_numpy(j).to(vectors.device)
    scores = (vectors[ii] * vectors[jj]).sum(dim=1).cpu().numpy()
    out["auroc"] = round(float(roc_auc_score(same, scores)), 4)
    return out


class Searcher:
    """The audit's search: each query image's ``k`` nearest training images, ``(distance, index)`` as numpy.

    The embedding's ``config.k`` nearest training images, or, with ``config.align``, its
    ``max(align, k)`` nearest re-scored by test-time alignment (:class:`cxrsynth.share.align.Aligner`:
    the query registered onto each, ``1 - NCC``) and the ``k`` best of those.

    Args:
        emb: The embedding.
        train_images: ``(N, S, S) uint8`` training images (any side), in bank order.
        config: ``k``, ``align``, ``align_size``, ``chunk``, ``batch``.
        device: Torch device.
        bank: The training images' vectors when already computed.
        align: Candidates registered onto (None: ``config.align``; a rule's own otherwise).
    """

    def __init__(self, emb: embed.Embedding, train_images: np.ndarray | None, config: AuditConfig, device,
                 bank=None, align: int | None = None) -> None:
        from cxrsynth.share.align import Aligner

        self.emb, self.config, self.device = emb, config, device
        self.align = config.align if align is None else align
        self.bank = self.vectors(train_images) if bank is None else bank
        self.aligner = Aligner(train_images, size=config.align_size, device=device) if self.align else None

    def vectors(self, images: np.ndarray):
        """``(N, S, S) uint8`` (any side) → ``(N, D)`` unit rows on the device."""
        import torch

        small = embed.resize_images(images, self.emb.size)
        parts = [self.emb(torch.from_numpy(small[i : i + self.config.batch]).to(self.device))
                 for i in range(0, len(small), self.config.batch)]
        return torch.cat(parts) if parts else torch.zeros((0, self.bank.shape[1]), device=self.device)

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.search(self.vectors(images), images)

    def search(self, vectors, images: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """The neighbours of the queries with embedding ``vectors``; ``images`` (their pixels) for the alignment."""
        k = self.config.k
        d, i = embed.nearest(vectors, self.bank, max(k, self.align), self.config.chunk)
        d, i = d.cpu().numpy(), i.cpu().numpy()
        if self.aligner is None:
            return d[:, :k], i[:, :k]
        d = self.aligner.distances(images, i)
        order = np.argsort(d, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(d, order, 1), np.take_along_axis(i, order, 1)


def _load_array(root: Path, frame: pd.DataFrame, size: int, batch: int) -> np.ndarray:
    """All images of ``frame`` as ``(N, size, size) uint8``, in frame order."""
    found = {}
    for keys, images in embed.iter_images(root, frame, size, batch):
        found.update(zip(keys, images))
    return np.stack([found[k] for k in frame["key"].astype(str)])


def train_detector(
    root: str | Path,
    dataset: str,
    out: str | Path,
    config: AuditConfig = AuditConfig(),
    progress: Callable[[str], None] | None = None,
) -> embed.Embedding:
    """Train the ``sscd`` copy detector once on ``dataset``'s training split, for every audit against it.

    Writes ``sscd.json`` + ``sscd.safetensors`` into ``out`` (an audit's ``--embedding sscd:OUT``)
    and ``detector.json``: the dataset, its version and the split it learnt from. Seeded: the
    same rows and ``config.sscd`` give the same weights on one device type.
    """
    from cxrsynth import runtime

    root, out = Path(root), Path(out)
    train, _, _ = real_sets(root, dataset, config)
    cfg = config.sscd
    (progress or (lambda message: None))(f"training the sscd copy detector on {len(train)} images of "
                                         f"{dataset}/{config.split} ({cfg.steps} steps, {cfg.size} px)")
    images = _load_array(root, train, cfg.size, config.batch)
    emb = embed.train_sscd(images, cfg, runtime.device(config.device), out=out)
    about = {"dataset": dataset, "version": manifest.read_meta(root, dataset).get("version"), "split": config.split,
             "images": int(len(train)), "patients": int(train["patient_id"].nunique())}
    (out / "detector.json").write_text(json.dumps(about, indent=1, sort_keys=True) + "\n")
    return emb


def audit(
    root: str | Path,
    synthetic: str,
    against: str,
    out: str | Path,
    config: AuditConfig = AuditConfig(),
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Audit synthetic dataset ``synthetic`` against the real training images of ``against``.

    Args:
        root: Project root.
        synthetic: A dataset whose images are audited (normally synthetic).
        against: The real dataset the generator learnt from; ``config.split`` its training rows.
        out: Folder for ``audit.json``, ``neighbours.parquet``, ``distances.png`` and ``pairs.png``.
        config: What to compare and how.
        progress: Optional ``progress(message)`` for each phase.

    Under ``torchrun`` each rank embeds and searches every ``world``-th batch (the batches of
    one process) and every rank gathers all of them (:func:`cxrsynth.share.embed.gather_batches`),
    so the result does not depend on the number of ranks; rank 0 writes the files.

    Returns:
        The ``audit.json`` content.
    """
    from cxrsynth import runtime

    started = time.perf_counter()
    say = progress or (lambda message: None)
    root, out = Path(root), Path(out)
    syn = _rows_with_images(root, synthetic)
    if syn.empty:
        raise AuditError(f"{synthetic} has no images to audit")
    train, heldout, heldout_how = real_sets(root, against, config)
    ranks = runtime.distributed()  # under torchrun: the embedding and the search split by batch over the ranks
    share = (ranks.rank, ranks.world)
    main = ranks.is_main
    device = runtime.device(config.device)
    out.mkdir(parents=True, exist_ok=True)
    rules = config.rules()
    per_rule = config.quantile / len(rules)  # each rule at its share of the quantile: the union's rate stays within it
    arrays: dict[str, np.ndarray] = {}

    def pixels(frame: pd.DataFrame, label: str) -> np.ndarray:  # what the alignment registers, at its side, loaded once
        if label not in arrays:
            arrays[label] = _load_array(root, frame, config.align_size, config.batch)
        return arrays[label]

    found = [_search_rule(root, out, rule, config, per_rule, (syn, train, heldout), pixels, device, share, ranks.world,
                          say) for rule in rules]
    syn_keys, train_keys = found[0].syn_keys, found[0].train_keys
    fired = np.stack([f.rule.flag(f.dist) for f in found])  # (rules, N_s); a hard copy is flagged too
    hard_mask = copies.either([(f.rule, f.dist) for f in found], "is_hard")
    chance_rate = float(copies.either([(f.rule, f.held_dist) for f in found], "loo_flag").mean())  # as each rule's
    # a flagged image's pair: from the rule under which new patients came least often as close (its strongest evidence)
    below = np.stack([f.heldout_below() for f in found])  # (rules, N_s)
    which = np.argmin(np.where(fired, below, np.inf), axis=0)
    flagged_rows = np.flatnonzero(fired.any(axis=0))
    flagged_rows = flagged_rows[np.lexsort((found[0].dist[flagged_rows, 0], below[which[flagged_rows], flagged_rows]))]

    def pair(row: int) -> dict[str, Any]:
        f = found[which[row]]
        neighbours = [{"training_key": train_keys[f.index[row, r]], "distance": round(float(f.dist[row, r]), 6)}
                      for r in range(f.dist.shape[1])]
        ratio = copies.scores(f.dist[row : row + 1])["relative"][0]
        return {"synthetic_key": syn_keys[row], "training_key": neighbours[0]["training_key"],
                "distance": neighbours[0]["distance"], "rule": f.spec.name, "embedding": f.emb.name,
                "flagged_by": [g.spec.name for g, hit in zip(found, fired[:, row]) if hit],
                "heldout_below": round(float(below[which[row], row]), 6),  # share of new patients even closer
                "ratio_to_next": None if not np.isfinite(ratio) else round(float(ratio), 4),
                "hard_copy": bool(hard_mask[row]), "neighbours": neighbours}

    pairs = [pair(int(r)) for r in flagged_rows]
    copied = {p["training_key"] for p in pairs}
    first = found[0].to_dict()
    union_text = " or ".join(f"the {f.spec.name} rule ({f.spec.describe(f.emb.name)}, at {per_rule:g})" for f in found)
    summary: dict[str, Any] = {
        "format": "cxrsynth-audit/3",
        "synthetic": {"name": synthetic, "version": manifest.read_meta(root, synthetic).get("version"), "images": len(syn)},
        "training": {"name": against, "version": manifest.read_meta(root, against).get("version"), "split": config.split,
                     "images": len(train), "patients": int(train["patient_id"].nunique())},
        "heldout": {"rows": heldout_how, "images": len(heldout), "patients": int(heldout["patient_id"].nunique())},
        "embedding": first["embedding"], "reid": first["reid"], "threshold": first["threshold"],
        "distances": first["distances"],
        "rules": [f.to_dict() for f in found],
        "union": {"rule": f"flagged when {union_text} flags it", "quantile": config.quantile, "per_rule": per_rule,
                  "chance_rate": round(chance_rate, 6),
                  "calibration": f"on {len(heldout)} held-out real images ({heldout_how}): the union flags "
                                 f"{100 * chance_rate:.2f}% of them (leave-one-out)",
                  "supported": all(f.rule.supported for f in found)},
        "counts": {"synthetic": len(syn), "flagged": int(len(flagged_rows)),
                   "expected_by_chance": round(chance_rate * len(syn), 2), "chance_rate": round(chance_rate, 6),
                   "copies": int(hard_mask.sum()),
                   "by_rule": {f.spec.name: int(hit.sum()) for f, hit in zip(found, fired)},
                   # Dar et al. (2024)'s terms: the share of synthetic images that are copies, of training images copied
                   "synthetic_flagged_fraction": round(len(flagged_rows) / max(len(syn), 1), 6),
                   "training_copied_fraction": round(len(copied) / max(len(train), 1), 6)},
        "flagged": pairs,
        "config": config.to_dict(),
        "device": str(device),
    }
    summary["seconds"] = round(time.perf_counter() - started, 3)
    if not main:  # every rank returns the summary; rank 0 alone writes the files
        return summary
    _write_neighbours(out / "neighbours.parquet", syn_keys, [(f.spec.name, f.dist, f.index) for f in found], train_keys)
    plot_distances(out / "distances.png", [(f"{f.spec.name} rule: {f.spec.describe(f.emb.name)}"
                                            + ("; 1 - NCC after registration" if f.spec.align else "; cosine distance"),
                                            f.dist[:, 0], f.held_dist[:, 0], f.absolute_threshold()) for f in found])
    shown = flagged_rows if len(flagged_rows) else np.argsort(found[0].dist[:, 0], kind="stable")
    title = f"{len(flagged_rows)} flagged pair(s)" if len(flagged_rows) else "no pair flagged: the closest pairs"
    drawn = [(p["synthetic_key"], p["training_key"], p["distance"], p["rule"]) for p in pairs[: config.show]] or \
            [(syn_keys[r], train_keys[found[0].index[r, 0]], float(found[0].dist[r, 0]), found[0].spec.name)
             for r in shown[: config.show]]
    names = " | ".join(f.spec.describe(f.emb.name) for f in found)
    plot_pairs(root, out / "pairs.png", syn, train, drawn, title=f"{synthetic} vs {against}/{config.split} ({names}): {title}")
    (out / AUDIT_JSON).write_text(json.dumps({**summary, "cxrsynth": __version__}, indent=1, sort_keys=True, default=str) + "\n")
    return summary


@dataclass
class _Found:
    """One rule's search: the calibrated criterion, held-out and synthetic neighbours, its re-identification AUROCs."""

    spec: Rule
    emb: embed.Embedding
    rule: copies.Calibrated
    train_keys: list[str]
    syn_keys: list[str]
    held_dist: np.ndarray
    dist: np.ndarray
    index: np.ndarray
    reid: dict[str, Any]
    dim: int
    calibration: str

    def absolute_threshold(self) -> float | None:
        t = self.rule.thresholds.get("absolute")
        return t if t is not None and np.isfinite(t) else None

    def heldout_below(self) -> np.ndarray:
        """Per synthetic image: the share of held-out new patients' images at least as close as it (first neighbour)."""
        held = np.sort(self.held_dist[:, 0])
        return np.searchsorted(held, self.dist[:, 0], side="left") / max(len(held), 1)

    def to_dict(self) -> dict[str, Any]:
        emb, rule, scores = self.emb, self.rule, copies.scores(self.dist)
        held_scores, threshold = copies.scores(self.held_dist), self.absolute_threshold()
        return {
            "name": self.spec.name, "align": self.spec.align,
            "embedding": {"name": emb.name, **{k: v for k, v in emb.info.items() if k != "config"},
                          **({"config": emb.info["config"]} if "config" in emb.info else {}), "dim": self.dim},
            "reid": self.reid,
            "threshold": {
                "distance": None if threshold is None else round(threshold, 6),
                "ratio": round(rule.thresholds["relative"], 6) if "relative" in rule.thresholds else None,
                "criterion": rule.criterion, "quantile": rule.quantile,
                "metric": "1 - NCC after registration" if self.spec.align else "cosine distance (1 - cosine similarity)",
                "calibration": self.calibration + rule.describe(), "copy": rule.to_dict()["hard_rule"],
                "rule": rule.to_dict(),
            },
            "distances": {"synthetic_to_train": _summary(scores["absolute"]), "heldout_to_train": _summary(held_scores["absolute"]),
                          "synthetic_ratio": _summary(scores["relative"][np.isfinite(scores["relative"])]),
                          "heldout_ratio": _summary(held_scores["relative"][np.isfinite(held_scores["relative"])])},
            "flagged": int(rule.flag(self.dist).sum()), "copies": int(rule.is_hard(self.dist).sum()),
        }


def _search_rule(root: Path, out: Path, spec: Rule, config: AuditConfig, quantile: float,
                 frames: tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame], pixels: Callable[[pd.DataFrame, str], np.ndarray],
                 device, share: tuple[int, int], world: int, say: Callable[[str], None]) -> _Found:
    """One rule of the audit: embed, calibrate its criterion at ``quantile`` on the held-out rows, search the synthetic
    ones (``frames``: synthetic, training, held-out); a network it trains is saved in ``out/<kind>`` (rank 0)."""
    import torch

    syn, train, heldout = frames
    main = share[0] == 0

    def train_network(kind: str) -> embed.Embedding:
        cfg = config.reid if kind == "reid" else config.sscd
        say(f"training the {kind} network on {len(train)} images of split {config.split!r} ({cfg.steps} steps)")
        images = _load_array(root, train, cfg.size, config.batch)
        folder = out / kind if main else None
        if kind == "reid":  # every rank trains the same network (same seed); rank 0 saves it
            return embed.train_reid(images, train["patient_id"], cfg, device, out=folder)
        return embed.train_sscd(images, cfg, device, out=folder)

    emb = embed.build(spec.embedding, device=device, train=train_network, pixel_size=config.pixel_size, root=root)
    say(f"{spec.name} rule ({spec.describe(emb.name)}): embedding {len(train)} training and {len(heldout)} held-out images")
    train_keys, bank = embed.embed_rows(root, train, emb, device, config.batch, share)
    _, held = embed.embed_rows(root, heldout, emb, device, config.batch, share)
    if spec.align:
        say(f"test-time alignment: each image registered onto its {spec.align} nearest training images")
    aligned = spec.align > 0
    search = Searcher(emb, pixels(train, "train") if aligned else None, config, device, bank=bank, align=spec.align)
    held_dist, _ = search.search(held, pixels(heldout, "heldout") if aligned else None)
    rule = copies.calibrate(held_dist, spec.criterion, quantile)

    say(f"{spec.name} rule: nearest training images of {len(syn)} synthetic images")
    syn_keys, found = [], {}
    syn_pixels = pixels(syn, "synthetic") if aligned else None
    syn_row = {key: r for r, key in enumerate(syn["key"].astype(str))}  # frame order
    for b, (keys, images) in enumerate(embed.iter_images(root, syn, emb.size, config.batch, share)):  # shard order
        syn_keys += keys
        if images is None:  # another rank's batch
            continue
        query = None if syn_pixels is None else syn_pixels[[syn_row[key] for key in keys]]
        found[b] = search.search(emb(torch.from_numpy(images).to(device)), query)
    found = embed.gather_batches(found, world)
    dist = np.concatenate([found[b][0] for b in sorted(found)])  # (N_s, k)
    index = np.concatenate([found[b][1] for b in sorted(found)])
    reid = {"training_split": reid_auroc(train, bank, config.pairs, config.seed),
            "heldout": reid_auroc(heldout, held, config.pairs, config.seed)}
    return _Found(spec, emb, rule, train_keys, syn_keys, held_dist, dist, index, reid, int(bank.shape[1]),
                  f"on {len(heldout)} held-out real images: ")


def _write_neighbours(path: Path, syn_keys: list[str], found: list[tuple[str, np.ndarray, np.ndarray]],
                      train_keys: list[str]) -> None:
    """Every synthetic image's ``k`` neighbours by each rule: ``rule, synthetic_key, rank, training_key, distance``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    parts = []
    for name, dist, index in found:
        n, k = dist.shape
        parts.append(pa.table({
            "rule": np.full(n * k, name, dtype=object),
            "synthetic_key": np.repeat(np.array(syn_keys, dtype=object), k),
            "rank": np.tile(np.arange(1, k + 1, dtype=np.int32), n),
            "training_key": np.array(train_keys, dtype=object)[index.reshape(-1)],
            "distance": dist.reshape(-1).astype(np.float64),
        }))
    pq.write_table(pa.concat_tables(parts), path, compression="zstd")


def plot_distances(path: Path, panels: list[tuple[str, np.ndarray, np.ndarray, float | None]]) -> Path:
    """Histograms of synthetic→train and held-out→train nearest distances, a panel per rule
    ``(name, synthetic, heldout, distance threshold or None)``, with the threshold where the criterion has one."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4), dpi=100, squeeze=False)
    for ax, (name, synthetic, heldout, threshold) in zip(axes[0], panels):
        both = np.concatenate([synthetic, heldout])
        bins = np.linspace(0.0, max(float(both.max()), threshold or 0.0) * 1.05 + 1e-9, 50)
        ax.hist(heldout, bins=bins, density=True, alpha=0.6, label=f"held-out real → train (n={len(heldout)})")
        ax.hist(synthetic, bins=bins, density=True, alpha=0.6, label=f"synthetic → train (n={len(synthetic)})")
        if threshold is not None:
            ax.axvline(threshold, color="red", linestyle="--", label=f"distance threshold {threshold:.4f}")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("distance to the nearest training image")
        ax.set_ylabel("density")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)
    return path


def plot_pairs(root: Path, path: Path, syn: pd.DataFrame, train: pd.DataFrame,
               pairs: list[tuple[str, str, float, str | None]], title: str, columns: int = 4) -> Path:
    """The pairs side by side (synthetic left, its nearest training image right), ``columns`` pairs a row, captioned
    with the distance and the rule that found the pair."""
    from PIL import Image, ImageDraw, ImageFont

    from cxrsynth import shards
    from cxrsynth.imaging import decode_png

    tile, gap, caption, head = 128, 4, 38, 20
    cell = 2 * tile + gap + 12
    syn_rows = syn.loc[syn["key"].astype(str).isin([p[0] for p in pairs])]
    train_rows = train.loc[train["key"].astype(str).isin([p[1] for p in pairs])]
    pngs = dict(shards.images(root, syn_rows)) | dict(shards.images(root, train_rows))
    font = ImageFont.load_default()
    n_rows = max(1, -(-len(pairs) // columns))
    sheet = Image.new("L", (columns * cell, head + n_rows * (tile + caption)), color=255)
    draw = ImageDraw.Draw(sheet)
    draw.text((4, 4), title, fill=0, font=font)
    for i, (s_key, t_key, distance, rule) in enumerate(pairs):
        r, c = divmod(i, columns)
        x, y = c * cell, head + r * (tile + caption)
        for j, key in enumerate((s_key, t_key)):
            image = Image.fromarray(decode_png(pngs[key], key=key)).resize((tile, tile), Image.Resampling.BILINEAR)
            sheet.paste(image, (x + j * (tile + gap), y))
        draw.text((x + 2, y + tile + 1), f"d = {distance:.4f}" + (f" ({rule} rule)" if rule else ""), fill=0, font=font)
        draw.text((x + 2, y + tile + 12), f"syn {s_key}"[:44], fill=0, font=font)
        draw.text((x + 2, y + tile + 24), f"train {t_key}"[:44], fill=0, font=font)
    sheet.save(path, format="PNG")
    return path


def public_summary(summary: dict[str, Any]) -> dict[str, Any]:
    """What an export may say about its audit: no training key, no image, no path.

    Keeps each rule's embedding kind, re-identification AUROCs and thresholds, how they were
    calibrated, the counts and distance summaries, and the training data's name and version
    (the top-level ``embedding``, ``reid_auroc`` and ``threshold`` are the first rule's).
    """
    def rule(r: dict[str, Any]) -> dict[str, Any]:
        emb = r["embedding"]
        return {"name": r.get("name", "first"), "align": r.get("align", 0),
                "embedding": {"name": emb["name"].split(":", 1)[0], "dim": emb.get("dim"), "size": emb.get("size")},
                "reid_auroc": {"training_split": r["reid"]["training_split"].get("auroc"),
                               "heldout": r["reid"]["heldout"].get("auroc")},
                "threshold": {k: r["threshold"].get(k) for k in ("distance", "ratio", "criterion", "quantile", "metric",
                                                                 "copy")}}

    rules = [rule(r) for r in summary.get("rules") or [summary]]
    union = summary.get("union") or {}
    # said again from the public fields: the audit's own text names the embeddings as given (a local folder)
    said = " or ".join(f"the {r['name']} rule ({r['embedding']['name']}"
                       + (f", registered onto its {r['align']} nearest" if r["align"] else "")
                       + f", {r['threshold']['criterion']}, at {r['threshold']['quantile']:g})" for r in rules)
    calibration = (f"{summary['heldout']['images']} held-out real images of patients outside the training split: "
                   + (f"flagged when {said} flags it" if union else
                      summary["threshold"].get("rule", {}).get("rule", f"{summary['threshold']['quantile']:g} quantile")))
    if union.get("chance_rate") is not None:
        calibration += f" (it flags {100 * union['chance_rate']:.2f}% of them, leave-one-out)"
    return {
        "format": summary["format"],
        "training": {k: summary["training"][k] for k in ("name", "version", "split", "images", "patients")},
        "heldout": {"images": summary["heldout"]["images"], "patients": summary["heldout"]["patients"]},
        "embedding": rules[0]["embedding"], "reid_auroc": rules[0]["reid_auroc"], "threshold": rules[0]["threshold"],
        "rules": rules,
        "calibration": calibration,
        "counts": summary["counts"],
        "distances": summary["distances"],
    }
