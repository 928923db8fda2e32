"""Prior preservation: class images generated once, cached, and reused by the next job."""

from __future__ import annotations

import logging

from dreambooth.trainer.metrics import TrainerMetrics
from dreambooth.trainer.run import run
from tests.support.trainer import job_document, trainer_config


def prior_job(model, photos, out, name):
    doc = job_document(model.as_uri(), photos.as_uri(), out.as_uri(), name=name, steps=4, every=2,
                       prior={"enabled": True, "classPrompt": "a photo of a cat", "numImages": 3})
    doc["spec"]["validation"] = {"enabled": False}
    return trainer_config(doc)


def test_class_images_are_generated_once_and_shared(tiny_model_dir, toy_cat_dir, tmp_path, caplog):
    first = prior_job(tiny_model_dir, toy_cat_dir, tmp_path / "jobs" / "a", "a")
    second = prior_job(tiny_model_dir, toy_cat_dir, tmp_path / "jobs" / "b", "b")
    # sibling output folders share one class-image cache
    assert first.class_cache_uri == second.class_cache_uri == (tmp_path / "jobs").as_uri() + "/.cache/class-images/"

    with caplog.at_level(logging.INFO):
        metrics = TrainerMetrics()
        run(first, tmp_path / "w1", metrics=metrics)
    assert "generating 3 class images" in caplog.text
    cache = sorted((tmp_path / "jobs" / ".cache" / "class-images").rglob("*.png"))
    assert len(cache) == 3
    assert metrics.prior_loss._value.get() > 0  # the class loss is reported on its own

    caplog.clear()
    with caplog.at_level(logging.INFO):
        run(second, tmp_path / "w2", metrics=TrainerMetrics())
    assert "reusing 3 cached class images" in caplog.text
    assert "generating" not in caplog.text


def test_after_an_interrupted_pod_the_missing_class_images_are_dealt_out_evenly():
    from dreambooth.trainer.prior import missing_share

    done = {f"class-{i:05d}.png" for i in range(0, 40, 2)} | {f"class-{i:05d}.png" for i in range(40, 60)}
    shares = [missing_share(done, 100, rank, 8) for rank in range(8)]
    drawn = sorted(i for share in shares for i in share)
    assert drawn == sorted(set(range(100)) - {int(name[6:11]) for name in done})  # each missing one, once
    assert max(map(len, shares)) - min(map(len, shares)) <= 1  # nobody waits for another's whole share
