"""Training a 14-finding classifier: masked BCE, EMA, best epoch by tuning loss, exact resume, DDP.

:func:`train` streams the training rows with :class:`cxrsynth.loader.ShardLoader`
(seeded order, augmentation, fixed epoch length), runs :class:`Trainer` steps, and after
every epoch computes the tuning loss of the EMA weights (no augmentation). The epoch with
the lowest tuning loss is the model (the paper's rule); without a tuning split, the last
epoch. Outputs in ``out``:

* ``model.safetensors`` — the best epoch's weights (EMA), a plain timm state dict;
* ``config.json`` — timm's model config: ``timm.create_model("local-dir:OUT", pretrained=True)``
  rebuilds the classifier with timm alone (:func:`cxrsynth.classify.model.timm_config`);
* ``classifier.json`` — preset, resolved config, training data (name, version, split,
  the rows' datasets and versions, image counts), best epoch, per-epoch history,
  ``classifier_id`` (sha256 of the weights), the cxrsynth version;
* ``checkpoints/latest.pt`` — model, EMA, optimizer, LR schedule, step, epoch and
  position in it, every rank's RNG state, history and best so far — and
  ``checkpoints/best-epoch-NNNN.safetensors``.

Loss: binary cross-entropy per finding, weighted by the loader's mask (0 on uncertain
findings) and divided by the mask's sum. Training images exclude uncertain findings by
default (the label contract), so the mask matters when ``exclude_uncertain=False``.

Refused before any step (:func:`check_data`): a tuning split that is, or shares a split
with, the training split (the best epoch would be picked on the training rows), training
rows without a certain label of some finding (its output would never be trained: with
``exclude_uncertain=False`` on rows where that finding is always uncertain, or no rows at
all once uncertain images are excluded), and tuning rows without any certain label (their
loss would be 0 at every epoch). A loss that becomes NaN or infinite stops the run
(:func:`cxrsynth.checkpoints.check_loss`) before a NaN checkpoint or model is written.

Resume: with ``resume=True`` a run continues from ``checkpoints/latest.pt`` when it comes
from the same run (:func:`run_fingerprint`: every setting but workers and logging, the
data version, the number of processes, the initial weights), else it fails naming each
difference. Checkpoints are written at every epoch end (and every ``checkpoint_every``
steps); the data order is a function of (seed, epoch, position), every other random draw
(dropout, drop-path) comes from the global torch generator seeded per rank inside a
``fork_rng`` and checkpointed, so on CPU a resumed run ends bit-identical to an unbroken
one (tested). On GPU, cuDNN and atomics make runs repeatable only up to floating-point
nondeterminism.

DDP (``torchrun``): every rank builds the same initial weights, reads a disjoint share of
the rows with the same number of batches (the loader's fixed epoch length), and the
tuning loss is summed over the ranks' shares. Rank 0 writes the files.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F

from cxrsynth import __version__, checkpoints, loader, manifest, runtime
from cxrsynth import cards
from cxrsynth.progress import LOG_FILE, JsonlLog
from cxrsynth.classify.model import (META, TIMM_CONFIG, WEIGHTS, Classifier, build, classifier_card, classifier_id,
                                     load_pretrained, save_weights, timm_config)
from cxrsynth.classify.presets import ClassifierConfig
from cxrsynth.errors import CxrsynthError
from cxrsynth.labels import FINDINGS

CHECKPOINTS = "checkpoints"
LATEST = "latest.pt"
#: What every training checkpoint holds (written by ``save_checkpoint`` in :func:`train`).
CHECKPOINT_KEYS = ("run", "trainer", "epoch", "position", "history", "best", "rng", "partial", "data_seen")
#: Config fields a resumed run may change: they do not alter the trajectory.
RESUMABLE_CHANGES = ("workers", "checkpoint_every", "log_every", "patience")


# 1. Fast paths, loss, one step ----------------------------------------------------------

def fast_paths(device: torch.device) -> dict[str, Any]:
    """The one place where the classifier's speed options are chosen.

    CUDA: bf16 autocast (no loss scaling needed), channels_last (cuDNN's NHWC kernels for
    ConvNeXt/ResNet convolutions), TF32 matmuls, autotuned cuDNN algorithms. CPU: fp32
    and contiguous NCHW throughout, so that runs are exact and resumable bit for bit.
    """
    cuda = device.type == "cuda"
    if cuda:
        runtime.cuda_fast_paths(deterministic=False)
    return {"autocast_dtype": torch.bfloat16 if cuda else None, "channels_last": cuda, "pin_memory": cuda}


def autocast(device: torch.device, fast: dict[str, Any]):
    """The autocast context of :func:`fast_paths` (disabled off CUDA)."""
    dtype = fast["autocast_dtype"]
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def to_device(images: torch.Tensor, device: torch.device, fast: dict[str, Any]) -> torch.Tensor:
    """A batch of images on the device, channels_last when chosen."""
    x = images.to(device, non_blocking=True)  # (B, 1, S, S)
    return x.contiguous(memory_format=torch.channels_last) if fast["channels_last"] else x


def masked_bce_sum(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum of BCE over unmasked findings, number of unmasked findings)``, fp32."""
    loss = F.binary_cross_entropy_with_logits(logits.float(), labels, weight=mask, reduction="sum")
    return loss, mask.sum()


def lr_factor(config: ClassifierConfig, step: int, total: int) -> float:
    """Learning-rate multiplier at ``step``: linear warm-up, then constant or cosine to 0 at ``total``."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - config.warmup_steps) / max(1, total - config.warmup_steps))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


class Trainer:
    """Model, DDP wrapper, EMA, optimizer and LR schedule, and :meth:`step` — the training step.

    ``cxrsynth bench classifier`` times this same step on random images.
    """

    def __init__(self, config: ClassifierConfig, device: torch.device, total_steps: int, *, world: int = 1,
                 weights: str | Path | None = None) -> None:
        from timm.optim import create_optimizer_v2
        from timm.utils import ModelEmaV3

        self.config, self.device, self.fast = config, device, fast_paths(device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)  # the same initial weights on every rank, no global side effect
            model = build(config)
        self.pretrained = load_pretrained(model, weights) if weights is not None else None
        model.to(device)
        if self.fast["channels_last"]:
            model = model.to(memory_format=torch.channels_last)
        self.model: Classifier = model
        self.net: torch.nn.Module = model
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        self.ema = ModelEmaV3(model, decay=config.ema_decay, use_warmup=config.ema_warmup) if config.ema_decay > 0 else None
        self.opt = create_optimizer_v2(model, opt=config.optimizer, lr=config.lr, weight_decay=config.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: lr_factor(config, s, total_steps))
        self.step_count = 0

    @property
    def eval_model(self) -> Classifier:
        """The weights evaluated and saved: the EMA's when there is one."""
        return self.ema.module if self.ema is not None else self.model

    def step(self, batch: dict[str, Any]) -> torch.Tensor:
        """One optimizer step on a batch; returns the (detached, on-device) mean masked BCE."""
        x = to_device(batch["image"], self.device, self.fast)
        y = batch["labels"].to(self.device, non_blocking=True)  # (B, 14)
        mask = batch["mask"].to(self.device, non_blocking=True)  # (B, 14)
        with autocast(self.device, self.fast):
            logits = self.net(x)  # (B, 14)
        total, count = masked_bce_sum(logits, y, mask)
        loss = total / count.clamp(min=1.0)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.opt.step()
        self.sched.step()
        self.step_count += 1
        if self.ema is not None:
            self.ema.update(self.model, step=self.step_count)
        return loss.detach()

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "ema": self.ema.module.state_dict() if self.ema is not None else None,
                "optimizer": self.opt.state_dict(), "lr_schedule": self.sched.state_dict(), "step": self.step_count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        if self.ema is not None:
            self.ema.module.load_state_dict(state["ema"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["lr_schedule"])
        self.step_count = state["step"]


@torch.no_grad()
def loss_sums(model: torch.nn.Module, batches, device: torch.device, fast: dict[str, Any]) -> tuple[float, float]:
    """``(sum of masked BCE, number of unmasked findings)`` of a model over batches (eval mode)."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), device=device, dtype=torch.float64)
    count = torch.zeros((), device=device, dtype=torch.float64)
    for batch in batches:
        with autocast(device, fast):
            logits = model(to_device(batch["image"], device, fast))
        s, n = masked_bce_sum(logits, batch["labels"].to(device), batch["mask"].to(device))
        total += s.double()
        count += n.double()
    model.train(was_training)
    return float(total), float(count)


# 2. Runs and checkpoints ----------------------------------------------------------------

def run_fingerprint(config: ClassifierConfig, data: dict[str, Any], world: int, weights_sha: str | None) -> dict[str, Any]:
    """What a checkpoint's run and a resuming run must share to continue identically.

    Every config field but :data:`RESUMABLE_CHANGES` (and ``epochs`` under a constant
    schedule, so that a finished run can be extended), the data, the number of processes
    and the initial weights' sha256.
    """
    skip = set(RESUMABLE_CHANGES) | ({"epochs"} if config.schedule == "constant" else set())
    fp = {k: v for k, v in config.to_dict().items() if k not in skip}
    return {"config": fp, "data": data, "world": world, "weights": weights_sha}


def _diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k} {a!r} -> {b!r}")
    return out


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _gather(obj: Any, world: int) -> list[Any]:
    """Every rank's ``obj`` (a collective when ``world > 1``)."""
    if world == 1:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _all_sum(values: list[float], device: torch.device, world: int) -> list[float]:
    if world == 1:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def data_record(root: Path, name: str, split: str, tune_split: str | None, train_rows: pd.DataFrame,
                tune_rows: pd.DataFrame | None) -> dict[str, Any]:
    """The ``data`` entry of ``classifier.json``: manifest name and version, splits, the rows' datasets."""
    frames = [train_rows] + ([tune_rows] if tune_rows is not None else [])
    both = pd.concat([f[["dataset", "version"]] for f in frames], ignore_index=True)
    datasets = {str(d): ",".join(sorted(str(v) for v in g["version"].dropna().unique()))
                for d, g in both.groupby("dataset", sort=True)}
    return {
        "name": name,
        "version": str(manifest.read_meta(root, name).get("version")),
        "split": split,
        "tune_split": tune_split,
        "datasets": datasets,
        "train_images": len(train_rows),
        "tune_images": 0 if tune_rows is None else len(tune_rows),
    }


def check_splits(split: str, tune_split: str | None) -> None:
    """Refuse a tuning split that is the training split or shares a split with it (``train,tune``)."""
    if tune_split is None:
        return
    names = lambda text: {s.strip() for s in text.split(",") if s.strip()}  # noqa: E731 (loader.select's rule)
    shared = sorted(names(split) & names(tune_split))
    if shared:
        raise CxrsynthError(f"the tuning split {tune_split!r} overlaps the training split {split!r} (both hold "
                            f"{', '.join(shared)}): the best epoch would be picked by a loss on the rows it was trained "
                            "on. Tune on another split, or give no tuning split (--tune-split none) to keep the last epoch")


def warn_unlearnable(where: str, frame: pd.DataFrame) -> None:
    """Warn (:class:`CxrsynthWarning`) about findings with no positive or no negative training label.

    Training still runs (small pilot sets have them), but such a finding's output learns a
    constant: its AUROC on any test set says nothing about the model, and the user should
    know before reading one.
    """
    import warnings

    from cxrsynth.errors import CxrsynthWarning

    values, mask = loader.label_arrays(frame)
    known = mask.astype(bool)
    positive = ((values == 1) & known).sum(axis=0)
    negative = ((values == 0) & known).sum(axis=0)
    for kind, counts in (("positive", positive), ("negative", negative)):
        lacking = [f for f, n in zip(FINDINGS, counts) if n == 0]
        if lacking:
            warnings.warn(f"{where}: {len(lacking)} finding(s) have no {kind} training label ({', '.join(lacking)}): "
                          "their outputs can only learn a constant", CxrsynthWarning, stacklevel=2)


def check_data(name: str, split: str, rows: pd.DataFrame, tune_split: str | None, tune_rows: pd.DataFrame | None,
               exclude_uncertain: bool) -> None:
    """Refuse training rows that leave a finding without a certain label, and tuning rows without any.

    A row's uncertain findings are out of the loss (the mask), so a finding uncertain in
    every training row would keep its initial output; with uncertain images excluded, rows
    whose every image has an uncertain finding leave nothing to train on.
    """
    for which, part, frame in (("training", split, rows), ("tuning", tune_split, tune_rows)):
        if frame is None:
            continue
        where = f"{name}/{part}"
        if frame.empty:  # loader.select refuses a split without rows: here exclusion emptied it
            raise CxrsynthError(f"{where}: no {which} rows without an uncertain finding: every image has one, and "
                                "uncertain images are excluded (the paper's rule); --uncertain mask keeps them and "
                                "leaves only their uncertain findings out of the loss")
        if which == "training":
            warn_unlearnable(where, frame)
        if exclude_uncertain:
            continue  # every finding of every row kept is certain
        _, mask = loader.label_arrays(frame)
        certain = mask.sum(axis=0)  # (14,) certain labels per finding
        if certain.sum() == 0:
            raise CxrsynthError(f"{where}: every finding of all {len(frame)} {which} rows is uncertain, so with "
                                "--uncertain mask no label is left to learn or tune on")
        none = [f for f, n in zip(FINDINGS, certain) if n == 0]
        if none and which == "training":
            raise CxrsynthError(f"{where}: {', '.join(none)} uncertain in all {len(frame)} training rows: with --uncertain "
                                f"mask {'that finding has' if len(none) == 1 else 'those findings have'} no label to "
                                "learn from, and the model's output for it would stay at its initial weights")


@dataclass
class _Progress:
    """What the loop reports through the callback (rank 0 only)."""

    callback: Callable[[dict[str, Any]], None] | None
    enabled: bool

    def __call__(self, **event: Any) -> None:
        if self.enabled and self.callback is not None:
            self.callback(event)


# 3. The loop ------------------------------------------------------------------------------

def finished(epochs_done: int, best: dict[str, Any], config: ClassifierConfig) -> bool:
    """All epochs done, or (with ``patience``) that many epochs without a better tuning loss."""
    if epochs_done >= config.epochs:
        return True
    return bool(config.patience and best["epoch"] is not None and best["tune_loss"] is not None
                and epochs_done - best["epoch"] >= config.patience)


def train(
    root: str | Path,
    name: str,
    config: ClassifierConfig,
    out: str | Path,
    *,
    split: str = "train",
    tune_split: str | None = "tune",
    preset: str | None = None,
    weights: str | Path | None = None,
    device: str | None = None,
    resume: bool = True,
    callback: Callable[[dict[str, Any]], None] | None = None,
    stop_after: int | None = None,
    checkpoint_dir: str | Path | None = None,
) -> dict[str, Any] | None:
    """Train (or resume) a classifier on ``name``'s ``split``; pick the epoch by ``tune_split``'s loss.

    Args:
        root: Project root.
        name: Dataset or mix to train on.
        config: The resolved configuration (a preset with overrides).
        out: Output directory (weights, classifier.json, checkpoints/).
        split: Training split.
        tune_split: Tuning split (``None``: no tuning loss; the last epoch is kept).
        preset: Preset name recorded in classifier.json (default ``config.name``).
        weights: Local pretrained weights for the initialisation (never downloaded).
        device: ``cpu``, ``cuda``, ``cuda:1``; default CUDA when available.
        resume: Continue from ``out/checkpoints/latest.pt`` when present (same run only).
        callback: Called on rank 0 with events ``{"event": "start" | "step" | "epoch", ...}``.
        stop_after: Return after this many epochs of this call, checkpointed but without
            the final outputs (as if killed; for tests and time-sliced jobs).
        checkpoint_dir: Folder of the resume state, the best epoch's weights and ``log.jsonl``
            (default ``out/checkpoints``). The log records wall-clock rates, so a pipeline
            that wants ``out`` byte-reproducible keeps them elsewhere (the study's cells:
            ``data/checkpoints/<cell>``, which also survives DVC removing a stage's outputs).

    Returns:
        The ``classifier.json`` dict once all epochs are done (None when stopped early).
    """
    root, out = Path(root), Path(out)
    if out.exists() and not out.is_dir():
        raise CxrsynthError(f"--out {out} is a file; the classifier is written to a folder (choose another --out)")
    dist = runtime.distributed()
    dev = runtime.device(device)
    fast = fast_paths(dev)
    report = _Progress(callback, dist.is_main)

    # 1. Data: the loader's fixed epoch length makes every rank take the same number of steps.
    check_splits(split, tune_split)
    train_rows = loader.select(root, name, split, exclude_uncertain=config.exclude_uncertain)
    tune_rows = loader.select(root, name, tune_split, exclude_uncertain=config.exclude_uncertain) if tune_split else None
    check_data(name, split, train_rows, tune_split, tune_rows, config.exclude_uncertain)
    data = data_record(root, name, split, tune_split, train_rows, tune_rows)
    common = dict(image_size=config.image_size, seed=config.seed, workers=config.workers, streams=config.streams,
                  pin_memory=fast["pin_memory"])
    train_data = loader.ShardLoader(root, train_rows, loader.LoaderConfig(
        batch_size=config.batch_size, train=True, augment=loader.Augment() if config.augment else None,
        shuffle_buffer=config.shuffle_buffer, **common), rank=dist.rank, world=dist.world)
    tune_data = loader.ShardLoader(root, tune_rows, loader.LoaderConfig(
        batch_size=config.batch_size, train=False, augment=None, **common),
        rank=dist.rank, world=dist.world) if tune_rows is not None else None
    per_epoch = len(train_data)

    # 2. State, or the checkpoint of the same run.
    weights_sha = _sha256(Path(weights)) if weights is not None else None
    run = run_fingerprint(config, {k: data[k] for k in ("name", "version", "split", "tune_split")}, dist.world, weights_sha)
    ck = Path(checkpoint_dir) if checkpoint_dir is not None else out / CHECKPOINTS
    ck_path = ck / LATEST
    with checkpoints.forked_rng(dev):  # the RNG policy of cxrsynth.checkpoints
        trainer = Trainer(config, dev, config.epochs * per_epoch, world=dist.world, weights=weights)
        checkpoints.seed_run(config.seed, dist.rank)  # dropout / drop-path draws
        epoch, position, history = 0, 0, []
        best: dict[str, Any] = {"epoch": None, "tune_loss": None, "file": None}
        partial = (0.0, 0)  # loss sum and batches of an epoch checkpointed midway
        seen_images, seen_keys = 0, set()
        if resume and ck_path.is_file():
            state = checkpoints.load(ck_path, CHECKPOINT_KEYS, dev)
            diffs = _diff(state["run"], run)
            if diffs:
                raise CxrsynthError(f"{ck_path} belongs to another run ({'; '.join(diffs)}); "
                                    "pass --no-resume to start over, or another --out")
            if state["best"]["file"] and not (ck / state["best"]["file"]).is_file():
                raise CxrsynthError(f"{ck_path} refers to {state['best']['file']}, which is missing")
            trainer.load_state_dict(state["trainer"])
            checkpoints.set_rng_state(state["rng"][dist.rank], dev)
            epoch, position, history, best = state["epoch"], state["position"], state["history"], state["best"]
            partial = tuple(state["partial"][dist.rank])
            seen_images, keys = state["data_seen"][dist.rank]
            seen_keys = set(keys)
        # the history a batch job reads (step, epoch, loss, lr; one line per epoch with the tuning loss), kept up
        # to the checkpoint's step on resume, so each step is written once however often the run is killed
        log = JsonlLog(ck / LOG_FILE, resume_from=trainer.step_count if ck_path.is_file() and resume else None) \
            if dist.is_main else None
        report(event="start", epochs=config.epochs, steps_per_epoch=per_epoch, epoch=epoch, position=position,
               step=trainer.step_count, train_images=data["train_images"], tune_images=data["tune_images"],
               resumed=trainer.step_count > 0, world=dist.world)

        def save_checkpoint(loss_sum: float, batches: int) -> None:
            mine = (checkpoints.rng_state(dev), (loss_sum, batches), (seen_images, sorted(seen_keys)))
            ranks = _gather(mine, dist.world)
            checkpoints.check_loss([r[1][0] for r in ranks], f"epoch {epoch + 1}, step {trainer.step_count}", config.lr)
            if not dist.is_main:
                return
            checkpoints.save({
                "run": run, "trainer": trainer.state_dict(), "epoch": epoch, "position": position,
                "history": history, "best": best, "rng": [r[0] for r in ranks], "partial": [r[1] for r in ranks],
                "data_seen": [r[2] for r in ranks], "cxrsynth": __version__,
            }, ck_path)
            for old in ck.glob("best-epoch-*.safetensors"):  # only after the checkpoint no longer needs them
                if old.name != best["file"]:
                    old.unlink()

        # 3. Epochs.
        done_now = 0
        while not finished(epoch, best, config) and (stop_after is None or done_now < stop_after):
            trainer.net.train()
            loss_sum = torch.zeros((), device=dev, dtype=torch.float64)
            loss_sum += partial[0]
            batches = partial[1]
            t_last, images_since = time.perf_counter(), 0
            t_epoch = t_last
            for batch in train_data.batches(epoch, start=position):
                loss = trainer.step(batch)
                loss_sum += loss.double()
                batches += 1
                position += 1
                seen_images += len(batch["key"])
                seen_keys.update(batch["key"])
                images_since += len(batch["key"]) * dist.world
                step = trainer.step_count
                if dist.is_main and (step % config.log_every == 0 or position == per_epoch):
                    now = time.perf_counter()
                    mean, rate = float(loss_sum) / batches, images_since / max(now - t_last, 1e-9)  # the readout's sync
                    report(event="step", step=step, epoch=epoch + 1, position=position, loss=mean, images_per_s=rate)
                    if log is not None:
                        log.write(step=step, epoch=epoch + 1, loss=mean, lr=trainer.sched.get_last_lr()[0],
                                  images_per_s=round(rate, 2))
                    t_last, images_since = now, 0
                if config.checkpoint_every and step % config.checkpoint_every == 0 and position < per_epoch:
                    save_checkpoint(float(loss_sum), batches)
            # 3b. Epoch end: train loss over ranks, tuning loss of the EMA weights, best so far.
            total, count = _all_sum([float(loss_sum), float(batches)], dev, dist.world)
            train_loss = total / max(count, 1.0)
            tune_loss = None
            if tune_data is not None:
                s, n = loss_sums(trainer.eval_model, tune_data.batches(0), dev, fast)
                s, n = _all_sum([s, n], dev, dist.world)
                tune_loss = s / max(n, 1.0)
            checkpoints.check_loss([train_loss] + ([tune_loss] if tune_loss is not None else []),
                                   f"the end of epoch {epoch + 1}", config.lr)  # every rank: the sums are all-reduced
            epoch += 1
            history.append({"epoch": epoch, "train_loss": train_loss, "tune_loss": tune_loss})
            if log is not None:
                log.write(step=trainer.step_count, epoch=epoch, train_loss=train_loss, tune_loss=tune_loss)
            improved = tune_loss is None or best["tune_loss"] is None or tune_loss < best["tune_loss"]
            if improved:
                best = {"epoch": epoch, "tune_loss": tune_loss, "file": f"best-epoch-{epoch:04d}.safetensors"}
                if dist.is_main:
                    save_weights(trainer.eval_model, ck / best["file"])
            position, partial = 0, (0.0, 0)
            save_checkpoint(0.0, 0)
            done_now += 1
            report(event="epoch", epoch=epoch, epochs=config.epochs, train_loss=train_loss, tune_loss=tune_loss,
                   best_epoch=best["epoch"], best_tune_loss=best["tune_loss"], seconds=time.perf_counter() - t_epoch)

    if not finished(epoch, best, config):
        return None
    # 4. The outputs: the best epoch's weights and classifier.json.
    seen = _gather((seen_images, sorted(seen_keys)), dist.world)
    meta = None
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / (WEIGHTS + ".tmp")
        shutil.copyfile(ck / best["file"], tmp)
        os.replace(tmp, out / WEIGHTS)
        meta = {
            "preset": preset or config.name,
            "config": config.to_dict(),
            "data": data,
            "best": {"epoch": best["epoch"], "tune_loss": best["tune_loss"]},
            "history": history,
            "classifier_id": classifier_id(out / WEIGHTS),
            "cxrsynth": __version__,
            "init_weights": None if weights is None else {"file": str(weights), "sha256": weights_sha},
            "runtime": {"device": dev.type, "world": dist.world, "threads": runtime.cpu_threads()},
            "trained_steps": trainer.step_count,
            "stopped_early": epoch < config.epochs,
            "data_seen": {
                "images_per_rank": [n for n, _ in seen],
                "distinct_keys_per_rank": [len(k) for _, k in seen],
                "distinct_keys": len(set().union(*(set(k) for _, k in seen))),
            },
        }
        cards.write(out, *classifier_card(meta))
        for name, doc in ((TIMM_CONFIG, timm_config(config)), (META, meta)):  # classifier.json last: it marks a complete folder
            tmp = out / (name + ".tmp")
            tmp.write_text(json.dumps(doc, indent=2, sort_keys=False) + "\n")
            os.replace(tmp, out / name)
    if dist.world > 1:
        from torch import distributed as tdist

        tdist.barrier()  # rank 0 has written the outputs when any rank returns
    return meta

