"""What the user gets wrong or already has: an invalid spec, a missing credentials Secret,
class images already in the shared cache. The real operator, trainer and S3; the test's
Job controller and kubelet (kubesim/cluster.py)."""

from __future__ import annotations

import json
import time

import pytest

from dreambooth.api.layout import MANIFEST, class_cache_uri
from dreambooth.demo import draw_toy_cats
from dreambooth.trainer.prior import cache_key
from dreambooth.trainer.storage import open_storage
from kubesim.cluster import MODEL_URI, LocalCluster, toy_cat_manifest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

NAME = "toy-cat"


def test_an_invalid_job_fails_with_invalid_spec_and_an_event(cluster: LocalCluster):
    # not an extended resource: the CRD's CEL rules do not scan extraResources' keys (see
    # tests/api/test_crd.py PYTHON_ONLY), so the API server stores it; the typed rules refuse it
    manifest = toy_cat_manifest(cluster.s3_endpoint, resources={"extraResources": {"ephemeral-storage": "1"}})
    cluster.apply(manifest)

    status = cluster.wait_phase(NAME, "Failed", timeout=30)
    ready = cluster.ready_condition(NAME)
    assert ready["reason"] == "InvalidSpec" and "spec.resources.extraResources.ephemeral-storage" in ready["message"]
    assert status["completionTime"] and status["restarts"] == 0
    events = cluster.kube.events(cluster.kube.get("dbj", "default", NAME))
    assert any(e["type"] == "Warning" and e["reason"] == "InvalidSpec" for e in events), events
    time.sleep(2)  # two more operator polls: still nothing was created or started
    assert cluster.kube.find("jobs", "default", f"{NAME}-trainer") is None
    assert cluster.kubelet.history == [] and cluster.status(NAME)["phase"] == "Failed"


def test_a_missing_credentials_secret_is_a_clear_condition_and_no_crash_loop(cluster_without_credentials: LocalCluster):
    cluster = cluster_without_credentials
    cluster.apply(
        toy_cat_manifest(
            cluster.s3_endpoint, training={"steps": 10}, checkpointing={"everySteps": 5}, validation={"enabled": False}
        )
    )

    cluster.wait_for(
        lambda: cluster.ready_condition(NAME).get("reason") == "SecretNotFound",
        timeout=30,
        what="Ready reason SecretNotFound",
        name=NAME,
    )
    ready = cluster.ready_condition(NAME)
    assert cluster.status(NAME)["phase"] == "Pending"
    assert 'secret "minio-credentials" not found' in ready["message"]
    assert 'create Secret "minio-credentials" in default' in ready["message"]
    [pod] = cluster.pods(NAME)
    waiting = pod["status"]["containerStatuses"][0]["state"]["waiting"]
    assert waiting["reason"] == "CreateContainerConfigError"
    events = cluster.kube.events(cluster.kube.get("dbj", "default", NAME))
    assert any(e["type"] == "Warning" and e["reason"] == "SecretNotFound" for e in events)

    time.sleep(3)  # no crash loop: the same pod waits, nothing runs, nothing is counted
    assert [p["metadata"]["name"] for p in cluster.pods(NAME)] == [pod["metadata"]["name"]]
    assert cluster.kubelet.history == []
    job = cluster.kube.get("jobs", "default", f"{NAME}-trainer")
    assert not job["status"].get("failed") and cluster.status(NAME)["restarts"] == 0
    assert cluster.ready_condition(NAME)["reason"] == "SecretNotFound"

    # creating the Secret is the fix: the kubelet retries, the same pod starts and trains
    cluster.create_credentials_secret()
    status = cluster.wait_phase(NAME, "Succeeded", timeout=90)
    [process] = cluster.processes(NAME)
    assert process.name == pod["metadata"]["name"] and status["restarts"] == 0


def test_cached_class_images_are_reused_without_generating(cluster: LocalCluster, tmp_path):
    prompt, count = "a photo of a toy cat", 3
    # The shared class-image cache as an earlier job with the same model, prompt,
    # resolution and count left it: images first, the manifest last.
    output = f"s3://{cluster.bucket}/default/{NAME}/"
    key = cache_key(model=MODEL_URI, revision=None, prompt=prompt, resolution=64, count=count)
    cache_uri = class_cache_uri(output) + key + "/"
    cache = open_storage(cache_uri, cluster.settings)
    for index, path in enumerate(draw_toy_cats(tmp_path / "class", count=count, seed=7)):
        cache.upload_file(path, f"class-{index:05d}.png")
    files = {o.key: o.size for o in cache.list()}
    cache.write_bytes(MANIFEST, json.dumps({"prompt": prompt, "count": count, "files": files}).encode())
    before = {(o.key, o.size) for o in cache.list()}

    cluster.apply(
        toy_cat_manifest(
            cluster.s3_endpoint,
            training={"steps": 20},
            checkpointing={"everySteps": 10},
            validation={"everySteps": 20},
            prior={"enabled": True, "classPrompt": prompt, "numImages": count},
        )
    )
    config = json.loads(
        cluster.wait_for(
            lambda: cluster.kube.find("configmaps", "default", f"{NAME}-trainer-config"), what="the ConfigMap"
        )["data"]["config.json"]
    )
    assert config["classCacheUri"] + key + "/" == cache_uri

    status = cluster.wait_phase(NAME, "Succeeded", timeout=90)
    log = cluster.logs(NAME)
    assert f"reusing {count} cached class images from {cache_uri}" in log, log[-3000:]
    assert "generating" not in log
    assert "GeneratingClassImages" not in {s["phase"] for s in cluster.history(NAME)}
    assert {(o.key, o.size) for o in cache.list()} == before  # nothing drawn or rewritten
    assert status["progress"]["step"] == 20
