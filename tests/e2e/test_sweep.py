"""A DreamBoothSweep on the simulated cluster: the real operator creates its runs as
DreamBoothJobs (2 learning rates x 2 steps x 2 schedulers = 2 jobs, never more than
maxParallel unfinished), the trainer trains each once, the comparison Job writes
compare.png and compare.json, the status has 8 rows; a failing run shows in its rows while
the other finishes; deleting the sweep deletes its runs."""

from __future__ import annotations

import io
import json
import threading
from typing import Any

import pytest
from PIL import Image

from dreambooth.trainer.storage import open_storage
from kubesim.cluster import CREDENTIALS_SECRET, MODEL_URI, NAMESPACE, PHOTOS_URI, LocalCluster
from tests.support.grids import assert_grid

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

RESOLUTION = 64
PROMPTS = ["a photo of zwx toy cat", "a photo of zwx toy cat on the beach"]
LABEL = "dreambooth.io/sweep"


def sweep_manifest(cluster: LocalCluster, name: str, axes: list[dict[str, Any]], **template: Any) -> dict[str, Any]:
    return {
        "apiVersion": "dreambooth.io/v1alpha1",
        "kind": "DreamBoothSweep",
        "metadata": {"name": name},
        "spec": {
            "maxParallel": 1,
            "axes": axes,
            "template": {
                "baseModel": {"uri": MODEL_URI},
                "instance": {"uri": PHOTOS_URI, "prompt": PROMPTS[0]},
                "training": {"steps": 4, "batchSize": 1, "resolution": RESOLUTION, "learningRate": 1e-3},
                "validation": {"prompts": PROMPTS, "inferenceSteps": 2, "imagesPerPrompt": 1},
                "storage": {
                    "endpoint": cluster.s3_endpoint,
                    "secure": False,
                    "credentialsSecret": {"name": CREDENTIALS_SECRET},
                },
                "resources": {"gpusPerNode": 0},
                **template,
            },
        },
    }


class Unfinished:
    """The most runs of a sweep unfinished at once, as the API server stored them."""

    def __init__(self, sweep: str) -> None:
        self.sweep, self.phases, self.most, self.lock = sweep, {}, 0, threading.Lock()

    def __call__(self, resource, kind, obj, old) -> None:
        if resource[2] != "dreamboothjobs" or (obj["metadata"].get("labels") or {}).get(LABEL) != self.sweep:
            return
        with self.lock:
            name = obj["metadata"]["name"]
            if kind == "DELETED":
                self.phases.pop(name, None)
            else:
                self.phases[name] = (obj.get("status") or {}).get("phase")
            self.most = max(self.most, sum(p not in ("Succeeded", "Failed") for p in self.phases.values()))


def sweep_status(cluster: LocalCluster, name: str) -> dict[str, Any]:
    return (cluster.kube.find("DreamBoothSweep", NAMESPACE, name) or {}).get("status") or {}


def wait_sweep(cluster: LocalCluster, name: str, phase: str, timeout: float) -> dict[str, Any]:
    cluster.wait_for(
        lambda: sweep_status(cluster, name).get("phase") == phase, timeout=timeout, what=f"sweep {name} {phase}"
    )
    return sweep_status(cluster, name)


def runs(cluster: LocalCluster, name: str) -> list[dict[str, Any]]:
    return cluster.kube.list("DreamBoothJob", NAMESPACE, labels={LABEL: name})


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, s3_server, tiny_model_dir, toy_cat_dir):
    with LocalCluster(tmp_path_factory.mktemp("sweep"), s3_server, prometheus=False) as local:
        local.upload_example_inputs(tiny_model_dir, toy_cat_dir)
        yield local


CLIP_URI = "s3://models/tiny-clip/"


@pytest.fixture(scope="module")
def study(cluster, tmp_path_factory):
    from dreambooth.trainer.tiny_clip import build_tiny_clip

    clip = open_storage(CLIP_URI, cluster.settings)  # the evaluator, fetched like a base model
    if not clip.list():
        clip.upload_dir(build_tiny_clip(tmp_path_factory.mktemp("clip") / "clip"))
    unfinished = Unfinished("study")
    stop = cluster.kube.on_change(unfinished)
    try:
        cluster.apply(
            sweep_manifest(
                cluster,
                "study",
                [
                    {"field": "training.learningRate", "values": [1e-3, 5e-4]},
                    {"field": "training.steps", "values": [2, 4]},
                    {"field": "validation.scheduler", "values": ["ddim", "pndm"]},
                ],
                evaluation={"enabled": True, "model": {"uri": CLIP_URI}},
            )
        )
        status = wait_sweep(cluster, "study", "Succeeded", timeout=300)
    finally:
        stop()
    return status, unfinished.most


def test_two_runs_for_eight_rows_never_more_than_max_parallel(cluster, study):
    status, most = study
    assert sorted(j["metadata"]["name"] for j in runs(cluster, "study")) == ["study-1", "study-2"]
    assert most == 1  # maxParallel
    assert (status["runsTotal"], status["runsSucceeded"], status["runsFailed"], status["summary"]) == (2, 2, 0, "2/2")
    rows = status["rows"]
    assert [(r["run"], r["step"], r["scheduler"]) for r in rows] == [
        (f"study-{n}", step, s) for n in (1, 2) for step in (2, 4) for s in ("ddim", "pndm")
    ]
    assert all(r["phase"] == "Succeeded" and r["finalLoss"] is not None for r in rows)
    assert rows[0]["values"] == {"training.learningRate": "0.001"}
    # every step's round of the main scheduler is evaluated (the comparison pod reports them)
    judged = [(r["run"], r["step"]) for r in rows if r.get("evaluation")]
    assert judged == [("study-1", 2), ("study-1", 4), ("study-2", 2), ("study-2", 4)]
    assert all(r["evaluation"]["step"] == r["step"] and r["scheduler"] == "ddim" for r in rows if r.get("evaluation"))
    assert status["bestRun"] in ("study-1", "study-2") and status["bestStep"] in (2, 4)
    for job in runs(cluster, "study"):  # each run trained once, to the largest steps value
        assert job["status"]["progress"]["summary"] == "4/4"
        assert job["spec"]["validation"]["compareSchedulers"] == ["pndm"]


def test_compare_png_and_json_are_in_the_sweeps_prefix(cluster, study):
    status, _ = study
    prefix = f"s3://{cluster.bucket}/{NAMESPACE}/study/"
    assert status["compare"] == prefix + "compare.png"
    store = open_storage(prefix, cluster.settings)
    with Image.open(io.BytesIO(store.read_bytes("compare.png"))) as png:  # rows: 2 runs x 2 steps x 2 schedulers
        assert_grid(png, rows=8, columns=len(PROMPTS), size=RESOLUTION)
    doc = json.loads(store.read_bytes("compare.json"))
    assert len(doc["rows"]) == 8 and all(r["succeeded"] and r["samples"] for r in doc["rows"])
    assert [r["evaluation"] is not None for r in doc["rows"]] == [True, False] * 4  # ddim judged, pndm drawn
    assert {o.key for o in store.list("runs/")} >= {
        "runs/study-1/samples/step-2-pndm.png",
        "runs/study-2/samples/step-4.png",
    }


def test_a_failing_run_shows_in_its_rows_and_the_other_finishes(cluster):
    cluster.apply(
        sweep_manifest(
            cluster,
            "priors",
            [{"field": "prior.enabled", "values": [True, False]}],
            prior={"enabled": True, "classPrompt": "a photo of a cat", "uri": "s3://training-data/no-class-images/"},
        )
    )
    status = wait_sweep(cluster, "priors", "Succeeded", timeout=240)
    assert (status["runsSucceeded"], status["runsFailed"]) == (1, 1)
    failed, ok = status["rows"]
    assert failed["phase"] == "Failed" and "no class images" in failed["message"]
    assert ok["phase"] == "Succeeded"
    doc = json.loads(
        open_storage(f"s3://{cluster.bucket}/{NAMESPACE}/priors/", cluster.settings).read_bytes("compare.json")
    )
    assert [r["succeeded"] for r in doc["rows"]] == [False, True]


def test_deleting_the_sweep_deletes_its_runs(cluster, study):
    assert runs(cluster, "study")
    cluster.kube.delete("DreamBoothSweep", NAMESPACE, "study")
    cluster.wait_for(
        lambda: not runs(cluster, "study") and not cluster.kube.find("Job", NAMESPACE, "study-compare"),
        timeout=60,
        what="the sweep's runs and comparison Job gone",
    )


def test_suspending_the_sweep_suspends_its_running_run_and_starts_no_other(cluster):
    manifest = sweep_manifest(
        cluster,
        "paused",
        [{"field": "training.learningRate", "values": [1e-3, 5e-4]}],
        validation={"enabled": False},
        checkpointing={"everySteps": 500},
    )
    manifest["spec"]["template"]["training"]["steps"] = 5000  # long enough to be caught training
    cluster.apply(manifest)
    cluster.wait_for(
        lambda: cluster.status("paused-1").get("phase") == "Training", timeout=120, what="the first run training"
    )
    cluster.kube.patch("DreamBoothSweep", NAMESPACE, "paused", {"spec": {"suspend": True}})
    status = wait_sweep(cluster, "paused", "Suspended", timeout=60)
    cluster.wait_phase("paused-1", "Suspended", timeout=60)
    assert [j["metadata"]["name"] for j in runs(cluster, "paused")] == ["paused-1"]  # no new run while suspended
    assert status["runsCreated"] == 1
    cluster.kube.delete("DreamBoothSweep", NAMESPACE, "paused")
    cluster.wait_for(lambda: not runs(cluster, "paused"), timeout=60, what="the suspended sweep's run gone")
