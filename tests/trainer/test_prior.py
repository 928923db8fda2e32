"""Prior preservation: class images generated once, cached, and reused by the next job."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from PIL import Image

from dreambooth.trainer.metrics import TrainerMetrics
from dreambooth.trainer.run import run
from tests.support.trainer import job_document, trainer_config

#: per family: the model fixture and the pipeline that must draw the class images
FAMILIES = {"sd": ("tiny_model_dir", "StableDiffusionPipeline"), "sdxl": ("tiny_sdxl_dir", "StableDiffusionXLPipeline")}


def prior_job(model, photos, out, name, family):
    doc = job_document(
        model.as_uri(),
        photos.as_uri(),
        out.as_uri(),
        name=name,
        steps=4,
        every=2,
        training={"method": "full"},
        prior={"enabled": True, "classPrompt": "a photo of a cat", "numImages": 3},
    )
    doc["spec"]["baseModel"]["family"] = family
    doc["spec"]["validation"] = {"enabled": False}
    doc["spec"]["output"]["formats"] = ["diffusers"]
    return trainer_config(doc)


@pytest.mark.parametrize("family", FAMILIES)
def test_class_images_are_generated_once_and_shared(family, request, toy_cat_dir, tmp_path, caplog):
    fixture, pipeline = FAMILIES[family]
    model = request.getfixturevalue(fixture)
    first = prior_job(model, toy_cat_dir, tmp_path / "jobs" / "a", "a", family)
    second = prior_job(model, toy_cat_dir, tmp_path / "jobs" / "b", "b", family)
    # sibling output folders share one class-image cache
    assert first.class_cache_uri == second.class_cache_uri == (tmp_path / "jobs").as_uri() + "/.cache/class-images/"

    with caplog.at_level(logging.INFO):
        metrics = TrainerMetrics()
        run(first, tmp_path / "w1", metrics=metrics)
    assert f"generating 3 class images for 'a photo of a cat' into {first.class_cache_uri}" in caplog.text
    assert f"with {pipeline}" in caplog.text
    cache = sorted((tmp_path / "jobs" / ".cache" / "class-images").rglob("*.png"))
    assert len(cache) == 3
    assert metrics.prior_loss._value.get() > 0  # the class loss is reported on its own
    # drawn by the family's pipeline of the base model: the first image is what that
    # pipeline, loaded by diffusers from the base folder, draws with the cache's sampler
    with Image.open(cache[0]) as image:
        assert image.size == (64, 64)
        assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(first_class_image(model, pipeline)))

    caplog.clear()
    with caplog.at_level(logging.INFO):
        run(second, tmp_path / "w2", metrics=TrainerMetrics())
    assert "reusing 3 cached class images" in caplog.text
    assert "generating" not in caplog.text


def first_class_image(model, pipeline_class):
    import diffusers

    from dreambooth.api.spec import Sampler, ValidationSpec
    from dreambooth.trainer.prior import SAMPLER
    from dreambooth.trainer.sampling import generate, scheduler_for

    pipe = getattr(diffusers, pipeline_class).from_pretrained(model)
    pipe.scheduler = scheduler_for(Sampler(SAMPLER["scheduler"]), pipe.scheduler.config)
    settings = ValidationSpec(
        prompts=["a photo of a cat"],
        inference_steps=SAMPLER["inferenceSteps"],
        guidance_scale=SAMPLER["guidanceScale"],
        images_per_prompt=1,
    )
    [[image]] = generate(pipe, settings, resolution=64, seed=SAMPLER["seed"], device="cpu")
    return image


def test_after_an_interrupted_pod_the_missing_class_images_are_dealt_out_evenly():
    from dreambooth.trainer.prior import missing_share

    done = {f"class-{i:05d}.png" for i in range(0, 40, 2)} | {f"class-{i:05d}.png" for i in range(40, 60)}
    shares = [missing_share(done, 100, rank, 8) for rank in range(8)]
    drawn = sorted(i for share in shares for i in share)
    assert drawn == sorted(set(range(100)) - {int(name[6:11]) for name in done})  # each missing one, once
    assert max(map(len, shares)) - min(map(len, shares)) <= 1  # nobody waits for another's whole share
