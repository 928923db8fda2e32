"""One finished tiny job (really trained, outputs in loopback S3), a running one, both as
DreamBoothJobs in the simulated cluster, and a real gallery serving namespace ``ml``."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from dreambooth.api import layout
from dreambooth.api.history import parse
from kubesim.gallery import GalleryServer, env_without_aws
from kubesim.kube import Kube, running_kube
from kubesim.s3server import S3Server
from tests.support.kube import DREAMBOOTH_JOBS
from tests.support.trainer import (
    job_document,
    run_trainer,
    trainer_config,
    trainer_env,
    upload,
    write_config,
)

NAMESPACE = "ml"
STEPS, EVERY = 6, 2


@dataclass
class World:
    kube: Kube
    s3: S3Server
    bucket: str
    gallery: GalleryServer
    finished: str = "toy-cat"
    running: str = "toy-cat-live"

    @property
    def url(self) -> str:
        return self.gallery.url

    def job_url(self, name: str) -> str:
        return f"{self.url}jobs/{NAMESPACE}/{name}"

    def set_progress(self, name: str, step: int, total: int = 100, phase: str = "Training") -> None:
        self.kube.patch_status(
            "DreamBoothJob",
            NAMESPACE,
            name,
            {
                "status": {
                    "phase": phase,
                    "progress": {
                        "step": step,
                        "totalSteps": total,
                        "percent": 100 * step / total,
                        "summary": f"{step}/{total}",
                        "loss": 0.2 - step / 1000,
                        "etaSeconds": (total - step) * 2,
                    },
                }
            },
        )


def succeeded(total: int, loss: float) -> dict:
    return {
        "phase": "Succeeded",
        "family": "sd",
        "progress": {"step": total, "totalSteps": total, "percent": 100.0, "summary": f"{total}/{total}", "loss": loss},
        "conditions": [
            {
                "type": "Succeeded",
                "status": "True",
                "reason": "Succeeded",
                "message": "the model is exported",
                "lastTransitionTime": "2026-01-01T00:00:00Z",
            },
            {
                "type": "Stalled",
                "status": "False",
                "reason": "Progressing",
                "message": "",
                "lastTransitionTime": "2026-01-01T00:00:00Z",
            },
        ],
    }


@pytest.fixture(scope="session")
def world(s3_server, tiny_model_dir, toy_cat_dir, tmp_path_factory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("gallery")
    from dreambooth.trainer.storage import S3Settings, open_storage

    s3 = S3Settings(
        endpoint=s3_server.endpoint,
        secure=False,
        region="us-east-1",
        access_key=s3_server.access_key,
        secret_key=s3_server.secret_key,
    )
    bucket = "gallery-" + tmp.name[-8:].lower().replace("_", "-").strip("-").rjust(4, "x")
    s3_server.client().make_bucket(bucket)
    upload(s3, f"s3://{bucket}/models/tiny/", tiny_model_dir)
    upload(s3, f"s3://{bucket}/data/cat/", toy_cat_dir)
    doc = job_document(
        f"s3://{bucket}/models/tiny/",
        f"s3://{bucket}/data/cat/",
        f"s3://{bucket}/{NAMESPACE}/toy-cat/",
        steps=STEPS,
        every=EVERY,
        validation={
            "inferenceSteps": 2,
            "imagesPerPrompt": 2,
            "everySteps": EVERY,
            "prompts": ["a photo of zwx toy cat", "zwx toy cat on the beach"],
        },
    )
    config = write_config(trainer_config(doc, endpoint=s3_server.endpoint), tmp / "train")
    code, log, _ = run_trainer(config, tmp / "train" / "work", trainer_env(s3))
    assert code == 0, log

    (tmp / "kube").mkdir()
    with running_kube(tmp / "kube", resources=DREAMBOOTH_JOBS) as kube:
        for ns in (NAMESPACE, "other"):
            kube.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
        job = copy.deepcopy(doc)
        job["metadata"]["namespace"] = NAMESPACE
        job["spec"]["storage"] = {"endpoint": s3_server.endpoint, "secure": False}
        kube.create(job)
        history = parse(open_storage(f"s3://{bucket}/{NAMESPACE}/toy-cat/", s3).read_bytes(layout.HISTORY))
        kube.patch_status("DreamBoothJob", NAMESPACE, "toy-cat", {"status": succeeded(STEPS, history[-1].loss)})
        live = copy.deepcopy(job)
        live["metadata"]["name"] = "toy-cat-live"
        kube.create(live)
        hidden = copy.deepcopy(job)
        hidden["metadata"]["namespace"] = "other"
        kube.create(hidden)
        env = {
            **env_without_aws(),
            **kube.env,
            "AWS_ACCESS_KEY_ID": s3_server.access_key,
            "AWS_SECRET_ACCESS_KEY": s3_server.secret_key,
        }
        args = [
            "--namespace",
            NAMESPACE,
            "--s3-endpoint",
            s3_server.endpoint,
            "--s3-insecure",
            "--output-root",
            f"s3://{bucket}",
        ]
        with GalleryServer(args, env, tmp / "gallery.log") as gallery:
            world = World(kube, s3_server, bucket, gallery)
            world.set_progress("toy-cat-live", 3)
            yield world


@pytest.fixture(scope="session")
def artifacts() -> Path:
    """Where the browser tests leave their screenshots (test artifacts)."""
    folder = Path(__file__).resolve().parents[2] / "test-artifacts" / "gallery"
    folder.mkdir(parents=True, exist_ok=True)
    return folder
