"""What trains, and how (step 5 of :mod:`dreambooth.trainer.run`): the :class:`Loop` of each
phase of a run, with its optimizer and LR schedule: DreamBooth's (:func:`build_loop`) and,
before it, textual inversion's (:func:`build_ti_loop`), sharing the latent caches and the
draw of :func:`shared_parts`.
"""

from __future__ import annotations

import logging

import torch

from dreambooth.api.spec import DreamBoothJobSpec, Optimizer
from dreambooth.trainer import textual_inversion, trainables
from dreambooth.trainer.buckets import Draw, Framing
from dreambooth.trainer.context import Context
from dreambooth.trainer.data import Example
from dreambooth.trainer.devices import weight_dtype
from dreambooth.trainer.families import Components
from dreambooth.trainer.loop import LatentCache, Loop, PromptEncoder
from dreambooth.trainer.textual_inversion import TokenEmbedding

log = logging.getLogger(__name__)


def build_optimizer(spec: DreamBoothJobSpec, groups: list[dict]) -> torch.optim.Optimizer:
    training = spec.training
    if training.optimizer is Optimizer.ADAMW_8BIT:
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, weight_decay=training.weight_decay)
    # foreach: one kernel per op over all tensors, several times faster than a loop on CPU
    return torch.optim.AdamW(groups, weight_decay=training.weight_decay, foreach=True)


def optimization(
    ctx: Context,
    groups: list[dict],
    modules: list[torch.nn.Module],
    *,
    schedule: str,
    warmup: int = 0,
    steps: int | None = None,
):
    """``(prepared modules, optimizer, LR schedule)``: every phase's optimizer goes through
    accelerate, whose optimizer steps and updates the fp16 loss scaler (an optimizer it does
    not know would never update it, and the next step's unscale would fail)."""
    from diffusers.optimization import get_scheduler

    optimizer = build_optimizer(ctx.spec, groups)
    lr_scheduler = get_scheduler(schedule, optimizer, num_warmup_steps=warmup, num_training_steps=steps)
    result = ctx.accelerator.prepare(*modules, optimizer)
    *prepared, optimizer = result if modules else (result,)  # one object comes back bare
    return prepared, optimizer, lr_scheduler


def shared_parts(ctx: Context, components: Components, instances: list[Example], classes: list[Example] | None) -> dict:
    """What every phase's loop shares; the VAE encodes the photos once, here (a cast copy
    when the export writes the float32 original)."""
    a, training = ctx.accelerator, ctx.spec.training
    dtype = torch.float32 if components.family.vae_in_fp32 else weight_dtype(a)
    vae = trainables.frozen(components.vae, a.device, dtype, keep_original=trainables.keeps_originals(ctx.spec))
    flips = len(Framing.for_photos(training).flips)
    draw = Draw.of(
        instances,
        flips=flips,
        seed=training.seed,
        micro_size=training.batch_size // training.gradient_accumulation_steps,
        class_images=len(classes or ()) // (len({e.size.target for e in instances}) * flips),
    )
    caches = {
        "instances": LatentCache(vae, instances, device=a.device, dtype=dtype),
        "classes": LatentCache(vae, classes, device=a.device, dtype=dtype) if classes else None,
    }
    vae_park = parking(
        a.device,
        trains_text_encoders=False,
        what="the VAE waits on the CPU between sample rounds (the latents are cached)",
    )
    if vae_park is not None:
        vae.to(vae_park)
    return {
        "accelerator": a,
        "vae_park": vae_park,
        "training": ctx.spec.training,
        "family": components.family,
        "scheduler": components.noise_scheduler,
        "vae": vae,
        **caches,
        "draw": draw,
        "prior_weight": ctx.spec.prior.loss_weight,
    }


def build_loop(ctx: Context, components: Components, shared: dict, token: TokenEmbedding | None = None) -> Loop:
    a, training = ctx.accelerator, ctx.spec.training
    chosen = trainables.select(
        ctx.spec,
        components.denoiser,
        components.text_encoders,
        device=a.device,
        dtype=weight_dtype(a),
        trainable=components.family.trainable_text_encoders,
        unread=components.family.unread_parameters,
    )
    if token is not None and chosen.text_encoders[0] is not components.text_encoders[0]:
        token.follow(chosen.text_encoders[0])  # a restored token reaches the copy that is read
    ema = None
    if training.ema:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(chosen.denoiser.parameters(), foreach=True)
    prepared, optimizer, lr_scheduler = optimization(
        ctx,
        chosen.groups,
        chosen.modules,
        schedule=training.lr_scheduler.value,
        warmup=training.lr_warmup_steps,
        steps=training.steps,
    )
    text_encoders = (prepared[1:] if chosen.text_encoder_steps else chosen.text_encoders) + chosen.fixed
    return Loop(
        **shared,
        denoiser=prepared[0],
        text_encoders=text_encoders,
        prompts=PromptEncoder(
            components.family,
            components.tokenizers,
            text_encoders,
            a.device,
            park=parking(a.device, trains_text_encoders=bool(chosen.text_encoder_steps)),
        ),
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        text_encoder_steps=chosen.text_encoder_steps,
        trained=prepared,
        ema=ema,
        extras={**({"ema": ema} if ema is not None else {}), **({"token": token} if token else {})},
    )


def parking(
    device: torch.device,
    *,
    trains_text_encoders: bool,
    what: str = "text encoders wait on the CPU between prompt encodings (none trains: the steps "
    "read cached embeddings)",
) -> torch.device | None:
    """Where frozen parts wait while the steps do not read them (text encoders between prompt
    encodings, the VAE between sample rounds): the CPU when they would otherwise hold
    accelerator memory that the caches make useless."""
    if trains_text_encoders or device.type == "cpu":
        return None
    log.info(what)
    return torch.device("cpu")


def build_ti_loop(ctx: Context, components: Components, shared: dict, token: TokenEmbedding) -> Loop:
    """Phase 1 of textual inversion + DreamBooth: only the new token's embedding learns; the
    UNet is read from a cast copy (phase 2 trains the float32 original).

    No DDP wrapper here: the one gradient that matters is averaged by hand."""
    a, ti = ctx.accelerator, ctx.spec.training.textual_inversion
    denoiser = trainables.frozen(components.denoiser, a.device, weight_dtype(a), keep_original=True)
    params = textual_inversion.train_only_the_embedding(components.text_encoders[0], token, device=a.device)
    _, optimizer, lr_scheduler = optimization(
        ctx, [{"params": params, "lr": ti.learning_rate}], [], schedule="constant"
    )

    def average_gradient() -> None:
        if a.num_processes > 1 and token.weight.grad is not None:
            token.weight.grad = a.reduce(token.weight.grad, reduction="mean")

    return Loop(
        **shared,
        denoiser=denoiser,
        text_encoders=components.text_encoders,
        prompts=PromptEncoder(components.family, components.tokenizers, components.text_encoders, a.device),
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        text_encoder_steps=ti.steps,
        phase=textual_inversion.PHASE,
        extras={"token": token},
        before_optimizer_step=average_gradient,
        after_optimizer_step=token.keep_others,
    )
