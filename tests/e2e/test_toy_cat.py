"""The README's example, end to end: examples/toy-cat.yaml applied as a user would
(``kubectl apply --validate=false``), the real operator creating the Job, the Job's pod
run as a local process by the test's kubelet, the real trainer training the tiny model
from S3 to S3, Prometheus scraping it. One run for the module; each test checks one
promise about it. What is stood in for: kubesim/cluster.py and docs/testing.md."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kubesim.cluster import TINY, LocalCluster, toy_cat_manifest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

NAME = "toy-cat"
STEPS = TINY["training"]["steps"]
EVERY = TINY["checkpointing"]["everySteps"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, s3_server, tiny_model_dir, toy_cat_dir) -> Any:
    """The cluster after the job has succeeded (kept up for the module's tests)."""
    with LocalCluster(tmp_path_factory.mktemp("toy-cat"), s3_server) as cluster:
        cluster.upload_example_inputs(tiny_model_dir, toy_cat_dir)
        cluster.apply(toy_cat_manifest(cluster.s3_endpoint))
        cluster.wait_phase(NAME, "Succeeded", timeout=120)
        yield cluster


def test_the_job_succeeds_and_status_showed_training_progress_on_the_way(run: LocalCluster):
    status = run.status(NAME)
    assert status["phase"] == "Succeeded", run.explain(NAME)
    assert status["progress"]["summary"] == f"{STEPS}/{STEPS}" and status["restarts"] == 0
    assert status["progress"]["percent"] == 100.0 and status["completionTime"]
    history = run.history(NAME)
    phases = [s["phase"] for s in history]
    seen = list(dict.fromkeys(phases))  # first appearance order
    assert seen[0] == "Pending" and seen[-1] == "Succeeded", phases
    assert seen.index("Initializing") < seen.index("Training") < seen.index("Succeeded"), phases
    training = [s for s in history if s["phase"] == "Training"]
    on_the_way = [s["progress"] for s in training if 0 < s["progress"]["step"] < STEPS]
    assert on_the_way, [s.get("progress") for s in training]
    for progress in on_the_way:
        assert progress["summary"] == f"{progress['step']}/{STEPS}"
        assert progress["totalSteps"] == STEPS and progress["loss"] > 0
    ready = next(c for c in training[-1]["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "Training" and f"/{STEPS}" in ready["message"], ready
    events = run.kube.events(run.kube.get("dbj", "default", NAME))
    assert {"Training", "Succeeded"} <= {e["reason"] for e in events}, events


def test_it_was_applied_as_a_user_would(run: LocalCluster):
    import shutil

    assert run.applied_with == ("kubectl" if shutil.which("kubectl") else "api")
    job = run.kube.get("jobs", "default", f"{NAME}-trainer")
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["metadata"]["ownerReferences"][0]["name"] == NAME
    [process] = run.processes(NAME)  # one pod, one process, exit 0
    assert process.exit_code == 0 and process.argv[1:] == ["-m", "dreambooth.trainer"]
    assert process.ip.startswith("127.0.0.")
    pod = run.kube.get("pods", "default", process.name)
    terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert terminated["reason"] == "Completed"
    summary = json.loads(terminated["message"])  # the trainer's termination message
    assert summary["reason"] == "Succeeded" and summary["step"] == STEPS


def test_model_single_file_and_sample_grids_are_in_s3(run: LocalCluster):
    keys = run.keys(NAME)
    assert {
        "model/model_index.json",
        "model/unet/diffusion_pytorch_model.safetensors",
        "model.safetensors",
        "result.json",
        "samples/progression.png",
    } <= keys, sorted(keys)
    assert {f"samples/step-{s}.png" for s in (STEPS // 2, STEPS)} <= keys
    assert run.checkpoint_steps(NAME) == [STEPS - 2 * EVERY, STEPS - EVERY]  # keep: 2; the last step is exported
    out = f"s3://{run.bucket}/default/{NAME}/"
    outputs = run.status(NAME)["outputs"]
    assert outputs == {"model": out + "model/", "singleFile": out + "model.safetensors", "samples": out + "samples/"}
    result = json.loads(run.output(NAME).read_bytes("result.json"))
    assert result["step"] == STEPS


def test_the_model_loads_in_stable_diffusion_pipeline(run: LocalCluster, tmp_path: Path):
    from diffusers import StableDiffusionPipeline

    folder = tmp_path / "model"
    run.output(NAME).download_prefix("model/", folder)
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    image = pipe("a photo of zwx toy cat", num_inference_steps=2, height=64, width=64, output_type="np").images[0]
    assert image.shape == (64, 64, 3)


def test_prometheus_scraped_the_step_series(run: LocalCluster):
    if run.prometheus is None:
        pytest.skip("prometheus is not installed (scripts/install-system-tools.sh installs it)")
    selector = f'dreambooth_trainer_step{{dreambooth_job="{NAME}",namespace="default"}}'
    samples = run.prometheus.samples(selector)
    values = [v for _, v in samples]
    assert len({v for v in values if v > 0}) >= 2, (samples, run.prometheus.log())
    assert values == sorted(values) and max(values) <= STEPS
    [series] = run.prometheus.query(f"last_over_time({selector}[10m])")
    assert series["metric"]["pod"].startswith(f"{NAME}-trainer-0-")
    assert series["metric"]["job"] == "dreambooth-trainers"
    loss = run.prometheus.samples(f'dreambooth_trainer_loss{{dreambooth_job="{NAME}"}}')
    assert any(v > 0 for _, v in loss)
    # the operator's own metrics (the ServiceMonitor's target): one job, succeeded
    run.prometheus.wait_for(
        'dreambooth_operator_jobs{phase="Succeeded"}', lambda found: found and float(found[0]["value"][1]) == 1.0
    )


def test_kubectl_get_shows_the_job(run: LocalCluster):
    listed = run.kube.kubectl("get", "dbj", "-o", "json")  # skipped where kubectl is missing
    [item] = json.loads(listed.stdout)["items"]
    assert item["metadata"]["name"] == NAME and item["status"]["phase"] == "Succeeded"


def test_no_credential_appears_in_any_log_event_status_or_object(run: LocalCluster):
    """The S3 keys reach the pod only through the Secret: they must not show up in the
    operator's log, the trainer's log, Events, any status the job had, the termination
    message, or any object but the Secret itself (raw or base64-encoded)."""
    import base64

    secrets = [run.s3.access_key, run.s3.secret_key]
    forms = {s for secret in secrets for s in (secret, base64.b64encode(secret.encode()).decode())}
    places = {
        "operator log": run.operator.output(),
        "trainer logs": run.logs(NAME),
        "status history": json.dumps(run.history(NAME)),
    }
    for kind in ("dbj", "configmaps", "jobs", "pods", "services", "events"):
        for obj in run.kube.list(kind):
            places[f"{kind}/{obj['metadata']['name']}"] = json.dumps(obj)
    assert any(name.startswith("pods/") for name in places) and any(n.startswith("events/") for n in places)
    secret = json.dumps(run.kube.list("secrets", "default"))
    assert all(base64.b64encode(s.encode()).decode() in secret for s in secrets), "the search finds them"
    leaks = [(where, form[:4] + "...") for where, text in places.items() for form in forms if form in text]
    assert not leaks, leaks
