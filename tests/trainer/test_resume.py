"""Nothing is lost on a crash: kill -9 or SIGTERM at a random step, restart, same result."""

from __future__ import annotations

import json
import random
import re
import shutil
import signal
import subprocess
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families
from safetensors.torch import load_file

from dreambooth.api import layout
from dreambooth.api.history import parse
from dreambooth.trainer.storage import open_storage
from kubesim.net import free_port
from tests.support.trainer import (
    job_document,
    run_trainer,
    start_trainer,
    termination_summary,
    trainer_config,
    trainer_env,
    upload,
    write_config,
)

STEPS, EVERY = 40, 5


def scrape(port: int) -> str | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1) as response:
            return response.read().decode()
    except OSError:
        return None


def metric(text: str, name: str) -> float | None:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return sample.value
    return None


def wait_for_step(proc: subprocess.Popen, port: int, at_least: int, timeout: float = 120) -> tuple[float, str]:
    """Poll the trainer's metrics until its step reaches ``at_least``; returns (step, text)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        text = scrape(port)
        step = metric(text, "dreambooth_trainer_step") if text else None
        if step is not None and step >= at_least:
            return step, text
        time.sleep(0.01)
    raise AssertionError(f"the trainer never reached step {at_least}")


#: the families a kill -9 resumes for: (model fixture, training options, the exported file compared)
FAMILIES = {
    "sd": ("tiny_model_dir", {}, "model/unet/diffusion_pytorch_model.safetensors"),
    "sdxl": (
        "tiny_sdxl_dir",
        {"method": "lora", "lora": {"textEncoder": True}},
        "lora/pytorch_lora_weights.safetensors",
    ),  # SDXL's default, both encoders' adapters too
}


@pytest.fixture
def bucket_with_inputs(s3_bucket, tiny_model_dir, toy_cat_dir):
    settings, bucket = s3_bucket
    upload(settings, f"s3://{bucket}/models/tiny/", tiny_model_dir)
    upload(settings, f"s3://{bucket}/data/cat/", toy_cat_dir)
    return settings, bucket


def config_for(
    settings, bucket, output: str, port: int = 0, *, model: str = "models/tiny/", training: dict | None = None
):
    doc = job_document(
        f"s3://{bucket}/{model}",
        f"s3://{bucket}/data/cat/",
        f"s3://{bucket}/{output}/",
        steps=STEPS,
        every=EVERY,
        training=training,
    )
    return trainer_config(doc, endpoint=settings.endpoint, metrics_port=port)


@pytest.mark.parametrize("family", [pytest.param(f, marks=[pytest.mark.slow] if f != "sd" else []) for f in FAMILIES])
def test_kill_9_at_a_random_step_resumes_and_ends_with_the_same_weights(family, bucket_with_inputs, request, tmp_path):
    settings, bucket = bucket_with_inputs
    fixture, training, artifact = FAMILIES[family]
    model = f"models/{family}/"
    upload(settings, f"s3://{bucket}/{model}", request.getfixturevalue(fixture))
    env = trainer_env(settings)

    def config(output, port=0):
        return config_for(settings, bucket, output, port, model=model, training=training)

    code, log, _ = run_trainer(write_config(config("straight"), tmp_path / "a"), tmp_path / "a" / "work", env)
    assert code == 0, log

    port = free_port()
    config_path = write_config(config("killed", port), tmp_path / "b")
    # past the second checkpoint: the first has landed then (one upload in flight at most)
    kill_at = random.Random().randint(2 * EVERY + 1, STEPS - EVERY)
    proc = start_trainer(config_path, tmp_path / "b" / "work", env)
    seen, _ = wait_for_step(proc, port, kill_at)
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    # Debris a crash can leave: a checkpoint without a manifest and one whose manifest lies.
    out = open_storage(f"s3://{bucket}/killed/", settings)
    out.write_bytes("checkpoints/checkpoint-9999/trainable.safetensors", b"half an upload")
    out.write_bytes("checkpoints/checkpoint-9998/trainable.safetensors", b"short")
    out.write_bytes(
        "checkpoints/checkpoint-9998/manifest.json",
        json.dumps({"step": 9998, "files": {"trainable.safetensors": {"size": 999, "sha256": "0"}}}).encode(),
    )

    code, log, summary = run_trainer(config_path, tmp_path / "b" / "work", env)
    assert code == 0, log
    resumed = int(re.search(r"resumed from \S+ at step (\d+)", log).group(1))
    # at most one interval and the steps trained while its checkpoint uploaded are lost:
    # the checkpoint before the newest one written had landed (one upload in flight at most)
    assert resumed % EVERY == 0 and (seen // EVERY - 1) * EVERY <= resumed <= seen + EVERY, (seen, resumed)
    assert summary["step"] == STEPS
    remaining = {o.key.split("/")[1] for o in out.list("checkpoints/")}
    # debris pruned; the last step is exported, not checkpointed
    assert remaining == {f"checkpoint-{STEPS - 2 * EVERY}", f"checkpoint-{STEPS - EVERY}"}

    # history.jsonl: every step once, the resumed run's losses those of the straight run
    straight_history = parse(open_storage(f"s3://{bucket}/straight/", settings).read_bytes(layout.HISTORY))
    killed_history = parse(out.read_bytes(layout.HISTORY))
    assert [p.step for p in killed_history] == [p.step for p in straight_history] == list(range(1, STEPS + 1))
    assert [p.loss for p in killed_history] == [p.loss for p in straight_history]

    a, b = (
        load_file(open_storage(f"s3://{bucket}/{run}/", settings).download(artifact, tmp_path / run / "w"))
        for run in ("straight", "killed")
    )
    assert a.keys() == b.keys()
    different = [k for k in a if not (a[k] == b[k]).all()]
    assert not different, f"{len(different)} tensors differ after resume, e.g. {different[:3]}"


def test_metrics_advance_pass_promtool_and_sigterm_saves_a_checkpoint(bucket_with_inputs, tmp_path):
    settings, bucket = bucket_with_inputs
    port = free_port()
    config_path = write_config(config_for(settings, bucket, "preempted", port), tmp_path)
    proc = start_trainer(config_path, tmp_path / "work", trainer_env(settings))
    first, _ = wait_for_step(proc, port, 2)
    later, text = wait_for_step(proc, port, first + 3)
    assert later > first
    assert metric(text, "dreambooth_trainer_total_steps") == STEPS
    assert metric(text, "dreambooth_trainer_phase") is not None

    promtool = shutil.which("promtool")
    if promtool:  # Debian's prometheus package; .ci/run installs it
        check = subprocess.run([promtool, "check", "metrics"], check=False, input=text, capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr

    proc.send_signal(signal.SIGTERM)  # what Kubernetes sends on preemption, suspend or drain
    proc.wait(timeout=60)
    log = proc.stdout.read()
    assert proc.returncode == 21, log
    summary = termination_summary(tmp_path / "work")
    assert summary["reason"] == "Preempted"
    stopped = int(re.search(r"stopped by SIGTERM after step (\d+)", summary["message"]).group(1))
    keys = {o.key for o in open_storage(f"s3://{bucket}/preempted/", settings).list("checkpoints/")}
    assert f"checkpoints/checkpoint-{stopped}/manifest.json" in keys
    if not promtool:
        pytest.skip("promtool not installed: metrics text not linted (apt-get install prometheus)")


def local_doc(model, photos, out, **kw):
    doc = job_document(model.as_uri(), photos.as_uri(), out.as_uri(), **kw)
    doc["spec"]["validation"] = {"enabled": False}
    return doc


def test_kill_9_during_class_image_generation_keeps_the_images_already_drawn(tiny_model_dir, toy_cat_dir, tmp_path):
    count = 12
    doc = local_doc(
        tiny_model_dir,
        toy_cat_dir,
        tmp_path / "jobs" / "face",
        steps=2,
        every=2,
        prior={"enabled": True, "classPrompt": "a photo of a cat", "numImages": count},
    )
    config_path = write_config(trainer_config(doc), tmp_path)
    cache = tmp_path / "jobs" / ".cache" / "class-images"
    proc = start_trainer(config_path, tmp_path / "work", trainer_env())
    deadline = time.monotonic() + 120
    while len(list(cache.rglob("*.png"))) < 3:
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    drawn = len(list(cache.rglob("*.png")))
    assert drawn < count, "generation finished before the kill: make it slower"

    code, log, _ = run_trainer(config_path, tmp_path / "work", trainer_env())
    assert code == 0, log
    kept = int(re.search(r"generating (\d+) class images .* \((\d+) already there\)", log).group(2))
    assert kept >= drawn and f"generating {count - kept} class images" in log
    assert len(list(cache.rglob("*.png"))) == count and len(list(cache.rglob("manifest.json"))) == 1


def test_kill_9_during_textual_inversion_resumes_in_phase_one(tiny_model_dir, toy_cat_dir, tmp_path):
    port = free_port()
    doc = local_doc(
        tiny_model_dir,
        toy_cat_dir,
        tmp_path / "out",
        steps=4,
        every=2,
        training={"textualInversion": {"steps": 40, "placeholderToken": "<zwx>", "initializerToken": "cat"}},
    )
    doc["spec"]["instance"]["prompt"] = "a photo of <zwx> toy cat"
    config = trainer_config(doc, metrics_port=port)
    config_path = write_config(config, tmp_path)
    proc = start_trainer(config_path, tmp_path / "work", trainer_env())
    seen, _ = wait_for_step(proc, port, 8)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    code, log, summary = run_trainer(config_path, tmp_path / "work", trainer_env())
    assert code == 0, log
    resumed = int(re.search(r"resumed from \S+ at step (\d+)", log).group(1))
    assert seen - 2 <= resumed < 40, (seen, resumed)  # phase 1 went on where it stopped
    assert summary["step"] == 44
