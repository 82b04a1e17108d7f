"""`cxrsynth generator train | import-mediffusion | export-diffusers | info | fid`.

Thin commands over :mod:`cxrsynth.diffusion`; torch and diffusers are imported inside
the command bodies so ``cxrsynth --help`` stays instant. Training options that only
override :class:`~cxrsynth.diffusion.train.TrainConfig` are ``None`` unless given.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from cxrsynth.cli.common import Device, Root, Threads, console, fail, quiet, set_threads
from cxrsynth.cli.common import info as note
from cxrsynth.cli.options import LazyHelp, given

generator_app = typer.Typer(no_args_is_help=True, help="Train, import and inspect conditional diffusion generators.")


@generator_app.command("train", cls=LazyHelp)
def train(
    data: Annotated[str, typer.Option("--data", help="Dataset name (its manifest and shards).")],
    out: Annotated[Path, typer.Option(
        "--out", help="Generator directory (EMA weights, generator.json, train.json; checkpoints/ unless --checkpoints).")],
    split: Annotated[Optional[str], typer.Option("--split", help="Split to train on.")] = "train",
    preset: Annotated[str, typer.Option("--preset", help="Generator preset: {presets}.")] = "tiny",
    image_size: Annotated[Optional[int], typer.Option("--image-size", min=8, help="Override the preset's image size.")] = None,
    steps: Annotated[Optional[int], typer.Option(
        "--steps", min=1, help="Total optimizer steps (default {TrainConfig.steps}).")] = None,
    batch: Annotated[Optional[int], typer.Option(
        "--batch", min=1, help="Images per step per process (default {TrainConfig.batch_size}).")] = None,
    lr: Annotated[Optional[float], typer.Option(
        "--lr", min=0, help="Peak AdamW learning rate (default {TrainConfig.lr}).")] = None,
    warmup: Annotated[Optional[int], typer.Option(
        "--warmup", min=0, help="Linear LR warm-up steps (default {TrainConfig.warmup_steps}).")] = None,
    ema: Annotated[Optional[float], typer.Option(
        "--ema", min=0, max=1, help="EMA decay (default {TrainConfig.ema_decay}, the paper's).")] = None,
    grad_clip: Annotated[Optional[float], typer.Option(
        "--grad-clip", min=0, help="Max gradient norm, 0: off (default {TrainConfig.grad_clip}).")] = None,
    save_every: Annotated[Optional[int], typer.Option(
        "--save-every", min=1, help="Checkpoint every N steps (default {TrainConfig.save_every}).")] = None,
    log_every: Annotated[Optional[int], typer.Option(
        "--log-every", min=1, help="Progress readout every N steps (default {TrainConfig.log_every}).")] = None,
    seed: Annotated[Optional[int], typer.Option(
        "--seed", min=0, help="Seed of data order, noise and timesteps (default {TrainConfig.seed}).")] = None,
    checkpoints: Annotated[Optional[Path], typer.Option(
        "--checkpoints", help="Checkpoint root (default: OUT/checkpoints); each run writes to ROOT/<run id>, the id "
                              "hashing the preset, data version, processes and every setting but --steps, "
                              "--save-every and --log-every. Keep it outside the DVC output, so that a killed "
                              "`dvc repro` resumes and DVC does not cache optimizer state.")] = None,
    resume: Annotated[bool, typer.Option(
        "--resume/--no-resume", help="Continue this run from ROOT/<run id>/latest.pt if present (a changed setting "
                                     "is another run and starts fresh; more --steps extends a run).")] = True,
    device: Device = None,
    threads: Threads = None,
    root: Root = Path("."),
) -> None:
    """Train a conditional generator on a dataset's shards (no uncertain findings, as the paper).

    Single process, or DDP under ``torchrun --nproc-per-node N -m cxrsynth.cli ...``.
    """
    from cxrsynth import runtime
    from cxrsynth.diffusion.presets import get_preset
    from cxrsynth.diffusion.train import TrainConfig, train_dataset

    set_threads(threads)

    config = get_preset(preset, **given(image_size=image_size))
    tc = TrainConfig(**given(steps=steps, batch_size=batch, lr=lr, warmup_steps=warmup, ema_decay=ema, grad_clip=grad_clip,
                             save_every=save_every, log_every=log_every, seed=seed))

    def started(event: dict) -> None:
        others = event["other_runs"]
        note(f"checkpoints: {event['checkpoints']} ({'resuming' if event['resuming'] else 'new run'})"
             + (f"; other runs there: {', '.join(others)}" if others else ""))

    dist_info = runtime.distributed()
    train_dataset(root, data, config, tc, out, split=split, checkpoints=checkpoints, resume=resume, device=device,
                  callback=started, progress=not quiet())
    if dist_info.world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    if dist_info.is_main:
        console.print(f"generator written to [bold]{out}[/bold] ({tc.steps} steps, preset {preset})")


@generator_app.command("import-mediffusion")
def import_mediffusion(
    checkpoint: Annotated[Path, typer.Argument(help="Mediffusion checkpoint (.ckpt / .pt).")],
    config: Annotated[Path, typer.Option("--config", help="Mediffusion YAML config of that checkpoint.")],
    out: Annotated[Path, typer.Option("--out", help="Generator directory to write.")],
    ema: Annotated[bool, typer.Option("--ema/--no-ema", help="Use the EMA weights when present.")] = True,
) -> None:
    """Convert a Mediffusion (ADM UNetModel) checkpoint into a cxrsynth generator."""
    from cxrsynth.diffusion.mediffusion import import_mediffusion as import_lib

    model = import_lib(checkpoint, config, out, ema=ema)
    n = sum(p.numel() for p in model.parameters())
    console.print(f"imported {checkpoint} -> [bold]{out}[/bold] ({n / 1e6:.1f}M parameters)")


@generator_app.command("export-diffusers")
def export_diffusers(
    directory: Annotated[Path, typer.Argument(help="Generator directory (generator train / import-mediffusion).")],
    out: Annotated[Path, typer.Argument(help="New folder for the diffusers layout (unet/, scheduler/).")],
    sampler: Annotated[str, typer.Option("--sampler", help="Sampler whose scheduler config to write (ddim, dpmpp...).")] = "ddim",
    timestep_spacing: Annotated[str, typer.Option("--timestep-spacing", help="trailing (cxrsynth's default) or leading (Mediffusion).")] = "trailing",
) -> None:
    """Write the generator as a folder plain diffusers loads: UNet2DConditionModel + scheduler config."""
    from cxrsynth.diffusion.export import export_diffusers as export_lib

    info = export_lib(directory, out, sampler=sampler, timestep_spacing=timestep_spacing)
    console.print(f"exported {directory} -> [bold]{out}[/bold] (UNet2DConditionModel, {info['parameters'] / 1e6:.2f}M "
                  f"parameters; {info['scheduler']}); load with UNet2DConditionModel.from_pretrained(OUT, subfolder='unet')")


@generator_app.command("info")
def info(
    directory: Annotated[Path, typer.Argument(help="Generator directory.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print generator.json as JSON.")] = False,
) -> None:
    """Show a generator's preset, configuration, conditioning layout and data version."""
    from cxrsynth.diffusion.model import generator_info

    meta = generator_info(directory)
    if as_json:
        console.print_json(json.dumps(meta))
        return
    cfg = meta["config"]
    console.print(f"[bold]{directory}[/bold]  preset {meta['preset']}  data {meta.get('data_version')}")
    console.print(f"  {cfg['image_size']} px, channels {cfg['model_channels']} x {cfg['channel_mult']}, "
                  f"{cfg['num_res_blocks']} res blocks, attention at ds {cfg['attention_ds']}")
    console.print(f"  {cfg['prediction_type']}, {cfg['beta_schedule']}, zero terminal SNR {cfg['zero_terminal_snr']}, "
                  f"T={cfg['num_train_timesteps']}")
    console.print(f"  conditioning ({len(meta['conditioning'])}): {', '.join(meta['conditioning'])}")
    for key in ("trained_steps", "imported_from"):
        if key in meta:
            console.print(f"  {key}: {meta[key]}")


@generator_app.command("fid")
def fid(
    real: Annotated[str, typer.Option("--real", help="Real dataset.")],
    synthetic: Annotated[str, typer.Option("--synthetic", help="Synthetic dataset.")],
    real_split: Annotated[Optional[str], typer.Option("--real-split", help="Split of the real dataset (e.g. train).")] = None,
    inception: Annotated[Optional[Path], typer.Option(
        "--inception", help="torchvision inception_v3 state dict (local file): FID.")] = None,
    classifier: Annotated[Optional[str], typer.Option(
        "--classifier", help="A classifier trained on the real data: a `cxrsynth classifier train` output directory, "
                             "or a timm model name with --checkpoint.")] = None,
    checkpoint: Annotated[Optional[Path], typer.Option(
        "--checkpoint", help="The timm classifier's state dict (local file; not with a classifier directory).")] = None,
    size: Annotated[Optional[int], typer.Option(
        "--size", min=8, help="Classifier input side (default: a classifier directory's training side, else 256).")] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", min=2, help="At most this many images per side.")] = None,
    device: Device = None,
    root: Root = Path("."),
) -> None:
    """Fréchet distance between real and synthetic images: FID (Inception) or in a classifier's feature space.

    Weights always come from local files; nothing is downloaded.
    """
    from cxrsynth import runtime
    from cxrsynth.classify.model import trained_classifier_extractor
    from cxrsynth.evaluate import frechet

    if (inception is None) == (classifier is None):
        fail("give exactly one of --inception FILE, --classifier DIR or --classifier MODEL --checkpoint FILE")
    directory = classifier is not None and (Path(classifier).is_dir() or "/" in classifier)
    if directory and checkpoint is not None:
        fail(f"--classifier {classifier} is a classifier directory (it holds its weights): drop --checkpoint")
    if classifier is not None and not directory and checkpoint is None:
        fail("--classifier MODEL needs --checkpoint FILE (or give a `cxrsynth classifier train` directory)")
    dev = runtime.device(device)
    if inception is not None:
        extractor, side, what = frechet.inception_extractor(inception), 299, "FID (Inception)"
    elif directory:
        extractor = trained_classifier_extractor(Path(classifier), size)
        side, what = extractor.size, f"Frechet distance (classifier {extractor.classifier_id}, {extractor.size} px)"
    else:
        extractor = frechet.classifier_extractor(classifier, checkpoint, **given(size=size))
        side, what = extractor.size, f"Frechet distance ({classifier})"
    value = frechet.dataset_fid(extractor, root, real, synthetic, size=side, real_split=real_split, limit=limit,
                                device=str(dev))
    console.print(f"{what} {real}{'/' + real_split if real_split else ''} vs {synthetic}: {value:.4f}")
