"""spec.evaluation: the figures on images whose answers are known, a tiny run judged by a
tiny random CLIP (evaluation.jsonl, gauges, the status the operator makes of them, resume),
an overfitting run, and output.export: best."""

from __future__ import annotations

import json
import shutil
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from dreambooth.api.evaluation import Sign, overfitting_signs
from dreambooth.api.spec import EvaluationThresholds
from dreambooth.api.termination import TerminationSummary
from dreambooth.operator.progress import parse_metrics
from dreambooth.operator.status import Observation, compute_status
from dreambooth.trainer.errors import ConfigError, Preempted
from dreambooth.trainer.evaluation import (
    PromptSamples,
    measure,
    prior_loss_drift,
    sample_similarity,
)
from dreambooth.trainer.evaluator import Evaluator
from dreambooth.trainer.metrics import TrainerMetrics
from dreambooth.trainer.run import run
from tests.support.trainer import StopAfter, job_document, trainer_config

STEPS, EVERY = 12, 4
PROMPTS = ["a photo of zwx toy cat", "a photo of zwx toy cat on the beach"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    from dreambooth.trainer.tiny_clip import build_tiny_clip

    return build_tiny_clip(tmp_path_factory.mktemp("clip") / "clip")


@pytest.fixture(scope="module")
def evaluator(clip_dir) -> Evaluator:
    return Evaluator.from_clip(clip_dir, clip_dir.as_uri(), "cpu")


def photos(folder: Path) -> list[Image.Image]:
    return [Image.open(p).convert("RGB") for p in sorted(folder.glob("*.png"))]


def noise(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(n)]


def evaluated_job(
    model: Path,
    images: Path,
    out: Path,
    clip: Path | None,
    *,
    steps=STEPS,
    every=EVERY,
    training=None,
    evaluation=None,
    **spec,
):
    doc = job_document(
        model.as_uri(), images.as_uri(), out.as_uri(), steps=steps, every=every, training=training, **spec
    )
    doc["spec"]["validation"] = {"inferenceSteps": 4, "imagesPerPrompt": 2, "everySteps": every, "prompts": PROMPTS}
    doc["spec"]["checkpointing"]["keep"] = 1
    doc["spec"]["evaluation"] = {
        "enabled": True,
        **({"model": {"uri": clip.as_uri()}} if clip else {}),
        **(evaluation or {}),
    }
    return doc


def lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "evaluation.jsonl").read_text().splitlines()]


def final_status(config, outcome, **obs):
    """What the operator makes of a succeeded trainer pod's termination summary."""
    summary = TerminationSummary(
        exit_code=0,
        reason="Succeeded",
        step=outcome.step,
        loss=outcome.loss,
        outputs=outcome.outputs,
        evaluation=outcome.evaluation,
    )
    pod = {
        "metadata": {"name": "toy-cat-trainer-0-ok"},
        "status": {
            "phase": "Succeeded",
            "containerStatuses": [
                {
                    "name": "trainer",
                    "state": {"terminated": {"exitCode": 0, "reason": "Completed", "message": summary.dumps()}},
                }
            ],
        },
    }
    job = {
        "metadata": {"name": "toy-cat-trainer"},
        "spec": {},
        "status": {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]},
    }
    observation = Observation.of(config.spec, generation=1, output_uri=config.output_uri, job=job, pods=[pod], **obs)
    return compute_status(observation, None, datetime(2026, 11, 24, tzinfo=UTC))


def conditions(status) -> dict:
    return {c.type: c for c in status.conditions}


# --- the figures, on images whose answers are known -------------------------------------------


def test_identical_images_are_similarity_one_and_flagged_as_memorized(evaluator, toy_cat_dir):
    cats = photos(toy_cat_dir)
    record = measure(10, [PromptSamples("p", evaluator.images(cats), None)], evaluator.images(cats))
    assert record.memorization == pytest.approx(1.0, abs=1e-5)
    assert record.prompts[0].memorization == pytest.approx(1.0, abs=1e-5)
    assert Sign.MEMORIZATION in overfitting_signs(record, EvaluationThresholds())


def test_unrelated_noise_is_far_from_the_photos_and_not_flagged(evaluator, toy_cat_dir):
    cats = evaluator.images(photos(toy_cat_dir))
    record = measure(10, [PromptSamples("p", evaluator.images(noise(4)), None)], cats)
    same = measure(10, [PromptSamples("p", cats, None)], cats)
    assert record.memorization < 0.9 and record.subject_fidelity < same.subject_fidelity - 0.1
    assert overfitting_signs(record, EvaluationThresholds()) == []


def test_samples_all_alike_are_a_diversity_collapse(evaluator):
    one = noise(1)[0]
    alike = evaluator.images([one, one.copy(), one.copy()])
    varied = evaluator.images(noise(3, seed=1))
    assert sample_similarity(alike) == pytest.approx(1.0, abs=1e-5)
    assert sample_similarity(varied) < 0.9
    assert sample_similarity(alike[:1]) is None  # one sample has no pairs
    record = measure(10, [PromptSamples("p", alike, None)], varied)
    assert overfitting_signs(record, EvaluationThresholds()) == [Sign.DIVERSITY_COLLAPSE]


@pytest.mark.parametrize(
    ("current", "first", "drift"), [(1.5, 1.0, 0.5), (0.5, 1.0, -0.5), (None, 1.0, None), (1.0, None, None)]
)
def test_prior_loss_drift_is_the_rise_against_the_first_value(current, first, drift):
    assert prior_loss_drift(current, first) == (pytest.approx(drift) if drift is not None else None)


def test_prompt_fidelity_prefers_the_prompts_own_text(evaluator, toy_cat_dir):
    images = evaluator.images(photos(toy_cat_dir))
    text = evaluator.texts(PROMPTS)
    record = measure(1, [PromptSamples(PROMPTS[0], images, text[0])], images)
    assert record.prompt_fidelity == pytest.approx(
        torch.nn.functional.cosine_similarity(images, text[0:1]).mean().item(), abs=1e-5
    )


# --- a tiny run judged by the tiny CLIP -----------------------------------------------------------


def test_a_run_writes_one_line_per_round_exposes_gauges_and_the_operator_copies_them(
    tiny_model_dir, toy_cat_dir, clip_dir, tmp_path
):
    out = tmp_path / "out"
    config = trainer_config(evaluated_job(tiny_model_dir, toy_cat_dir, out, clip_dir))
    metrics = TrainerMetrics()
    port = metrics.serve(0, addr="127.0.0.1")
    outcome = run(config, tmp_path / "w", metrics=metrics)

    records = lines(out)  # the base model's round, then one per checkpoint, then the final model
    assert [r["step"] for r in records] == [0, 4, 8, 12]
    assert records[0]["base"] is True and "checkpoint" not in records[0]
    assert [r["checkpoint"] for r in records[1:]] == [
        "checkpoints/checkpoint-4/",
        "checkpoints/checkpoint-8/",
        "model/",
    ]
    assert all(len(r["prompts"]) == 2 and r["promptFidelity"] is not None for r in records)
    latest = records[-1]

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        snapshot = parse_metrics(response.read().decode())
    assert snapshot.evaluation.step == 12
    assert snapshot.evaluation.subject_fidelity == pytest.approx(latest["subjectFidelity"])
    assert snapshot.evaluation.base_subject_fidelity == pytest.approx(records[0]["subjectFidelity"])
    best = max(records[1:], key=lambda r: r["score"])  # no overfitting sign in this run
    assert not any(r["signs"] and r["signs"] != ["SubjectNotLearned"] for r in records)
    assert snapshot.best_step == best["step"]

    # the operator while it runs (the gauges) and once it has succeeded (the summary)
    running = compute_status(
        Observation.of(config.spec, generation=1, output_uri=config.output_uri, job=None, snapshot=snapshot),
        None,
        datetime(2026, 11, 24, tzinfo=UTC),
    )
    status = final_status(config, outcome)
    for shown in (running.evaluation, status.evaluation):
        assert shown.step == 12 and shown.memorization == pytest.approx(latest["memorization"])
        assert shown.best_checkpoint.step == best["step"]
    assert status.evaluation.best_checkpoint.uri == (out / best["checkpoint"]).as_uri().rstrip("/") + (
        "/" if best["checkpoint"].endswith("/") else ""
    )
    assert status.outputs.best_checkpoint == status.evaluation.best_checkpoint.uri
    assert conditions(status)["Overfitting"].status == "False"
    assert conditions(status)["Overfitting"].reason == "NoSign"
    # the best checkpoint is never pruned (keep: 1)
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert f"checkpoint-{best['step']}" in kept or best["step"] == STEPS


def test_a_stopped_and_resumed_run_lists_every_round_once(tiny_model_dir, toy_cat_dir, clip_dir, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(
        trainer_config(evaluated_job(tiny_model_dir, toy_cat_dir, straight, clip_dir)),
        tmp_path / "w0",
        metrics=TrainerMetrics(),
    )
    config = trainer_config(evaluated_job(tiny_model_dir, toy_cat_dir, resumed, clip_dir))
    metrics = TrainerMetrics()
    with pytest.raises(Preempted):  # stops after step 6: checkpoint 6 holds the rounds 0 and 4
        run(config, tmp_path / "w1", metrics=metrics, stop=StopAfter(metrics, 6))
    assert [r["step"] for r in lines(resumed)] == [0, 4]
    run(config, tmp_path / "w2", metrics=TrainerMetrics())
    assert [r["step"] for r in lines(resumed)] == [0, 4, 8, 12]
    assert lines(resumed) == lines(straight)  # the same weights, the same samples, the same figures


def test_export_best_exports_the_checkpoint_the_status_names(tiny_model_dir, toy_cat_dir, clip_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "out"
    doc = evaluated_job(tiny_model_dir, toy_cat_dir, out, clip_dir)
    doc["spec"]["output"]["export"] = "best"
    config = trainer_config(doc)
    outcome = run(config, tmp_path / "w", metrics=TrainerMetrics())
    status = final_status(config, outcome)
    best = status.evaluation.best_checkpoint
    assert best.step < STEPS, "this run's best round is an earlier checkpoint"
    assert status.outputs.best_checkpoint == best.uri == (out / f"checkpoints/checkpoint-{best.step}").as_uri() + "/"
    saved = load_file(out / "checkpoints" / f"checkpoint-{best.step}" / "trainable.safetensors")
    exported = load_file(out / "model" / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(saved[f"unet.{k}"], v) for k, v in exported.items())
    pipe = StableDiffusionPipeline.from_pretrained(out / "model")
    image = pipe(
        PROMPTS[0], num_inference_steps=2, height=64, width=64, generator=torch.Generator().manual_seed(0)
    ).images[0]
    assert image.size == (64, 64)


def base_samples(model: Path, folder: Path) -> Path:
    """The tiny model's own samples of PROMPTS[0] (the sampler and seed the run validates
    with), as instance photos: a model trained on them reproduces its training photos."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(
        PROMPTS[0],
        num_images_per_prompt=2,
        num_inference_steps=4,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(0),
    ).images
    folder.mkdir()
    for i, image in enumerate(images):
        image.save(folder / f"sample-{i}.png")
    return folder


def test_a_run_whose_samples_reproduce_its_photos_is_overfitting(tiny_model_dir, clip_dir, tmp_path):
    memorized = base_samples(tiny_model_dir, tmp_path / "photos")
    doc = evaluated_job(tiny_model_dir, memorized, tmp_path / "out", clip_dir, steps=8, training={"learningRate": 1e-7})
    doc["spec"]["validation"]["prompts"] = PROMPTS[:1]
    config = trainer_config(doc)
    outcome = run(config, tmp_path / "w", metrics=TrainerMetrics())
    assert outcome.evaluation.memorization > 0.95
    overfitting = conditions(final_status(config, outcome))["Overfitting"]
    assert (overfitting.status, overfitting.reason) == ("True", "Memorization")
    assert "reproduce the training photos" in overfitting.message


def test_the_safety_checker_is_the_fallback_evaluator(tmp_path, toy_cat_dir):
    from dreambooth.trainer.tiny import build_tiny_model

    model = build_tiny_model(tmp_path / "sd", safety_checker=True)
    out = tmp_path / "out"
    config = trainer_config(evaluated_job(model, toy_cat_dir, out, None, steps=4, every=4))
    run(config, tmp_path / "w", metrics=TrainerMetrics())
    records = lines(out)
    assert [r["step"] for r in records] == [0, 4]
    assert all("promptFidelity" not in r and 0 < r["subjectFidelity"] <= 1 for r in records)  # no text tower


def test_no_evaluator_is_a_clear_config_error(tiny_model_dir, toy_cat_dir, tmp_path):
    plain = tmp_path / "sd"
    shutil.copytree(tiny_model_dir, plain)  # no safety_checker/
    config = trainer_config(evaluated_job(plain, toy_cat_dir, tmp_path / "out", None, steps=4, every=4))
    with pytest.raises(ConfigError, match="evaluation.model.uri"):
        run(config, tmp_path / "w", metrics=TrainerMetrics())
