"""One training run as a dozen named steps: config -> data -> model -> train -> export.

:func:`run` is what ``python -m dreambooth.trainer`` (in a pod) and ``dreambooth train``
(locally) execute. Every process runs it; only the main process writes to storage,
serves metrics and samples. Its inputs (base model, evaluator, photos) are opened by
:mod:`dreambooth.trainer.inputs`, each phase's loop is built by :mod:`dreambooth.trainer.phases`;
here: the steps of a phase (:func:`train`) and the run from start to export (:func:`run`).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

import torch

from dreambooth.api import layout
from dreambooth.api import telemetry as names
from dreambooth.api.config import TrainerConfig
from dreambooth.api.history import Point
from dreambooth.api.resolve import images_per_step
from dreambooth.api.telemetry import TrainerPhase
from dreambooth.trainer import judging, persist, textual_inversion
from dreambooth.trainer.context import Context, Outcome
from dreambooth.trainer.devices import make_accelerator
from dreambooth.trainer.errors import Preempted
from dreambooth.trainer.families import Components
from dreambooth.trainer.inputs import (
    class_framing,
    load_instance_examples,
    open_judge,
    open_model,
    s3_settings,
)
from dreambooth.trainer.loop import Loop, Throughput
from dreambooth.trainer.metrics import TrainerMetrics
from dreambooth.trainer.phases import build_loop, build_ti_loop, shared_parts
from dreambooth.trainer.progress import Progress
from dreambooth.trainer.storage import open_storage

log = logging.getLogger("dreambooth.trainer")


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
                ctx.history.add(
                    Point(
                        done,
                        values["loss"],
                        values["instance_loss"],
                        values["lr"],
                        time.time(),
                        values.get("prior_loss"),
                    )
                )
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
                outcome.last_checkpoint = persist.save_checkpoint(ctx, loop, done, must=must) or outcome.last_checkpoint
            if stopping:
                raise Preempted(
                    f"stopped by SIGTERM after step {done}; the checkpoint is saved and the next pod resumes from it"
                )
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


def run(
    config: TrainerConfig, workdir: Path, *, stop: threading.Event | None = None, metrics: TrainerMetrics | None = None
) -> Outcome:
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
    ctx = Context(
        config, workdir, accelerator, s3, open_storage(config.output_uri, s3), metrics, stop or threading.Event()
    )
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
