"""``cxrsynth bench generate``: sampling throughput, achieved TFLOP/s, MFU, memory.

FLOPs are measured, not estimated: ``torch.utils.flop_counter.FlopCounterMode`` counts
one network forward at the benchmark batch (convolutions, matmuls, attention), and
the total is forwards x FLOPs per forward. MFU = achieved FLOP/s / peak, with the
peak from :data:`PEAK_TFLOPS` (dense bf16 unless noted):

* H100 / H200 (SXM): 790 TFLOP/s, the *measured* dense bf16 matmul ceiling that
  DESIGN.md uses as its anchor (the data-sheet figure is 989); pass ``peak_tflops`` to
  use another.
* A100: 312 (data sheet); L40S: 362; A10G: 125 (data sheets).
* CPU: no peak (MFU not reported).

The benchmark runs on CPU too (use the ``tiny``/``micro`` preset and few steps).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from cxrsynth.diffusion.model import ConditionalUNet
from cxrsynth.diffusion.presets import get_preset
from cxrsynth.diffusion.sample import _needs, fast_paths, sample_batch

#: Dense bf16 peak TFLOP/s by GPU name fragment (see module docstring).
PEAK_TFLOPS: dict[str, float] = {"H100": 790.0, "H200": 790.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}


@dataclass
class BenchResult:
    """One benchmark measurement."""

    preset: str
    image_size: int
    batch: int
    steps: int
    sampler: str
    guidance: float
    dtype: str
    compile: bool
    channels_last: bool
    device: str
    seconds: float
    images_per_s: float
    gflop_per_forward_per_image: float
    achieved_tflops: float
    peak_tflops: float | None
    mfu: float | None
    peak_memory_gib: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def peak_tflops_for(device: torch.device) -> float | None:
    """Peak bf16 TFLOP/s of the device from :data:`PEAK_TFLOPS`, None when unknown."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_TFLOPS.items():
        if key in name:
            return value
    return None


def count_forward_flops(model: torch.nn.Module, batch: int, dtype: torch.dtype = torch.float32) -> int:
    """FLOPs of one forward of ``model`` (a ConditionalUNet) at ``batch``."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = model.gen_config  # type: ignore[attr-defined]
    device = next(model.parameters()).device
    x = torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size, device=device)
    t = torch.full((batch,), 500, device=device)
    c = torch.zeros(batch, cfg.condition_size, device=device)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter, torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        model(x, t, c)
    return int(counter.get_total_flops())


def bench_generate(
    preset: str = "paper",
    batch: int = 64,
    steps: int = 200,
    *,
    sampler: str = "ddim",
    guidance: float = 1.0,
    dtype: str = "bf16",
    compile: bool = False,
    channels_last: bool = True,
    device: str | None = None,
    image_size: int | None = None,
    warmup_steps: int = 2,
    peak_tflops: float | None = None,
) -> BenchResult:
    """Time ``batch`` images x ``steps`` sampler steps on random weights.

    Args:
        preset: Generator preset.
        batch: Images per batch.
        steps: Denoising steps.
        sampler: ``ddim`` or ``dpmpp``.
        guidance: Standard CFG scale; 1.0 = one forward per step (the paper's
            "guidance 0" in Mediffusion's convention), else two.
        dtype: ``bf16`` (autocast) or ``fp32``. On CPU, fp32 is used.
        compile: ``torch.compile`` the network (mode ``max-autotune-no-cudagraphs``
            is not forced; default mode).
        channels_last: NHWC memory format (CUDA).
        device: Defaults to CUDA when available.
        image_size: Override the preset's size.
        warmup_steps: Untimed warm-up steps (compilation, cuDNN autotuning).
        peak_tflops: Override the peak used for MFU.
    """
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cfg = get_preset(preset, **({"image_size": image_size} if image_size else {}))
    torch_dtype = torch.bfloat16 if (dtype == "bf16" and dev.type == "cuda") else torch.float32
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = ConditionalUNet.build(cfg).eval().to(dev)
    if channels_last:
        forward = fast_paths(model, compile=compile, deterministic=False)
    else:
        forward = torch.compile(model) if compile else None
    need_cond, need_uncond = _needs(guidance, "standard")
    passes = int(need_cond) + int(need_uncond)
    flops = count_forward_flops(model, batch * passes, torch_dtype)
    cond = torch.zeros(batch, cfg.condition_size)
    seeds = list(range(batch))
    kw = dict(sampler=sampler, guidance=guidance, dtype=torch_dtype, forward=forward)
    sample_batch(model, cond, seeds, steps=max(1, warmup_steps), **kw)  # warm-up
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
    return BenchResult(
        preset=preset, image_size=cfg.image_size, batch=batch, steps=steps, sampler=sampler,
        guidance=guidance, dtype=str(torch_dtype).removeprefix("torch."), compile=compile,
        channels_last=channels_last and dev.type == "cuda",
        device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        seconds=seconds, images_per_s=batch / seconds,
        gflop_per_forward_per_image=flops / (batch * passes) / 1e9 if batch else 0.0,
        achieved_tflops=achieved, peak_tflops=peak, mfu=achieved / peak if peak else None,
        peak_memory_gib=torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None,
    )
