"""The generator's training loop: CFG dropout, EMA, AdamW, exact resume, DDP.

The loop consumes batches ``{"image": uint8 (B, 1, S, S), "cond": float32 (B, 22)}``
from ``data(epoch)`` (a :class:`cxrsynth.loader.ShardLoader` in :func:`train_dataset`,
the library function behind the CLI; lists in tests). Every random draw of the loop
(timesteps, noise, condition dropout) comes from one ``torch.Generator`` seeded with
``seed + rank``; the network's own layers draw from the global generators, forked and
seeded per rank for the run (the RNG policy of :mod:`cxrsynth.checkpoints`, shared with
the classifier's trainer). All of them are checkpointed together with the model, the EMA,
the optimizer, the LR schedule, the step and the position in the epoch; resuming skips
the batches already seen in that epoch, so a resumed run on CPU continues bit-identically
(tested). On GPU, cuDNN/atomics make runs reproducible only up to floating-point
nondeterminism.

Checkpoints go to ``out/checkpoints/`` unless ``checkpoints=`` names another directory;
a pipeline keeps them outside its DVC output, so that DVC neither caches optimizer state
with every generator version nor deletes it before a rerun (a killed ``dvc repro``
resumes). Since such a directory outlives the output it trained, every checkpoint
records the run it belongs to (:func:`run_fingerprint`: the settings that must not
change mid-run) and resuming another run fails, naming what differs; only ``steps``
(to extend a run) and the logging/saving cadence may change. The CLI gives every run
its own directory under a checkpoint root (:func:`run_checkpoints`, named by
:func:`run_id`), so a changed setting starts a new run beside the old one.

A loss that becomes NaN or infinite stops the run (:func:`cxrsynth.checkpoints.check_loss`):
at the next readout on one process, and under DDP at the next checkpoint, where every rank's
flag is gathered so all ranks stop alike; no checkpoint and no generator is written from it.

Fast paths (chosen in :func:`_fast_paths`, one place): bf16 autocast, channels_last,
fused AdamW and :func:`cxrsynth.runtime.cuda_fast_paths` (TF32, autotuned cuDNN) on
CUDA only; fp32 elsewhere.

DDP (``torchrun``, joined through :func:`cxrsynth.runtime.distributed`; gloo on CPU,
nccl on CUDA): every rank builds the same initial
weights, draws its noise from ``seed + rank`` and reads its own share of the data
(``data(epoch)`` must already be sharded by rank and yield the same number of batches
on every rank, else the gradient all-reduce of the longer rank would wait forever;
:func:`train_dataset`'s loader gives every rank ``rows // (world * batch)`` batches). When batches carry their ``key`` list,
the run records which images each rank consumed (``data_seen`` in ``generator.json``:
images and distinct keys per rank, distinct keys over all ranks; checkpointed, so a
resumed run reports the whole run), so a user can check
that ranks read disjoint shares (within an epoch: sum of per-rank distinct keys =
distinct keys overall) and how much of the dataset a run covered.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from timm.utils import ModelEmaV3

from cxrsynth import __version__, runtime
from cxrsynth import checkpoints as checkpoints_lib
from cxrsynth.config import MAX_BATCH, MAX_TRAIN_STEPS, Config, setting
from cxrsynth.diffusion.losses import ScheduleTensors, diffusion_loss
from cxrsynth.diffusion.model import ConditionalUNet, save_generator
from cxrsynth.diffusion.presets import GeneratorConfig
from cxrsynth.diffusion.schedule import training_scheduler
from cxrsynth.errors import CxrsynthError
from cxrsynth.progress import LOG_FILE, JsonlLog, Ticker, stderr_is_terminal

CHECKPOINTS = "checkpoints"
LATEST = "latest.pt"
# TrainConfig fields a resumed run may change: they do not alter the trajectory.
RESUMABLE_CHANGES = ("steps", "save_every", "log_every", "keep_checkpoints")


@dataclass
class TrainConfig(Config):
    """Training hyper-parameters (written to ``train.json`` beside the output).

    Attributes:
        steps: Optimizer steps to reach (total, including resumed ones).
        batch_size: Images per step per process.
        lr: Peak AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: Linear LR warm-up steps.
        ema_decay: EMA decay (paper 0.9999), with timm's warm-up.
        grad_clip: Max gradient norm (0 disables).
        save_every: Checkpoint every N steps (and at the end).
        log_every: Loss/throughput readout every N steps (the only GPU syncs).
        seed: Seed of the training generator (timesteps, noise, dropout).
        keep_checkpoints: Number of step checkpoints kept (besides ``latest.pt``).
    """

    kind = "generator training config"  # how errors name these settings (a class attribute, not a field)

    steps: int = setting(1000, ge=1, le=MAX_TRAIN_STEPS)
    batch_size: int = setting(16, ge=1, le=MAX_BATCH)
    lr: float = setting(1e-4, gt=0)
    weight_decay: float = setting(0.0, ge=0)
    warmup_steps: int = setting(100, ge=0)
    ema_decay: float = setting(0.9999, ge=0, le=1)
    grad_clip: float = setting(1.0, ge=0)
    save_every: int = setting(500, ge=1)
    log_every: int = setting(10, ge=1)
    seed: int = 0
    keep_checkpoints: int = setting(2, ge=0)


def _fast_paths(device: torch.device) -> dict[str, Any]:
    """The one place where training speed options are chosen.

    CUDA: bf16 autocast (no loss scaling needed), channels_last (cuDNN NHWC kernels),
    fused AdamW, TF32 matmuls and autotuned cuDNN algorithms (a GPU run repeats only up to
    floating-point nondeterminism anyway). CPU: fp32 throughout, so runs are exact and
    resumable.
    """
    cuda = device.type == "cuda"
    if cuda:
        runtime.cuda_fast_paths(deterministic=False)
    return {
        "autocast_dtype": torch.bfloat16 if cuda else None,
        "channels_last": cuda,
        "fused_adamw": cuda,
    }


def latest_checkpoint(checkpoints: Path) -> Path | None:
    """``checkpoints/latest.pt`` (a checkpoint directory) if a run left one."""
    p = Path(checkpoints) / LATEST
    return p if p.exists() else None


def run_fingerprint(train_config: TrainConfig, data_version: str | None, world: int) -> dict[str, Any]:
    """What a checkpoint's run and a resuming run must share to continue identically.

    Every :class:`TrainConfig` field except :data:`RESUMABLE_CHANGES`, the data version
    and the number of processes (each rank has its own generator and data share).
    """
    fp = {k: v for k, v in train_config.to_dict().items() if k not in RESUMABLE_CHANGES}
    return {**fp, "data_version": data_version, "world": world}


def run_id(config: GeneratorConfig, run: dict[str, Any]) -> str:
    """A short, stable name for a run: hash of its generator config and :func:`run_fingerprint`."""
    blob = json.dumps({"config": config.to_dict(), "run": run}, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def run_checkpoints(root: Path, config: GeneratorConfig, train_config: TrainConfig,
                    data_version: str | None, world: int) -> Path:
    """``root/<run_id>``: the checkpoint directory of this run under a shared root.

    What ``cxrsynth generator train`` uses: a run resumes from its own directory, and a
    changed setting (say the learning rate in ``params.yaml`` before a ``dvc repro``)
    starts a new run beside the old one instead of failing or overwriting it.
    """
    return Path(root) / run_id(config, run_fingerprint(train_config, data_version, world))


#: What every training checkpoint holds (written by ``save_checkpoint`` in :func:`train`).
CHECKPOINT_KEYS = ("config", "step", "epoch", "batch_in_epoch", "model", "ema", "optimizer", "lr_schedule", "rng")


def load_checkpoint(path: Path, device: str | torch.device = "cpu") -> dict[str, Any]:
    """A generator training checkpoint, loaded safely (:func:`cxrsynth.checkpoints.load`)."""
    return checkpoints_lib.load(path, CHECKPOINT_KEYS, device)


def _check_resumable(ckpt_path: Path, state: dict[str, Any], config: GeneratorConfig, run: dict[str, Any]) -> None:
    """Raise a :class:`CxrsynthError` unless the checkpoint comes from the same generator and run.

    Checkpoints written before the run fingerprint existed are checked on the generator
    config only.
    """
    advice = "pass a new --checkpoints dir, or --no-resume to start over"
    if state["config"] != config.to_dict():
        raise CxrsynthError(f"{ckpt_path} was trained with another generator config; {advice}")
    old = state.get("run")
    if old is None:
        return
    diffs = [f"{k} {old.get(k)!r} -> {run.get(k)!r}" for k in sorted(set(old) | set(run)) if old.get(k) != run.get(k)]
    if diffs:
        raise CxrsynthError(f"{ckpt_path} belongs to another run ({'; '.join(diffs)}); {advice}")


@checkpoints_lib.isolated_rng
def train(
    config: GeneratorConfig,
    train_config: TrainConfig,
    data: Callable[[int], Iterable[dict[str, torch.Tensor]]],
    out: Path,
    *,
    checkpoints: Path | None = None,
    resume: bool | Path = False,
    device: str | torch.device | None = None,
    data_version: str | None = None,
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
) -> ConditionalUNet:
    """Train (or resume training) a generator and save its EMA weights to ``out``.

    Args:
        config: Network and diffusion configuration (a preset).
        train_config: Optimisation settings.
        data: ``epoch -> iterable of batches`` for this process (already sharded by
            rank); called again with epoch + 1 when exhausted.
        out: Output directory: EMA generator (``save_pretrained``), ``train.json``.
        checkpoints: Checkpoint directory (``latest.pt``, ``step-*.pt``, the history
            ``log.jsonl``: one line per logged step with step, epoch, loss, lr, images/s); defaults to
            ``out / "checkpoints"``. Keep it outside a DVC output.
        resume: True to continue from ``checkpoints/latest.pt`` when present, or a
            checkpoint path. The checkpoint must come from the same generator config and
            :func:`run_fingerprint` (else a :class:`CxrsynthError` naming each difference).
        device: Default :func:`cxrsynth.runtime.device` (CUDA, ``cuda:LOCAL_RANK`` under
            torchrun, when available, else CPU).
        data_version: Recorded in ``generator.json``.
        progress: Show progress on rank 0: a rich bar on a terminal, plain lines
            (:class:`cxrsynth.progress.Ticker`) when stderr is a file or pipe.
        on_step: Called as ``on_step(step, loss)`` at each log interval.

    Returns:
        The EMA network (eval mode).
    """
    tc = train_config
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CxrsynthError(f"{out} is a file, not a generator folder")
    ck = Path(checkpoints) if checkpoints is not None else out / CHECKPOINTS
    dist_info = runtime.distributed()
    device = runtime.device(None if device is None else str(device))
    fast = _fast_paths(device)
    is_main = dist_info.is_main

    # 1. Model, EMA, optimiser, LR schedule; every random draw from `gen`.
    gen = torch.Generator(device="cpu").manual_seed(tc.seed)
    checkpoints_lib.seed_run(tc.seed, dist_info.rank)  # the network's own draws (dropout); forked by @isolated_rng
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(tc.seed)  # initial weights: same on every rank, no global side effect
        model = ConditionalUNet.build(config)
    model.to(device)
    if fast["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    ema = ModelEmaV3(model, decay=tc.ema_decay, use_warmup=True)
    opt = torch.optim.AdamW(
        model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay, betas=(0.9, 0.999),
        fused=fast["fused_adamw"] or None,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, tc.warmup_steps)))
    step, epoch, batch_in_epoch = 0, 0, 0
    seen_keys: set[str] = set()  # this rank's images, for data_seen (bounded by the dataset size)
    seen_images = 0
    run = run_fingerprint(tc, data_version, dist_info.world)

    ckpt_path = latest_checkpoint(ck) if resume is True else (Path(resume) if resume else None)
    if ckpt_path is not None:
        state = load_checkpoint(ckpt_path, device)
        _check_resumable(ckpt_path, state, config, run)
        model.load_state_dict(state["model"])
        ema.module.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["lr_schedule"])
        checkpoints_lib.set_rng_state(state["rng"][min(dist_info.rank, len(state["rng"]) - 1)], device, gen)
        step, epoch, batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        if "data_seen" in state:  # same world (fingerprint): this rank's share so far
            seen_images, keys = state["data_seen"][dist_info.rank]
            seen_keys = set(keys)
    else:
        gen.manual_seed(tc.seed + dist_info.rank)

    net: torch.nn.Module = model
    if dist_info.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    noise_sched = training_scheduler(config)
    tensors = ScheduleTensors(noise_sched.alphas_cumprod).to(device)
    T = config.num_train_timesteps
    out.mkdir(parents=True, exist_ok=True)
    if is_main:
        (out / "train.json").write_text(json.dumps(
            {"generator": config.to_dict(), "train": tc.to_dict(), "world": dist_info.world,
             "data_version": data_version, "cxrsynth": __version__}, indent=2) + "\n")

    def save_checkpoint() -> None:
        mine = (checkpoints_lib.rng_state(device, gen), (seen_images, sorted(seen_keys)), bool(finite))
        ranks: list[Any] = [mine]
        if dist_info.world > 1:
            import torch.distributed as dist

            ranks = [None] * dist_info.world
            dist.all_gather_object(ranks, mine)
        # every rank decides alike (the flags are gathered), so no rank waits for a stopped one
        checkpoints_lib.check_loss([0.0 if ok else math.nan for _, _, ok in ranks], f"step {step} or before", tc.lr)
        if not is_main:
            return
        ck.mkdir(parents=True, exist_ok=True)
        state = {
            "config": config.to_dict(), "train": tc.to_dict(), "run": run, "step": step, "epoch": epoch,
            "batch_in_epoch": batch_in_epoch, "model": model.state_dict(),
            "ema": ema.module.state_dict(), "optimizer": opt.state_dict(),
            "lr_schedule": sched.state_dict(), "rng": [r for r, _, _ in ranks],
            "data_seen": [s for _, s, _ in ranks],
        }
        checkpoints_lib.save(state, ck / LATEST)
        if tc.keep_checkpoints > 0:
            this = f"step-{step:08d}.pt"
            checkpoints_lib.save(state, ck / this)
            # Step files past this step come from a run this one replaced (--no-resume, or a
            # resume from an earlier file); left in place they would outrank the new ones.
            files = sorted(ck.glob("step-*.pt"))
            stale = [p for p in files if p.name > this]
            ours = [p for p in files if p.name <= this]
            for old in stale + ours[: -tc.keep_checkpoints]:
                old.unlink()

    # 2. The loop; the history (step, loss, lr) beside the checkpoints, kept up to the resumed step.
    bar = _progress(progress and is_main, total=tc.steps, done=step)
    history = JsonlLog(ck / LOG_FILE, resume_from=step if ckpt_path is not None else None) if is_main else None
    autocast = torch.autocast(device.type, dtype=fast["autocast_dtype"] or torch.float32,
                              enabled=fast["autocast_dtype"] is not None)
    running = torch.zeros((), device=device)
    finite = torch.ones((), device=device, dtype=torch.bool)  # every loss so far finite; read at checkpoints (a sync there anyway)
    n_running, images, t_last = 0, 0, time.perf_counter()
    model.train()
    while step < tc.steps:
        batches = iter(data(epoch))
        for _ in range(batch_in_epoch):  # fast-forward to the resume position
            next(batches, None)
        for batch in batches:
            if step >= tc.steps:
                break
            x0 = batch["image"].to(device, non_blocking=True).float() / 127.5 - 1.0  # (B, 1, S, S)
            cond = batch["cond"].to(device, non_blocking=True).float()  # (B, 22)
            b = x0.shape[0]
            seen_images += b
            seen_keys.update(batch.get("key", ()))
            # 2a. t ~ U{0..T-1}, eps ~ N(0, I), CFG dropout mask — all from `gen`.
            t = torch.randint(0, T, (b,), generator=gen).to(device)
            noise = torch.randn(x0.shape, generator=gen).to(device)
            drop = (torch.rand(b, generator=gen) < config.cond_drop_prob).to(device)
            # 2b. x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps.
            ab = tensors.alpha_bar[t][:, None, None, None]
            xt = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
            if fast["channels_last"]:
                xt = xt.contiguous(memory_format=torch.channels_last)
            with autocast:
                output = net(xt, t, cond, drop)
            loss = diffusion_loss(output.float(), x0, xt, noise, t, tensors, config).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if tc.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            opt.step()
            sched.step()
            step += 1
            batch_in_epoch += 1
            ema.update(model, step=step)
            running += loss.detach()
            finite &= torch.isfinite(loss.detach())
            n_running += 1
            images += b * dist_info.world
            if step % tc.log_every == 0 or step == tc.steps:
                value = (running / n_running).item()  # the only sync
                if dist_info.world == 1:  # under DDP the gathered check of the next checkpoint stops every rank alike
                    checkpoints_lib.check_loss([value], f"step {step}", tc.lr)
                now = time.perf_counter()
                rate = images / max(now - t_last, 1e-9)
                running.zero_(); n_running, images, t_last = 0, 0, now
                bar.update(step, value, rate)
                if history is not None:
                    history.write(step=step, epoch=epoch, loss=value, lr=sched.get_last_lr()[0], images_per_s=rate)
                if on_step is not None:
                    on_step(step, value)
            if step % tc.save_every == 0 or step == tc.steps:
                save_checkpoint()
        else:
            epoch += 1
            batch_in_epoch = 0
            if step == 0 and batch_in_epoch == 0 and epoch > 1:
                raise CxrsynthError("the training data yielded no batches")
            continue
        break
    bar.close()
    final = ema.module.eval()
    data_seen = _data_seen(seen_images, seen_keys, dist_info)  # a collective: every rank calls it
    if is_main:
        extra: dict[str, Any] = {"trained_steps": step, "ema_decay": tc.ema_decay, "world": dist_info.world,
                                 "run_id": run_id(config, run)}
        if data_seen is not None:
            extra["data_seen"] = data_seen
        save_generator(final, out, data_version=data_version, extra=extra)
    return final


def train_dataset(
    root: str | Path,
    name: str,
    config: GeneratorConfig,
    train_config: TrainConfig,
    out: str | Path,
    *,
    split: str | None = "train",
    checkpoints: str | Path | None = None,
    resume: bool = True,
    device: str | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
    progress: bool = True,
) -> ConditionalUNet:
    """Train (or resume) a generator on dataset ``name``'s ``split``: ``cxrsynth generator train``.

    The dataset side of :func:`train`, as :func:`cxrsynth.classify.train.train` is the
    classifier's: the rows without an uncertain finding (the paper's training rule;
    :func:`cxrsynth.loader.select`), streamed by a :class:`cxrsynth.loader.ShardLoader` in
    the generator's order (``order="buffer"``: a seed trains the same bytes as ever),
    this process's share under DDP (``torchrun``); every rank yields the same number of
    batches per epoch, so no gradient all-reduce waits. Checkpoints go to
    ``checkpoints/<run id>`` (:func:`run_checkpoints`; ``checkpoints`` defaults to
    ``out/checkpoints``).

    Args:
        root: Project root.
        name: Dataset to train on (its manifest and shards).
        config: Network and diffusion configuration (a preset with overrides).
        train_config: Optimisation settings (its seed also orders the data).
        out: Generator directory (EMA weights, generator.json, train.json).
        split: Split to train on (``None``: every row).
        checkpoints: Checkpoint root; each run writes to ``checkpoints/<run id>``.
        resume: Continue this run from its ``latest.pt`` when present.
        device: ``cpu``, ``cuda``, ``cuda:1``; default CUDA when available.
        callback: Called on rank 0 before training with ``{"event": "start",
            "checkpoints": Path, "resuming": bool, "other_runs": [names under the root]}``.
        progress: Show progress on rank 0 (as :func:`train`).

    Returns:
        The EMA network (eval mode); rank 0 has written it to ``out`` when any rank returns.
    """
    from cxrsynth import loader, manifest

    root, out, tc = Path(root), Path(out), train_config
    dist_info = runtime.distributed()

    # 1. Data: this rank's share, the same number of batches on every rank.
    rows = loader.select(root, name, split, exclude_uncertain=True)
    if len(rows) < tc.batch_size * dist_info.world:
        raise CxrsynthError(f"{name}/{split}: {len(rows)} trainable images, fewer than one global batch "
                            f"({tc.batch_size * dist_info.world})")
    data = loader.ShardLoader(root, rows, loader.LoaderConfig(
        batch_size=tc.batch_size, image_size=config.image_size, train=True, augment=None, seed=tc.seed,
        order="buffer", cond=True, uint8=True), rank=dist_info.rank, world=dist_info.world)
    data_version = f"{name}@{manifest.read_meta(root, name)['version']}"

    # 2. This run's checkpoint directory under the root.
    ck_root = Path(checkpoints) if checkpoints is not None else out / CHECKPOINTS
    ck = run_checkpoints(ck_root, config, tc, data_version, dist_info.world)
    if dist_info.is_main and callback is not None:
        others = sorted(p.name for p in ck_root.iterdir() if p.is_dir() and p != ck) if ck_root.is_dir() else []
        callback({"event": "start", "checkpoints": ck, "resuming": bool(resume and latest_checkpoint(ck)),
                  "other_runs": others})

    # 3. The loop.
    model = train(config, tc, data.batches, out, checkpoints=ck, resume=resume, device=device, data_version=data_version,
                  progress=progress)
    if dist_info.world > 1:
        import torch.distributed

        torch.distributed.barrier()  # rank 0 has written the generator when any rank returns
    return model


def _data_seen(images: int, keys: set[str], dist_info: runtime.Distributed) -> dict[str, Any] | None:
    """Images and distinct keys consumed by each rank in the run (resumes included), and overall.

    Gathers every rank's key set on every rank (``all_gather_object``), once at the
    end; None when the batches carried no keys (e.g. in-memory test data).
    """
    mine = (images, sorted(keys))
    everyone: list[Any] = [mine]
    if dist_info.world > 1:
        import torch.distributed as dist

        everyone = [None] * dist_info.world
        dist.all_gather_object(everyone, mine)
    if not any(k for _, k in everyone):
        return None
    return {
        "images_per_rank": [n for n, _ in everyone],
        "distinct_keys_per_rank": [len(k) for _, k in everyone],
        "distinct_keys": len(set().union(*(k for _, k in everyone))),
    }


class _progress:
    """Progress with loss and images/s: a rich bar on a terminal, plain lines otherwise (or nothing when disabled)."""

    def __init__(self, enabled: bool, total: int, done: int) -> None:
        self.bar = self.ticker = None
        if enabled and not stderr_is_terminal():
            self.ticker = Ticker("train", total, done=done, unit=" steps/s")
        elif enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("train"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[rate]} img/s"),
                TimeRemainingColumn(),
            )
            self.task = self.bar.add_task("train", total=total, completed=done, loss="-", rate="-")
            self.bar.start()

    def update(self, step: int, loss: float, rate: float) -> None:
        shown = f"{loss:.4f}" if math.isfinite(loss) else "nan"
        if self.ticker is not None:
            self.ticker.update(step, loss=shown, img_per_s=f"{rate:.1f}")
        if self.bar is not None:
            self.bar.update(self.task, completed=step, loss=shown, rate=f"{rate:.1f}")

    def close(self) -> None:
        if self.ticker is not None:
            self.ticker.close()
        if self.bar is not None:
            self.bar.stop()
