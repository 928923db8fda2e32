"""The run's side of ``spec.evaluation``: the judge (main process), what each round
publishes, the records a checkpoint carries, and the export of the best checkpoint.

Published at every round: ``evaluation.jsonl`` (rewritten whole from the records, on the
storage thread), the ``dreambooth_trainer_evaluation_*`` gauges, and at the end the
termination summary's ``evaluation`` (the operator's ``status.evaluation``)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from dreambooth.api import layout
from dreambooth.api.evaluation import Record
from dreambooth.api.spec import ExportChoice
from dreambooth.trainer import checkpoints, state
from dreambooth.trainer.context import Context
from dreambooth.trainer.errors import ConfigError, StorageUnavailableError
from dreambooth.trainer.evaluator import (
    Evaluator,
    Judge,
    Rounds,
    has_safety_checker,
    pixels_to_image,
)

log = logging.getLogger("dreambooth.trainer")


def final_model_key(ctx: Context) -> str:
    """The key of the final model, for the record of the last step."""
    return layout.final_model(f.value for f in ctx.spec.output.formats or [])


def check_source(ctx: Context, model: Path) -> None:
    """Every process: fail at once (the same way) when there is no evaluator to use."""
    if ctx.spec.evaluation.model.uri is None and not has_safety_checker(model):
        raise ConfigError(
            "evaluation.enabled needs an evaluator: set evaluation.model.uri to a CLIPModel folder (e.g. a "
            f"saved openai/clip-vit-large-patch14), or use a base model with safety_checker/ ({ctx.spec.base_model.uri} "
            "has none)"
        )


def make_judge(ctx: Context, clip: Path | None, model: Path, instances) -> Judge:
    """The main process's judge: a CLIP folder, else the base model's safety checker."""
    device = ctx.accelerator.device
    if clip is not None:
        evaluator = Evaluator.from_clip(clip, ctx.spec.evaluation.model.uri, device)
    else:
        evaluator = Evaluator.from_safety_checker(model, ctx.spec.base_model.uri, device)
    rounds = Rounds(ctx.spec.evaluation.thresholds, ctx.total_steps)
    return Judge(evaluator, [pixels_to_image(e.pixels) for e in instances], ctx.spec.validation.prompts, rounds)


def publish(ctx: Context) -> None:
    """Metrics now; ``evaluation.jsonl`` (every record so far) on the storage thread."""
    judge: Judge = ctx.judge
    status = judge.rounds.status(ctx.output.uri)
    if status is not None and ctx.metrics:
        ctx.metrics.report_evaluation(status)
    if ctx.metrics and (base := judge.rounds.base) is not None:
        ctx.metrics.base_subject_fidelity.set(base.subject_fidelity)
    ctx.background.post(_write, ctx, judge.rounds.jsonl())


def _write(ctx: Context, data: bytes) -> None:
    try:
        ctx.output.write_bytes(layout.EVALUATION, data)
    except StorageUnavailableError as err:  # the next round writes every line again
        log.warning("%s not saved: %s", layout.EVALUATION, err)


def resume(ctx: Context, folder: Path | None) -> None:
    """Start from the records of the checkpoint resumed from (none: a fresh start)."""
    if ctx.judge is None or folder is None:
        return
    ctx.judge.rounds.load(folder / layout.EVALUATION)
    publish(ctx)


def save_records(ctx: Context, folder: Path) -> None:
    """Into a checkpoint being written: the records up to its step."""
    if ctx.judge is not None:
        (folder / layout.EVALUATION).write_bytes(ctx.judge.rounds.jsonl())


def best_step(ctx: Context) -> int | None:
    best = ctx.judge.rounds.best() if ctx.judge is not None else None
    return best.step if best is not None else None


def load_best(ctx: Context, loop, modules: dict, final_step: int) -> Record | None:
    """With ``output.export: best``, put the best checkpoint's weights (and EMA, token) into
    the model about to be exported; returns the best record (None: no evaluation)."""
    best = ctx.judge.rounds.best() if ctx.judge is not None else None
    if best is None or ctx.spec.output.export is not ExportChoice.BEST or best.step >= final_step:
        return best
    found = next((c for c in checkpoints.complete(ctx.output) if c.step == best.step), None)
    if found is None:
        log.warning("the best checkpoint (step %d) is not in storage: exporting the last step's model", best.step)
        return None
    dest = ctx.workdir / "best"
    folder = checkpoints.download(ctx.output, found, dest)
    try:
        device = state.read_weights(folder, modules=modules, optimizer=loop.optimizer)
        state.read_extras(folder, loop.extras, device=device)
    finally:
        shutil.rmtree(dest, ignore_errors=True)
    log.info("exporting the best checkpoint, step %d (score %.4f)", best.step, best.score)
    return best


def finish(ctx: Context, outcome, best: Record | None) -> None:
    """What the result and the termination summary say about the evaluation."""
    if ctx.judge is None:
        return
    if best is not None:
        outcome.outputs["bestCheckpoint"] = ctx.output.uri(best.checkpoint)
    outcome.evaluation = ctx.judge.rounds.status(ctx.output.uri)
