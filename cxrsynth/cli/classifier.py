"""`cxrsynth classifier train | predict`: thin commands over :mod:`cxrsynth.classify`.

torch and timm are imported inside the command bodies so ``cxrsynth --help`` stays instant.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from cxrsynth.cli.common import Device, Root, Threads, console, err_console, info, progress_bar, quiet, set_threads, verbose
from cxrsynth.cli.options import LazyHelp

classifier_app = typer.Typer(no_args_is_help=True, help="Train 14-finding classifiers (any timm model) and predict with them.")


class _TrainBar:
    """Progress over all steps of the run, with loss and images/s; epoch lines below it.

    A rich bar on a terminal; plain lines (:class:`cxrsynth.progress.Ticker`) when stderr is a file or
    pipe; nothing with ``--quiet``; every logged step as a line with ``--verbose``."""

    def __init__(self) -> None:
        from cxrsynth.progress import stderr_is_terminal

        self.progress: Any = None
        self.ticker: Any = None
        self.plain = not stderr_is_terminal()

    def _note(self, message: str) -> None:
        if self.progress is not None:
            self.progress.console.print(message, highlight=False)
        else:
            info(message)

    def __call__(self, event: dict[str, Any]) -> None:
        if quiet():
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        from cxrsynth.progress import Ticker

        kind = event["event"]
        if kind == "start":
            total = event["epochs"] * event["steps_per_epoch"]
            what = "resuming at epoch {} step {}".format(event["epoch"] + 1, event["step"]) if event["resumed"] else "new run"
            if self.plain:
                self.ticker = Ticker("train", total, done=event["step"], unit=" steps/s")
            else:
                self.progress = Progress(
                    TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("epoch {task.fields[epoch]}"),
                    TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[rate]} img/s"),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=err_console,
                )
                self.task = self.progress.add_task("train", total=total, completed=event["step"], epoch=event["epoch"] + 1,
                                                   loss="-", rate="-")
                self.progress.start()
            self._note(f"{event['train_images']:,} training / {event['tune_images']:,} tuning images, "
                       f"{event['steps_per_epoch']} steps per epoch on {event['world']} process(es); {what}")
        elif kind == "step":
            if self.ticker is not None:
                self.ticker.update(event["step"], epoch=event["epoch"], loss=f"{event['loss']:.4f}",
                                   img_per_s=f"{event['images_per_s']:.0f}")
            else:
                self.progress.update(self.task, completed=event["step"], epoch=event["epoch"], loss=f"{event['loss']:.4f}",
                                     rate=f"{event['images_per_s']:.0f}")
            if verbose():
                self._note(f"step {event['step']} (epoch {event['epoch']}): loss {event['loss']:.4f}, "
                           f"{event['images_per_s']:.0f} img/s")
        elif kind == "epoch":
            tune = "n/a" if event["tune_loss"] is None else f"{event['tune_loss']:.4f}"
            best = "n/a" if event["best_tune_loss"] is None else f"{event['best_tune_loss']:.4f}"
            self._note(f"epoch {event['epoch']}/{event['epochs']}: train loss {event['train_loss']:.4f}, tune loss {tune}; "
                       f"best epoch {event['best_epoch']} ({best}); {event['seconds']:.1f} s")

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
        if self.ticker is not None:
            self.ticker.close()


@classifier_app.command("train", cls=LazyHelp)
def train(
    data: Annotated[str, typer.Option("--data", help="Dataset or mix to train on (its manifest and shards).")],
    out: Annotated[Path, typer.Option("--out", help="Output directory: model.safetensors, classifier.json, checkpoints/ "
                                                    "(unless --checkpoints).")],
    preset: Annotated[str, typer.Option("--preset", help="Classifier preset: {classifier_presets}.")] = "small",
    split: Annotated[str, typer.Option("--split", help="Training split.")] = "train",
    tune_split: Annotated[Optional[str], typer.Option(
        "--tune-split", help="Tuning split: its loss picks the best epoch ('none': keep the last epoch).")] = "tune",
    model: Annotated[Optional[str], typer.Option(
        "--model", help="timm model name (replaces the preset's model and its model_kwargs).")] = None,
    epochs: Annotated[Optional[int], typer.Option("--epochs", min=1, help="Epochs at most (preset's by default).")] = None,
    patience: Annotated[Optional[int], typer.Option(
        "--patience", min=0, help="Stop after N epochs without a lower tuning loss (0: never; preset's by default).")] = None,
    batch: Annotated[Optional[int], typer.Option("--batch", min=1, help="Images per step per process.")] = None,
    image_size: Annotated[Optional[int], typer.Option("--image-size", min=8, help="Input side in pixels.")] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", min=0.0, help="Peak learning rate.")] = None,
    optimizer: Annotated[Optional[str], typer.Option("--optimizer", help="{optimizers} (preset's by default).")] = None,
    weight_decay: Annotated[Optional[float], typer.Option("--weight-decay", min=0.0, help="Weight decay.")] = None,
    schedule: Annotated[Optional[str], typer.Option("--schedule", help="{schedules} (preset's by default).")] = None,
    warmup: Annotated[Optional[int], typer.Option("--warmup", min=0, help="Linear LR warm-up steps.")] = None,
    ema: Annotated[Optional[float], typer.Option("--ema", min=0.0, max=0.999999, help="EMA decay (0: no EMA).")] = None,
    grad_clip: Annotated[Optional[float], typer.Option("--grad-clip", min=0.0, help="Max gradient norm (0: off).")] = None,
    uncertain: Annotated[Optional[str], typer.Option(
        "--uncertain", help="exclude (the paper: drop images with any uncertain finding) | mask (keep them, "
                            "uncertain findings out of the loss).")] = None,
    augment: Annotated[Optional[bool], typer.Option("--augment/--no-augment", help="Training augmentations.")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Seed of weights, data order and augmentation.")] = None,
    workers: Annotated[Optional[int], typer.Option("--workers", min=0, help="Loader worker processes per process "
                                                  "(must divide the preset's loader streams; does not change the "
                                                  "result).")] = None,
    checkpoint_every: Annotated[Optional[int], typer.Option(
        "--checkpoint-every", min=0, help="Also checkpoint every N steps inside an epoch.")] = None,
    weights: Annotated[Optional[Path], typer.Option(
        "--weights", exists=True, dir_okay=False, help="Local pretrained weights (safetensors or a torch state dict); "
                                                       "never downloaded.")] = None,
    resume: Annotated[bool, typer.Option("--resume/--no-resume", help="Continue from the checkpoints' latest.pt "
                                                                     "(same run only).")] = True,
    checkpoints: Annotated[Optional[Path], typer.Option(
        "--checkpoints", help="Folder of the resume state, the best epoch and log.jsonl (default: OUT/checkpoints).")] = None,
    device: Device = None,
    threads: Threads = None,
    root: Root = Path("."),
) -> None:
    """Train a 14-finding classifier; the epoch with the lowest tuning loss is the model.

    Single process, or DDP under ``torchrun --nproc-per-node N -m cxrsynth.cli classifier train ...``.
    """
    from cxrsynth import runtime
    from cxrsynth.classify.presets import get_preset
    from cxrsynth.classify.train import train as train_lib

    set_threads(threads)
    if uncertain not in (None, "exclude", "mask"):
        raise typer.BadParameter("expected exclude or mask", param_hint="--uncertain")
    config = get_preset(
        preset, model=model, epochs=epochs, patience=patience, batch_size=batch, image_size=image_size, lr=lr, optimizer=optimizer,
        weight_decay=weight_decay, schedule=schedule, warmup_steps=warmup, ema_decay=ema, grad_clip=grad_clip,
        exclude_uncertain=None if uncertain is None else uncertain == "exclude", augment=augment, seed=seed,
        workers=workers, checkpoint_every=checkpoint_every,
    )
    dist = runtime.distributed()
    bar = _TrainBar() if dist.is_main else None
    try:
        meta = train_lib(root, data, config, out, split=split, tune_split=None if tune_split in (None, "none") else tune_split,
                         preset=preset, weights=weights, device=device, resume=resume, callback=bar,
                         checkpoint_dir=checkpoints)
    finally:
        if bar is not None:
            bar.close()
    if dist.world > 1:
        import torch.distributed

        torch.distributed.destroy_process_group()
    if meta is not None:
        best = meta["best"]
        tune = "n/a" if best["tune_loss"] is None else f"{best['tune_loss']:.4f}"
        console.print(f"classifier [bold]{meta['classifier_id']}[/bold] written to [bold]{out}[/bold]: best epoch "
                      f"{best['epoch']} of {len(meta['history'])} (tune loss {tune}), preset {preset}, "
                      f"{meta['data']['train_images']:,} training images of {data}", highlight=False)


@classifier_app.command("predict")
def predict(
    model_dir: Annotated[Path, typer.Option(
        "--model", exists=True, file_okay=False, help="Classifier directory (classifier train --out).")],
    data: Annotated[str, typer.Option("--data", help="Dataset or mix to predict (any site).")],
    out: Annotated[Path, typer.Option("--out", help="Predictions parquet to write.")],
    split: Annotated[Optional[str], typer.Option("--split", help="Split to predict ('all': every row).")] = "test",
    batch: Annotated[Optional[int], typer.Option("--batch", min=1, help="Images per forward (default: training batch).")] = None,
    workers: Annotated[int, typer.Option("--workers", min=0, help="Loader worker processes.")] = 0,
    device: Device = None,
    threads: Threads = None,
    root: Root = Path("."),
) -> None:
    """Write one row per image: key, dataset and a sigmoid probability per finding (uncertain rows included).

    Single process, or split over ranks under ``torchrun --nproc-per-node N -m cxrsynth.cli classifier predict
    ...`` (each rank predicts its share; rank 0 writes the same file as one process).
    """
    from cxrsynth import runtime
    from cxrsynth.classify.predict import predict as predict_lib
    from cxrsynth.classify.predict import write

    set_threads(threads)
    with progress_bar(f"predict {data}", total=None) as advance:
        frame, meta = predict_lib(model_dir, root, data, None if split == "all" else split, batch_size=batch,
                                  workers=workers, device=device, progress=advance)
    if not runtime.distributed(join=False).is_main:
        return
    write(frame, meta, out)
    console.print(f"{len(frame):,} predictions of {data}/{split} by classifier {meta['model']['classifier_id']} "
                  f"-> [bold]{out}[/bold]", highlight=False)
