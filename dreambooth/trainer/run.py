"""One training run as a dozen named steps: config -> data -> model -> train -> export.

:func:`run` is what ``python -m dreambooth.trainer`` (in a pod) and ``dreambooth train``
(locally) execute. Every process runs it; only the main process writes to storage,
serves metrics and samples.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from pathlib import Path

import torch

from dreambooth.api import layout
from dreambooth.api import telemetry as names
from dreambooth.api.config import TrainerConfig, for_family
from dreambooth.api.history import Point
from dreambooth.api.job import SpecError
from dreambooth.api.resolve import images_per_step
from dreambooth.api.spec import DreamBoothJobSpec, ModelFamily, Optimizer
from dreambooth.api.telemetry import TrainerPhase
from dreambooth.api.uris import Scheme, Uri
from dreambooth.trainer import judging, persist, textual_inversion, trainables
from dreambooth.trainer.buckets import Draw, Framing
from dreambooth.trainer.context import Context, Outcome
from dreambooth.trainer.data import Example, load_examples
from dreambooth.trainer.devices import make_accelerator, weight_dtype
from dreambooth.trainer.errors import ConfigError, DataError, NotFoundError, Preempted, TrainerError
from dreambooth.trainer.families import VAE_FIELD, Components, load_components, load_vae
from dreambooth.trainer.loop import LatentCache, Loop, PromptEncoder, Throughput
from dreambooth.trainer.metrics import TrainerMetrics
from dreambooth.trainer.models import fetch_from_hub
from dreambooth.trainer.pernode import once_per_node
from dreambooth.trainer.progress import Progress
from dreambooth.trainer.storage import S3Settings, open_storage, storage_uri
from dreambooth.trainer.textual_inversion import TokenEmbedding

log = logging.getLogger("dreambooth.trainer")

ANY = frozenset(Scheme)  # every scheme a spec may name; fetch_prefix says what each means here
#: what an hf:// evaluator is fetched with: a CLIPModel folder (files at its root)
CLIP_PATTERNS = ["*.json", "*.txt", "model.safetensors"]
#: what an hf:// baseModel.vae is fetched with: a lone AutoencoderKL (or a model's vae/)
VAE_PATTERNS = ["config.json", "diffusion_pytorch_model.safetensors", "vae/config.json",
                "vae/diffusion_pytorch_model.safetensors"]


# --- 2. storage and inputs ------------------------------------------------------------


def s3_settings(config: TrainerConfig) -> S3Settings | None:
    spec = config.spec
    uris = [spec.base_model.uri, spec.base_model.vae, spec.instance.uri, config.output_uri, spec.prior.uri]
    if spec.evaluation.enabled:
        uris.append(spec.evaluation.model.uri)
    if not any(storage_uri(u, ANY).scheme is Scheme.S3 for u in uris if u):
        return None
    return S3Settings.from_env(config.storage.endpoint, config.storage.secure, config.storage.region)


def fetch_prefix(uri: Uri | str, s3: S3Settings | None, dest: Path, *, what: str,
                 empty: type[TrainerError] = DataError) -> Path:
    """A local folder with the objects below ``uri`` (file:// URIs are used in place)."""
    parsed = storage_uri(uri, ANY)
    if parsed.scheme is Scheme.PVC:
        raise ConfigError(f"{uri}: pvc:// volumes are mounted by the operator; locally use file://")
    if parsed.scheme is Scheme.FILE:
        return Path(parsed.path)
    storage = open_storage(parsed, s3)
    if not storage.list():
        raise empty(f"no {what} found under {uri}: upload them there, or fix the URI")
    shutil.rmtree(dest, ignore_errors=True)
    files = storage.download_prefix("", dest)
    log.info("fetched %d files of %s from %s", len(files), what, uri)
    return dest


def fetch_once(ctx: Context, key: str, work) -> Path:
    """``work()`` (a fetch) by the pod's first process; the folder it returns, on all."""
    return Path(once_per_node(ctx.accelerator, ctx.workdir, key, lambda: str(work())))


def fetch_model(ctx: Context, key: str, uri: str, revision: str | None, *, what: str,
                patterns: list[str] | None = None) -> Path:
    parsed = storage_uri(uri, ANY)
    if parsed.scheme is Scheme.HF:
        return fetch_once(ctx, key, lambda: fetch_from_hub(
            parsed.authority, revision or parsed.revision, ctx.workdir / "hub", patterns=patterns))
    return fetch_once(ctx, key, lambda: fetch_prefix(
        parsed, ctx.s3, ctx.workdir / key, what=what, empty=NotFoundError))


def fetch_base_model(ctx: Context) -> Path:
    model = ctx.spec.base_model
    return fetch_model(ctx, "base-model", model.uri, model.revision, what="base model files")


def open_judge(ctx: Context, components: Components, instances: list[Example]) -> None:
    """spec.evaluation: fetch the CLIP evaluator like the base model (once per node); the
    main process loads it and judges the sample rounds."""
    evaluation = ctx.spec.evaluation
    if not (evaluation.enabled and ctx.spec.validation.enabled):
        return
    judging.check_source(ctx, components.path)
    clip = None
    if evaluation.model.uri:
        clip = fetch_model(ctx, "evaluator", evaluation.model.uri, evaluation.model.revision,
                           what="evaluation model files", patterns=CLIP_PATTERNS)
    if ctx.main:
        ctx.judge = judging.make_judge(ctx, clip, components.path, instances)


def open_model(ctx: Context) -> Components:
    """Fetch, check and load the base model (and the VAE that replaces its own); a job with
    ``baseModel.family: auto`` gets the presets and rules of the family found in it from now
    on (``ctx.config`` changes)."""
    model = ctx.spec.base_model
    components = load_components(fetch_base_model(ctx), model.uri, model.family)
    if model.vae:
        folder = fetch_model(ctx, "vae", model.vae, None, what=f"VAE files ({VAE_FIELD})", patterns=VAE_PATTERNS)
        components.vae = load_vae(folder, model.vae, components)
        log.info("the VAE is %s's (%s)", model.vae, VAE_FIELD)
    try:
        ctx.config = for_family(ctx.config, ModelFamily(components.family.name))
    except SpecError as err:
        raise ConfigError(f"the model is {components.family.title}, which this job's spec does not fit: "
                          + "; ".join(map(str, err.issues))) from None
    components.family.configure(components, ctx.spec.training, model.uri)
    log.info("model family %s (%s)", components.family.name, components.family.title)
    return components


def load_instance_examples(ctx: Context, components: Components) -> list[Example]:
    """The photos, framed: one example per photo (and its mirror with training.randomFlip),
    in its aspect-ratio bucket or the ``resolution`` square."""
    training = ctx.spec.training
    multiple = components.resolution_multiple
    sizes = [("training.resolution", training.resolution)]
    if training.buckets is not None and training.buckets.enabled:
        sizes.append(("training.buckets.step", training.buckets.step))
    for name, value in sizes:
        if value % multiple:
            raise ConfigError(
                f"{name} {value} does not fit this model: it must be a multiple of {multiple} (VAE "
                f"and UNet downsampling), e.g. {max(multiple, value // multiple * multiple)}"
            )
    components.family.check_resolution(components, training.resolution)
    folder = fetch_once(ctx, "instance", lambda: fetch_prefix(
        ctx.spec.instance.uri, ctx.s3, ctx.workdir / "instance", what="instance photos"))
    examples = load_examples(
        folder,
        prompt=ctx.spec.instance.prompt,
        resolution=training.resolution,
        use_captions=ctx.spec.instance.use_captions,
        source_uri=ctx.spec.instance.uri,
        framing=Framing.for_photos(training),
    )
    buckets = sorted({e.size.target for e in examples})
    log.info("%d photos in %d bucket(s): %s", len(examples) // len(Framing.for_photos(training).flips),
             len(buckets), ", ".join(f"{w}x{h}" for h, w in buckets))
    return examples


def class_framing(spec: DreamBoothJobSpec, instances: list[Example]) -> Framing:
    """Class images are framed in every bucket of the photos (mirrored too with randomFlip)."""
    return Framing.for_photos(spec.training).for_classes([e.size.target for e in instances])


# --- 3. what trains, and how ----------------------------------------------------------


def build_optimizer(spec: DreamBoothJobSpec, groups: list[dict]) -> torch.optim.Optimizer:
    training = spec.training
    if training.optimizer is Optimizer.ADAMW_8BIT:
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, weight_decay=training.weight_decay)
    # foreach: one kernel per op over all tensors, several times faster than a loop on CPU
    return torch.optim.AdamW(groups, weight_decay=training.weight_decay, foreach=True)


def optimization(ctx: Context, groups: list[dict], modules: list[torch.nn.Module], *, schedule: str,
                 warmup: int = 0, steps: int | None = None):
    """``(prepared modules, optimizer, LR schedule)``: every phase's optimizer goes through
    accelerate, whose optimizer steps and updates the fp16 loss scaler (an optimizer it does
    not know would never update it, and the next step's unscale would fail)."""
    from diffusers.optimization import get_scheduler

    optimizer = build_optimizer(ctx.spec, groups)
    lr_scheduler = get_scheduler(schedule, optimizer, num_warmup_steps=warmup, num_training_steps=steps)
    result = ctx.accelerator.prepare(*modules, optimizer)
    *prepared, optimizer = result if modules else (result,)  # one object comes back bare
    return prepared, optimizer, lr_scheduler


def shared_parts(ctx: Context, components: Components, instances: list[Example],
                 classes: list[Example] | None) -> dict:
    """What every phase's loop shares; the VAE encodes the photos once, here (a cast copy
    when the export writes the float32 original)."""
    a, training = ctx.accelerator, ctx.spec.training
    dtype = torch.float32 if components.family.vae_in_fp32 else weight_dtype(a)
    vae = trainables.frozen(components.vae, a.device, dtype, keep_original=trainables.keeps_originals(ctx.spec))
    flips = len(Framing.for_photos(training).flips)
    draw = Draw.of(instances, flips=flips, seed=training.seed,
                   micro_size=training.batch_size // training.gradient_accumulation_steps,
                   class_images=len(classes or ()) // (len({e.size.target for e in instances}) * flips))
    return {
        "accelerator": a,
        "training": ctx.spec.training,
        "family": components.family,
        "scheduler": components.noise_scheduler,
        "vae": vae,
        "instances": LatentCache(vae, instances, device=a.device, dtype=dtype),
        "classes": LatentCache(vae, classes, device=a.device, dtype=dtype) if classes else None,
        "draw": draw,
        "prior_weight": ctx.spec.prior.loss_weight,
    }


def build_loop(ctx: Context, components: Components, shared: dict,
               token: TokenEmbedding | None = None) -> Loop:
    a, training = ctx.accelerator, ctx.spec.training
    chosen = trainables.select(ctx.spec, components.denoiser, components.text_encoders, device=a.device,
                               dtype=weight_dtype(a), trainable=components.family.trainable_text_encoders,
                               unread=components.family.unread_parameters)
    if token is not None and chosen.text_encoders[0] is not components.text_encoders[0]:
        token.follow(chosen.text_encoders[0])  # a restored token reaches the copy that is read
    ema = None
    if training.ema:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(chosen.denoiser.parameters(), foreach=True)
    prepared, optimizer, lr_scheduler = optimization(
        ctx, chosen.groups, chosen.modules, schedule=training.lr_scheduler.value,
        warmup=training.lr_warmup_steps, steps=training.steps)
    text_encoders = (prepared[1:] if chosen.text_encoder_steps else chosen.text_encoders) + chosen.fixed
    return Loop(
        **shared,
        denoiser=prepared[0],
        text_encoders=text_encoders,
        prompts=PromptEncoder(components.family, components.tokenizers, text_encoders, a.device),
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        text_encoder_steps=chosen.text_encoder_steps,
        trained=prepared,
        ema=ema,
        extras={**({"ema": ema} if ema is not None else {}), **({"token": token} if token else {})},
    )


def build_ti_loop(ctx: Context, components: Components, shared: dict, token: TokenEmbedding) -> Loop:
    """Phase 1 of textual inversion + DreamBooth: only the new token's embedding learns; the
    UNet is read from a cast copy (phase 2 trains the float32 original).

    No DDP wrapper here: the one gradient that matters is averaged by hand."""
    a, ti = ctx.accelerator, ctx.spec.training.textual_inversion
    denoiser = trainables.frozen(components.denoiser, a.device, weight_dtype(a), keep_original=True)
    params = textual_inversion.train_only_the_embedding(components.text_encoders[0], token, device=a.device)
    _, optimizer, lr_scheduler = optimization(ctx, [{"params": params, "lr": ti.learning_rate}], [],
                                              schedule="constant")

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


# --- 4. the run -----------------------------------------------------------------------


def train(ctx: Context, components: Components, loop: Loop, start: int, end: int) -> Outcome:
    """Optimizer steps ``start`` .. ``end`` of ``loop``'s phase, with checkpoints and samples."""
    a, spec = ctx.accelerator, ctx.spec
    outcome = Outcome(step=start)
    progress = Progress(ctx.total_steps, start, enabled=ctx.main)
    throughput = Throughput(images_per_step=images_per_step(spec.training.batch_size, loop.classes is not None))
    if ctx.metrics:
        ctx.metrics.phase.state(TrainerPhase.TRAINING)
    if start == 0 and spec.evaluation.enabled and spec.validation.enabled:  # the base model's round
        persist.sample_round(ctx, components, loop, 0, None, base=True)
    try:
        for step in range(start, end):
            values = loop.run_step(step)
            done = step + 1
            outcome.step, outcome.loss = done, float(values["loss"])
            if ctx.main:
                ctx.history.add(Point(done, values["loss"], values["instance_loss"], values["lr"], time.time(),
                                      values.get("prior_loss")))
            speed = throughput.tick() if done > start + 1 else None
            if ctx.metrics:
                report(ctx.metrics, done, values, speed)
            if ctx.judge is not None:
                ctx.judge.rounds.add_losses(values)
            progress.update(done, values, speed)
            if CHECKSUMS:
                log.info("weights step=%d checksum=%s", done, weights_checksum(loop))
            stopping = bool(a.reduce(torch.tensor([float(ctx.stop.is_set())], device=a.device), "max").item())
            # no checkpoint of the last step: the export follows at once; a phase's last
            # step and SIGTERM's checkpoint must land, periodic ones upload in the background
            must = stopping or (done == end and done < ctx.total_steps)
            checkpoint = must or (done % spec.checkpointing.every_steps == 0 and done < ctx.total_steps)
            # samples (and their evaluation) first: the checkpoint then carries the round's record
            if not stopping and spec.validation.enabled and (done % spec.validation.every_steps == 0 or done == end):
                persist.sample_round(ctx, components, loop, done, round_key(ctx, loop, done, checkpoint))
            if checkpoint:
                outcome.last_checkpoint = persist.save_checkpoint(ctx, loop, done, must=must) \
                    or outcome.last_checkpoint
            if stopping:
                raise Preempted(f"stopped by SIGTERM after step {done}; the checkpoint is saved and "
                                "the next pod resumes from it")
            persist.publish_history(ctx)
    finally:
        progress.close()
    return outcome


def round_key(ctx: Context, loop: Loop, step: int, checkpointed: bool) -> str | None:
    """Where the weights of a round at ``step`` are kept: its checkpoint, the final model for
    the last step, none otherwise (nor in textual inversion's phase, whose checkpoints hold
    only the new token)."""
    if loop.phase == textual_inversion.PHASE:
        return None
    if step == ctx.total_steps:
        return judging.final_model_key(ctx)
    return layout.checkpoint(step) if checkpointed else None


#: diagnostics: every process logs a checksum of its trained weights after each step, so
#: that ranks can be compared (they must be identical under DDP)
CHECKSUMS = os.environ.get("DREAMBOOTH_DEBUG_WEIGHT_CHECKSUMS") == "1"


def weights_checksum(loop: Loop) -> str:
    with torch.no_grad():
        return float(sum(p.detach().double().sum() for p in loop.parameters)).hex()


def report(m: TrainerMetrics, step: int, values: dict[str, float], speed: float | None) -> None:
    m.step.set(step)
    m.loss.set(values["loss"])
    m.instance_loss.set(values["instance_loss"])
    if "prior_loss" in values:
        m.prior_loss.set(values["prior_loss"])
    m.learning_rate.set(values["lr"])
    if speed:
        m.images_per_second.set(speed)
    if torch.cuda.is_available():
        m.gpu_memory_bytes.set(torch.cuda.max_memory_allocated())


def run(config: TrainerConfig, workdir: Path, *, stop: threading.Event | None = None,
        metrics: TrainerMetrics | None = None) -> Outcome:
    """Train ``config`` to the end, resuming from its newest checkpoint if there is one."""
    accelerator = make_accelerator(config.spec)
    if accelerator.is_main_process and metrics is None:
        metrics = TrainerMetrics()
        if config.metrics_port:
            metrics.serve(config.metrics_port)
    if not accelerator.is_main_process:
        metrics = None
    workdir.mkdir(parents=True, exist_ok=True)
    s3 = s3_settings(config)
    ctx = Context(config, workdir, accelerator, s3, open_storage(config.output_uri, s3), metrics,
                  stop or threading.Event())
    try:
        return _run(ctx)
    finally:
        ctx.background.close()  # an upload still in flight lands before the process exits


def _run(ctx: Context) -> Outcome:
    accelerator, metrics = ctx.accelerator, ctx.metrics
    if metrics:
        metrics.phase.state(TrainerPhase.INITIALIZING)
    components = open_model(ctx)
    config = ctx.config
    if metrics:
        metrics.total_steps.set(ctx.total_steps)
        metrics.family.info({names.MODEL_FAMILY_LABEL: components.family.name})
    instances = load_instance_examples(ctx, components)
    classes = None
    if config.spec.prior.enabled:
        from dreambooth.trainer.prior import class_examples

        classes = class_examples(ctx, components, class_framing(config.spec, instances))
    open_judge(ctx, components, instances)
    token = textual_inversion.add_token(config.spec, components)
    found = persist.fetch_checkpoint(ctx)
    judging.resume(ctx, found.folder if found else None)
    start = found.step if found else 0
    ti_end = ctx.total_steps - config.spec.training.steps
    shared = shared_parts(ctx, components, instances, classes)
    if token is not None and start < ti_end:
        loop = build_ti_loop(ctx, components, shared, token)
        persist.restore(ctx, loop, found, phase_start=0)
        train(ctx, components, loop, start, ti_end)
        start = ti_end
    loop = build_loop(ctx, components, shared, token)
    persist.restore(ctx, loop, found, phase_start=ti_end)
    outcome = train(ctx, components, loop, start, ctx.total_steps)
    persist.finish(ctx, components, loop, outcome)
    # the process group goes down cleanly; only on success (a failed NCCL group can hang)
    accelerator.end_training()
    return outcome
