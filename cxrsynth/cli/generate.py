"""``cxrsynth generate``: synthetic replicas of a dataset as a new shard version."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from cxrsynth.cli.common import Root, console, fail, progress_bar, set_threads


def generate(
    generator: Annotated[Path, typer.Option("--generator", help="Generator folder (generator train / import-mediffusion).")],
    conditions: Annotated[str, typer.Option("--conditions", help="Dataset whose rows give demographics + findings.")],
    name: Annotated[str, typer.Option("--name", help="Name of the synthetic dataset.")],
    split: Annotated[Optional[str], typer.Option("--split", help="Split of the conditions to replicate (paper: train).")] = "train",
    replicas: Annotated[int, typer.Option("--replicas", help="Synthetic images per source row.")] = 1,
    guidance: Annotated[float, typer.Option("--guidance", help="Guidance w. standard: 1 = conditional only, 0 = unconditional; "
                                               "the paper's CFG 0 / 4 / 7.5 are w with --cfg-formula mediffusion.")] = 1.0,
    sampler: Annotated[str, typer.Option("--sampler", help="ddim (x0 clipped, as Mediffusion) | ddim-unclipped | dpmpp (DPM-Solver++ 2M).")] = "ddim",
    steps: Annotated[int, typer.Option("--steps", help="Denoising steps (paper: DDIM 200).")] = 200,
    eta: Annotated[float, typer.Option("--eta", help="DDIM eta (0 deterministic; Mediffusion used 1).")] = 0.0,
    cfg_formula: Annotated[str, typer.Option("--cfg-formula", help="standard: u + w(c - u); mediffusion: c + w(c - u).")] = "standard",
    seed: Annotated[int, typer.Option("--seed", help="Base seed; each image's seed derives from it.")] = 0,
    batch: Annotated[int, typer.Option("--batch", help="Images per network call. Part of the version: kernels round differently at another batch size.")] = 16,
    shard_size: Annotated[int, typer.Option("--shard-size", help="Images per shard (the unit of resume).")] = 1000,
    compile_: Annotated[bool, typer.Option("--compile", help="torch.compile the network (GPU throughput). Fused kernels may round differently: use it for every part and rerun of a dataset, or for none.")] = False,
    part: Annotated[Optional[str], typer.Option("--part", help="i/N: this job's share of the shards (job arrays).")] = None,
    device: Annotated[Optional[str], typer.Option("--device", help="cpu, cuda, cuda:1 (default: cuda if present).")] = None,
    threads: Annotated[Optional[int], typer.Option("--threads", help="CPU threads (torch.set_num_threads); default: torch's. Part "
                                                  "of the version on CPU (kernels round by thread count); under torchrun each rank has OMP_NUM_THREADS.")] = None,
    root: Root = Path("."),
) -> None:
    """Write K synthetic replicas of a dataset's split, conditioned row by row, as new shards.

    Resumable: the same command after a kill skips finished shards and ends byte-identical.
    """
    from cxrsynth import manifest
    from cxrsynth.generate import GenerateConfig
    from cxrsynth.generate import generate as generate_lib

    set_threads(threads)

    config = GenerateConfig(replicas=replicas, guidance=guidance, sampler=sampler, steps=steps, eta=eta,
                            cfg_formula=cfg_formula, seed=seed, batch_size=batch, shard_size=shard_size,
                            compile=compile_)
    try:
        with progress_bar(f"generate {name}", total=None) as advance:
            summary = generate_lib(root=root, generator_dir=generator, conditions=conditions, split=split, name=name,
                                   config=config, part=part, device=device, progress=advance)
    except (ValueError, FileNotFoundError, KeyError, manifest.ManifestError) as exc:
        fail(str(exc))
    if summary["complete"]:
        state = "complete"
    elif summary["world"] > 1:
        state = "partial: other parts or ranks still to run (the last to finish writes the index and manifest)"
    else:
        state = "partial"
    who = f" (part {summary['rank']}/{summary['world']})" if summary["world"] > 1 else ""
    console.print(f"{name} @ {summary['version']}: {summary['images']:,} images in {summary['units']} shard(s); "
                  f"{summary['written']} written by this run{who}; {state}")
