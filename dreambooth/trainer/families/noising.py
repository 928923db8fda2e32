"""How a training example is noised and what the denoiser must predict for it.

Two ways, chosen by the family (:meth:`Family.noised`):

- **DDPM** (SD 1.x/2.x, SDXL): a timestep uniform in ``[0, num_train_timesteps)``, the
  scheduler's ``add_noise``, target the noise (epsilon) or the velocity (v-prediction);
  optional Min-SNR-gamma weights (Hang et al. 2023).
- **Flow matching** (SD3): ``u`` from a density over ``[0, 1]`` (``logit_normal``: the
  sigmoid of a normal draw with ``logitMean``/``logitStd``; ``mode``: a uniform draw bent by
  ``modeScale`` toward the middle; ``cosmap`` and ``uniform``: uniform), the sigma of the
  scheduler's (shifted) training schedule at index ``floor(u x N)``, noisy input
  ``(1 - sigma) x + sigma noise`` at timestep ``sigma x N``, target ``noise - x``. Loss
  weights: ``cosmap`` ``2 / (pi (1 - 2 sigma + 2 sigma^2))``, else 1. With
  ``precondition`` (the reference's default), the reference compares ``noisy - sigma pred``
  with ``x``; that difference is ``sigma (target - pred)``, so it is the same loss with the
  weight multiplied by ``sigma^2``, which is how it is applied here.

Every draw comes from the sample's own generator (``gens``): the same draws on 1 or N
processes, and again after a resume. These are the SD3 paper's schemes as diffusers'
training utilities define them (``compute_density_for_timestep_sampling``,
``compute_loss_weighting_for_sd3``), written here from the formulas.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dreambooth.api.spec import FlowMatchingSpec, TrainingSpec, Weighting


@dataclass
class Noised:
    noisy: torch.Tensor  # the denoiser's input
    timesteps: torch.Tensor  # (batch,): what the denoiser is told
    target: torch.Tensor  # what its output is compared with
    weights: torch.Tensor | None = None  # (batch,): per-sample loss weights; None is 1


def snr_weights(scheduler, timesteps: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023)."""
    alphas = scheduler.alphas_cumprod.to(timesteps.device)[timesteps]
    snr = alphas / (1 - alphas)
    weights = torch.clamp(snr, max=gamma) / snr
    return weights * snr / (snr + 1) if prediction_type == "v_prediction" else weights


def ddpm(
    scheduler, latents: torch.Tensor, noise: torch.Tensor, gens: list[torch.Generator], training: TrainingSpec
) -> Noised:
    device = latents.device
    steps = scheduler.config.num_train_timesteps
    timesteps = torch.cat([torch.randint(0, steps, (1,), generator=g, device=device) for g in gens])
    prediction_type = scheduler.config.prediction_type
    target = noise if prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, timesteps)
    weights = snr_weights(scheduler, timesteps, training.snr_gamma, prediction_type) if training.snr_gamma else None
    return Noised(scheduler.add_noise(latents, noise, timesteps), timesteps, target, weights)


def density(flow: FlowMatchingSpec, gens: list[torch.Generator], device) -> torch.Tensor:
    """One ``u`` in [0, 1] per generator, from ``flow.weighting``'s density."""
    if flow.weighting is Weighting.LOGIT_NORMAL:
        draws = [torch.normal(flow.logit_mean, flow.logit_std, (1,), generator=g, device=device) for g in gens]
        return torch.sigmoid(torch.cat(draws))
    u = torch.cat([torch.rand((1,), generator=g, device=device) for g in gens])
    if flow.weighting is Weighting.MODE:
        u = 1 - u - flow.mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    return u


def training_sigmas(scheduler) -> torch.Tensor:
    """The sigmas of the flow-matching scheduler's training schedule (shift applied), from a
    fresh copy: sampling never changes the ones training reads."""
    return type(scheduler).from_config(scheduler.config).sigmas.float()


def loss_weights(flow: FlowMatchingSpec, sigmas: torch.Tensor) -> torch.Tensor:
    if flow.weighting is Weighting.COSMAP:
        weights = 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas**2))
    else:
        weights = torch.ones_like(sigmas)
    return weights * sigmas**2 if flow.precondition else weights


def flow_matching(
    scheduler, latents: torch.Tensor, noise: torch.Tensor, gens: list[torch.Generator], training: TrainingSpec
) -> Noised:
    flow = training.flow_matching or FlowMatchingSpec()
    steps = scheduler.config.num_train_timesteps
    u = density(flow, gens, latents.device)
    index = (u * steps).long().clamp(0, steps - 1)
    sigmas = training_sigmas(scheduler).to(latents.device)[index]
    s = sigmas.view(-1, *([1] * (latents.ndim - 1)))
    noisy = (1 - s) * latents + s * noise
    return Noised(noisy, sigmas * steps, noise - latents, loss_weights(flow, sigmas))
