"""Defect: collective timeouts during rank-0 work (issue 18, defect 4).

Every rank used to wait in a barrier while rank 0 uploaded a checkpoint, drew sample grids
and exported; on GPUs NCCL kills the run once such a wait passes its timeout (10 minutes by
default), on every retry. Here the storage is the real test S3 server behind a throttling
proxy (kubesim/faultproxy.py), so that uploads take several times a short
``runPolicy.collectiveTimeoutSeconds``, and gloo enforces that timeout as NCCL would.
"""

from __future__ import annotations

import re
import threading
import time
from datetime import datetime

import numpy as np
import pytest
from PIL import Image

from dreambooth.trainer import checkpoints
from dreambooth.trainer.errors import Preempted
from dreambooth.trainer.metrics import TrainerMetrics
from dreambooth.trainer.run import run
from dreambooth.trainer.sampling import first_images, generate
from dreambooth.trainer.storage import S3Settings, open_storage
from kubesim.faultproxy import FaultProxy
from tests.support.trainer import (
    StopAfter,
    download,
    job_document,
    launch,
    trainer_config,
    trainer_env,
    upload,
    write_config,
)

TIMEOUT_S = 3
PROMPTS = ["a photo of zwx toy cat", "zwx toy cat in a box", "zwx toy cat, watercolor"]
_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) rank(\d) \w+ \S+ (.*)$", re.MULTILINE)


@pytest.fixture
def bucket(s3_bucket, tiny_model_dir, toy_cat_dir):
    settings, name = s3_bucket
    upload(settings, f"s3://{name}/models/tiny/", tiny_model_dir)
    upload(settings, f"s3://{name}/data/cat/", toy_cat_dir)
    return settings, name


def s3_job(bucket: str, out: str, **kw):
    return job_document(f"s3://{bucket}/models/tiny/", f"s3://{bucket}/data/cat/", f"s3://{bucket}/{out}/", **kw)


def log_times(log: str) -> list[tuple[float, int, str]]:
    """(seconds, rank, message) of every log line of the trainer's format."""
    return [
        (datetime.strptime(t, "%Y-%m-%d %H:%M:%S,%f").timestamp(), int(rank), message)
        for t, rank, message in _LINE.findall(log)
    ]


def first(lines, rank: int, pattern: str) -> float:
    found = [t for t, r, message in lines if r == rank and re.search(pattern, message)]
    assert found, f"no rank{rank} line matching {pattern!r}"
    return found[0]


@pytest.mark.slow
def test_collective_timeout_is_not_tripped_by_uploads_and_exports_longer_than_it(bucket, tmp_path):
    """2 processes, gloo, a 3 s collective timeout, S3 through a link that makes the
    checkpoint upload take several timeouts and the export more than one: the run
    succeeds, training goes on during the upload, the ranks' weights stay identical, the
    checkpoint is complete, and the sample grid (rows drawn by both ranks) is the image one
    process draws from the same weights."""
    settings, name = bucket
    doc = s3_job(name, "job", steps=4, every=2, training={"batchSize": 2})
    doc["spec"].update(
        resources={"nodes": 2, "gpusPerNode": 0},
        runPolicy={"collectiveTimeoutSeconds": TIMEOUT_S},
        validation={"prompts": PROMPTS, "imagesPerPrompt": 1, "inferenceSteps": 2, "everySteps": 4},
    )
    doc["spec"]["output"]["formats"] = ["diffusers"]
    env = {**trainer_env(settings), "DREAMBOOTH_DEBUG_WEIGHT_CHECKSUMS": "1"}
    with FaultProxy(settings.endpoint) as proxy:
        proxy.limit(upload=600_000)  # the checkpoint: ~10 MB, ~16 s; the export: ~3.6 MB, ~6 s
        config = trainer_config(doc, endpoint=proxy.endpoint)
        proc = launch(2, write_config(config, tmp_path), tmp_path / "work", env)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]

    lines = log_times(log)
    uploaded = first(lines, 0, r"checkpoint \S+/checkpoint-2/")
    assert uploaded - first(lines, 0, r"weights step=2 ") > 3 * TIMEOUT_S, "the upload was not slow: no test"
    assert first(lines, 1, r"weights step=4 ") < uploaded, "training did not go on during the upload"
    assert first(lines, 0, r"exported diffusers") - uploaded > TIMEOUT_S, "the export was not slow: no test"
    sums: dict[int, dict[int, str]] = {}
    for _, rank, message in lines:
        if m := re.match(r"weights step=(\d+) checksum=(\S+)", message):
            sums.setdefault(int(m.group(1)), {})[rank] = m.group(2)
    assert sorted(sums) == [1, 2, 3, 4] and all(
        len(set(by_rank.values())) == 1 == len(by_rank) - 1 for by_rank in sums.values()
    ), sums

    out = open_storage(f"s3://{name}/job/", settings)
    assert [c.step for c in checkpoints.complete(out)] == [2]
    found = checkpoints.download_latest(out, tmp_path / "resume")  # every file matches its manifest
    assert found is not None and found[0].step == 2

    from diffusers import StableDiffusionPipeline

    model = download(settings, f"s3://{name}/job/model/", tmp_path / "model")
    pipe = StableDiffusionPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    spec = config.spec
    alone = [row[0] for row in generate(pipe, spec.validation, resolution=64, seed=spec.training.seed, device="cpu")]
    out.download("samples/step-4.png", tmp_path / "grid.png")
    with Image.open(tmp_path / "grid.png") as drawn:
        cells = first_images(drawn.convert("RGB"), len(PROMPTS), 64)
    for prompt, cell, expected in zip(PROMPTS, cells, alone, strict=True):
        assert np.array_equal(np.asarray(cell), np.asarray(expected.convert("RGB"))), f"row {prompt!r} differs"


class OutageAt:
    """Stands in for SIGTERM's flag in an in-process run (never set), and cuts the proxy once
    step ``step`` is done; it comes back when the failed upload has been reported."""

    def __init__(self, metrics: TrainerMetrics, proxy: FaultProxy, step: int) -> None:
        self.metrics, self.proxy, self.step, self.cut = metrics, proxy, step, False
        threading.Thread(target=self._restore_after_failure, daemon=True).start()

    def is_set(self) -> bool:
        if not self.cut and self.metrics.step._value.get() >= self.step:
            self.proxy.outage()
            self.cut = True
        return False

    def _restore_after_failure(self) -> None:
        deadline = time.monotonic() + 120
        while self.metrics.checkpoint_upload_failures._value.get() < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        self.proxy.restore()


def local_inputs_s3_output(tiny_model_dir, toy_cat_dir, name: str, **kw):
    doc = job_document(tiny_model_dir.as_uri(), toy_cat_dir.as_uri(), f"s3://{name}/job/", **kw)
    doc["spec"]["validation"] = {"enabled": False}
    doc["spec"]["output"]["formats"] = ["diffusers"]
    return doc


def through(settings: S3Settings, proxy: FaultProxy) -> S3Settings:
    return S3Settings(
        proxy.endpoint,
        secure=False,
        region=settings.region,
        access_key=settings.access_key,
        secret_key=settings.secret_key,
    )


def test_collective_timeout_a_failed_periodic_upload_is_reported_and_training_goes_on(
    s3_bucket, tiny_model_dir, toy_cat_dir, tmp_path, monkeypatch, caplog
):
    settings, name = s3_bucket
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", settings.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", settings.secret_key)
    metrics = TrainerMetrics()
    with FaultProxy(settings.endpoint) as proxy:
        config = trainer_config(
            local_inputs_s3_output(tiny_model_dir, toy_cat_dir, name, steps=6, every=2), endpoint=proxy.endpoint
        )
        outcome = run(config, tmp_path / "w", metrics=metrics, stop=OutageAt(metrics, proxy, 2))
    assert outcome.step == 6 and metrics.step._value.get() == 6
    assert metrics.checkpoint_upload_failures._value.get() == 1
    assert "checkpoint at step 2 not saved, trying again at the next one" in caplog.text
    out = open_storage(f"s3://{name}/job/", settings)
    assert [c.step for c in checkpoints.complete(out)] == [4]  # the next one landed
    assert out.exists("result.json") and out.exists("model/model_index.json")


def test_collective_timeout_sigterm_during_an_upload_still_leaves_a_complete_checkpoint(
    s3_bucket, tiny_model_dir, toy_cat_dir, tmp_path, monkeypatch
):
    settings, name = s3_bucket
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", settings.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", settings.secret_key)
    metrics = TrainerMetrics()
    stop = StopAfter(metrics, 3)
    landed_at_stop = []
    is_set = stop.is_set
    stop.is_set = lambda: bool(is_set() and not landed_at_stop.append(metrics.last_checkpoint_step._value.get()))
    with FaultProxy(settings.endpoint) as proxy:
        proxy.limit(upload=4_000_000)  # ~2.5 s per checkpoint: step 2's is in flight at step 3
        config = trainer_config(
            local_inputs_s3_output(tiny_model_dir, toy_cat_dir, name, steps=6, every=2), endpoint=proxy.endpoint
        )
        with pytest.raises(Preempted):
            run(config, tmp_path / "w", metrics=metrics, stop=stop)
    assert landed_at_stop[0] < 2, "step 2's upload had landed before the stop: no test"
    out = open_storage(f"s3://{name}/job/", settings)
    assert [c.step for c in checkpoints.complete(out)] == [2, 3]
    found = checkpoints.download_latest(out, tmp_path / "resume")
    assert found is not None and found[0].step == 3
