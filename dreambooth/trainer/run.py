"""One training run as a dozen named steps: config -> data -> model -> train -> export.

:func:`run` is what ``python -m dreambooth.trainer`` (in a pod) and ``dreambooth train``
(locally) execute. Every process runs it; only the main process writes to storage,
serves metrics and samples.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dreambooth.api.config import TrainerConfig
from dreambooth.api.spec import DreamBoothJobSpec, MixedPrecision, Optimizer
from dreambooth.api.uris import Scheme, parse_uri
from dreambooth.trainer import checkpoints, state, trainables
from dreambooth.trainer.data import Example, load_examples
from dreambooth.trainer.errors import ConfigError, DataError, NotFoundError, Preempted, TrainerError
from dreambooth.trainer.export import export
from dreambooth.trainer.loop import LatentCache, Loop, PromptEncoder, Throughput
from dreambooth.trainer.metrics import TrainerMetrics
from dreambooth.trainer.models import Components, fetch_from_hub, load_components
from dreambooth.trainer.progress import Progress
from dreambooth.trainer.sampling import build_pipeline, generate, grid, progression
from dreambooth.trainer.storage import S3Settings, Storage, open_storage

log = logging.getLogger("dreambooth.trainer")

RESULT = "result.json"
SAMPLES = "samples/"


@dataclass
class Outcome:
    step: int
    outputs: dict[str, str] = field(default_factory=dict)
    last_checkpoint: str | None = None


@dataclass
class Context:
    """What every step of a run shares."""

    config: TrainerConfig
    workdir: Path
    accelerator: object
    s3: S3Settings | None
    output: Storage
    metrics: TrainerMetrics | None
    stop: threading.Event

    @property
    def spec(self) -> DreamBoothJobSpec:
        return self.config.spec

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process


# --- 1. processes and devices ---------------------------------------------------------


def make_accelerator(spec: DreamBoothJobSpec):
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    cpu = spec.resources.gpus_per_node == 0 or not torch.cuda.is_available()
    if cpu and spec.training.mixed_precision is MixedPrecision.FP16:
        raise ConfigError("training.mixedPrecision fp16 needs a GPU, and none is visible: use no or bf16")
    accelerator = Accelerator(mixed_precision=spec.training.mixed_precision.value, cpu=cpu)
    expected = spec.resources.num_processes
    if accelerator.num_processes not in (1, expected):
        raise ConfigError(
            f"the trainer runs as {accelerator.num_processes} processes but the job asks for "
            f"{expected} (resources.nodes x gpusPerNode): launch it with accelerate launch "
            f"--num_processes {expected}"
        )
    if accelerator.num_processes != expected:
        log.warning("running as 1 process although the job asks for %d; the batch is unchanged", expected)
    set_seed(spec.training.seed)
    return accelerator


def weight_dtype(accelerator) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


# --- 2. storage and inputs ------------------------------------------------------------


def s3_settings(config: TrainerConfig) -> S3Settings | None:
    spec = config.spec
    uris = [spec.base_model.uri, spec.instance.uri, config.output_uri, spec.prior.uri or ""]
    if not any(u.startswith("s3://") for u in uris):
        return None
    return S3Settings.from_env(config.storage.endpoint, config.storage.secure, config.storage.region)


def fetch_prefix(uri: str, s3: S3Settings | None, dest: Path, *, what: str,
                 empty: type[TrainerError] = DataError) -> Path:
    """A local folder with the objects below ``uri`` (file:// URIs are used in place)."""
    parsed = parse_uri(uri, allowed={Scheme.S3, Scheme.FILE, Scheme.HF, Scheme.PVC})
    if parsed.scheme is Scheme.PVC:
        raise ConfigError(f"{uri}: pvc:// volumes are mounted by the operator; locally use file://")
    if parsed.scheme is Scheme.FILE:
        return Path(parsed.path)
    storage = open_storage(uri, s3)
    if not storage.list():
        raise empty(f"no {what} found under {uri}: upload them there, or fix the URI")
    shutil.rmtree(dest, ignore_errors=True)
    storage.download_prefix("", dest)
    return dest


def fetch_base_model(ctx: Context) -> Path:
    model = ctx.spec.base_model
    parsed = parse_uri(model.uri, allowed=set(Scheme))
    if parsed.scheme is Scheme.HF:
        return fetch_from_hub(parsed.authority, model.revision or parsed.revision, ctx.workdir / "hub")
    return fetch_prefix(model.uri, ctx.s3, ctx.workdir / "base-model", what="base model files",
                        empty=NotFoundError)


def load_instance_examples(ctx: Context, components: Components) -> list[Example]:
    training = ctx.spec.training
    multiple = components.resolution_multiple
    if training.resolution % multiple:
        raise ConfigError(
            f"training.resolution {training.resolution} does not fit this model: it must be a "
            f"multiple of {multiple} (VAE and UNet downsampling), e.g. "
            f"{max(multiple, training.resolution // multiple * multiple)}"
        )
    with ctx.accelerator.local_main_process_first():
        folder = fetch_prefix(ctx.spec.instance.uri, ctx.s3, ctx.workdir / "instance", what="instance photos")
    return load_examples(
        folder,
        prompt=ctx.spec.instance.prompt,
        resolution=training.resolution,
        use_captions=ctx.spec.instance.use_captions,
        source_uri=ctx.spec.instance.uri,
    )


# --- 3. what trains, and how ----------------------------------------------------------


def build_optimizer(spec: DreamBoothJobSpec, groups: list[dict]) -> torch.optim.Optimizer:
    training = spec.training
    if training.optimizer is Optimizer.ADAMW_8BIT:
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, weight_decay=training.weight_decay)
    # foreach: one kernel per op over all tensors, several times faster than a loop on CPU
    return torch.optim.AdamW(groups, weight_decay=training.weight_decay, foreach=True)


def build_loop(ctx: Context, components: Components, instances: list[Example],
               classes: list[Example] | None) -> Loop:
    from diffusers.optimization import get_scheduler

    a, training = ctx.accelerator, ctx.spec.training
    dtype = weight_dtype(a)
    vae = trainables.place(components.vae.requires_grad_(False).eval(), a.device, dtype)
    chosen = trainables.select(ctx.spec, components.unet, components.text_encoder, device=a.device, dtype=dtype)
    optimizer = build_optimizer(ctx.spec, chosen.groups)
    lr_scheduler = get_scheduler(
        training.lr_scheduler.value, optimizer,
        num_warmup_steps=training.lr_warmup_steps, num_training_steps=training.steps,
    )
    ema = None
    if training.ema:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(chosen.unet.parameters(), foreach=True)
    prepared = a.prepare(*chosen.modules, optimizer)
    unet, optimizer = prepared[0], prepared[-1]
    text_encoder = prepared[1] if chosen.text_encoder_steps else chosen.text_encoder
    return Loop(
        accelerator=a,
        training=training,
        unet=unet,
        text_encoder=text_encoder,
        scheduler=components.noise_scheduler,
        prompts=PromptEncoder(components.tokenizer, text_encoder, a.device),
        instances=LatentCache(vae, instances, device=a.device, dtype=dtype),
        classes=LatentCache(vae, classes, device=a.device, dtype=dtype) if classes else None,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        prediction_type=components.prediction_type,
        prior_weight=ctx.spec.prior.loss_weight,
        text_encoder_steps=chosen.text_encoder_steps,
        trained=prepared[:-1],
        ema=ema,
    )


def modules_of(ctx: Context, loop: Loop) -> dict[str, torch.nn.Module]:
    a = ctx.accelerator
    return {"unet": a.unwrap_model(loop.unet), "text_encoder": a.unwrap_model(loop.text_encoder)}


def extras_of(loop: Loop) -> dict:
    return {"ema": loop.ema} if loop.ema is not None else {}


@contextlib.contextmanager
def ema_weights(ctx: Context, loop: Loop):
    """Sample and export with the EMA weights when EMA is on."""
    if loop.ema is None:
        yield
        return
    params = list(ctx.accelerator.unwrap_model(loop.unet).parameters())
    loop.ema.store(params)
    loop.ema.copy_to(params)
    try:
        yield
    finally:
        loop.ema.restore(params)


def run_facts(ctx: Context) -> dict:
    """What must not change between a checkpoint and the run resuming from it."""
    t = ctx.spec.training
    return {"processes": ctx.accelerator.num_processes, "batchSize": t.batch_size,
            "method": t.method.value, "trainTextEncoder": bool(t.train_text_encoder)}


# --- 4. checkpoints and samples -------------------------------------------------------


def resume(ctx: Context, loop: Loop) -> int:
    """Continue from the newest complete checkpoint, if any; returns the next step."""
    a = ctx.accelerator
    chosen = ctx.workdir / "resume" / "CHOSEN"
    with a.local_main_process_first():
        if a.is_local_main_process:
            shutil.rmtree(chosen.parent, ignore_errors=True)
            chosen.parent.mkdir(parents=True)
            found = checkpoints.download_latest(ctx.output, chosen.parent)
            chosen.write_text(str(found[1]) if found else "")
    folder = chosen.read_text()
    if not folder:
        log.info("no checkpoint in %s: starting at step 0", ctx.output.uri(checkpoints.ROOT))
        return 0
    step = state.read(Path(folder), modules=modules_of(ctx, loop), optimizer=loop.optimizer,
                      lr_scheduler=loop.lr_scheduler, facts=run_facts(ctx), extras=extras_of(loop))
    log.info("resumed from %s at step %d", ctx.output.uri(checkpoints.prefix_for(step)), step)
    if ctx.metrics:
        ctx.metrics.last_checkpoint_step.set(step)
    return step


def save_checkpoint(ctx: Context, loop: Loop, step: int) -> str | None:
    a = ctx.accelerator
    a.wait_for_everyone()
    uri = None
    if ctx.main:
        folder = Path(tempfile.mkdtemp(dir=ctx.workdir, prefix="checkpoint-"))
        try:
            state.write(folder, step=step, modules=modules_of(ctx, loop), optimizer=loop.optimizer,
                        lr_scheduler=loop.lr_scheduler, facts=run_facts(ctx), extras=extras_of(loop))
            with ctx.metrics.checkpoint_upload_seconds.time():
                saved = checkpoints.save(ctx.output, folder, step, keep=ctx.spec.checkpointing.keep)
        except Exception:
            ctx.metrics.checkpoint_upload_failures.inc()
            raise
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        ctx.metrics.last_checkpoint_step.set(step)
        uri = ctx.output.uri(saved.prefix)
        log.info("checkpoint %s", uri)
    a.wait_for_everyone()
    return uri


def pipeline_of(ctx: Context, components: Components, loop: Loop):
    modules = modules_of(ctx, loop)
    return build_pipeline(
        vae=components.vae, text_encoder=modules["text_encoder"], tokenizer=components.tokenizer,
        unet=modules["unet"], scheduler_config=components.noise_scheduler.config,
        sampler=ctx.spec.validation.scheduler,
    )


def save_samples(ctx: Context, components: Components, loop: Loop, step: int) -> None:
    """Upload samples/step-<step>.png: rows = prompts, columns = images (main process)."""
    a, validation = ctx.accelerator, ctx.spec.validation
    a.wait_for_everyone()
    if ctx.main:
        unet, te = modules_of(ctx, loop).values()
        was_training = unet.training, te.training
        unet.eval(), te.eval()
        with a.autocast(), ema_weights(ctx, loop):
            rows = generate(pipeline_of(ctx, components, loop), validation,
                            resolution=ctx.spec.training.resolution, seed=ctx.spec.training.seed,
                            device=a.device)
        unet.train(was_training[0]), te.train(was_training[1])
        path = ctx.workdir / f"step-{step}.png"
        title = f"step {step}/{ctx.spec.training.steps}, {validation.scheduler.value.upper()} {validation.inference_steps} steps"
        grid(rows, validation.prompts, title=title).save(path)
        ctx.output.upload_file(path, f"{SAMPLES}step-{step}.png")
        path.unlink()
    a.wait_for_everyone()


def save_progression(ctx: Context) -> None:
    """samples/progression.png from every step-<step>.png, also those of earlier pods."""
    from PIL import Image

    found = sorted(
        (int(m.group(1)), o.key)
        for o in ctx.output.list(SAMPLES)
        if (m := re.fullmatch(r"samples/step-(\d+)\.png", o.key))
    )
    grids = []
    for step, key in found:
        path = ctx.workdir / f"grid-{step}.png"
        ctx.output.download(key, path)
        with Image.open(path) as image:
            grids.append((step, image.convert("RGB")))
    if grids:
        out = ctx.workdir / "progression.png"
        validation = ctx.spec.validation
        progression(grids, validation.prompts, ctx.spec.training.resolution).save(out)
        ctx.output.upload_file(out, f"{SAMPLES}progression.png")


# --- 5. the run -----------------------------------------------------------------------


def train(ctx: Context, components: Components, loop: Loop, start: int) -> Outcome:
    a, spec = ctx.accelerator, ctx.spec
    total = spec.training.steps
    outcome = Outcome(step=start)
    progress = Progress(total, start, enabled=ctx.main)
    throughput = Throughput(images_per_step=spec.training.batch_size * (2 if loop.classes else 1))
    if ctx.metrics:
        ctx.metrics.phase.state("training")
    try:
        for step in range(start, total):
            values = loop.run_step(step)
            done = step + 1
            outcome.step = done
            speed = throughput.tick() if done > start + 1 else None
            if ctx.metrics:
                m = ctx.metrics
                m.step.set(done)
                m.loss.set(values["loss"])
                m.instance_loss.set(values["instance_loss"])
                if "prior_loss" in values:
                    m.prior_loss.set(values["prior_loss"])
                m.learning_rate.set(values["lr"])
                if speed:
                    m.images_per_second.set(speed)
                if torch.cuda.is_available():
                    m.gpu_memory_bytes.set(torch.cuda.max_memory_allocated())
            progress.update(done, values, speed)
            stopping = bool(a.reduce(torch.tensor([float(ctx.stop.is_set())], device=a.device), "max").item())
            if done % spec.checkpointing.every_steps == 0 or done == total or stopping:
                outcome.last_checkpoint = save_checkpoint(ctx, loop, done)
            if stopping:
                raise Preempted(f"stopped by SIGTERM after step {done}; the checkpoint is saved and "
                                "the next pod resumes from it")
            if spec.validation.enabled and (done % spec.validation.every_steps == 0 or done == total):
                save_samples(ctx, components, loop, done)
    finally:
        progress.close()
    return outcome


def finish(ctx: Context, components: Components, loop: Loop, outcome: Outcome) -> None:
    """Export the model (main process) and write result.json last: the run is complete."""
    a = ctx.accelerator
    if ctx.metrics:
        ctx.metrics.phase.state("exporting")
    a.wait_for_everyone()
    if ctx.main:
        with ema_weights(ctx, loop):
            pipeline = pipeline_of(ctx, components, loop)
            outcome.outputs = export(pipeline, ctx.spec.output.formats, ctx.output, ctx.workdir)
        if ctx.spec.validation.enabled:
            save_progression(ctx)
            outcome.outputs["samples"] = ctx.output.uri(SAMPLES)
        result = {"step": outcome.step, "totalSteps": ctx.spec.training.steps, "outputs": outcome.outputs}
        ctx.output.write_bytes(RESULT, json.dumps(result, indent=1).encode())
        ctx.metrics.phase.state("succeeded")
    a.wait_for_everyone()


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
    if metrics:
        metrics.phase.state("initializing")
        metrics.total_steps.set(config.spec.training.steps)
    workdir.mkdir(parents=True, exist_ok=True)
    s3 = s3_settings(config)
    ctx = Context(config, workdir, accelerator, s3, open_storage(config.output_uri, s3), metrics,
                  stop or threading.Event())
    with accelerator.local_main_process_first():
        model_dir = fetch_base_model(ctx)
    components = load_components(model_dir, source=config.spec.base_model.uri)
    instances = load_instance_examples(ctx, components)
    classes = None
    if config.spec.prior.enabled:
        from dreambooth.trainer.prior import class_examples

        classes = class_examples(ctx, components)
    loop = build_loop(ctx, components, instances, classes)
    start = resume(ctx, loop)
    outcome = train(ctx, components, loop, start)
    finish(ctx, components, loop, outcome)
    return outcome
