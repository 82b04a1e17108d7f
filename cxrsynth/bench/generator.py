"""``cxrsynth bench generate``: sampling throughput, achieved TFLOP/s, MFU, memory.

FLOPs are counted, not estimated from a formula: :func:`.roofline.roofline` runs one
network forward at the benchmark batch on meta tensors and sums torch's
``flop_counter`` FLOPs of every op (convolutions, matmuls and attention, on any
device), and the total is forwards x FLOPs per forward. MFU = achieved FLOP/s / peak, with the
peak from :data:`PEAK_TFLOPS` (dense bf16 unless noted):

* H100 / H200 (SXM): 790 TFLOP/s, the *measured* dense bf16 matmul ceiling that the
  project's performance figures use as their anchor (the data-sheet figure is 989); pass
  ``peak_tflops`` to use another.
* A100: 312 (data sheet); L40S: 362; A10G: 125 (data sheets).
* CPU: no peak (MFU not reported).

The benchmark runs on CPU too (use the ``tiny``/``micro`` preset and few steps).

Each result also carries the *roofline* of the same forward (:mod:`.roofline`, counted
on meta tensors against the H100's measured 790 TFLOP/s and 3.0 TB/s): the best MFU an
eager forward could reach and the best with ideal fusion of the memory-bound ops, so a
measurement reads against what the network allows. ``profile`` adds the top kernels of
one timed sampler step (``torch.profiler``), to see where the time goes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cxrsynth import runtime
from cxrsynth.config import Record
from cxrsynth.diffusion.model import ConditionalUNet
from cxrsynth.diffusion.presets import get_preset
from cxrsynth.diffusion.sample import fast_paths, guidance_branches, sample_batch
from cxrsynth.errors import CxrsynthError, UnknownNameError

#: Dense bf16 peak TFLOP/s by GPU name fragment (see module docstring).
PEAK_TFLOPS: dict[str, float] = {"H100": 790.0, "H200": 790.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}


@dataclass
class BenchResult(Record):
    """One benchmark measurement."""

    preset: str
    image_size: int
    batch: int
    steps: int
    sampler: str
    guidance: float
    dtype: str
    compile: bool
    compile_mode: str | None
    channels_last: bool
    deterministic: bool
    device: str
    seconds: float
    warmup_seconds: float
    images_per_s: float
    gflop_per_forward_per_image: float
    achieved_tflops: float
    peak_tflops: float | None
    mfu: float | None
    peak_memory_gib: float | None
    roofline_mfu_eager: float | None = None
    roofline_mfu_fused: float | None = None
    top_kernels: list[dict[str, Any]] | None = None


def peak_tflops_for(device: torch.device) -> float | None:
    """Peak bf16 TFLOP/s of the device from :data:`PEAK_TFLOPS`, None when unknown."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_TFLOPS.items():
        if key in name:
            return value
    return None


def bench_generate(
    preset: str = "paper",
    batch: int = 64,
    steps: int = 200,
    *,
    sampler: str = "ddim",
    guidance: float = 1.0,
    dtype: str = "bf16",
    compile: bool = False,
    compile_mode: str = "default",
    channels_last: bool = True,
    device: str | None = None,
    image_size: int | None = None,
    warmup_steps: int = 2,
    peak_tflops: float | None = None,
    profile: int = 0,
    deterministic: bool = False,
) -> BenchResult:
    """Time ``batch`` images x ``steps`` sampler steps on random weights.

    Args:
        preset: Generator preset.
        batch: Images per batch.
        steps: Denoising steps.
        sampler: ``ddim`` or ``dpmpp``.
        guidance: Standard CFG scale; 1.0 = one forward per step (the paper's
            "guidance 0" in Mediffusion's convention), else two.
        dtype: ``bf16`` (fp32 weights under autocast, as ``generate`` runs), ``bf16-weights``
            (the network cast to bf16 whole: no autocast casts, bf16 norms) or ``fp32``.
            On CPU ``bf16`` means fp32 (CPU autocast is slow); ``bf16-weights`` runs.
        compile: ``torch.compile`` the network.
        compile_mode: ``default``, ``reduce-overhead`` (CUDA graphs), ``max-autotune``
            or ``max-autotune-no-cudagraphs``.
        channels_last: NHWC memory format (CUDA).
        device: Defaults to CUDA when available.
        image_size: Override the preset's size.
        warmup_steps: Untimed warm-up steps (compilation, cuDNN autotuning).
        peak_tflops: Override the peak used for MFU.
        deterministic: cuDNN's deterministic algorithms, as ``generate`` runs (its bytes
            must repeat); off, cuDNN autotunes (the fastest kernels).
        profile: After timing, profile one more sampler step and keep this many
            top kernels (by device time on CUDA, CPU time elsewhere); 0: no profile.
    """
    from cxrsynth.bench.roofline import roofline

    dev = runtime.device(device)
    cfg = get_preset(preset, **({"image_size": image_size} if image_size else {}))
    if dtype not in ("bf16", "bf16-weights", "fp32"):
        raise UnknownNameError("dtype", dtype, ("bf16", "bf16-weights", "fp32"))
    torch_dtype = torch.bfloat16 if (dtype == "bf16-weights" or (dtype == "bf16" and dev.type == "cuda")) else torch.float32
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = ConditionalUNet.build(cfg).eval().to(dev)
    if dtype == "bf16-weights":
        torch.nn.Module.to(model, torch.bfloat16)  # all of it: diffusers would warn about fp32-kept modules (none)
    forward = fast_paths(model, compile=compile, compile_mode=compile_mode, channels_last=channels_last,
                         deterministic=deterministic)
    need_cond, need_uncond = guidance_branches(guidance, "standard")
    passes = int(need_cond) + int(need_uncond)
    roof = roofline(preset, batch * passes, dtype="bf16", image_size=image_size)  # H100 bf16 ceilings
    flops = roof.gflop * 1e9 * batch * passes  # one sampler step
    cond = torch.zeros(batch, cfg.condition_size)
    seeds = list(range(batch))
    kw = dict(sampler=sampler, guidance=guidance, dtype=torch_dtype, forward=forward)
    start = time.perf_counter()
    sample_batch(model, cond, seeds, steps=max(1, warmup_steps), **kw)  # warm-up: compilation, autotuning
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    warmup_seconds = time.perf_counter() - start
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    start = time.perf_counter()
    sample_batch(model, cond, seeds, steps=steps, **kw)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - start
    achieved = flops * steps / seconds / 1e12
    peak = peak_tflops if peak_tflops is not None else peak_tflops_for(dev)
    kernels = _top_kernels(lambda: sample_batch(model, cond, seeds, steps=1, **kw), dev, profile) if profile else None
    return BenchResult(
        preset=preset, image_size=cfg.image_size, batch=batch, steps=steps, sampler=sampler,
        guidance=guidance, dtype=dtype if torch_dtype == torch.bfloat16 else "fp32", compile=compile,
        compile_mode=compile_mode if compile else None, channels_last=channels_last and dev.type == "cuda",
        deterministic=deterministic,
        device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        seconds=seconds, warmup_seconds=warmup_seconds, images_per_s=batch / seconds,
        gflop_per_forward_per_image=roof.gflop,
        achieved_tflops=achieved, peak_tflops=peak, mfu=achieved / peak if peak else None,
        peak_memory_gib=torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None,
        roofline_mfu_eager=roof.mfu_ceiling(), roofline_mfu_fused=roof.mfu_ceiling(fused=True),
        top_kernels=kernels,
    )


def _top_kernels(step: Any, device: torch.device, n: int) -> list[dict[str, Any]]:
    """The ``n`` kernels (CUDA) or ops (CPU) taking the most time in one call of ``step``."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        step()
        if cuda:
            torch.cuda.synchronize(device)
    attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, attr, 0) > 0]
    total = sum(getattr(e, attr) for e in events) or 1.0
    events.sort(key=lambda e: getattr(e, attr), reverse=True)
    return [
        {"name": e.key, "calls": e.count, "ms": getattr(e, attr) / 1e3, "share": getattr(e, attr) / total}
        for e in events[:n]
    ]


@dataclass
class TrainBenchResult(Record):
    """One training-throughput measurement (``cxrsynth bench train``)."""

    preset: str
    image_size: int
    batch: int
    steps: int
    device: str
    seconds: float
    images_per_s: float
    gflop_per_image: float
    achieved_tflops: float
    peak_tflops: float | None
    mfu: float | None
    peak_memory_gib: float | None


def bench_train(
    preset: str = "paper",
    batch: int = 32,
    steps: int = 20,
    *,
    warmup_steps: int = 5,
    device: str | None = None,
    image_size: int | None = None,
    peak_tflops: float | None = None,
) -> TrainBenchResult:
    """Time the real training loop (:func:`.train.train`) on random images.

    The loop runs exactly as ``cxrsynth generator train`` runs it (bf16 autocast,
    channels_last and fused AdamW on CUDA, EMA, gradient clipping), fed one fixed batch
    of random uint8 images so that data loading is not what is measured. Timing runs
    from the loss readout after ``warmup_steps`` to the readout after ``steps`` more (the
    readouts are the loop's only GPU syncs). FLOPs per image are 3 x the forward's
    (forward + backward, the usual convention; the optimizer and EMA are not counted).
    """
    import itertools
    import tempfile

    from cxrsynth.bench.roofline import roofline
    from cxrsynth.diffusion.train import TrainConfig, train

    if batch < 1 or steps < 1 or warmup_steps < 1:
        raise CxrsynthError("batch, steps and warmup steps must be >= 1")
    dev = runtime.device(device)
    cfg = get_preset(preset, **({"image_size": image_size} if image_size else {}))
    steps = -(-steps // warmup_steps) * warmup_steps  # readouts every warmup_steps
    g = torch.Generator().manual_seed(0)
    s = cfg.image_size
    fixed = {"image": torch.randint(0, 256, (batch, 1, s, s), generator=g, dtype=torch.uint8),
             "cond": torch.rand(batch, cfg.condition_size, generator=g)}
    marks: list[float] = []

    def mark(step: int, loss: float) -> None:  # the loss readout has just synced the device
        marks.append(time.perf_counter())

    tc = TrainConfig(steps=warmup_steps + steps, batch_size=batch, warmup_steps=1, log_every=warmup_steps,
                     save_every=10**9, keep_checkpoints=0)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    with tempfile.TemporaryDirectory(prefix="cxrsynth-bench-train-") as tmp:
        train(cfg, tc, lambda epoch: itertools.repeat(fixed, tc.steps), tmp, device=dev, progress=False,
              on_step=mark)
    seconds = marks[-1] - marks[0]
    gflop = 3 * roofline(preset, batch, dtype="bf16", image_size=image_size).gflop
    achieved = gflop * 1e9 * batch * steps / seconds / 1e12
    peak = peak_tflops if peak_tflops is not None else peak_tflops_for(dev)
    return TrainBenchResult(
        preset=preset, image_size=s, batch=batch, steps=steps,
        device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        seconds=seconds, images_per_s=batch * steps / seconds, gflop_per_image=gflop,
        achieved_tflops=achieved, peak_tflops=peak, mfu=achieved / peak if peak else None,
        peak_memory_gib=torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None,
    )


def bench_solvers(
    model: ConditionalUNet,
    cond: torch.Tensor,
    seeds: list[int],
    runs: list[tuple[str, int]],
    *,
    reference: tuple[str, int] = ("dpmpp", 200),
    guidance: float = 1.0,
    batch_size: int = 16,
) -> list[dict[str, Any]]:
    """How far each (sampler, steps) lands from a many-step reference, same seeds and conditions.

    Deterministic samplers started from the same x_T solve the same probability-flow ODE,
    so the distance to a converged solution (``dpmpp`` at 200 steps by default) is the
    error a few-step solver adds. ``ddim`` clips its x_0 estimates as Mediffusion did,
    which changes the trajectory itself; ``ddim-unclipped`` is the plain ODE solver.

    Returns:
        One dict per run (the reference first): sampler, steps, seconds, images_per_s,
        rmse_grey (root-mean-square difference from the reference in 8-bit grey
        levels), mean_abs_grey and p99_abs_grey.
    """
    from cxrsynth.diffusion.sample import sample
    from cxrsynth.diffusion.schedule import get_sampler

    for sampler, _ in [reference, *runs]:
        get_sampler(sampler)  # an unknown name fails before any run
    out: list[dict[str, Any]] = []
    ref: torch.Tensor | None = None
    for sampler, steps in [reference, *runs]:
        start = time.perf_counter()
        images = sample(model, cond, seeds, sampler=sampler, steps=steps, guidance=guidance,
                        batch_size=batch_size).float()
        seconds = time.perf_counter() - start
        ref = images if ref is None else ref
        diff = (images - ref).abs()
        out.append({"sampler": sampler, "steps": steps, "seconds": seconds, "images_per_s": len(seeds) / seconds,
                    "rmse_grey": float(diff.pow(2).mean().sqrt()), "mean_abs_grey": float(diff.mean()),
                    "p99_abs_grey": float(diff.flatten().kthvalue(max(1, int(0.99 * diff.numel()))).values)})
    return out


def bench_solvers_on(
    root: str | Path,
    generator_dir: str | Path,
    conditions: str,
    split: str | None,
    n: int,
    runs: list[tuple[str, int]],
    *,
    reference: tuple[str, int] = ("dpmpp", 200),
    guidance: float = 1.0,
    batch_size: int = 16,
    device: str | None = None,
) -> tuple[int, list[dict[str, Any]]]:
    """:func:`bench_solvers` on a trained generator, conditioned on the first ``n`` rows of
    ``conditions`` (its ``split``, as :func:`cxrsynth.diffusion.replicas.condition_rows`
    orders them), image ``i`` seeded ``i``.

    Returns:
        The number of images per run, and :func:`bench_solvers`' results.
    """
    from cxrsynth import labels
    from cxrsynth.diffusion.model import load_generator
    from cxrsynth.diffusion.replicas import condition_rows

    rows = condition_rows(root, conditions, split).head(n)
    model = load_generator(Path(generator_dir), device=runtime.device(device))
    results = bench_solvers(model, torch.from_numpy(labels.conditioning_vectors(rows)), list(range(len(rows))),
                            runs, reference=reference, guidance=guidance, batch_size=batch_size)
    return len(rows), results
