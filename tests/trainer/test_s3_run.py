"""A whole trainer run from S3 to S3, as a pod runs it: real S3 server, tiny real model."""

from __future__ import annotations

import json

import pytest
import torch

from tests.support.trainer import (
    denoising_loss,
    download,
    job_document,
    run_trainer,
    trainer_config,
    trainer_env,
    upload,
    write_config,
)


@pytest.fixture
def s3_job(s3_bucket, tiny_model_dir, toy_cat_dir, tmp_path):
    """A bucket holding the base model and the photos; returns a job-document builder."""
    settings, bucket = s3_bucket
    upload(settings, f"s3://{bucket}/models/tiny-sd/", tiny_model_dir)
    upload(settings, f"s3://{bucket}/data/toy-cat/", toy_cat_dir)

    def build(**kwargs):
        return job_document(
            f"s3://{bucket}/models/tiny-sd/", f"s3://{bucket}/data/toy-cat/", f"s3://{bucket}/jobs/toy-cat/", **kwargs
        )

    return settings, bucket, build


def test_s3_to_s3_run_learns_and_exports_a_loadable_model(s3_job, tiny_model_dir, toy_cat_dir, tmp_path):
    settings, bucket, build = s3_job
    config = trainer_config(build(steps=60, every=20), endpoint=settings.endpoint)
    code, log, summary = run_trainer(write_config(config, tmp_path), tmp_path / "work", trainer_env(settings))
    assert code == 0, log
    assert summary["reason"] == "Succeeded" and summary["step"] == 60
    assert 0 < summary["loss"] < 10  # the last step's loss, for the job's final status

    out = f"s3://{bucket}/jobs/toy-cat/"
    result = json.loads(download(settings, out, tmp_path / "out").joinpath("result.json").read_text())
    assert result["outputs"]["diffusers"] == out + "model/"
    keys = {p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*") if p.is_file()}
    assert {
        "model/model_index.json",
        "model/unet/diffusion_pytorch_model.safetensors",
        "model.safetensors",
        "samples/step-60.png",
    } <= keys
    # keep=2: only the two newest checkpoints remain, each with its manifest; the last step
    # is exported, not checkpointed
    assert {k.split("/")[1] for k in keys if k.startswith("checkpoints/")} == {"checkpoint-20", "checkpoint-40"}

    # Learning: on a fixed set of noise draws, the trained model predicts the noise on its
    # photos far better than the base model (criterion: at most 60% of the base error).
    before = denoising_loss(tiny_model_dir, toy_cat_dir, "a photo of zwx toy cat")
    after = denoising_loss(tmp_path / "out" / "model", toy_cat_dir, "a photo of zwx toy cat")
    assert after < 0.6 * before, (before, after)

    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "out" / "model")
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"  # the seed's sampler travels with it
    image = pipe(
        "a photo of zwx toy cat", num_inference_steps=3, height=64, width=64, generator=torch.Generator().manual_seed(0)
    ).images[0]
    assert image.size == (64, 64)
