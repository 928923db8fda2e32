"""Everything a run writes to (or reads back from) the job's output prefix: checkpoints,
resume, sample grids, the progression grid and the final export.

Only the main process writes to storage, and the others never sit in a collective while it
does: a checkpoint is written to local disk at its step and uploaded by the main process's
storage thread (:class:`~dreambooth.trainer.background.Background`) while training goes on;
sample grids are drawn by all processes (prompt ``i`` by rank ``i % processes``) and gathered
to the main process. Waits for slow work (the previous upload before the next checkpoint,
SIGTERM's checkpoint, the export) go through :func:`~dreambooth.trainer.background.together`,
whose collectives each last about a second; a node's download of the checkpoint to resume
from, through :func:`~dreambooth.trainer.pernode.once_per_node` (no collective at all)."""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from dreambooth.api import layout
from dreambooth.api.history import History
from dreambooth.api.telemetry import TrainerPhase
from dreambooth.trainer import checkpoints, judging, state
from dreambooth.trainer.background import together
from dreambooth.trainer.context import Context, Outcome
from dreambooth.trainer.errors import StorageUnavailableError
from dreambooth.trainer.export import export
from dreambooth.trainer.families import Components
from dreambooth.trainer.loop import Loop, borrowed
from dreambooth.trainer.pernode import once_per_node
from dreambooth.trainer.sampling import generate, grid, progression

log = logging.getLogger("dreambooth.trainer")


def modules_of(ctx: Context, loop: Loop) -> dict[str, torch.nn.Module]:
    """The denoiser and text encoders being trained, by their names in checkpoints (the
    family's folder names: unet, text_encoder, text_encoder_2)."""
    a, family = ctx.accelerator, loop.family
    names = (family.denoiser_name, *family.text_encoder_names)
    return dict(zip(names, map(a.unwrap_model, (loop.denoiser, *loop.text_encoders)), strict=True))


def run_facts(ctx: Context, loop: Loop) -> dict:
    """What must not change between a checkpoint and the run resuming from it."""
    t = ctx.spec.training
    return {
        "processes": ctx.accelerator.num_processes,
        "batchSize": t.batch_size,
        "method": t.method.value,
        "trainTextEncoder": bool(t.train_text_encoder),
        "phase": loop.phase,
    }


# --- checkpoints ----------------------------------------------------------------------


@dataclass(frozen=True)
class Found:
    """The newest complete checkpoint, downloaded."""

    step: int
    phase: str
    folder: Path


def fetch_checkpoint(ctx: Context) -> Found | None:
    """Download the newest complete checkpoint (once per node) or say there is none."""
    root = ctx.workdir / "resume"

    def download() -> str:
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        found = checkpoints.download_latest(ctx.output, root)
        return str(found[1]) if found else ""

    folder = once_per_node(ctx.accelerator, ctx.workdir, "checkpoint", download)
    if not folder:
        log.info("no checkpoint in %s: starting at step 0", ctx.output.uri(layout.CHECKPOINTS))
        return None
    facts = json.loads((Path(folder) / state.STATE).read_text())
    saved = Path(folder) / layout.HISTORY
    if saved.is_file():  # the history up to the checkpoint's step: the resumed run continues it
        ctx.history = History.from_bytes(saved.read_bytes()).up_to(int(facts["step"]))
    return Found(int(facts["step"]), facts.get("phase", "dreambooth"), Path(folder))


def restore(ctx: Context, loop: Loop, found: Found | None, phase_start: int) -> None:
    """Load ``found`` into ``loop`` if it belongs to this phase; a checkpoint from the end
    of an earlier phase only hands over what carries across (e.g. a learned token)."""
    if found is None or found.step < phase_start:
        return
    if found.phase == loop.phase:
        state.read(
            found.folder,
            modules=modules_of(ctx, loop),
            optimizer=loop.optimizer,
            lr_scheduler=loop.lr_scheduler,
            facts=run_facts(ctx, loop),
            extras=loop.extras,
        )
    else:
        state.read_extras(found.folder, loop.extras, device=ctx.accelerator.device)
    log.info("resumed from %s at step %d", ctx.output.uri(layout.checkpoint(found.step)), found.step)
    if ctx.metrics:
        ctx.metrics.last_checkpoint_step.set(found.step)


def save_checkpoint(ctx: Context, loop: Loop, step: int, *, must: bool = True) -> str | None:
    """Checkpoint ``step``: the main process writes it to local disk here (the state leaves
    the device) and its storage thread uploads it while training goes on.

    At most one upload is in flight: this first waits for the previous one. With ``must``
    (SIGTERM, the end of a phase) it also waits for this upload, fails if it fails, and
    returns its URI. A periodic checkpoint (``must=False``) returns ``None`` at once; if its
    upload fails for want of storage, that is reported (metric, log) and training goes on:
    the next checkpoint tries again."""
    a = ctx.accelerator
    together(
        a, ctx.background.fence() if ctx.main else None, poll_s=ctx.poll_s, what="uploading the previous checkpoint"
    )
    upload = None
    if ctx.main and not must:
        ctx.background.post(upload_checkpoint, ctx, write_checkpoint(ctx, loop, step), step, False)
    elif ctx.main:  # training stops here: the storage thread writes too, and a failure reaches all
        upload = ctx.background.submit(lambda: upload_checkpoint(ctx, write_checkpoint(ctx, loop, step), step, True))
    if not must:
        return None
    return together(a, upload, poll_s=ctx.poll_s, what=f"saving the checkpoint of step {step}")


def write_checkpoint(ctx: Context, loop: Loop, step: int) -> Path:
    """The checkpoint of ``step`` in a new folder of the workdir (main process)."""
    folder = Path(tempfile.mkdtemp(dir=ctx.workdir, prefix="checkpoint-"))
    try:
        state.write(
            folder,
            step=step,
            modules=modules_of(ctx, loop),
            optimizer=loop.optimizer,
            lr_scheduler=loop.lr_scheduler,
            facts=run_facts(ctx, loop),
            extras=loop.extras,
        )
        judging.save_records(ctx, folder)
        (folder / layout.HISTORY).write_bytes(ctx.history.up_to(step).to_bytes())
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        ctx.metrics.checkpoint_upload_failures.inc()
        raise
    return folder


def upload_checkpoint(ctx: Context, folder: Path, step: int, must: bool) -> str | None:
    """Upload the checkpoint written to ``folder`` (on the storage thread), then delete it.
    Pruning spares the best evaluated checkpoint (judged before this one was written)."""
    try:
        with ctx.metrics.checkpoint_upload_seconds.time():
            saved = checkpoints.save(
                ctx.output, folder, step, keep=ctx.spec.checkpointing.keep, protect=judging.best_step(ctx)
            )
        ctx.metrics.last_checkpoint_step.set(step)
        upload_history(ctx, (folder / layout.HISTORY).read_bytes())
        uri = ctx.output.uri(saved.prefix)
        log.info("checkpoint %s", uri)
        return uri
    except StorageUnavailableError as err:
        ctx.metrics.checkpoint_upload_failures.inc()
        if must:
            raise
        log.warning("checkpoint at step %d not saved, trying again at the next one: %s", step, err)
        return None
    except Exception:
        ctx.metrics.checkpoint_upload_failures.inc()
        raise
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# --- history ---------------------------------------------------------------------------

#: history.jsonl is rewritten at least this often while a run trains (besides at every
#: checkpoint, sample grid and the end), so that a viewer's loss curve keeps up
HISTORY_EVERY_S = 30.0


def publish_history(ctx: Context, *, every_s: float = HISTORY_EVERY_S) -> None:
    """Hand history.jsonl (as it is now) to the storage thread, unless it was handed over
    less than ``every_s`` ago (0: now)."""
    now = time.monotonic()
    if ctx.main and now - ctx.history_published >= every_s:
        ctx.history_published = now
        ctx.background.post(upload_history, ctx, ctx.history.to_bytes())


def upload_history(ctx: Context, data: bytes) -> None:
    """Replace history.jsonl whole (on the storage thread); only reported if storage cannot."""
    try:
        ctx.output.write_bytes(layout.HISTORY, data)
    except StorageUnavailableError as err:
        log.warning("%s not saved: %s", layout.HISTORY, err)


# --- samples and export ---------------------------------------------------------------


@contextlib.contextmanager
def ema_weights(ctx: Context, loop: Loop):
    """Sample and export with the EMA weights when EMA is on. The parameters and the EMA's
    copies trade storage and trade back: no copy of the UNet is made (every process samples,
    and EMAModel.store would keep one in each process's CPU memory)."""
    if loop.ema is None:
        yield
        return
    params = list(ctx.accelerator.unwrap_model(loop.denoiser).parameters())
    shadows = loop.ema.shadow_params

    def swap() -> None:
        with torch.no_grad():
            for param, shadow in zip(params, shadows, strict=True):
                param.data, shadow.data = shadow.data, param.data

    swap()
    try:
        yield
    finally:
        swap()


def pipeline_of(ctx: Context, components: Components, loop: Loop, *, export: bool = False, sampler=None):
    """The pipeline of the model being trained: for samples, the parts on the device (frozen
    ones in the compute dtype); for the export, the float32 originals of the frozen parts.
    ``sampler``: another scheduler than validation.scheduler (compareSchedulers)."""
    from dreambooth.trainer.sampling import scheduler_for

    modules = list(modules_of(ctx, loop).values())
    frozen_te = not loop.text_encoder_steps
    return components.family.pipeline(
        vae=components.vae if export else loop.vae,
        text_encoders=components.text_encoders if export and frozen_te else modules[1:],
        tokenizers=components.tokenizers,
        denoiser=modules[0],
        scheduler=scheduler_for(sampler or ctx.spec.validation.scheduler, components.noise_scheduler.config),
    )


def sample_round(
    ctx: Context, components: Components, loop: Loop, step: int, checkpoint: str | None, *, base: bool = False
) -> None:
    """Draw the samples of ``step`` (every process); with spec.evaluation the main process
    judges them (``checkpoint``: the key holding these weights) and publishes the figures.
    ``base``: the base model's round before the first step (judged, no grid uploaded)."""
    rows = save_samples(ctx, components, loop, step, upload=not base)
    if ctx.judge is not None:
        ctx.judge.round(step, rows, checkpoint, base=base)
        judging.publish(ctx)


def save_samples(ctx: Context, components: Components, loop: Loop, step: int, *, upload: bool = True) -> list | None:
    """samples/step-<step>.png: rows = prompts, columns = images. Prompt ``i`` is drawn by
    rank ``i % processes`` with the generator it has on one process (the same grid on 1 or
    N processes); the main process assembles the grid and its storage thread uploads it.
    Returns the rows (images per prompt) on the main process, None on the others."""

    validation = ctx.spec.validation
    ordered = _draw(ctx, components, loop, step, None, upload=upload)
    if upload:  # the same weights and seeds with each further scheduler (a sweep's axis)
        for sampler in validation.compare_schedulers:
            _draw(ctx, components, loop, step, sampler, upload=True)
        if ctx.main:
            publish_history(ctx, every_s=0)
    return ordered


def _draw(ctx: Context, components: Components, loop: Loop, step: int, sampler, *, upload: bool) -> list | None:
    """One grid of ``step`` drawn with ``sampler`` (None: validation.scheduler), uploaded by
    the main process when ``upload``; its rows on the main process, None on the others."""
    from accelerate.utils import gather_object

    a, validation = ctx.accelerator, ctx.spec.validation
    mine = list(range(a.process_index, len(validation.prompts), a.num_processes))
    rows: dict[int, list] = {}
    if mine:
        modules = list(modules_of(ctx, loop).values())
        was_training = [m.training for m in modules]
        for module in modules:
            module.eval()
        with (
            a.autocast(),
            ema_weights(ctx, loop),
            loop.prompts.on_device(),  # the pipeline encodes prompts
            borrowed([loop.vae], a.device, loop.vae_park),
        ):  # and decodes latents
            drawn = generate(
                pipeline_of(ctx, components, loop, sampler=sampler),
                validation,
                resolution=ctx.spec.training.resolution,
                seed=ctx.spec.training.seed,
                device=a.device,
                rows=mine,
                options=components.family.sampling_options(ctx.spec.training),
            )
        for module, training in zip(modules, was_training, strict=True):
            module.train(training)
        rows = dict(zip(mine, drawn, strict=True))
    if a.num_processes > 1:
        rows = {i: images for part in gather_object([rows]) for i, images in part.items()}
    if not ctx.main:
        return None
    ordered = [rows[i] for i in range(len(validation.prompts))]
    if upload:
        name = (sampler or validation.scheduler).value
        path = ctx.workdir / f"step-{step}-{name}.png"
        title = f"step {step}/{ctx.total_steps}, {name.upper()} {validation.inference_steps} steps"
        grid(ordered, validation.prompts, title=title).save(path)
        ctx.background.post(upload_sample, ctx, path, layout.sample_grid(step, sampler and sampler.value))
    return ordered


def upload_sample(ctx: Context, path: Path, key: str) -> None:
    """Upload one grid (on the storage thread); a grid storage cannot take is only reported."""
    try:
        ctx.output.upload_file(path, key)
    except StorageUnavailableError as err:
        log.warning("sample grid %s not saved: %s", key, err)
    finally:
        path.unlink(missing_ok=True)


def save_progression(ctx: Context) -> None:
    """samples/progression.png from every step-<step>.png, also those of earlier pods."""
    from PIL import Image

    found = sorted(
        (step, o.key) for o in ctx.output.list(layout.SAMPLES) if (step := layout.sample_grid_step(o.key)) is not None
    )
    grids = []
    for step, key in found:
        path = ctx.workdir / f"grid-{step}.png"
        ctx.output.download(key, path)
        with Image.open(path) as image:
            grids.append((step, image.convert("RGB")))
    if grids:
        out = ctx.workdir / "progression.png"
        progression(grids, ctx.spec.validation.prompts, ctx.spec.training.resolution).save(out)
        ctx.output.upload_file(out, layout.PROGRESSION)


def finish(ctx: Context, components: Components, loop: Loop, outcome: Outcome) -> None:
    """Export the model (the main process's storage thread, once the uploads before it are
    done) and write result.json last: the run is complete. Every process waits for it in
    short collectives and they all exit together (see docs/trainer.md, "The end of a run")."""
    a = ctx.accelerator
    if ctx.metrics:
        ctx.metrics.phase.state(TrainerPhase.EXPORTING)
    together(
        a, ctx.background.fence() if ctx.main else None, poll_s=ctx.poll_s, what="uploading checkpoints and samples"
    )
    job = None
    if ctx.main:
        job = ctx.background.submit(_export, ctx, components, loop, outcome)
    together(a, job, poll_s=ctx.poll_s, what="exporting the model")


def _export(ctx: Context, components: Components, loop: Loop, outcome: Outcome) -> None:
    best = judging.load_best(ctx, loop, modules_of(ctx, loop), outcome.step)  # output.export: best
    with ema_weights(ctx, loop):
        pipeline = pipeline_of(ctx, components, loop, export=True)
        outcome.outputs = export(
            components.family, pipeline, ctx.spec.output.formats, ctx.output, ctx.workdir, ctx.config.job.name
        )
    if ctx.spec.validation.enabled:
        save_progression(ctx)
        outcome.outputs["samples"] = ctx.output.uri(layout.SAMPLES)
    ctx.output.write_bytes(layout.HISTORY, ctx.history.to_bytes())
    judging.finish(ctx, outcome, best)
    # a periodic checkpoint storage could not take (an outage) left debris that no later
    # checkpoint pruned: the last step is exported, not checkpointed
    checkpoints.prune(ctx.output, keep=ctx.spec.checkpointing.keep, protect=judging.best_step(ctx))
    result = {"step": outcome.step, "totalSteps": ctx.total_steps, "outputs": outcome.outputs}
    ctx.output.write_bytes(layout.RESULT, json.dumps(result, indent=1).encode())
    ctx.metrics.phase.state(TrainerPhase.SUCCEEDED)
