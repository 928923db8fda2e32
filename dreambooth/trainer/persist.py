"""Everything a run writes to (or reads back from) the job's output prefix: checkpoints,
resume, sample grids, the progression grid and the final export. The main process writes;
every process waits for it, so all ranks stay at the same step."""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from dreambooth.trainer import checkpoints, state
from dreambooth.trainer.context import Context, Outcome
from dreambooth.trainer.errors import StorageUnavailableError
from dreambooth.trainer.export import export
from dreambooth.trainer.loop import Loop
from dreambooth.trainer.models import Components
from dreambooth.trainer.sampling import build_pipeline, generate, grid, progression

log = logging.getLogger("dreambooth.trainer")

RESULT = "result.json"
SAMPLES = "samples/"


def modules_of(ctx: Context, loop: Loop) -> dict[str, torch.nn.Module]:
    a = ctx.accelerator
    return {"unet": a.unwrap_model(loop.unet), "text_encoder": a.unwrap_model(loop.text_encoder)}


def run_facts(ctx: Context, loop: Loop) -> dict:
    """What must not change between a checkpoint and the run resuming from it."""
    t = ctx.spec.training
    return {"processes": ctx.accelerator.num_processes, "batchSize": t.batch_size, "method": t.method.value,
            "trainTextEncoder": bool(t.train_text_encoder), "phase": loop.phase}


# --- checkpoints ----------------------------------------------------------------------


@dataclass(frozen=True)
class Found:
    """The newest complete checkpoint, downloaded."""

    step: int
    phase: str
    folder: Path


def fetch_checkpoint(ctx: Context) -> Found | None:
    """Download the newest complete checkpoint (once per node) or say there is none."""
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
        return None
    facts = json.loads((Path(folder) / state.STATE).read_text())
    return Found(int(facts["step"]), facts.get("phase", "dreambooth"), Path(folder))


def restore(ctx: Context, loop: Loop, found: Found | None, phase_start: int) -> None:
    """Load ``found`` into ``loop`` if it belongs to this phase; a checkpoint from the end
    of an earlier phase only hands over what carries across (e.g. a learned token)."""
    if found is None or found.step < phase_start:
        return
    if found.phase == loop.phase:
        state.read(found.folder, modules=modules_of(ctx, loop), optimizer=loop.optimizer,
                   lr_scheduler=loop.lr_scheduler, facts=run_facts(ctx, loop), extras=loop.extras)
    else:
        state.read_extras(found.folder, loop.extras)
    log.info("resumed from %s at step %d", ctx.output.uri(checkpoints.prefix_for(found.step)), found.step)
    if ctx.metrics:
        ctx.metrics.last_checkpoint_step.set(found.step)


def save_checkpoint(ctx: Context, loop: Loop, step: int, *, must: bool = True) -> str | None:
    """Write the checkpoint of ``step`` (main process). With ``must=False`` (a periodic
    checkpoint) storage that stays unavailable through the retries is reported (metric,
    log) and training goes on: the next checkpoint tries again."""
    a = ctx.accelerator
    a.wait_for_everyone()
    uri = None
    if ctx.main:
        folder = Path(tempfile.mkdtemp(dir=ctx.workdir, prefix="checkpoint-"))
        try:
            state.write(folder, step=step, modules=modules_of(ctx, loop), optimizer=loop.optimizer,
                        lr_scheduler=loop.lr_scheduler, facts=run_facts(ctx, loop), extras=loop.extras)
            with ctx.metrics.checkpoint_upload_seconds.time():
                saved = checkpoints.save(ctx.output, folder, step, keep=ctx.spec.checkpointing.keep)
            ctx.metrics.last_checkpoint_step.set(step)
            uri = ctx.output.uri(saved.prefix)
            log.info("checkpoint %s", uri)
        except StorageUnavailableError as err:
            ctx.metrics.checkpoint_upload_failures.inc()
            if must:
                raise
            log.warning("checkpoint at step %d not saved, trying again at the next one: %s", step, err)
        except Exception:
            ctx.metrics.checkpoint_upload_failures.inc()
            raise
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    a.wait_for_everyone()
    return uri


# --- samples and export ---------------------------------------------------------------


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


def pipeline_of(ctx: Context, components: Components, loop: Loop, *, export: bool = False):
    """The pipeline of the model being trained: for samples, the parts on the device (frozen
    ones in the compute dtype); for the export, the float32 originals of the frozen parts."""
    modules = modules_of(ctx, loop)
    frozen_te = not loop.text_encoder_steps
    return build_pipeline(
        vae=components.vae if export else loop.vae,
        text_encoder=components.text_encoder if export and frozen_te else modules["text_encoder"],
        tokenizer=components.tokenizer, unet=modules["unet"],
        scheduler_config=components.noise_scheduler.config, sampler=ctx.spec.validation.scheduler,
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
        title = (f"step {step}/{ctx.total_steps}, {validation.scheduler.value.upper()} "
                 f"{validation.inference_steps} steps")
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
        progression(grids, ctx.spec.validation.prompts, ctx.spec.training.resolution).save(out)
        ctx.output.upload_file(out, f"{SAMPLES}progression.png")


def finish(ctx: Context, components: Components, loop: Loop, outcome: Outcome) -> None:
    """Export the model (main process) and write result.json last: the run is complete."""
    a = ctx.accelerator
    if ctx.metrics:
        ctx.metrics.phase.state("exporting")
    a.wait_for_everyone()
    if ctx.main:
        with ema_weights(ctx, loop):
            pipeline = pipeline_of(ctx, components, loop, export=True)
            outcome.outputs = export(pipeline, ctx.spec.output.formats, ctx.output, ctx.workdir)
        if ctx.spec.validation.enabled:
            save_progression(ctx)
            outcome.outputs["samples"] = ctx.output.uri(SAMPLES)
        result = {"step": outcome.step, "totalSteps": ctx.total_steps, "outputs": outcome.outputs}
        ctx.output.write_bytes(RESULT, json.dumps(result, indent=1).encode())
        ctx.metrics.phase.state("succeeded")
    a.wait_for_everyone()
