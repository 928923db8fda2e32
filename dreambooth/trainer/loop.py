"""The DreamBooth training loop, readable in one sitting.

Each optimizer step draws ``batchSize`` images over all processes and accumulation steps
(plus as many class images with prior preservation), noises their latents at random
timesteps and trains the UNet (and maybe the text encoder) to predict the noise (or the
velocity, for v-prediction models). Everything random in a step (data order, noise,
timesteps, dropout) is a pure function of (seed, step, micro-batch, rank), so a resumed run
continues exactly where an uninterrupted one would be.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from dreambooth.api.spec import TrainingSpec
from dreambooth.trainer.data import Example, sample_indices

log = logging.getLogger(__name__)


def step_seed(seed: int, step: int, micro: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, step, micro, rank]).generate_state(1)[0])


class LatentCache:
    """The VAE posterior (mean, std) of every image, computed once: the VAE never trains.

    Latents are still *sampled* every step from the cached posterior, as if encoded anew.
    """

    def __init__(self, vae, examples: list[Example], *, device, dtype, batch: int = 8) -> None:
        means, stds = [], []
        with torch.no_grad():
            for i in range(0, len(examples), batch):
                pixels = torch.stack([e.pixels for e in examples[i : i + batch]]).to(device, dtype)
                dist = vae.encode(pixels).latent_dist
                means.append(dist.mean.float())
                stds.append(dist.std.float())
        self.mean = torch.cat(means)
        self.std = torch.cat(stds)
        self.scaling = float(vae.config.scaling_factor)
        self.prompts = [e.prompt for e in examples]

    def __len__(self) -> int:
        return len(self.prompts)

    def sample(self, indices: list[int], generator: torch.Generator) -> torch.Tensor:
        mean, std = self.mean[indices], self.std[indices]
        noise = torch.randn(mean.shape, generator=generator, device=mean.device)
        return (mean + std * noise) * self.scaling


class PromptEncoder:
    """Text embeddings; cached per prompt whenever the text encoder is not training."""

    def __init__(self, tokenizer, text_encoder, device) -> None:
        self.tokenizer, self.text_encoder, self.device = tokenizer, text_encoder, device
        self.cache: dict[str, torch.Tensor] = {}

    def _ids(self, prompts: list[str]) -> torch.Tensor:
        return self.tokenizer(
            prompts,
            padding="max_length",
            truncation=True,
            max_length=self.tokenizer.model_max_length,
            return_tensors="pt",
        ).input_ids.to(self.device)

    def __call__(self, prompts: list[str], *, training: bool) -> torch.Tensor:
        if training:
            self.cache.clear()
            return self.text_encoder(self._ids(prompts))[0]
        missing = sorted({p for p in prompts if p not in self.cache})
        if missing:
            with torch.no_grad():
                for prompt, emb in zip(missing, self.text_encoder(self._ids(missing))[0]):
                    self.cache[prompt] = emb
        return torch.stack([self.cache[p] for p in prompts])


def snr_weights(scheduler, timesteps: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023)."""
    alphas = scheduler.alphas_cumprod.to(timesteps.device)[timesteps]
    snr = alphas / (1 - alphas)
    weights = torch.clamp(snr, max=gamma) / snr
    return weights * snr / (snr + 1) if prediction_type == "v_prediction" else weights


@dataclass
class StepLoss:
    total: torch.Tensor
    instance: torch.Tensor
    prior: torch.Tensor | None


def diffusion_loss(unet, scheduler, latents, cond, generator, *, training: TrainingSpec,
                   prediction_type: str, n_prior: int, prior_weight: float) -> StepLoss:
    """Noise ``latents``, predict with ``unet``; the last ``n_prior`` rows are class images."""
    noise = torch.randn(latents.shape, generator=generator, device=latents.device)
    if training.noise_offset:
        shape = (latents.shape[0], latents.shape[1], 1, 1)
        noise = noise + training.noise_offset * torch.randn(shape, generator=generator, device=latents.device)
    timesteps = torch.randint(
        0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator, device=latents.device
    )
    noisy = scheduler.add_noise(latents, noise, timesteps)
    pred = unet(noisy, timesteps, cond).sample.float()
    target = noise if prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, timesteps)
    per_sample = F.mse_loss(pred, target.float(), reduction="none").mean(dim=(1, 2, 3))
    if training.snr_gamma:
        per_sample = per_sample * snr_weights(scheduler, timesteps, training.snr_gamma, prediction_type)
    n_instance = latents.shape[0] - n_prior
    instance = per_sample[:n_instance].mean()
    if not n_prior:
        return StepLoss(instance, instance, None)
    prior = per_sample[n_instance:].mean()
    return StepLoss(instance + prior_weight * prior, instance, prior)


@dataclass
class Loop:
    """Everything one process needs to run optimizer steps."""

    accelerator: object
    training: TrainingSpec
    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    scheduler: object
    prompts: PromptEncoder
    instances: LatentCache
    classes: LatentCache | None
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    prediction_type: str
    prior_weight: float = 1.0
    text_encoder_steps: int = 0  # train the text encoder while step < this
    trained: list[torch.nn.Module] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.parameters = [p for group in self.optimizer.param_groups for p in group["params"]]

    @property
    def per_device(self) -> int:
        a = self.accelerator
        return self.training.batch_size // (a.num_processes * self.training.gradient_accumulation_steps)

    def _micro_batch(self, step: int, micro: int, generator: torch.Generator):
        a = self.accelerator
        common = dict(per_device=self.per_device, processes=a.num_processes,
                      accumulation=self.training.gradient_accumulation_steps, seed=self.training.seed)
        idx = sample_indices(step, micro, a.process_index, dataset_size=len(self.instances), **common)
        latents = [self.instances.sample(idx, generator)]
        prompts = [self.instances.prompts[i] for i in idx]
        if self.classes is not None:
            cidx = sample_indices(step, micro, a.process_index, dataset_size=len(self.classes), **common)
            latents.append(self.classes.sample(cidx, generator))
            prompts += [self.classes.prompts[i] for i in cidx]
        return torch.cat(latents), prompts, len(idx) if self.classes is not None else 0

    def run_step(self, step: int) -> dict[str, float]:
        """One optimizer step (all micro-batches); returns losses averaged over processes."""
        a = self.accelerator
        train_te = step < self.text_encoder_steps
        if not train_te and self.text_encoder.training:
            self.text_encoder.requires_grad_(False).eval()  # frozen from now on
        accumulation = self.training.gradient_accumulation_steps
        sums = torch.zeros(3, device=a.device)
        for micro in range(accumulation):
            seed = step_seed(self.training.seed, step, micro, a.process_index)
            torch.manual_seed(seed)  # dropout (LoRA) draws from the global generator
            generator = torch.Generator(device=a.device).manual_seed(seed)
            latents, prompts, n_prior = self._micro_batch(step, micro, generator)
            last = micro == accumulation - 1
            with contextlib.ExitStack() as stack:
                if not last:
                    for model in self.trained:
                        stack.enter_context(a.no_sync(model))
                with a.autocast():
                    cond = self.prompts(prompts, training=train_te)
                    loss = diffusion_loss(
                        self.unet, self.scheduler, latents, cond, generator, training=self.training,
                        prediction_type=self.prediction_type, n_prior=n_prior, prior_weight=self.prior_weight,
                    )
                a.backward(loss.total / accumulation)
            sums += torch.stack([
                loss.total.detach(), loss.instance.detach(),
                loss.prior.detach() if loss.prior is not None else torch.zeros((), device=a.device),
            ]).float()
        if a.scaler is not None:
            a.unscale_gradients(self.optimizer)  # fp16: clip the true gradients
        torch.nn.utils.clip_grad_norm_(self.parameters, self.training.max_grad_norm, foreach=True)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        total, instance, prior = (a.reduce(sums, reduction="mean") / accumulation).tolist()
        out = {"loss": total, "instance_loss": instance, "lr": self.lr_scheduler.get_last_lr()[0]}
        if self.classes is not None:
            out["prior_loss"] = prior
        return out


@dataclass
class Throughput:
    """Images per second over the recent steps (an exponential moving average)."""

    images_per_step: int
    smoothing: float = 0.8
    value: float | None = None
    _last: float = field(default_factory=time.perf_counter)

    def tick(self) -> float:
        now = time.perf_counter()
        rate = self.images_per_step / max(now - self._last, 1e-9)
        self._last = now
        self.value = rate if self.value is None else self.smoothing * self.value + (1 - self.smoothing) * rate
        return self.value


StepHook = Callable[[int, dict[str, float]], None]
