"""Every ``cxrsynth bench`` command: thin layers over :mod:`cxrsynth.bench`.

``ingest`` (data layer), ``phantom`` (renderer speed, learnability), ``generate`` /
``roofline`` / ``train`` / ``solvers`` (the generator's speed, measured and bounded).
Heavy imports (torch, diffusers) happen inside the command bodies.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from cxrsynth.cli.common import BootstrapThreads, Device, Root, Threads, console, err_console, fail, set_threads
from cxrsynth.cli.options import given

#: ``--json`` of every benchmark: its result as one JSON line instead of a table.
AsJson = Annotated[bool, typer.Option("--json", help="Print the result as JSON (one line).")]


def bench_generate(
    preset: Annotated[str, typer.Option("--preset", help="Generator preset: {presets}.")] = "paper",
    batch: Annotated[int, typer.Option("--batch", min=1, help="Images per batch.")] = 64,
    steps: Annotated[int, typer.Option("--steps", min=1, help="Sampler steps.")] = 200,
    sampler: Annotated[str, typer.Option("--sampler", help="{samplers}.")] = "ddim",
    guidance: Annotated[float, typer.Option("--guidance", help="Standard CFG scale; 1 = one forward per step.")] = 1.0,
    dtype: Annotated[str, typer.Option("--dtype", help="bf16 (autocast, as generate runs) | bf16-weights (network cast whole) | fp32; on CPU bf16 means fp32.")] = "bf16",
    compile: Annotated[bool, typer.Option("--compile/--no-compile", help="torch.compile the network.")] = False,
    compile_mode: Annotated[str, typer.Option(
        "--compile-mode", help="{compile_modes} (reduce-overhead: CUDA graphs).")] = "default",
    channels_last: Annotated[bool, typer.Option("--channels-last/--no-channels-last", help="NHWC on CUDA.")] = True,
    deterministic: Annotated[bool, typer.Option("--deterministic/--autotune", help="cuDNN deterministic algorithms as "
                                                "`generate` uses (repeatable bytes), or autotuned (fastest).")] = False,
    image_size: Annotated[Optional[int], typer.Option("--image-size", help="Override the preset's size.")] = None,
    device: Device = None,
    threads: Threads = None,
    peak: Annotated[Optional[float], typer.Option("--peak-tflops", help="Peak TFLOP/s for MFU (default: table).")] = None,
    profile: Annotated[int, typer.Option("--profile", min=0, help="Also print the top N kernels of one sampler step.")] = 0,
    as_json: AsJson = False,
) -> None:
    """Sampling throughput on random weights: images/s, TFLOP/s, MFU, peak memory.

    The line ends with the roofline of the same forward on an H100 (eager and ideally fused), the most MFU the network allows without changing its kernels.
    """
    from cxrsynth.bench.generator import bench_generate as bench_lib

    set_threads(threads)
    r = bench_lib(preset, batch, steps, sampler=sampler, guidance=guidance, dtype=dtype, compile=compile,
                  compile_mode=compile_mode, channels_last=channels_last, device=device,
                  image_size=image_size, peak_tflops=peak, profile=profile, deterministic=deterministic)
    if as_json:
        print(json.dumps(r.to_dict()))
        return
    mfu, mem = _mfu_and_memory(r)
    mode = f"compile={r.compile_mode}" if r.compile else "eager"
    console.print(
        f"{r.preset} {r.image_size}px batch {r.batch} {r.sampler}{r.steps} {r.dtype} {mode} "
        f"channels_last={r.channels_last}{' deterministic' if r.deterministic else ''} on {r.device}: "
        f"{r.images_per_s:.3f} images/s, {r.gflop_per_forward_per_image:.4g} GFLOP/forward/image, "
        f"{r.achieved_tflops:.2f} TFLOP/s, MFU {mfu}, peak memory {mem}; "
        f"H100 roofline MFU: eager {100 * r.roofline_mfu_eager:.0f}%, fused {100 * r.roofline_mfu_fused:.0f}%",
        highlight=False,
    )
    if r.top_kernels:
        from rich.table import Table

        table = Table(title="top kernels of one sampler step")
        for col in ("kernel", "calls", "ms", "share"):
            table.add_column(col, justify="left" if col == "kernel" else "right")
        for k in r.top_kernels:
            table.add_row(k["name"][:90], str(k["calls"]), f"{k['ms']:.2f}", f"{100 * k['share']:.1f}%")
        console.print(table)


def bench_roofline(
    preset: Annotated[str, typer.Option("--preset", help="Generator preset: {presets}.")] = "paper",
    batch: Annotated[int, typer.Option("--batch", min=1, help="Images per forward (x2 with guidance).")] = 64,
    dtype: Annotated[str, typer.Option("--dtype", help="bf16 | fp32 element size.")] = "bf16",
    image_size: Annotated[Optional[int], typer.Option("--image-size", help="Override the preset's size.")] = None,
    peak: Annotated[float, typer.Option("--peak-tflops", help="Peak TFLOP/s (default: H100 measured here).")] = 790.0,
    bandwidth: Annotated[float, typer.Option("--bandwidth-tbs", help="Memory bandwidth TB/s (default: H100 measured here).")] = 3.0,
    steps: Annotated[str, typer.Option("--steps", help="Sampler step counts for the images/s ceilings, comma-separated.")] = "200,25",
    top_ops: Annotated[int, typer.Option("--ops", min=0, help="Also list the N aten ops with the most roofline time.")] = 0,
    as_json: AsJson = False,
) -> None:
    """FLOPs and bytes of one forward, per category of op, and the MFU ceilings they imply.

    Counted on meta tensors (no GPU, about a second): each op takes at least max(FLOPs / peak, bytes / bandwidth). "eager" sums that over the ops the network runs; "fused" merges every connected run of memory-bound ops between two GEMMs into one pass; "with epilogues" also finishes each GEMM output read by one elementwise op inside the GEMM.
    """
    from cxrsynth.bench.roofline import roofline

    counts = [s.strip() for s in steps.split(",") if s.strip()]
    if not counts or not all(s.isdigit() and int(s) >= 1 for s in counts):
        fail(f"--steps must be positive integers separated by commas, got {steps!r}")
    step_counts = [int(s) for s in counts]
    r = roofline(preset, batch, dtype=dtype, image_size=image_size, peak_tflops=peak, bandwidth_tbs=bandwidth)
    if as_json:
        print(json.dumps(r.to_dict() | {"images_per_s": {
            str(s): {"eager": r.images_per_s(s), "fused": r.images_per_s(s, fused=True),
                     "epilogue": r.images_per_s(s, epilogue=True)} for s in step_counts}}))
        return
    from rich.table import Table

    table = Table(title=f"roofline: {preset} {r.image_size}px, batch {batch}, {dtype}, "
                        f"{peak:g} TFLOP/s, {bandwidth:g} TB/s (per image)")
    for col in ("ops", "op calls", "memory-bound", "GFLOP", "MB moved", "roof ms", "share"):
        table.add_column(col, justify="left" if col == "ops" else "right")
    for name, c in r.categories.items():
        table.add_row(name, str(c.ops), str(c.memory_bound_ops), f"{c.gflop:.1f}", f"{c.mbytes:.0f}",
                      f"{c.roof_ms:.3f}", f"{100 * c.roof_ms / r.eager_ms:.0f}%")
    console.print(table)
    if top_ops > 0:
        ops = Table(title=f"top {top_ops} ops by roofline time (per image)")
        for col in ("op", "calls", "MB moved", "roof ms", "share"):
            ops.add_column(col, justify="left" if col == "op" else "right")
        for name, c in list(r.by_op.items())[:top_ops]:
            ops.add_row(name, str(c.ops), f"{c.mbytes:.0f}", f"{c.roof_ms:.3f}", f"{100 * c.roof_ms / r.eager_ms:.0f}%")
        console.print(ops)
    console.print(
        f"{r.gflop:.1f} GFLOP/forward/image; compute floor {r.compute_floor_ms:.3f} ms/image; "
        f"eager roofline {r.eager_ms:.3f} ms (MFU ceiling {100 * r.mfu_ceiling():.1f}%); "
        f"fused roofline {r.fused_ms:.3f} ms in {r.fused_kernels} fused groups "
        f"(MFU ceiling {100 * r.mfu_ceiling(fused=True):.1f}%); with GEMM epilogues {r.epilogue_ms:.3f} ms "
        f"(MFU ceiling {100 * r.mfu_ceiling(epilogue=True):.1f}%); GEMMs alone {r.gemm_ms:.3f} ms "
        f"(MFU ceiling {100 * r.compute_floor_ms / r.gemm_ms:.1f}%: norms and activations folded into them)",
        highlight=False,
    )
    for s in step_counts:
        console.print(f"  {s} steps: at most {r.images_per_s(s):.2f} images/s eager, "
                      f"{r.images_per_s(s, fused=True):.2f} fused, {r.images_per_s(s, epilogue=True):.2f} "
                      f"with epilogues (one forward per step)", highlight=False)


def bench_train(
    preset: Annotated[str, typer.Option("--preset", help="Generator preset: {presets}.")] = "paper",
    batch: Annotated[int, typer.Option("--batch", help="Images per step.")] = 32,
    steps: Annotated[int, typer.Option("--steps", help="Timed steps (rounded up to a multiple of --warmup).")] = 20,
    warmup: Annotated[int, typer.Option("--warmup", help="Untimed steps first; also the readout interval.")] = 5,
    image_size: Annotated[Optional[int], typer.Option("--image-size", help="Override the preset's size.")] = None,
    device: Device = None,
    threads: Threads = None,
    peak: Annotated[Optional[float], typer.Option("--peak-tflops", help="Peak TFLOP/s for MFU (default: table).")] = None,
    as_json: AsJson = False,
) -> None:
    """Training throughput of the real loop on random images: images/s, TFLOP/s (3x forward), MFU."""
    from cxrsynth.bench.generator import bench_train as bench_lib

    set_threads(threads)
    r = bench_lib(preset, batch, steps, warmup_steps=warmup, device=device, image_size=image_size, peak_tflops=peak)
    if as_json:
        print(json.dumps(r.to_dict()))
        return
    mfu, mem = _mfu_and_memory(r)
    console.print(
        f"train {r.preset} {r.image_size}px batch {r.batch}, {r.steps} timed steps on {r.device}: "
        f"{r.images_per_s:.2f} images/s, {r.gflop_per_image:.4g} GFLOP/image (3x forward), "
        f"{r.achieved_tflops:.2f} TFLOP/s, MFU {mfu}, peak memory {mem}", highlight=False,
    )


def _mfu_and_memory(r) -> tuple[str, str]:
    """A result's MFU ("41.2% of 790") and peak memory ("12.3 GiB"), "n/a" off the GPU."""
    mfu = f"{100 * r.mfu:.1f}% of {r.peak_tflops:.0f}" if r.mfu is not None else "n/a"
    mem = f"{r.peak_memory_gib:.1f} GiB" if r.peak_memory_gib is not None else "n/a"
    return mfu, mem


def bench_solvers(
    generator: Annotated[Path, typer.Option("--generator", help="Generator folder (generator train / import-mediffusion).")],
    conditions: Annotated[str, typer.Option("--conditions", help="Dataset whose rows give the conditions.")],
    split: Annotated[Optional[str], typer.Option("--split", help="Split of the conditions.")] = "train",
    n: Annotated[int, typer.Option("--n", min=1, help="Images per run (the first N condition rows, as generate orders them).")] = 16,
    runs: Annotated[str, typer.Option("--runs", help="Runs as sampler:steps, comma-separated.")] =
        "ddim:200,ddim:25,ddim-unclipped:200,ddim-unclipped:25,dpmpp:25,dpmpp:10",
    reference: Annotated[str, typer.Option("--reference", help="The converged run, sampler:steps.")] = "dpmpp:200",
    guidance: Annotated[float, typer.Option("--guidance", help="Standard CFG scale (1: conditional model).")] = 1.0,
    batch: Annotated[int, typer.Option("--batch", min=1, help="Images per network call.")] = 16,
    device: Device = None,
    threads: Threads = None,
    as_json: AsJson = False,
    root: Root = Path("."),
) -> None:
    """Few-step solver error: each run's distance from a many-step reference, same seeds and conditions.

    Tells how many steps a trained generator needs: a run within a grey level or two of the reference adds no visible error.
    """
    from cxrsynth.bench.generator import bench_solvers_on

    set_threads(threads)

    def parse(spec: str) -> tuple[str, int]:
        name, _, steps = spec.strip().partition(":")
        if not name or not steps.isdigit() or int(steps) < 1:
            fail(f"expected sampler:steps (e.g. dpmpp:25), got {spec!r}")
        return name, int(steps)

    plan = [parse(s) for s in runs.split(",") if s.strip()]
    ref = parse(reference)
    images, results = bench_solvers_on(root, generator, conditions, split, n, plan, reference=ref, guidance=guidance,
                                       batch_size=batch, device=device)
    if as_json:
        print(json.dumps(results))
        return
    from rich.table import Table

    table = Table(title=f"{generator}: {images} images of {conditions}/{split}, distance from {reference} (grey levels)")
    for col in ("sampler", "steps", "images/s", "RMSE", "mean |d|", "p99 |d|"):
        table.add_column(col, justify="left" if col == "sampler" else "right")
    for r in results:
        table.add_row(r["sampler"], str(r["steps"]), f"{r['images_per_s']:.2f}", f"{r['rmse_grey']:.2f}",
                      f"{r['mean_abs_grey']:.2f}", f"{r['p99_abs_grey']:.0f}")
    console.print(table)


def bench_ingest(
    n: Annotated[int, typer.Option("--n", min=1, help="Phantom images to ingest.")] = 1000,
    size: Annotated[int, typer.Option("--size", min=1, help="Preprocessed image side.")] = 256,
    workers: Annotated[Optional[int], typer.Option("--workers", min=1, help="Processes for image work (default: all cores).")] = None,
    chexpert_csv: Annotated[Optional[Path], typer.Option("--chexpert-csv", help="CheXpert train.csv for the labels-only timing.")] = None,
) -> None:
    """Time ingest (1 vs all workers), shard streaming, and labels-only ingest of a CheXpert CSV."""
    import os
    import platform

    from rich.table import Table

    from cxrsynth.bench.ingest import bench_ingest as run

    rows = run(n=n, size=size, workers=workers, chexpert_csv=chexpert_csv)
    table = Table(title=f"cxrsynth bench ingest — {platform.machine()}, {os.cpu_count()} cores, {size} px")
    for column in ("what", "items", "seconds", "items/s"):
        table.add_column(column, justify="left" if column == "what" else "right")
    for r in rows:
        table.add_row(r["what"], f"{r['items']:,}", f"{r['seconds']:.2f}", f"{r['per_second']:,.0f}")
    console.print(table)
    if len(rows) >= 2:
        console.print(f"speed-up from {rows[1]['what'].split(', ')[1]}: {rows[1]['per_second'] / rows[0]['per_second']:.2f}x")


def bench_phantom(
    train: Annotated[Optional[int], typer.Option("--train", min=10, help="cxp training images, about.")] = None,
    test: Annotated[Optional[int], typer.Option("--test", min=10, help="Held-out cxp images, about (other patients).")] = None,
    external: Annotated[Optional[int], typer.Option("--external", min=10, help="emory images (the external site).")] = None,
    size: Annotated[Optional[int], typer.Option("--size", "--image-size", min=16, help="Shard and classifier side.")] = None,
    epochs: Annotated[Optional[int], typer.Option("--epochs", min=1, help="Training epochs of the small preset.")] = None,
    uncertain: Annotated[Optional[str], typer.Option(
        "--uncertain", help="mask (the bench's default: keep images, uncertain findings out of the loss) | exclude "
                            "(the paper: drop images with any uncertain finding).")] = None,
    bootstrap: Annotated[Optional[int], typer.Option("--bootstrap", min=0, help="Bootstrap replicates (0: none).")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Seed of phantoms, split, classifier and bootstrap.")] = None,
    device: Device = None,
    threads: Threads = None,
    work: Annotated[Optional[Path], typer.Option(
        "--work", file_okay=False, help="Keep the phantoms and the project here (default: a temporary folder).")] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the figures as JSON here.")] = None,
) -> None:
    """Train the `small` classifier on imported cxp phantoms; AUROC (cxrsynth.evaluate) on held-out cxp and on emory."""
    from rich.table import Table

    from cxrsynth.bench.phantom import UNCERTAIN, BenchConfig, run_bench

    if uncertain is not None and uncertain not in UNCERTAIN:
        raise typer.BadParameter(f"expected {' or '.join(UNCERTAIN)}", param_hint="--uncertain")
    set_threads(threads)
    cfg = BenchConfig(**given(train=train, test=test, external=external, size=size, epochs=epochs, uncertain=uncertain,
                              bootstrap=bootstrap, seed=seed, device=device))
    result = run_bench(cfg, log=lambda line: console.print(line, highlight=False), work=work)
    n = result["images"]
    table = Table(title=f"Phantom benchmark: small classifier ({result['classifier']['model']}, {cfg.size} px, "
                        f"uncertain {cfg.uncertain}) trained on {n['cxp_train']} cxp phantoms ({result['epochs']} epochs)")
    table.add_column("Finding")
    table.add_column(f"cxp held-out ({n['cxp_test']})", justify="right")
    table.add_column(f"emory ({n['emory_test']})", justify="right")
    cell = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731  (None: one class only in that test set)
    for name in result["cxp"]:
        table.add_row(name, cell(result["cxp"][name]), cell(result["emory"][name]))
    table.add_row("[bold]macro[/]", f"[bold]{cell(result['macro_cxp'])}[/]", f"[bold]{cell(result['macro_emory'])}[/]")
    console.print(table)
    console.print(
        f"render {result['render_images_per_second_per_core']:.1f} images/s per core (320x390); "
        f"data {result['data_seconds']:.0f} s; training {result['train_seconds']:.0f} s ({result['threads']} threads); "
        f"bar (0.70 <= cxp <= 0.95, emory < cxp, >= 50 img/s): {'PASS' if result['passed'] else 'FAIL'}",
        highlight=False,
    )
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(result, indent=2) + "\n")


def bench_evaluate(
    images: Annotated[int, typer.Option("--images", min=2, help="Test images (the paper's CheXpert test set: 56,448).")] = 56_000,
    replicates: Annotated[Optional[int], typer.Option(
        "--replicates", min=1, help="Bootstrap replicates (default {EvaluateConfig.bootstrap}, as `evaluate`).")] = None,
    cluster: Annotated[str, typer.Option("--cluster", help="{clusters} (2-4 images per patient).")] = "image",
    seed: Annotated[int, typer.Option("--seed", help="Seed of the random data and the draws.")] = 0,
    threads: BootstrapThreads = None,
    as_json: AsJson = False,
) -> None:
    """Bootstrap AUROC speed: REPLICATES x IMAGES x 14 findings on random data (what `evaluate` runs)."""
    from cxrsynth.bench.evaluate import bench_bootstrap
    from cxrsynth.evaluate.metrics import CLUSTERS

    if cluster not in CLUSTERS:
        fail(f"--cluster must be one of {', '.join(CLUSTERS)}, got {cluster!r}")
    r = bench_bootstrap(images=images, seed=seed, cluster=cluster, threads=threads, **given(replicates=replicates))
    if as_json:
        print(json.dumps(r.to_dict()))
        return
    console.print(
        f"bootstrap {r.replicates} x {r.images:,} images x {r.findings} findings ({r.cluster}s resampled, "
        f"{r.threads} thread(s)): {r.seconds:.2f} s wall, {r.cpu_seconds:.2f} s CPU, {r.replicates_per_s:.0f} replicates/s",
        highlight=False,
    )


def bench_load(
    data: Annotated[str, typer.Option("--data", help="Dataset or mix whose shards are streamed.")],
    split: Annotated[Optional[str], typer.Option("--split", help="Split streamed ('all': every row).")] = "train",
    workers: Annotated[str, typer.Option("--workers", help="Worker counts to time, comma-separated (0: in-process).")] = "0,1,2",
    batch: Annotated[int, typer.Option("--batch", min=1, help="Images per batch.")] = 64,
    limit: Annotated[Optional[int], typer.Option("--limit", min=1, help="At most this many rows.")] = None,
    image_size: Annotated[Optional[int], typer.Option("--image-size", min=8, help="Resize to this side (default: the shards').")] = None,
    augment: Annotated[bool, typer.Option("--augment/--no-augment", help="Also run the training augmentations.")] = False,
    repeats: Annotated[int, typer.Option("--repeats", min=1, help="Rounds: each times the ceiling, then one epoch per worker count (paired ratios, median shown).")] = 1,
    as_json: AsJson = False,
    root: Root = Path("."),
) -> None:
    """Loader images/s per worker count next to the PNG-decode ceiling (PIL, one process) of the same images.

    Steady images/s (after the first batch: worker start-up and the shuffle buffer's fill) is the rate compared with the ceiling.
    """
    from rich.table import Table

    from cxrsynth.bench.load import LoadBenchConfig
    from cxrsynth.bench.load import bench_load as bench_lib

    try:
        counts = tuple(int(w) for w in workers.split(",") if w.strip())
        if not counts or min(counts) < 0:
            raise ValueError
    except ValueError:
        raise typer.BadParameter(f"expected worker counts such as 0,1,2, got {workers!r}", param_hint="--workers") from None
    r = bench_lib(root, LoadBenchConfig(name=data, split=None if split == "all" else split, workers=counts,
                                        batch_size=batch, limit=limit, image_size=image_size, augment=augment, repeats=repeats))
    if as_json:
        print(json.dumps(r))
        return
    c = r["ceiling"]
    table = Table(title=f"bench load {data}/{split}: {r['images']:,} images, {r['image_side']} px, {r['cpu_count']} cores"
                        f"{', augmented' if augment else ''}")
    for col in ("what", "images", "seconds", "images/s", "first batch s", "steady images/s", "per worker / ceiling (median)",
                "vs 1 worker"):
        table.add_column(col, justify="left" if col == "what" else "right", no_wrap=col == "what")
    table.add_row("PIL decode ceiling, 1 process", f"{c['images']:,}", f"{c['seconds']:.2f}", f"{c['images_per_s']:,.0f}",
                  "", f"{c['images_per_s']:,.0f}", "100%", "")
    for x in r["loader"]:
        speedup = "" if x["speedup_vs_1"] is None else f"{x['speedup_vs_1']:.2f}x"
        table.add_row(f"loader, {x['workers']} workers", f"{x['images']:,}", f"{x['seconds']:.2f}", f"{x['images_per_s']:,.0f}",
                      f"{x['first_batch_s']:.2f}", f"{x['steady_images_per_s']:,.0f}", f"{100 * x['per_worker_of_ceiling']:.0f}%",
                      speedup)
    console.print(table)


def bench_classifier(
    preset: Annotated[str, typer.Option("--preset", help="Classifier preset: {classifier_presets}.")] = "small",
    batch: Annotated[Optional[int], typer.Option("--batch", min=1, help="Images per step (preset's by default).")] = None,
    image_size: Annotated[Optional[int], typer.Option("--image-size", min=8, help="Input side (preset's by default).")] = None,
    model: Annotated[Optional[str], typer.Option("--model", help="timm model (preset's by default).")] = None,
    steps: Annotated[int, typer.Option("--steps", min=1, help="Timed steps per phase.")] = 10,
    warmup: Annotated[int, typer.Option("--warmup", min=0, help="Untimed steps first.")] = 3,
    device: Device = None,
    threads: Threads = None,
    as_json: AsJson = False,
) -> None:
    """Classifier training and inference images/s and peak memory on random images (the real training step)."""
    from cxrsynth.bench.classifier import bench_classifier as bench_lib

    set_threads(threads)
    r = bench_lib(preset, batch=batch, image_size=image_size, steps=steps, warmup=warmup, device=device, model=model)
    if as_json:
        print(json.dumps(r.to_dict()))
        return
    mem = (f"peak memory train {r.train_peak_memory_gib:.2f} GiB, inference {r.infer_peak_memory_gib:.2f} GiB"
           if r.train_peak_memory_gib is not None else f"peak RSS {r.peak_rss_gib:.2f} GiB")
    console.print(f"classifier {r.preset} ({r.model}, {r.parameters_m:.1f}M parameters) {r.image_size}px batch {r.batch} "
                  f"on {r.device} ({r.threads} threads): train {r.train_images_per_s:,.1f} images/s, "
                  f"inference {r.infer_images_per_s:,.1f} images/s; {mem}", highlight=False)


def bench_audit(
    planted: Annotated[bool, typer.Option("--planted", help="Plant near-copies of training images among new patients' "
                                                           "images: detection and false-flag rates per embedding x criterion.")] = False,
    data: Annotated[str, typer.Option("--data", help="--planted: real dataset with a training split and held-out patients.")] = "cxp",
    size: Annotated[int, typer.Option("--size", min=8, help="--planted: side (px) images are decoded and transformed at.")] = 64,
    per_transform: Annotated[int, typer.Option("--per-transform", min=1, help="--planted: copies planted per transform.")] = 40,
    embeddings: Annotated[str, typer.Option("--embeddings", help="--planted: comma-separated embeddings "
                                                                 "(pixels, reid, sscd, classifier:DIR).")] = "pixels,reid,sscd",
    synthetic: Annotated[Optional[str], typer.Option("--synthetic", help="--planted: a synthetic replica whose flagged "
                                                                         "share is reported too.")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="--planted: write the JSON report here.")] = None,
    sscd_steps: Annotated[Optional[int], typer.Option("--sscd-steps", min=1, help="--planted: training steps of the sscd "
                                                                              "network (default: the audit's).")] = None,
    sscd_shift: Annotated[Optional[float], typer.Option("--sscd-shift", min=0.0, max=0.5, help="--planted: largest shift of "
                                                        "the sscd augmentation, share of the side (default: the audit's).")] = None,
    align: Annotated[Optional[int], typer.Option("--align", min=0, help="--planted: candidates re-scored by test-time "
                                                                        "alignment (0: none; default: the audit's).")] = None,
    detector: Annotated[Optional[str], typer.Option("--detector", help="--planted: the detector rule of the union row (the "
                                                    "audit's default rules), e.g. sscd:DIR trained once by `share detector` "
                                                    "(default: the audit's, an sscd network trained here).")] = None,
    align_size: Annotated[Optional[int], typer.Option("--align-size", min=16, help="--planted: side (px) of the "
                                                      "registration (default: the audit's).")] = None,
    seed: Annotated[int, typer.Option("--seed", min=0, help="--planted: seeds the patient halves and the plants.")] = 0,
    queries: Annotated[int, typer.Option("--queries", min=1, help="Synthetic embeddings searched.")] = 4096,
    bank: Annotated[int, typer.Option("--bank", min=1, help="Training embeddings searched against.")] = 16384,
    dim: Annotated[int, typer.Option("--dim", min=1, help="Embedding size (1024 = the 32 px pixels embedding).")] = 1024,
    k: Annotated[int, typer.Option("--k", min=1, help="Neighbours kept per query.")] = 5,
    chunk: Annotated[int, typer.Option("--chunk", min=1, help="Queries per similarity block.")] = 4096,
    device: Device = None,
    threads: Threads = None,
    as_json: AsJson = False,
    root: Root = Path("."),
) -> None:
    """Memorization-audit search speed (seconds per million pairs, the paper's 720K x 72K); --planted: what the audit catches."""
    set_threads(threads)
    if planted:
        _bench_planted(root, data, size, per_transform, embeddings, synthetic, out, device, as_json, sscd_steps, sscd_shift,
                       align, align_size, seed, detector)
        return
    from cxrsynth.bench.audit import bench_audit as bench_lib

    r = bench_lib(queries=queries, bank=bank, dim=dim, k=k, chunk=chunk, device=device)
    if as_json:
        print(json.dumps(r.to_dict()))
        return
    console.print(f"audit search {r.queries:,} x {r.bank:,} pairs, dim {r.dim}, k {r.k} on {r.device} ({r.threads} threads): "
                  f"{r.seconds:.3f} s = {r.seconds_per_million_pairs * 1e3:.3f} ms per million pairs; the paper's 720K x 72K: "
                  f"{r.paper_scale_hours:.2f} h; pixels embedding {r.embed_images_per_s:,.0f} images/s; the detector rule's "
                  f"alignment at {r.align_size} px {r.align_pairs_per_s:,.0f} pairs/s, the paper's 720K x {r.align_candidates} "
                  f"candidates: {r.paper_scale_align_hours:.2f} h", highlight=False, soft_wrap=True)


def _bench_planted(root: Path, data: str, size: int, per_transform: int, embeddings: str, synthetic: str | None,
                   out: Path | None, device: str | None, as_json: bool, sscd_steps: int | None, sscd_shift: float | None,
                   align: int | None, align_size: int | None, seed: int, detector: str | None = None) -> None:
    from cxrsynth.bench.planted import bench_planted
    from cxrsynth.share.audit import AuditConfig

    base = AuditConfig()
    default = base.override(device=device, align_size=align_size, detector=detector,
                            sscd=base.sscd.override(steps=sscd_steps, shift=sscd_shift))
    config = default.override(align=align)  # --align: the embeddings compared; the union row is the audit's default rules
    report = bench_planted(root, data, size=size, per_transform=per_transform,
                           embeddings=tuple(e for e in embeddings.split(",") if e), synthetic=synthetic, config=config,
                           seed=seed, rules=default.rules(),
                           progress=lambda m: err_console.print(m, highlight=False, soft_wrap=True))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")
    if as_json:
        print(json.dumps(report))
        return
    # plain fixed-width lines (a rich table of 17 columns folds every cell in an 80-column pipe)
    names = [t[:8] for t in report["transforms"]]
    extra = report["synthetic"] is not None
    lines = [f"planted copies at {size} px: share detected per transform ({per_transform} each); new patients' images "
             f"flagged; the criterion's chance rate on the calibrating half" + ("; synthetic images flagged" if extra else ""),
             f"{'embedding':<12} {'align':>5} {'criterion':<9} " + " ".join(f"{n:>8}" for n in names)
             + f" {'new patients':>17} {'chance':>7}" + (f" {'synthetic':>9}" if extra else "")]
    rates = {(r["embedding"], r["criterion"], r["transform"]): r["rate"] for r in report["rows"]}
    for c in report["configs"]:
        new = f"{c['new_patients_flagged']}/{c['new_patient_images']} {100 * c['false_flag_rate']:.2f}%"
        lines.append(f"{c['embedding'][:12]:<12} {str(c['align']):>5} {c['criterion']:<9} "
                     + " ".join(f"{rates[c['embedding'], c['criterion'], t]:>8.2f}" for t in report["transforms"])
                     + f" {new + ('' if c['false_flags_consistent'] else ' *'):>17} {100 * c['chance_rate']:>6.2f}%"
                     + (f" {100 * c['synthetic_flagged']:>8.2f}%" if extra else ""))
    lines += [f"union = {' or '.join(c['rules'])}, each at {100 * report['quantile'] / len(c['rules']):g}% "
              "(the audit's default)" for c in report["configs"] if c.get("rules")]
    for line in lines:
        console.print(line, highlight=False, soft_wrap=True, markup=False)
    if not all(c["false_flags_consistent"] for c in report["configs"]):
        console.print(f"* more new patients flagged than the {100 * report['quantile']:g}% quantile explains (one-sided "
                      "binomial p < 0.05): not eligible as the best", highlight=False, soft_wrap=True)
    b = report["best"]
    console.print(f"best: {b['embedding']} + {b['criterion']}: worst transform {b['worst_rate']:.2f}, mean {b['mean_rate']:.2f}, "
                  f"new patients flagged {b['false_flag_rate']:.4f}" + ("" if b["eligible"] else " (none eligible: the least bad)")
                  + (f"; wrote {out}" if out else ""), highlight=False)


def bench_scale(
    scale: Annotated[float, typer.Option("--scale", min=0.0001, max=1.0,
                                         help="Fraction of the paper's sizes (1.0: 223,414 CheXpert, 377,110 MIMIC, 10 x 72K replicas).")] = 1.0,
    threads: Annotated[Optional[int], typer.Option("--threads", min=1, help="torch, faiss and bootstrap threads (default: the CPUs available).")] = None,
    chexpert_csv: Annotated[Optional[Path], typer.Option(
        "--chexpert-csv", help="CheXpert's real train.csv(.gz) for the labels (default: fabricated with its label marginals).")] = None,
    images: Annotated[Optional[int], typer.Option("--images", min=1, help="Phantom images of the image-ingest stage (default: 400 at scale >= 0.1).")] = None,
    work: Annotated[Optional[Path], typer.Option("--work", file_okay=False, help="Keep the tables and outputs here (default: a temporary folder).")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", dir_okay=False, help="Also write the result as JSON here.")] = None,
) -> None:
    """Every non-GPU stage of the study at the paper's sizes, each beside its plain-library equivalent (ratio = ours / plain).

    Stages: labels-only ingest, split, mix at 1000%, a DuckDB cohort query, evaluate (1,000 image and patient bootstrap replicates), compare of 11 cells, co-occurrence, the report of 30 cells, the audit's neighbour search (dims 256, 1024) and image ingest. * = timed on a slice and extrapolated.
    """
    import platform

    from rich.table import Table

    from cxrsynth.bench.scale import run, table_lines

    result = run(scale=scale, threads=threads, chexpert_csv=chexpert_csv, work=work, images=images,
                 log=lambda line: console.print(line, highlight=False))
    m = result["machine"]
    table = Table(title=f"cxrsynth bench scale --scale {scale:g}: {platform.machine()}, {m['cpus']} CPUs, "
                        f"{m['memory_gib']:g} GiB, {result['threads']} threads")
    for col in ("stage", "rows", "seconds", "peak GiB", "plain equivalent", "plain seconds", "ratio"):
        table.add_column(col, justify="left" if col in ("stage", "plain equivalent") else "right")
    for row in table_lines(result):
        table.add_row(*row)
    console.print(table)
    console.print(f"* timed on a slice and extrapolated; ratio = ours / plain; setup (fabricating the inputs) "
                  f"{result['setup_seconds']:.1f} s, not counted", highlight=False)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
