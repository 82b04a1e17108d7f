"""Noise schedules and samplers, built from a :class:`GeneratorConfig` by name.

All schedulers come from diffusers and share the generator's training process: the
cosine schedule (``squaredcos_cap_v2``, improved DDPM) rescaled to zero terminal SNR
(Lin et al. 2023; Mediffusion's ``enforce_zero_terminal_snr``), v-prediction,
``num_train_timesteps`` steps. Register a new sampler with :func:`register_sampler`.

Timestep spacing: ``trailing`` (default) starts sampling at t = T-1, where the
zero-SNR schedule gives pure noise, as Lin et al. recommend; ``leading`` is DDIM's
original striding (0, k, 2k, ...), which Mediffusion's ``DDIM200`` used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from cxrsynth.diffusion.presets import GeneratorConfig
from cxrsynth.registry import Registry


def _common(config: GeneratorConfig) -> dict[str, Any]:
    return {
        "num_train_timesteps": config.num_train_timesteps,
        "beta_schedule": config.beta_schedule,
        "rescale_betas_zero_snr": config.zero_terminal_snr,
        "prediction_type": config.prediction_type,
    }


class FittedDDIM(DDIMScheduler):
    """diffusers' DDIM whose noise variance always fits under ``1 - alpha_bar_prev``.

    DDIM's step takes ``sqrt(1 - alpha_bar_prev - (eta * sigma_t)^2)``. At t = T of the
    zero-terminal-SNR schedule (alpha_bar_T = 0: the first step of ``trailing`` spacing),
    sigma_t^2 at eta = 1 equals ``1 - alpha_bar_prev`` exactly, and float32 rounding of
    ``sqrt(sigma_t^2)^2`` exceeds it by an ulp: the square root is NaN and every image of
    ``generate --eta 1`` came out black. :meth:`_get_variance` lowers sigma_t^2 by the few
    ulps that make it fit (so for any eta <= 1); where it fits already, it is unchanged, and
    so are the images.
    """

    def _get_variance(self, timestep: int, prev_timestep: int) -> torch.Tensor:
        variance = super()._get_variance(timestep, prev_timestep)
        alpha_prev = self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.final_alpha_cumprod
        while bool(1 - alpha_prev - (variance ** 0.5) ** 2 < 0):  # as step() computes it, at eta = 1
            variance = torch.nextafter(variance, torch.zeros_like(variance))
        return variance


def training_scheduler(config: GeneratorConfig) -> DDPMScheduler:
    """The forward process q(x_t | x_0) used in training (betas, alphas_cumprod)."""
    return DDPMScheduler(**_common(config), clip_sample=False)


@dataclass(frozen=True)
class Sampler:
    """A named sampler: how to build its diffusers scheduler and what ``step`` takes.

    Attributes:
        name: Registry name.
        build: ``(config, timestep_spacing) -> scheduler``.
        stochastic: True when ``step`` accepts ``eta`` and ``variance_noise`` (DDIM).
    """

    name: str
    build: Callable[[GeneratorConfig, str], Any]
    stochastic: bool


SAMPLERS: Registry[Sampler] = Registry("sampler")


def register_sampler(sampler: Sampler) -> Sampler:
    """Add a sampler to the registry (unique names)."""
    return SAMPLERS.register(sampler.name, sampler)


def get_sampler(name: str) -> Sampler:
    """The sampler called ``name``."""
    return SAMPLERS[name]


def list_samplers() -> list[str]:
    """Registered sampler names."""
    return SAMPLERS.names()


register_sampler(
    Sampler(
        name="ddim",
        # clip_sample: x_0 estimates clipped to [-1, 1], as Mediffusion's clip_denoised=True.
        build=lambda c, spacing: FittedDDIM(
            **_common(c), clip_sample=True, set_alpha_to_one=True, timestep_spacing=spacing
        ),
        stochastic=True,
    )
)
register_sampler(
    Sampler(
        name="ddim-unclipped",
        # The plain DDIM ODE solver (eta = 0): no x_0 clipping, so it converges to the same
        # probability-flow ODE solution as dpmpp (`cxrsynth bench solvers` compares them).
        build=lambda c, spacing: FittedDDIM(
            **_common(c), clip_sample=False, set_alpha_to_one=True, timestep_spacing=spacing
        ),
        stochastic=True,
    )
)
register_sampler(
    Sampler(
        name="dpmpp",
        # DPM-Solver++(2M): deterministic multistep solver for 10-25 steps.
        build=lambda c, spacing: DPMSolverMultistepScheduler(
            **_common(c), algorithm_type="dpmsolver++", solver_order=2,
            timestep_spacing=spacing, final_sigmas_type="zero", lower_order_final=True,
        ),
        stochastic=False,
    )
)
