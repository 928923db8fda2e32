"""The DreamBooth training loop, readable in one sitting.

Each optimizer step draws ``batchSize`` images over all processes and accumulation steps
(plus as many class images with prior preservation), noises their latents at random
timesteps and trains the denoiser (and maybe the text encoders) to predict what the family
trains it for (the noise, the velocity, or SD3's flow-matching target); a micro-batch's
images share one aspect-ratio bucket. Everything random in a step (data order, buckets,
flips, noise, timesteps, dropout) is a pure function of (seed, step, micro-batch, rank), so a resumed run
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
from dreambooth.trainer.buckets import CLASS_STREAM, Draw
from dreambooth.trainer.data import Example, sample_positions
from dreambooth.trainer.families import Conditioning, Family, SampleSize

log = logging.getLogger(__name__)


def sample_seed(seed: int, position: int) -> int:
    """The seed of everything random about the sample at global ``position`` of the run."""
    return int(np.random.SeedSequence([seed, position]).generate_state(1)[0])


def dropout_seed(seed: int, step: int, micro: int, rank: int) -> int:
    """Dropout (e.g. LoRA's) draws from torch's global generator: seeded per micro-batch."""
    return int(np.random.SeedSequence([seed, step, micro, rank, 1]).generate_state(1)[0])


def generators(seed: int, positions: range, device, offset: int = 0) -> list[torch.Generator]:
    """One generator per sample, seeded by its position in the run, not by the rank that
    draws it: the same job gives the same result on 1 GPU or 8."""
    return [torch.Generator(device=device).manual_seed(sample_seed(seed, offset + p)) for p in positions]


def randn(shape, gens: list[torch.Generator], device) -> torch.Tensor:
    return torch.stack([torch.randn(shape, generator=g, device=device) for g in gens])


class LatentCache:
    """The VAE posterior (mean, std) of every image, computed once: the VAE never trains.

    Latents are still *sampled* every step from the cached posterior, as if encoded anew.
    """

    def __init__(self, vae, examples: list[Example], *, device, dtype, batch: int = 8) -> None:
        self.mean: list[torch.Tensor] = [None] * len(examples)
        self.std: list[torch.Tensor] = [None] * len(examples)
        by_shape: dict[tuple[int, ...], list[int]] = {}  # one per bucket: a batch shares a shape
        for i, e in enumerate(examples):
            by_shape.setdefault(tuple(e.pixels.shape), []).append(i)
        with torch.no_grad():
            for indices in by_shape.values():
                for start in range(0, len(indices), batch):
                    chunk = indices[start : start + batch]
                    pixels = torch.stack([examples[i].pixels for i in chunk]).to(device, dtype)
                    dist = vae.encode(pixels).latent_dist
                    for i, mean, std in zip(chunk, dist.mean.float(), dist.std.float(), strict=True):
                        self.mean[i], self.std[i] = mean, std
        self.scaling = float(vae.config.scaling_factor)
        self.shift = float(getattr(vae.config, "shift_factor", None) or 0.0)  # SD3's VAE has one
        self.prompts = [e.prompt for e in examples]
        self.sizes = [e.size for e in examples]

    def __len__(self) -> int:
        return len(self.prompts)

    def sample(self, indices: list[int], gens: list[torch.Generator]) -> torch.Tensor:
        mean = torch.stack([self.mean[i] for i in indices])
        std = torch.stack([self.std[i] for i in indices])
        return (mean + std * randn(mean.shape[1:], gens, mean.device) - self.shift) * self.scaling


@contextlib.contextmanager
def borrowed(modules, device, park):
    """``modules`` on ``device`` inside the block and back on ``park`` after it (``park``
    None: they stay where they are)."""
    if park is None:
        yield
        return
    for module in modules:
        module.to(device)
    try:
        yield
    finally:
        for module in modules:
            module.to(park)


class PromptEncoder:
    """The family's conditioning of prompts; cached per prompt whenever no text encoder trains.

    ``park``: where the text encoders wait between encodings in a run that trains none of
    them (the CPU, on a GPU: the steps read cached embeddings, so SD3's T5-XXL and both CLIPs
    leave the GPU's memory to the denoiser); :meth:`on_device` brings them back for a while
    (sampling)."""

    def __init__(self, family: Family, tokenizers, text_encoders, device, *, park=None) -> None:
        self.family, self.tokenizers, self.text_encoders = family, list(tokenizers), list(text_encoders)
        self.device, self.park = device, park
        self.cache: dict[str, Conditioning] = {}

    def on_device(self):
        """The text encoders on the compute device inside the block, parked after it."""
        return borrowed(self.text_encoders, self.device, self.park)

    def __call__(self, prompts: list[str], *, training: bool) -> Conditioning:
        if training:
            self.cache.clear()
            return self.family.encode(self.tokenizers, self.text_encoders, prompts, self.device)
        missing = sorted({p for p in prompts if p not in self.cache})
        if missing:
            with torch.no_grad(), self.on_device():
                encoded = self.family.encode(self.tokenizers, self.text_encoders, missing, self.device)
                self.cache.update(zip(missing, encoded.rows(), strict=True))
        return Conditioning.stack([self.cache[p] for p in prompts])


@dataclass
class StepLoss:
    total: torch.Tensor
    instance: torch.Tensor
    prior: torch.Tensor | None


def diffusion_loss(
    family: Family,
    denoiser,
    scheduler,
    latents,
    cond: Conditioning,
    sizes: list[SampleSize],
    gens: list[torch.Generator],
    *,
    training: TrainingSpec,
    n_prior: int,
    prior_weight: float,
) -> StepLoss:
    """Noise ``latents`` the family's way (DDPM, flow matching), predict with its
    ``denoiser``; the last ``n_prior`` rows are class images. ``gens`` holds one generator
    per row."""
    device = latents.device
    noise = randn(latents.shape[1:], gens, device)
    if training.noise_offset:
        noise = noise + training.noise_offset * randn((latents.shape[1], 1, 1), gens, device)
    drawn = family.noised(scheduler, latents, noise, gens, training)
    pred = family.predict(denoiser, drawn.noisy, drawn.timesteps, cond, sizes).float()
    per_sample = F.mse_loss(pred, drawn.target.float(), reduction="none").mean(dim=(1, 2, 3))
    if drawn.weights is not None:
        per_sample = per_sample * drawn.weights.float()
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
    family: Family
    denoiser: torch.nn.Module  # the UNet (SD3: the transformer)
    text_encoders: list[torch.nn.Module]
    scheduler: object
    vae: torch.nn.Module  # encoded the latents (compute dtype); samples decode with it
    prompts: PromptEncoder
    instances: LatentCache
    classes: LatentCache | None
    draw: Draw  # which cached image (bucket, flip) each sample trains on
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    prior_weight: float = 1.0
    vae_park: torch.device | None = None  # where the VAE waits between sample rounds (None: on the device)
    text_encoder_steps: int = 0  # train the text encoders while step < this
    trained: list[torch.nn.Module] = field(default_factory=list)
    ema: object | None = None  # diffusers EMAModel of the denoiser's weights
    phase: str = "dreambooth"
    #: further state for checkpoints, by name: objects with state_dict()/load_state_dict()
    extras: dict[str, object] = field(default_factory=dict)
    before_optimizer_step: Callable[[], None] | None = None
    after_optimizer_step: Callable[[], None] | None = None

    def __post_init__(self) -> None:
        self.parameters = [p for group in self.optimizer.param_groups for p in group["params"]]

    @property
    def per_device(self) -> int:
        a = self.accelerator
        return self.training.batch_size // (a.num_processes * self.training.gradient_accumulation_steps)

    def _micro_batch(self, step: int, micro: int):
        """Latents, prompts and per-sample generators of this rank's share of a micro-batch."""
        a, seed = self.accelerator, self.training.seed
        positions = sample_positions(
            step,
            micro,
            a.process_index,
            per_device=self.per_device,
            processes=a.num_processes,
            accumulation=self.training.gradient_accumulation_steps,
        )
        idx = self.draw.instances(positions)
        gens = generators(seed, positions, a.device)
        latents = [self.instances.sample(idx, gens)]
        prompts = [self.instances.prompts[i] for i in idx]
        sizes = [self.instances.sizes[i] for i in idx]
        if self.classes is None:
            return latents[0], prompts, sizes, gens, 0
        cidx = self.draw.classes(positions)  # in the micro-batch's bucket
        class_gens = generators(seed, positions, a.device, offset=CLASS_STREAM)
        latents.append(self.classes.sample(cidx, class_gens))
        prompts += [self.classes.prompts[i] for i in cidx]
        sizes += [self.classes.sizes[i] for i in cidx]
        return torch.cat(latents), prompts, sizes, gens + class_gens, len(idx)

    def run_step(self, step: int) -> dict[str, float]:
        """One optimizer step (all micro-batches); returns losses averaged over processes."""
        a = self.accelerator
        train_te = step < self.text_encoder_steps
        for text_encoder in self.text_encoders:
            if not train_te and text_encoder.training:
                text_encoder.requires_grad_(False).eval()  # frozen from now on
        accumulation = self.training.gradient_accumulation_steps
        sums = torch.zeros(3, device=a.device)
        for micro in range(accumulation):
            latents, prompts, sizes, gens, n_prior = self._micro_batch(step, micro)
            torch.manual_seed(dropout_seed(self.training.seed, step, micro, a.process_index))
            last = micro == accumulation - 1
            with contextlib.ExitStack() as stack:
                if not last:
                    for model in self.trained:
                        stack.enter_context(a.no_sync(model))
                with a.autocast():
                    cond = self.prompts(prompts, training=train_te)
                    loss = diffusion_loss(
                        self.family,
                        self.denoiser,
                        self.scheduler,
                        latents,
                        cond,
                        sizes,
                        gens,
                        training=self.training,
                        n_prior=n_prior,
                        prior_weight=self.prior_weight,
                    )
                a.backward(loss.total / accumulation)
            sums += torch.stack(
                [
                    loss.total.detach(),
                    loss.instance.detach(),
                    loss.prior.detach() if loss.prior is not None else torch.zeros((), device=a.device),
                ]
            ).float()
        if self.before_optimizer_step is not None:
            self.before_optimizer_step()
        if a.scaler is not None:
            a.unscale_gradients(self.optimizer)  # fp16: clip the true gradients
        torch.nn.utils.clip_grad_norm_(self.parameters, self.training.max_grad_norm, foreach=True)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.step(a.unwrap_model(self.denoiser).parameters())
        if self.after_optimizer_step is not None:
            self.after_optimizer_step()
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
