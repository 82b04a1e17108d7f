"""``cxrsynth generate``: synthetic replicas of a dataset as a new shard version.

Options that only override :class:`~cxrsynth.diffusion.replicas.GenerateConfig` are ``None`` unless
given; their help shows the config's defaults and the registered names when asked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from cxrsynth.cli.common import Device, Root, Store, console, progress_bar, set_threads, threads_option
from cxrsynth.cli.options import given

GenerateThreads = threads_option("CPU threads (torch.set_num_threads); default: torch's. Part of the version on CPU (kernels "
                                 "round by thread count); under torchrun each rank has OMP_NUM_THREADS.")


def generate(
    generator: Annotated[Path, typer.Option("--generator", help="Generator folder (generator train / import-mediffusion).")],
    conditions: Annotated[str, typer.Option("--conditions", help="Dataset whose rows give demographics + findings.")],
    name: Annotated[str, typer.Option("--name", help="Name of the synthetic dataset.")],
    split: Annotated[Optional[str], typer.Option("--split", help="Split of the conditions to replicate (paper: train).")] = "train",
    replicas: Annotated[Optional[int], typer.Option(
        "--replicas", min=1, help="Synthetic images per source row (default {GenerateConfig.replicas}).")] = None,
    guidance: Annotated[Optional[float], typer.Option(
        "--guidance", min=0, help="Guidance w (default {GenerateConfig.guidance}). standard: 1 = conditional only, "
                                  "0 = unconditional; "
                           "the paper's CFG 0 / 4 / 7.5 are w with --cfg-formula mediffusion.")] = None,
    sampler: Annotated[Optional[str], typer.Option(
        "--sampler", help="{samplers} (default {GenerateConfig.sampler}; ddim clips x0 as Mediffusion did, "
                          "dpmpp is DPM-Solver++ 2M).")] = None,
    steps: Annotated[Optional[int], typer.Option(
        "--steps", min=1, help="Denoising steps (default {GenerateConfig.steps}, the paper's DDIM 200).")] = None,
    eta: Annotated[Optional[float], typer.Option(
        "--eta", min=0, help="DDIM eta, 0 deterministic; Mediffusion used 1 (default {GenerateConfig.eta}).")] = None,
    cfg_formula: Annotated[Optional[str], typer.Option(
        "--cfg-formula", help="{cfg_formulas} (default {GenerateConfig.cfg_formula}). standard: u + w(c - u); "
                              "mediffusion: c + w(c - u), rescaled.")] = None,
    seed: Annotated[Optional[int], typer.Option(
        "--seed", min=0, help="Base seed; each image's seed derives from it (default {GenerateConfig.seed}).")] = None,
    batch: Annotated[Optional[int], typer.Option(
        "--batch", min=1, help="Images per network call (default {GenerateConfig.batch_size}). Part of the version: "
                               "kernels round differently at another batch size.")] = None,
    shard_size: Annotated[Optional[int], typer.Option(
        "--shard-size", min=1, help="Images per shard, the unit of resume (default {GenerateConfig.shard_size}).")] = None,
    compile_: Annotated[Optional[bool], typer.Option(
        "--compile/--no-compile", help="torch.compile the network (GPU throughput; default {GenerateConfig.compile}). Fused "
                                       "kernels may round differently: use it for every part and rerun of a dataset, or for none.")] = None,
    rebalance: Annotated[Optional[float], typer.Option(
        "--rebalance", min=0.0, max=1.0, help="Draw each replica's conditions so that every rarer finding reaches this "
                                              "prevalence (e.g. 0.2); default: every source row once.")] = None,
    part: Annotated[Optional[str], typer.Option("--part", help="i/N: this job's share of the shards (job arrays).")] = None,
    device: Device = None,
    threads: GenerateThreads = None,
    force: Annotated[bool, typer.Option(
        "--force", help="Write over an existing dataset of another kind (never over --conditions).")] = False,
    store: Store = None,
    root: Root = Path("."),
) -> None:
    """Write K synthetic replicas of a dataset's split, conditioned row by row, as new shards.

    Resumable: the same command after a kill skips finished shards and ends byte-identical.
    """
    from cxrsynth.diffusion.replicas import GenerateConfig, prepare, run

    set_threads(threads)

    config = GenerateConfig(**given(replicas=replicas, guidance=guidance, sampler=sampler, steps=steps, eta=eta,
                                    cfg_formula=cfg_formula, seed=seed, batch_size=batch, shard_size=shard_size,
                                    compile=compile_, rebalance=rebalance))
    job = prepare(root=root, generator_dir=generator, conditions=conditions, split=split, name=name,
                  config=config, part=part, device=device, force=force, store=store)
    with progress_bar(f"generate {name}", total=job.images_todo) as advance:
        summary = run(job, progress=advance)
    if summary["complete"]:
        state = "complete"
    elif summary["world"] > 1:
        state = "partial: other parts or ranks still to run (the last to finish writes the index and manifest)"
    else:
        state = "partial"
    who = f" (part {summary['rank']}/{summary['world']})" if summary["world"] > 1 else ""
    console.print(f"{name} @ {summary['version']}: {summary['images']:,} images in {summary['units']} shard(s); "
                  f"{summary['written']} written by this run{who}; {state}")
