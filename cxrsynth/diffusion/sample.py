"""Sampling with classifier-free guidance and one random generator per image.

Every image has its own seed: its initial noise x_T and, for stochastic DDIM (eta > 0),
the noise of every step come from a ``torch.Generator`` seeded with that image's seed
and drawn on the CPU. An image is therefore the same whatever the batch size, the
device or the number of GPUs it was generated with (EDM's convention), up to the
floating-point differences of the network itself between devices.

Guidance formulas (w = ``guidance``):

* ``standard``: ``out = uncond + w * (cond - uncond)`` (Ho & Salimans). w = 1 is the
  conditional model alone; w = 0 the unconditional one.
* ``mediffusion``: what Mediffusion 0.6.0 (the paper's generator) computed:
  ``g = cond + w * (cond - uncond)``, then the "rescaled CFG" of Lin et al. 2023 with
  phi = 0.7: ``out = 0.7 * g * std(cond) / std(g) + 0.3 * g``. w = 0 is the conditional
  model alone, so the paper's guidance {0, 4, 7.5} are standard {1, 5, 8.5} before the
  rescale. Mediffusion took the standard deviations over the whole batch (both output
  channels); here they are per image (both channels), so the result does not depend on
  the batch, and equals Mediffusion's with batch size 1.

``MEDIFFUSION_COMPAT`` holds the settings that reproduce the paper's sampler: DDIM with
eta = 1 (hard-coded in Mediffusion 0.6.0), ``leading`` timestep spacing (its DDIM200
striding) and the ``mediffusion`` guidance formula.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch

from cxrsynth import runtime
from cxrsynth.diffusion.model import ConditionalUNet
from cxrsynth.diffusion.schedule import get_sampler
from cxrsynth.errors import CxrsynthError, UnknownNameError

CfgFormula = Literal["standard", "mediffusion"]
#: Guidance formulas (see the module docstring).
CFG_FORMULAS: tuple[str, ...] = ("standard", "mediffusion")

#: Keyword arguments of :func:`sample` that reproduce Mediffusion 0.6.0's DDIM sampler.
MEDIFFUSION_COMPAT: dict[str, Any] = {
    "sampler": "ddim",
    "eta": 1.0,
    "cfg_formula": "mediffusion",
    "timestep_spacing": "leading",
}

#: Mediffusion's rescale factor phi (Lin et al. 2023, "Common diffusion noise schedules").
MEDIFFUSION_PHI = 0.7


def combine_guidance(
    cond: torch.Tensor, uncond: torch.Tensor, guidance: float, formula: CfgFormula = "standard"
) -> torch.Tensor:
    """Combine conditional and unconditional outputs (B, C, H, W) by ``formula``."""
    if formula == "standard":
        return uncond + guidance * (cond - uncond)
    if formula == "mediffusion":
        g = cond + guidance * (cond - uncond)
        dims = tuple(range(1, cond.ndim))
        rescaled = g * (cond.std(dim=dims, keepdim=True) / g.std(dim=dims, keepdim=True))
        return MEDIFFUSION_PHI * rescaled + (1 - MEDIFFUSION_PHI) * g
    raise UnknownNameError("cfg formula", formula, CFG_FORMULAS)


def guidance_branches(guidance: float, formula: CfgFormula) -> tuple[bool, bool]:
    """Which network branches ``(cond, uncond)`` a guidance setting needs.

    ``standard`` needs only the conditional branch at w = 1 and only the unconditional
    one at w = 0; ``mediffusion`` always needs the conditional one.
    """
    if formula == "standard":
        return guidance != 0.0, guidance != 1.0
    if formula == "mediffusion":
        return True, guidance != 0.0
    raise UnknownNameError("cfg formula", formula, CFG_FORMULAS)


def guided_output(
    model: torch.nn.Module,
    x: torch.Tensor,
    t: torch.Tensor,
    cond: torch.Tensor,
    guidance: float,
    formula: CfgFormula = "standard",
) -> torch.Tensor:
    """The network output under classifier-free guidance, one batched forward.

    Args:
        model: A :class:`ConditionalUNet` (possibly compiled).
        x: (B, C, H, W) x_t.
        t: scalar timestep tensor.
        cond: (B, 22) conditioning vectors.
        guidance: Guidance scale w.
        formula: ``standard`` or ``mediffusion`` (see the module docstring).

    Returns:
        (B, out_channels, H, W).
    """
    need_cond, need_uncond = guidance_branches(guidance, formula)
    b = x.shape[0]
    tt = t.expand(b) if t.ndim == 0 else t
    if need_cond and not need_uncond:
        return model(x, tt, cond)
    if need_uncond and not need_cond:
        return model(x, tt, None)
    drop = torch.cat([torch.zeros(b, dtype=torch.bool), torch.ones(b, dtype=torch.bool)]).to(x.device)
    out = model(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([cond, cond]), drop)  # (2B, C', H, W)
    c_out, u_out = out.float().chunk(2)
    return combine_guidance(c_out, u_out, guidance, formula).to(out.dtype)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> uint8 [0, 255] (round half to even, clamped)."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def _check_finite_images(x: torch.Tensor, start: int, guidance: float) -> None:
    """Refuse a batch with a NaN or infinite pixel: :func:`to_uint8` would make it black (NaN) or
    white (inf) without a word, and a replica set of such images would look complete."""
    bad = ~torch.isfinite(x).flatten(1).all(dim=1)  # (B,)
    if bool(bad.any()):  # a sync, as the copy to the CPU that follows is
        first = start + int(bad.nonzero()[0])
        raise CxrsynthError(
            f"the generator's output is NaN or infinite for {int(bad.sum())} of {len(x)} images of the batch from image "
            f"{start} (first: image {first}); not writing them as images. A guidance too large for float32 "
            f"(it is {guidance:g}) or a generator with damaged weights does this")


def _noise(generators: list[torch.Generator], shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """(B, *shape) standard normal noise, row i from generators[i], drawn on the CPU.

    On CUDA the copy goes through pinned memory without blocking: the per-step noise of
    stochastic DDIM is drawn while the GPU runs the network, with no sync.
    """
    noise = torch.stack([torch.randn(shape, generator=g) for g in generators])
    if device.type == "cuda":
        return noise.pin_memory().to(device, non_blocking=True)
    return noise.to(device)


@torch.no_grad()
def sample_batch(
    model: ConditionalUNet,
    cond: torch.Tensor,
    seeds: Sequence[int],
    *,
    sampler: str = "ddim",
    steps: int,
    guidance: float = 1.0,
    eta: float = 0.0,
    cfg_formula: CfgFormula = "standard",
    timestep_spacing: str = "trailing",
    dtype: torch.dtype = torch.float32,
    forward: torch.nn.Module | None = None,
) -> torch.Tensor:
    """Denoise one batch; returns [-1, 1] float32 images (B, C, H, W).

    ``forward`` replaces ``model`` for the network calls (a compiled module); the
    model itself provides the configuration. ``dtype`` bf16 runs an fp32 model under
    autocast (norms and softmax in fp32); a model cast to bf16 whole runs in bf16
    throughout (half the activation bytes of the memory-bound ops; the sampler's own
    arithmetic stays fp32 either way).
    """
    cfg = model.gen_config
    device = next(model.parameters()).device
    spec = get_sampler(sampler)
    scheduler = spec.build(cfg, timestep_spacing)
    scheduler.set_timesteps(steps, device=device)
    net = forward if forward is not None else model
    shape = (cfg.in_channels, cfg.image_size, cfg.image_size)
    # 1. One generator per image; x_T ~ N(0, I) from it.
    gens = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
    x = _noise(gens, shape, device) * scheduler.init_noise_sigma  # (B, C, H, W)
    cond = cond.to(device=device, dtype=torch.float32)
    weights = next(model.parameters()).dtype
    if weights != torch.float32:  # a model cast whole (bf16 weights): no autocast, inputs cast
        dtype = weights
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != weights)
    for t in scheduler.timesteps:
        # 2. Network output at (x_t, t) with guidance; keep the prediction channels
        #    (the second half is the learned variance, unused by DDIM / DPM-Solver).
        if forward is not None:
            torch.compiler.cudagraph_mark_step_begin()  # CUDA-graph outputs of the last step are free
        with autocast:
            out = guided_output(net, x.to(dtype) if dtype != torch.float32 else x, t, cond, guidance, cfg_formula)
        pred = out[:, : cfg.in_channels].float()
        # 3. x_{t-1} from the scheduler; DDIM's sigma_t * z uses each image's generator.
        kwargs: dict[str, Any] = {}
        if spec.stochastic:
            kwargs["eta"] = eta
            if eta > 0:
                kwargs["variance_noise"] = _noise(gens, shape, device)
        x = scheduler.step(pred, t, x, **kwargs).prev_sample
    return x.float()


def sample(
    model: ConditionalUNet,
    cond: torch.Tensor,
    seeds: Sequence[int],
    *,
    sampler: str = "ddim",
    steps: int,
    guidance: float = 1.0,
    eta: float = 0.0,
    cfg_formula: CfgFormula = "standard",
    timestep_spacing: str = "trailing",
    batch_size: int = 16,
    dtype: torch.dtype = torch.float32,
    forward: torch.nn.Module | None = None,
) -> torch.Tensor:
    """Generate one image per (condition, seed) pair.

    Args:
        model: The generator (its device is used).
        cond: (N, 22) conditioning vectors (labels.conditioning_vectors).
        seeds: N seeds, one per image.
        sampler: Registered sampler name (:func:`~cxrsynth.diffusion.schedule.list_samplers`).
        steps: Denoising steps (no default here: a replica set's is
            :class:`cxrsynth.diffusion.replicas.GenerateConfig`'s; the paper used DDIM 200).
        guidance: Guidance scale w (meaning depends on ``cfg_formula``).
        eta: DDIM stochasticity (0 deterministic, 1 DDPM-like; Mediffusion used 1).
        cfg_formula: ``standard`` or ``mediffusion`` (see the module docstring).
        timestep_spacing: ``trailing`` or ``leading`` (Mediffusion).
        batch_size: Images per network call (x2 with guidance); does not change results.
        dtype: ``torch.bfloat16`` runs the network under autocast (GPU); ignored for a
            model cast to bf16 (see :func:`sample_batch`).
        forward: Optional compiled version of ``model`` for the network calls.

    Returns:
        (N, C, H, W) uint8 images.

    Raises:
        CxrsynthError: a batch's output holds NaN or infinite values (not turned into pixels).
    """
    if cond.ndim != 2 or len(cond) != len(seeds):
        raise CxrsynthError(f"need one seed per condition row: cond {tuple(cond.shape)}, {len(seeds)} seeds")
    if batch_size < 1:
        raise CxrsynthError(f"batch size must be >= 1, got {batch_size}")
    if steps < 1:
        raise CxrsynthError(f"sampler steps must be >= 1, got {steps}")
    out = []
    for start in range(0, len(seeds), batch_size):
        x = sample_batch(
            model, cond[start : start + batch_size], seeds[start : start + batch_size],
            sampler=sampler, steps=steps, guidance=guidance, eta=eta, cfg_formula=cfg_formula,
            timestep_spacing=timestep_spacing, dtype=dtype, forward=forward,
        )
        _check_finite_images(x, start, guidance)
        out.append(to_uint8(x).cpu())
    if not out:
        cfg = model.gen_config
        return torch.empty((0, cfg.in_channels, cfg.image_size, cfg.image_size), dtype=torch.uint8)
    return torch.cat(out)


#: ``torch.compile`` modes (``reduce-overhead`` replays CUDA graphs of the network).
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def fast_paths(
    model: ConditionalUNet,
    *,
    compile: bool = False,
    compile_mode: str = "default",
    channels_last: bool = True,
    deterministic: bool = True,
) -> torch.nn.Module | None:
    """The sampling fast paths, chosen in one place; returns ``forward`` for :func:`sample`.

    On CUDA: channels_last (NHWC convolutions; off only to measure it) and TF32 matmuls; with
    ``deterministic`` (replica generation, whose bytes must repeat on a rerun) cuDNN picks
    deterministic algorithms, without it (benchmarks) it autotunes. ``compile`` wraps the
    network in ``torch.compile`` with ``compile_mode`` (:data:`COMPILE_MODES`; the
    network traces as one graph, no breaks, so ``fullgraph=True``). On CPU nothing
    changes but ``compile``. Attention runs through ``scaled_dot_product_attention``
    (diffusers' ``AttnProcessor2_0``): flash attention on the GPU in bf16.
    """
    if compile_mode not in COMPILE_MODES:
        raise UnknownNameError("compile mode", compile_mode, COMPILE_MODES)
    device = next(model.parameters()).device
    if device.type == "cuda":
        runtime.cuda_fast_paths(deterministic)
        if channels_last:
            model.to(memory_format=torch.channels_last)
    if not compile:
        return None
    return torch.compile(model, mode=None if compile_mode == "default" else compile_mode, fullgraph=True)
