"""The memorization audit: is any synthetic image a copy of a real training image?

For every synthetic image, its ``k`` nearest real training images by an embedding
(:mod:`cxrsynth.share.embed`; unit vectors, cosine distance, chunked matrix products on
the GPU when there is one). A synthetic image is *flagged* when its nearest training image
is closer than the ``quantile`` (default 1%) of the distances from genuinely new real
images — held-out images of patients outside the training split — to their nearest
training image: closer to a training image than almost any new patient's radiograph is.
The threshold is thus calibrated on real data, not picked by hand; by construction about
``quantile x synthetic images`` are flagged by chance alone (``expected_by_chance``).

An embedding that cannot recognise a patient in two of their radiographs cannot catch a
leaked patient either (Packhäuser et al., Sci Rep 2022), so the audit also reports the
embedding's patient verification AUROC on real pairs: same patient (different studies
where the manifest knows studies) against different patients, on the training split and
on the held-out patients.

Outputs (in ``out``): ``audit.json`` (the summary, flagged pairs with their training keys),
``neighbours.parquet`` (every synthetic image's ``k`` neighbours), ``distances.png``
(synthetic→train and held-out→train distance histograms with the threshold) and
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
        embedding: ``pixels``, ``classifier:DIR``, ``reid[:DIR]`` or ``sscd[:DIR]``.
        criterion: ``absolute``, ``relative`` or ``combined`` (:mod:`cxrsynth.share.copies`).
        k: Neighbours kept per image (the relative score uses 2..k).
        quantile: The criterion's false-flag rate on new patients' images (its calibration quantile).
        pixel_size: Side of the ``pixels`` embedding.
        align: Candidates (the embedding's nearest) each image is registered onto and re-scored by
            test-time alignment (:mod:`cxrsynth.share.align`); 0: the embedding's distances as they are.
        align_size: Side (px) of the registration.
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
        copies.CRITERIA[self.criterion]  # a clean error naming the known criteria
        if self.align < 0 or self.align_size < 16:
            raise AuditError(f"audit config: align must be >= 0 and align_size >= 16, got {self.align}, {self.align_size}")
        if self.criterion != "absolute" and self.k < 2:
            raise AuditError(f"audit config: the {self.criterion} criterion needs k >= 2 neighbours, got {self.k}")


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
    """

    def __init__(self, emb: embed.Embedding, train_images: np.ndarray, config: AuditConfig, device,
                 bank=None) -> None:
        from cxrsynth.share.align import Aligner

        self.emb, self.config, self.device = emb, config, device
        self.bank = self.vectors(train_images) if bank is None else bank
        self.aligner = Aligner(train_images, size=config.align_size, device=device) if config.align else None

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
        d, i = embed.nearest(vectors, self.bank, max(k, self.config.align), self.config.chunk)
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
    import torch

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

    def train_network(kind: str) -> embed.Embedding:
        cfg = config.reid if kind == "reid" else config.sscd
        say(f"training the {kind} network on {len(train)} images of split {config.split!r} ({cfg.steps} steps)")
        images = _load_array(root, train, cfg.size, config.batch)
        if kind == "reid":  # every rank trains the same network (same seed); rank 0 saves it
            return embed.train_reid(images, train["patient_id"], cfg, device, out=out / "reid" if main else None)
        return embed.train_sscd(images, cfg, device, out=out / "sscd" if main else None)

    out.mkdir(parents=True, exist_ok=True)
    emb = embed.build(config.embedding, device=device, train=train_network, pixel_size=config.pixel_size,
                      root=root)
    say(f"embedding {len(train)} training and {len(heldout)} held-out images ({emb.name})")
    train_keys, bank = embed.embed_rows(root, train, emb, device, config.batch, share)
    _, held = embed.embed_rows(root, heldout, emb, device, config.batch, share)

    def pixels(frame: pd.DataFrame) -> np.ndarray | None:  # what the alignment registers, at its side
        return _load_array(root, frame, config.align_size, config.batch) if config.align else None

    if config.align:
        say(f"test-time alignment: each image registered onto its {config.align} nearest training images")
    search = Searcher(emb, pixels(train), config, device, bank=bank)
    held_dist, _ = search.search(held, pixels(heldout))
    held_nn = held_dist[:, 0]
    rule = copies.calibrate(held_dist, config.criterion, config.quantile)
    threshold = rule.thresholds.get("absolute", float("nan"))

    say(f"nearest training images of {len(syn)} synthetic images")
    syn_keys, found = [], {}
    syn_pixels, syn_row = pixels(syn), {key: r for r, key in enumerate(syn["key"].astype(str))}  # frame order
    for b, (keys, images) in enumerate(embed.iter_images(root, syn, emb.size, config.batch, share)):  # shard order
        syn_keys += keys
        if images is None:  # another rank's batch
            continue
        aligned = None if syn_pixels is None else syn_pixels[[syn_row[key] for key in keys]]
        found[b] = search.search(emb(torch.from_numpy(images).to(device)), aligned)
    found = embed.gather_batches(found, ranks.world)
    dist = np.concatenate([found[b][0] for b in sorted(found)])  # (N_s, k)
    index = np.concatenate([found[b][1] for b in sorted(found)])
    nn = dist[:, 0]
    flagged_mask, hard_mask = rule.flag(dist), rule.is_hard(dist)
    flagged_rows = np.flatnonzero(flagged_mask)
    flagged_rows = flagged_rows[np.argsort(nn[flagged_rows], kind="stable")]
    syn_scores, held_scores = copies.scores(dist), copies.scores(held_dist)

    say("re-identification AUROC on real pairs")
    reid_train = reid_auroc(train, bank, config.pairs, config.seed)
    reid_held = reid_auroc(heldout, held, config.pairs, config.seed)

    def pair(row: int) -> dict[str, Any]:
        neighbours = [{"training_key": train_keys[index[row, r]], "distance": round(float(dist[row, r]), 6)}
                      for r in range(dist.shape[1])]
        ratio = syn_scores["relative"][row]
        return {"synthetic_key": syn_keys[row], "training_key": neighbours[0]["training_key"],
                "distance": neighbours[0]["distance"],
                "heldout_below": round(float((held_nn < nn[row]).mean()), 6),  # share of new patients even closer
                "ratio_to_next": None if not np.isfinite(ratio) else round(float(ratio), 4),
                "hard_copy": bool(hard_mask[row]), "neighbours": neighbours}

    copied = {train_keys[index[r, 0]] for r in flagged_rows}
    summary: dict[str, Any] = {
        "format": "cxrsynth-audit/2",
        "synthetic": {"name": synthetic, "version": manifest.read_meta(root, synthetic).get("version"), "images": len(syn)},
        "training": {"name": against, "version": manifest.read_meta(root, against).get("version"), "split": config.split,
                     "images": len(train), "patients": int(train["patient_id"].nunique())},
        "heldout": {"rows": heldout_how, "images": len(heldout), "patients": int(heldout["patient_id"].nunique())},
        "embedding": {"name": emb.name, **{k: v for k, v in emb.info.items() if k != "config"},
                      **({"config": emb.info["config"]} if "config" in emb.info else {}), "dim": int(bank.shape[1])},
        "reid": {"training_split": reid_train, "heldout": reid_held},
        "threshold": {
            "distance": round(threshold, 6) if np.isfinite(threshold) else None,
            "ratio": round(rule.thresholds["relative"], 6) if "relative" in rule.thresholds else None,
            "criterion": config.criterion, "quantile": config.quantile,
            "metric": "cosine distance (1 - cosine similarity)",
            "calibration": f"on {len(heldout)} held-out real images ({heldout_how}): {rule.describe()}",
            "copy": rule.to_dict()["hard_rule"], "rule": rule.to_dict(),
        },
        "distances": {"synthetic_to_train": _summary(nn), "heldout_to_train": _summary(held_nn),
                      "synthetic_ratio": _summary(syn_scores["relative"][np.isfinite(syn_scores["relative"])]),
                      "heldout_ratio": _summary(held_scores["relative"][np.isfinite(held_scores["relative"])])},
        "counts": {"synthetic": len(syn), "flagged": int(len(flagged_rows)),
                   "expected_by_chance": round(rule.chance_rate * len(syn), 2), "chance_rate": round(rule.chance_rate, 6),
                   "copies": int(hard_mask.sum()),
                   # Dar et al. (2024)'s terms: the share of synthetic images that are copies, of training images copied
                   "synthetic_flagged_fraction": round(len(flagged_rows) / max(len(syn), 1), 6),
                   "training_copied_fraction": round(len(copied) / max(len(train), 1), 6)},
        "flagged": [pair(int(r)) for r in flagged_rows],
        "config": config.to_dict(),
        "device": str(device),
    }
    summary["seconds"] = round(time.perf_counter() - started, 3)
    if not main:  # every rank returns the summary; rank 0 alone writes the files
        return summary
    _write_neighbours(out / "neighbours.parquet", syn_keys, dist, index, train_keys)
    plot_distances(out / "distances.png", nn, held_nn, threshold if np.isfinite(threshold) else None, emb.name)
    shown = flagged_rows if len(flagged_rows) else np.argsort(nn, kind="stable")
    title = f"{len(flagged_rows)} flagged pair(s)" if len(flagged_rows) else "no pair flagged: the closest pairs"
    drawn = [(syn_keys[r], train_keys[index[r, 0]], float(nn[r])) for r in shown[: config.show]]
    plot_pairs(root, out / "pairs.png", syn, train, drawn,
               title=f"{synthetic} vs {against}/{config.split} ({emb.name}, {config.criterion}): {title}")
    (out / AUDIT_JSON).write_text(json.dumps({**summary, "cxrsynth": __version__}, indent=1, sort_keys=True, default=str) + "\n")
    return summary


def _write_neighbours(path: Path, syn_keys: list[str], dist: np.ndarray, index: np.ndarray, train_keys: list[str]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    n, k = dist.shape
    table = pa.table({
        "synthetic_key": np.repeat(np.array(syn_keys, dtype=object), k),
        "rank": np.tile(np.arange(1, k + 1, dtype=np.int32), n),
        "training_key": np.array(train_keys, dtype=object)[index.reshape(-1)],
        "distance": dist.reshape(-1).astype(np.float64),
    })
    pq.write_table(table, path, compression="zstd")


def plot_distances(path: Path, synthetic: np.ndarray, heldout: np.ndarray, threshold: float | None, embedding: str) -> Path:
    """Histograms of synthetic→train and held-out→train nearest distances, with the distance threshold (when the
    criterion has one)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    both = np.concatenate([synthetic, heldout])
    bins = np.linspace(0.0, max(float(both.max()), threshold or 0.0) * 1.05 + 1e-9, 50)
    ax.hist(heldout, bins=bins, density=True, alpha=0.6, label=f"held-out real → train (n={len(heldout)})")
    ax.hist(synthetic, bins=bins, density=True, alpha=0.6, label=f"synthetic → train (n={len(synthetic)})")
    if threshold is not None:
        ax.axvline(threshold, color="red", linestyle="--", label=f"distance threshold {threshold:.4f}")
    ax.set_xlabel(f"cosine distance to the nearest training image ({embedding})")
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)
    return path


def plot_pairs(root: Path, path: Path, syn: pd.DataFrame, train: pd.DataFrame, pairs: list[tuple[str, str, float]],
               title: str, columns: int = 4) -> Path:
    """The pairs side by side (synthetic left, its nearest training image right), ``columns`` pairs a row, captioned."""
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
    for i, (s_key, t_key, distance) in enumerate(pairs):
        r, c = divmod(i, columns)
        x, y = c * cell, head + r * (tile + caption)
        for j, key in enumerate((s_key, t_key)):
            image = Image.fromarray(decode_png(pngs[key], key=key)).resize((tile, tile), Image.Resampling.BILINEAR)
            sheet.paste(image, (x + j * (tile + gap), y))
        draw.text((x + 2, y + tile + 1), f"d = {distance:.4f}", fill=0, font=font)
        draw.text((x + 2, y + tile + 12), f"syn {s_key}"[:44], fill=0, font=font)
        draw.text((x + 2, y + tile + 24), f"train {t_key}"[:44], fill=0, font=font)
    sheet.save(path, format="PNG")
    return path


def public_summary(summary: dict[str, Any]) -> dict[str, Any]:
    """What an export may say about its audit: no training key, no image, no path.

    Keeps the embedding's kind and re-identification AUROCs, the threshold and how it was
    calibrated, the counts and distance summaries, and the training data's name and version.
    """
    emb = summary["embedding"]
    return {
        "format": summary["format"],
        "training": {k: summary["training"][k] for k in ("name", "version", "split", "images", "patients")},
        "heldout": {"images": summary["heldout"]["images"], "patients": summary["heldout"]["patients"]},
        "embedding": {"name": emb["name"].split(":", 1)[0], "dim": emb.get("dim"), "size": emb.get("size")},
        "reid_auroc": {"training_split": summary["reid"]["training_split"].get("auroc"),
                       "heldout": summary["reid"]["heldout"].get("auroc")},
        "threshold": {k: summary["threshold"].get(k) for k in ("distance", "ratio", "criterion", "quantile", "metric", "copy")},
        "calibration": (f"{summary['heldout']['images']} held-out real images of patients outside the training split: "
                        + summary["threshold"].get("rule", {}).get("rule", f"{summary['threshold']['quantile']:g} quantile")),
        "counts": summary["counts"],
        "distances": summary["distances"],
    }
