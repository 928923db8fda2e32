"""A pod with several training processes, as a multi-GPU pod runs it (accelerate launch;
gloo on the CPU here), with its inputs in S3: what each process fetches, reads and waits for."""

from __future__ import annotations

import json
import re

import pytest

from tests.support.trainer import (
    job_document,
    launch,
    trainer_config,
    trainer_env,
    upload,
    write_config,
)

pytestmark = pytest.mark.slow


def test_inputs_are_fetched_once_per_pod_and_read_by_every_process(s3_bucket, tiny_model_dir, toy_cat_dir, tmp_path):
    """Defect: every process of a pod took its turn to delete the shared folder and download
    the base model and photos again, while the first was already loading from it: it failed
    with a do-not-retry BadModel/BadData, and the Job failed at once."""
    settings, bucket = s3_bucket
    upload(settings, f"s3://{bucket}/models/tiny/", tiny_model_dir)
    upload(settings, f"s3://{bucket}/data/cat/", toy_cat_dir)
    doc = job_document(
        f"s3://{bucket}/models/tiny/",
        f"s3://{bucket}/data/cat/",
        f"s3://{bucket}/out/",
        steps=2,
        every=2,
        training={"batchSize": 2},
    )
    doc["spec"]["resources"] = {"nodes": 2, "gpusPerNode": 0}  # 2 processes
    doc["spec"]["validation"] = {"enabled": False}
    config = write_config(trainer_config(doc, endpoint=settings.endpoint), tmp_path)
    done = launch(2, config, tmp_path / "work", trainer_env(settings))
    assert done.returncode == 0, done.stderr[-4000:]
    fetched = re.findall(r"rank(\d) INFO \S+: fetched \d+ files of (.+?) from s3://", done.stderr)
    assert sorted(fetched) == [("0", "base model files"), ("0", "instance photos")], fetched
    summary = json.loads((tmp_path / "work" / "termination-log").read_text())
    assert summary["exitCode"] == 0 and summary["step"] == 2
