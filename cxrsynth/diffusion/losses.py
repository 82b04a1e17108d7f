"""Training loss: v (or eps / x0) regression plus improved DDPM's variance bound term.

The network's second output channel interpolates the log variance between the
posterior's beta~_t and beta_t (Nichol & Dhariwal 2021, "learned range"). It is
trained by the variational bound L_vlb with the mean's gradient stopped, as in
improved DDPM's hybrid loss and Mediffusion (``MSE`` + ``LEARNED_RANGE``):

    L = || pred - target ||^2  +  lambda * L_vlb(frozen mean, learned variance)

with lambda = T / 1000 * ``vlb_weight``. Losses are per-sample means over pixels.
"""

from __future__ import annotations

import math

import torch

from cxrsynth.diffusion.presets import GeneratorConfig


class ScheduleTensors:
    """alpha_bar_t, alpha_bar_{t-1}, beta_t and the posterior log variance as tensors."""

    def __init__(self, alphas_cumprod: torch.Tensor) -> None:
        ab = alphas_cumprod.double()
        ab_prev = torch.cat([ab.new_ones(1), ab[:-1]])
        beta = 1 - ab / ab_prev
        post_var = beta * (1 - ab_prev) / (1 - ab).clamp_min(1e-20)
        post_var[0] = 0.0
        self.alpha_bar = ab.float()
        self.alpha_bar_prev = ab_prev.float()
        self.beta = beta.float()
        # log of beta~_t, with t = 0 clipped to t = 1's value (beta~_0 = 0).
        self.post_log_var = torch.log(torch.cat([post_var[1:2], post_var[1:]])).float()
        self.coef_x0 = (beta * ab_prev.sqrt() / (1 - ab).clamp_min(1e-20)).float()
        self.coef_xt = ((1 - ab_prev) * (1 - beta).sqrt() / (1 - ab).clamp_min(1e-20)).float()

    def to(self, device: torch.device) -> "ScheduleTensors":
        for k, v in vars(self).items():
            setattr(self, k, v.to(device))
        return self


def _bcast(v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return v[t][:, None, None, None]  # (B, 1, 1, 1)


def _normal_kl(mu1: torch.Tensor, lv1: torch.Tensor, mu2: torch.Tensor, lv2: torch.Tensor) -> torch.Tensor:
    return 0.5 * (-1.0 + lv2 - lv1 + torch.exp(lv1 - lv2) + (mu1 - mu2) ** 2 * torch.exp(-lv2))


def _approx_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def _discretized_nll(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """-log p(x) of 8-bit data in [-1, 1] under a discretized Gaussian (improved DDPM)."""
    centered = x - mean
    inv_std = torch.exp(-log_scale)
    cdf_plus = _approx_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = _approx_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    log_probs = torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))
    return -log_probs


def diffusion_loss(
    output: torch.Tensor,
    x0: torch.Tensor,
    xt: torch.Tensor,
    noise: torch.Tensor,
    t: torch.Tensor,
    sched: ScheduleTensors,
    config: GeneratorConfig,
) -> torch.Tensor:
    """Per-sample training loss (B,).

    Args:
        output: (B, out_channels, H, W) network output (float32).
        x0: (B, C, H, W) clean images in [-1, 1].
        xt: (B, C, H, W) noisy images.
        noise: (B, C, H, W) the eps that made ``xt``.
        t: (B,) long timesteps.
        sched: Schedule tensors on the same device.
        config: The generator configuration (prediction type, learned variance).
    """
    c = config.in_channels
    pred = output[:, :c]
    ab = _bcast(sched.alpha_bar, t)
    if config.prediction_type == "v_prediction":
        target = ab.sqrt() * noise - (1 - ab).sqrt() * x0
    elif config.prediction_type == "epsilon":
        target = noise
    else:
        target = x0
    dims = tuple(range(1, x0.ndim))
    loss = ((pred - target) ** 2).mean(dim=dims)
    if not config.learned_variance or config.vlb_weight == 0:
        return loss
    # x0 estimate with the mean's gradient stopped (frozen_out in improved DDPM).
    p = pred.detach()
    if config.prediction_type == "v_prediction":
        x0_hat = ab.sqrt() * xt - (1 - ab).sqrt() * p
    elif config.prediction_type == "epsilon":
        x0_hat = (xt - (1 - ab).sqrt() * p) / ab.sqrt().clamp_min(1e-8)
    else:
        x0_hat = p
    cx0, cxt = _bcast(sched.coef_x0, t), _bcast(sched.coef_xt, t)
    true_mean = cx0 * x0 + cxt * xt
    model_mean = cx0 * x0_hat + cxt * xt
    min_log = _bcast(sched.post_log_var, t)
    max_log = torch.log(_bcast(sched.beta, t).clamp_min(1e-20))
    frac = (output[:, c:] + 1) / 2
    model_log_var = frac * max_log + (1 - frac) * min_log
    kl = _normal_kl(true_mean, min_log, model_mean, model_log_var).mean(dim=dims) / math.log(2.0)
    nll = _discretized_nll(x0, model_mean, 0.5 * model_log_var).mean(dim=dims) / math.log(2.0)
    vb = torch.where(t == 0, nll, kl)
    return loss + config.vlb_weight * vb * (config.num_train_timesteps / 1000.0)
