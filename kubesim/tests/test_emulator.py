"""The Kubernetes API emulator works for real clients: kopf (in-process, unmodified), the
``kubernetes``/``kubernetes_asyncio`` clients, kubectl; and the controller stand-ins behave
like the real Job controller, kubelet and garbage collector."""

from __future__ import annotations

import asyncio
import datetime
import json
import queue
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from kopf.testing import KopfRunner

from kubesim.controllers import (
    ControllerLoop,
    GarbageCollector,
    JobController,
    Kubelet,
)
from kubesim.kube import FaultShare, Kube, NotFound, kopf_registry

DBJ = "/apis/dreambooth.io/v1alpha1/namespaces/default/dreamboothjobs"
MERGE = {"Content-Type": "application/merge-patch+json"}
JSON_PATCH = {"Content-Type": "application/json-patch+json"}


@pytest.fixture(autouse=True)
def _sys_path_restored(monkeypatch):
    """kopf's file loader (``kopf run path.py``) puts the file's folder first on sys.path and
    leaves it there; a later test that hands sys.path to a subprocess (PYTHONPATH) would make
    it import that folder's operator.py instead of the standard library's ``operator``."""
    monkeypatch.setattr(sys, "path", list(sys.path))


OPERATOR = """
import pathlib

import kopf
import kubernetes_asyncio.client as k8s
import kubernetes_asyncio.config as k8s_config

CALLS = pathlib.Path(__file__).with_suffix(".calls")


API: k8s.ApiClient


@kopf.on.startup()
async def connect(**_):
    global API
    await k8s_config.load_kube_config()
    API = k8s.ApiClient()  # once: a new client costs ~30 ms (an SSL context, a session)


@kopf.on.cleanup()
async def disconnect(**_):
    await API.close()


@kopf.on.create("dreambooth.io", "v1alpha1", "dreamboothjobs")
async def created(body, name, namespace, patch, **_):
    with CALLS.open("a") as calls:
        calls.write(name + "\\n")
    config_map = {"apiVersion": "v1", "kind": "ConfigMap",
                  "metadata": {"name": f"{name}-config",
                               "labels": {"dreambooth.io/job-name": name}},
                  "data": {"steps": str(body["spec"]["steps"])}}
    kopf.adopt(config_map, owner=body)
    await k8s.CoreV1Api(API).create_namespaced_config_map(namespace, config_map)
    patch.status["phase"] = "Created"
    kopf.info(body, reason="Created", message=f"ConfigMap {name}-config")
"""


def dbj(name: str, steps: int = 5, **labels: str) -> dict[str, Any]:
    return {
        "apiVersion": "dreambooth.io/v1alpha1",
        "kind": "DreamBoothJob",
        "metadata": {"name": name, "namespace": "default", "labels": labels},
        "spec": {"steps": steps},
    }


ON_DELETE = """

@kopf.on.delete("dreambooth.io", "v1alpha1", "dreamboothjobs")
async def deleted(name, **_):
    with CALLS.open("a") as calls:
        calls.write("deleted:" + name + "\\n")
"""


def operator_file(tmp_path: Path, on_delete: bool = False) -> Path:
    """The operator; ``on_delete`` adds a deletion handler (and so kopf's finalizer)."""
    path = tmp_path / "operator.py"
    path.write_text(OPERATOR + (ON_DELETE if on_delete else ""))
    return path


def calls(path: Path) -> list[str]:
    calls_file = path.with_suffix(".calls")
    return calls_file.read_text().split() if calls_file.exists() else []


def run_kopf(kube: Kube, path: Path) -> KopfRunner:
    """kopf as in production (``kopf run``), in this process, with a fresh registry."""
    return KopfRunner(["run", "--standalone", "-A", "--verbose", str(path)], registry=kopf_registry(), timeout=30)


def wait_watching(kube: Kube, path: str = DBJ.replace("/namespaces/default", "")) -> None:
    """kopf lists, then watches: the second GET is its watch."""
    kube.wait_for(lambda: kube.requests.count(("GET", path)) >= 2, 30, "kopf watching")


# ---------------------------------------------------------------------------------------------
# (a) kopf, unmodified, in-process


def test_kopf_operator_creates_child_and_writes_status_through_subresource(kube, tmp_path):
    path = operator_file(tmp_path, on_delete=True)
    with run_kopf(kube, path) as runner:
        wait_watching(kube)
        job = kube.create(dbj("toy", steps=7))
        config = kube.wait_for(lambda: kube.get("ConfigMap", "default", "toy-config"), 20)
        status = kube.wait_for(lambda: kube.get("dbj", "default", "toy").get("status"), 20)
        kube.wait_for(lambda: kube.events(job), 10)
        time.sleep(1.0)  # room for a wrongly repeated handler call
        assert calls(path) == ["toy"]
        finalizers = kube.get("dbj", "default", "toy")["metadata"]["finalizers"]
        kube.delete("dbj", "default", "toy")  # marked; kopf's handler, then its finalizer goes
        kube.wait_for(lambda: kube.find("dbj", "default", "toy") is None, 20, "deleted")
    assert runner.exit_code == 0
    assert calls(path) == ["toy", "deleted:toy"]
    assert finalizers == ["kopf.zalando.org/KopfFinalizerMarker"]
    assert config["data"] == {"steps": "7"}
    assert config["metadata"]["ownerReferences"][0]["uid"] == job["metadata"]["uid"]
    assert status == {"phase": "Created"}
    assert ("PATCH", f"{DBJ}/toy/status") in kube.requests
    assert [e["reason"] for e in kube.events(job)] == ["Created"]
    assert "Handler 'created' succeeded" in runner.output
    assert not re.search(r'HTTP/1.1" [45]\d\d|Traceback|Unprocessable|Conflict', runner.output)
    # The cascade is the garbage collector's job, run explicitly.
    assert kube.find("ConfigMap", "default", "toy-config") is not None
    assert GarbageCollector(kube).collect() == [("ConfigMap", "default", "toy-config")]
    assert kube.find("ConfigMap", "default", "toy-config") is None


def test_kopf_handles_200_objects_without_slowing_down(kube, tmp_path):
    """Stock kmock needed 43 s for 200 objects (quadratic request log and lookups)."""
    path = operator_file(tmp_path)
    with run_kopf(kube, path):
        wait_watching(kube)
        started = time.monotonic()

        async def create_all() -> None:
            async with aiohttp.ClientSession(kube.url) as session:
                for batch in range(0, 200, 50):
                    await asyncio.gather(*(session.post(DBJ, json=dbj(f"job-{i}")) for i in range(batch, batch + 50)))

        asyncio.run(create_all())
        kube.wait_for(lambda: sum(bool(j.get("status")) for j in kube.list("dbj")) == 200, 60, "200 statuses")
        elapsed = time.monotonic() - started
    assert sorted(calls(path)) == sorted(f"job-{i}" for i in range(200))
    assert len(kube.list("ConfigMap", "default")) == 200
    assert elapsed < 15, elapsed


def test_request_cost_does_not_grow_with_history(kube):
    """Stock kmock replays its whole request log on every request: cost grows with use."""

    async def create(names: range) -> float:
        started = time.monotonic()
        async with aiohttp.ClientSession(kube.url) as session:
            for i in names:
                async with session.post(DBJ, json=dbj(f"job-{i}")) as rsp:
                    assert rsp.status == 201
                async with session.get(f"{DBJ}/job-{i}") as rsp:
                    assert rsp.status == 200
        return time.monotonic() - started

    first, second = asyncio.run(create(range(500))), asyncio.run(create(range(500, 1000)))
    assert second < 3 * first + 0.5, (first, second)


# ---------------------------------------------------------------------------------------------
# (b) the client libraries


@pytest.mark.asyncio
async def test_kubernetes_asyncio_lists_creates_patches_and_watches(kube):
    import kubernetes_asyncio.client as k8s
    import kubernetes_asyncio.config as k8s_config
    import kubernetes_asyncio.watch as k8s_watch

    await k8s_config.load_kube_config()  # the fixture's $KUBECONFIG
    async with k8s.ApiClient() as api:
        core, custom = k8s.CoreV1Api(api), k8s.CustomObjectsApi(api)
        await core.create_namespaced_config_map(
            "default", {"metadata": {"name": "a", "labels": {"dreambooth.io/job-name": "toy"}}, "data": {"x": "1"}}
        )
        await core.create_namespaced_config_map("default", {"metadata": {"name": "b"}})
        listed = await core.list_namespaced_config_map("default", label_selector="dreambooth.io/job-name=toy")
        assert [cm.metadata.name for cm in listed.items] == ["a"]
        since = listed.metadata.resource_version

        # A dict is a strategic merge patch for built-in kinds.
        patched = await core.patch_namespaced_config_map("a", "default", {"data": {"y": "2"}})
        assert patched.data == {"x": "1", "y": "2"}
        assert int(patched.metadata.resource_version) > int(since)

        created = await custom.create_namespaced_custom_object(
            "dreambooth.io", "v1alpha1", "default", "dreamboothjobs", dbj("toy")
        )
        await custom.patch_namespaced_custom_object_status(
            "dreambooth.io",
            "v1alpha1",
            "default",
            "dreamboothjobs",
            "toy",
            {"status": {"phase": "Pending"}},
            _content_type="application/merge-patch+json",
        )
        after = await custom.patch_namespaced_custom_object(
            "dreambooth.io",
            "v1alpha1",
            "default",
            "dreamboothjobs",
            "toy",
            {"spec": {"steps": 9}, "status": {"phase": "Ignored"}},
            _content_type="application/merge-patch+json",
        )
        assert after["status"] == {"phase": "Pending"}  # not through the main object
        assert after["metadata"]["generation"] == created["metadata"]["generation"] + 1

        # A watch from the list's resourceVersion sees only what happened since.
        seen = []
        async with k8s_watch.Watch().stream(
            core.list_namespaced_config_map, "default", resource_version=since, timeout_seconds=2
        ) as stream:
            async for event in stream:
                seen.append((event["type"], event["object"].metadata.name))
                if len(seen) == 1:
                    await core.delete_namespaced_config_map("b", "default")
                if len(seen) == 2:
                    break
        assert seen == [("MODIFIED", "a"), ("DELETED", "b")]


def test_kubernetes_sync_client_finds_the_emulator(kube):
    import kubernetes

    kubernetes.config.load_kube_config()
    names = [ns.metadata.name for ns in kubernetes.client.CoreV1Api().list_namespace().items]
    assert names == ["default"]


# ---------------------------------------------------------------------------------------------
# (c) kubectl


DBJ_YAML = """\
apiVersion: dreambooth.io/v1alpha1
kind: DreamBoothJob
metadata:
  name: toy
spec:
  steps: 3
"""


def test_kubectl_apply_get_watch_patch_delete(kube):
    assert "created" in kube.kubectl("apply", "--validate=false", "-f", "-", input=DBJ_YAML).stdout
    assert "toy" in kube.kubectl("get", "dbj").stdout
    assert kube.kubectl("get", "dbj", "toy", "-o", "jsonpath={.spec.steps}").stdout == "3"
    assert "configured" in kube.kubectl("apply", "--validate=false", "-f", "-", input=DBJ_YAML.replace("3", "4")).stdout
    assert kube.get("dbj", "default", "toy")["spec"]["steps"] == 4

    watch = subprocess.Popen(
        kube.kubectl_argv(
            "get", "dbj", "-w", "--output-watch-events", "-o", "jsonpath={.type} {.object.status.phase}{'\\n'}"
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=kube.env,
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(
        target=lambda: [lines.put(line) for line in watch.stdout],  # type: ignore
        daemon=True,
    ).start()
    try:
        assert lines.get(timeout=30).split() == ["ADDED"]
        kube.kubectl(
            "patch", "dbj", "toy", "--subresource=status", "--type=merge", "-p", '{"status": {"phase": "Training"}}'
        )
        assert lines.get(timeout=30).split() == ["MODIFIED", "Training"]
    finally:
        watch.kill()
        watch.communicate()
    kube.kubectl("delete", "dbj", "toy")
    assert kube.find("dbj", "default", "toy") is None


# ---------------------------------------------------------------------------------------------
# the API semantics kopf and the operator rely on (raw HTTP)


def http(
    kube: Kube, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    async def go() -> tuple[int, Any]:
        async with (
            aiohttp.ClientSession(kube.url) as session,
            session.request(method, path, json=body, headers=headers) as rsp,
        ):
            return rsp.status, await rsp.json()

    return asyncio.run(go())


def test_server_side_metadata_generation_and_status_subresource(kube):
    code, job = http(kube, "POST", DBJ, {**dbj("toy"), "status": {"phase": "Bogus"}})
    meta = job["metadata"]
    assert code == 201 and "status" not in job  # a new object's status is the server's
    assert meta["namespace"] == "default" and meta["generation"] == 1
    assert meta["uid"] and meta["creationTimestamp"].endswith("Z")
    assert http(kube, "POST", DBJ, dbj("toy"))[0] == 409
    _, named = http(kube, "POST", "/api/v1/namespaces/default/configmaps", {"metadata": {"generateName": "cm-"}})
    assert named["metadata"]["name"].startswith("cm-") and len(named["metadata"]["name"]) == 8

    _, job = http(kube, "PATCH", f"{DBJ}/toy/status", {"status": {"phase": "Pending"}, "spec": {"steps": 99}}, MERGE)
    assert job["status"] == {"phase": "Pending"} and job["spec"]["steps"] == 5
    assert job["metadata"]["generation"] == 1  # a status change is no new generation
    _, job = http(kube, "PATCH", f"{DBJ}/toy", {"metadata": {"labels": {"a": "b"}}}, MERGE)
    assert job["metadata"]["generation"] == 1  # nor is a metadata change
    _, job = http(kube, "PATCH", f"{DBJ}/toy", {"spec": {"steps": 6}, "status": None}, MERGE)
    assert job["metadata"]["generation"] == 2 and job["status"] == {"phase": "Pending"}
    version = job["metadata"]["resourceVersion"]
    _, same = http(kube, "PATCH", f"{DBJ}/toy", {"spec": {"steps": 6}}, MERGE)
    assert same["metadata"]["resourceVersion"] == version  # no change, no new version

    assert (
        http(kube, "PATCH", f"{DBJ}/toy", {"metadata": {"resourceVersion": "1"}, "spec": {"steps": 1}}, MERGE)[0] == 409
    )
    code, error = http(
        kube,
        "PATCH",
        f"{DBJ}/toy",
        [
            {"op": "test", "path": "/metadata/resourceVersion", "value": "1"},
            {"op": "add", "path": "/metadata/finalizers", "value": ["x"]},
        ],
        JSON_PATCH,
    )
    assert code == 422 and error["kind"] == "Status"
    assert kube.get("dbj", "default", "toy")["metadata"]["resourceVersion"] == version
    assert http(kube, "PATCH", f"{DBJ}/toy", {"x": 1}, {"Content-Type": "text/plain"})[0] == 415

    code, listed = http(kube, "GET", DBJ)
    assert listed["kind"] == "DreamBoothJobList" and listed["apiVersion"] == "dreambooth.io/v1alpha1"
    assert listed["metadata"]["resourceVersion"] == str(kube.emulator.rv)


def test_finalizers_delay_deletion_until_removed(kube):
    kube.create({**dbj("toy"), "metadata": {"name": "toy", "finalizers": ["keep"]}})
    marked = kube.delete("dbj", "default", "toy")
    assert marked["metadata"]["deletionTimestamp"]
    with pytest.raises(Exception, match="no new finalizers"):
        kube.patch("dbj", "default", "toy", {"metadata": {"finalizers": ["keep", "more"]}})
    kube.patch("dbj", "default", "toy", {"metadata": {"finalizers": None}})
    with pytest.raises(NotFound):
        kube.get("dbj", "default", "toy")


def watch_lines(kube: Kube, query: str, count: int, during=None) -> list[tuple[str, str]]:
    """The first ``count`` events of a watch on configmaps (``during`` runs once it is open)."""

    async def go() -> list[tuple[str, str]]:
        url = f"/api/v1/namespaces/default/configmaps?watch=true&{query}"
        async with (
            aiohttp.ClientSession(kube.url) as session,
            session.get(url, timeout=aiohttp.ClientTimeout(total=10)) as rsp,
        ):
            assert rsp.headers["Content-Type"].startswith("application/json")
            if during is not None:
                await asyncio.to_thread(during)
            out: list[tuple[str, str]] = []
            async for line in rsp.content:
                event = json.loads(line)
                out.append(
                    (event["type"], event["object"].get("metadata", {}).get("name") or str(event["object"].get("code")))
                )
                if len(out) == count:
                    break
            return out

    return asyncio.run(go())


def test_watches_replay_only_newer_events_and_follow_selectors(kube):
    def cm(name: str, **labels: str) -> dict[str, Any]:
        return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "labels": labels}}

    kube.create(cm("old", app="x"))
    mark = kube.create(cm("mark"))["metadata"]["resourceVersion"]
    kube.create(cm("new", app="x"))
    assert watch_lines(kube, f"resourceVersion={mark}", 1) == [("ADDED", "new")]
    assert watch_lines(kube, "", 3) == [("ADDED", "mark"), ("ADDED", "new"), ("ADDED", "old")]

    def relabel() -> None:
        kube.patch("cm", "default", "mark", {"metadata": {"labels": {"app": "x"}}})
        kube.patch("cm", "default", "old", {"metadata": {"labels": {"app": "y"}}})

    selected = watch_lines(kube, f"labelSelector=app%3Dx&resourceVersion={kube.emulator.rv}", 2, relabel)
    assert selected == [("ADDED", "mark"), ("DELETED", "old")]

    kube.emulator.max_history = 4  # compacts the history: an old version is gone
    for i in range(6):
        kube.create(cm(f"more-{i}"))
    assert watch_lines(kube, f"resourceVersion={mark}", 1) == [("ERROR", "410")]
    assert watch_lines(kube, "timeoutSeconds=1", 100)[-1] == ("ADDED", "old")  # then it ends


def test_label_selectors_on_lists(kube):
    for name, labels in [("a", {"k": "1", "t": "x"}), ("b", {"k": "2"}), ("c", {})]:
        kube.create({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "labels": labels}})

    def names(selector: str) -> list[str]:
        return [s["metadata"]["name"] for s in kube.list("Secret", "default", selector)]

    assert names("k=1") == ["a"] and names("k==2") == ["b"] and names("k!=1") == ["b", "c"]
    assert names("k in (1,2)") == ["a", "b"] and names("k notin (1)") == ["b", "c"]
    assert names("k") == ["a", "b"] and names("!k") == ["c"] and names("k,t=x") == ["a"]
    assert names("") == ["a", "b", "c"]


def test_injected_faults_hit_http_clients_only(kube):
    kube.create(dbj("toy"))
    kube.fail_next("PATCH", "/dreamboothjobs/toy/status", status=503, times=1)
    assert http(kube, "PATCH", f"{DBJ}/toy/status", {"status": {"a": 1}}, MERGE)[0] == 503
    assert http(kube, "PATCH", f"{DBJ}/toy/status", {"status": {"a": 1}}, MERGE)[0] == 200


def test_a_fault_share_answers_409_only_to_writes_500_to_any_and_cuts_held_requests(kube):
    kube.create(dbj("toy"))
    kube.fault_share(FaultShare(conflict=1.0))
    assert http(kube, "GET", f"{DBJ}/toy")[0] == 200  # a read is never a conflict
    code, body = http(kube, "PATCH", f"{DBJ}/toy/status", {"status": {"a": 1}}, MERGE)
    assert code == 409 and body["reason"] == "Conflict"
    share = FaultShare(error=1.0)
    kube.fault_share(share)
    assert http(kube, "GET", f"{DBJ}/toy")[0] == 500
    assert share.counts == {"requests": 1, "conflict": 0, "error": 1, "hang": 0}
    kube.fault_share(FaultShare(hang=1.0, hang_s=0.2))
    started = time.monotonic()
    with pytest.raises(aiohttp.ClientError):  # held, then cut without an answer
        http(kube, "GET", f"{DBJ}/toy")
    assert time.monotonic() - started >= 0.2
    kube.fault_share(None)
    assert http(kube, "GET", f"{DBJ}/toy")[0] == 200


def test_delete_all_deletes_the_collection_and_leaves_the_owned_to_the_collector(kube):
    owner = kube.create(dbj("toy"))
    kube.create(dbj("other"))
    ref = {
        "apiVersion": "dreambooth.io/v1alpha1",
        "kind": "DreamBoothJob",
        "name": "toy",
        "uid": owner["metadata"]["uid"],
    }
    kube.create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "toy-config", "ownerReferences": [ref]}})
    assert kube.delete_all("dbj", "default") == 2
    assert kube.list("dbj", "default") == [] and len(kube.list("configmaps", "default")) == 1
    GarbageCollector(kube).collect()
    assert kube.list("configmaps", "default") == []


# ---------------------------------------------------------------------------------------------
# (d) the Job controller and kubelet stand-ins


def indexed_job(name: str = "toy-trainer", nodes: int = 2, backoff: int = 1, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "completionMode": "Indexed",
            "completions": nodes,
            "parallelism": nodes,
            "backoffLimit": backoff,
            "podFailurePolicy": {
                "rules": [
                    {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
                    {
                        "action": "FailJob",
                        "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [3, 4]},
                    },
                ]
            },
            "template": {
                "metadata": {"labels": {"dreambooth.io/job-name": "toy"}},
                "spec": {
                    "restartPolicy": "Never",
                    "subdomain": name,
                    "containers": [{"name": "trainer", "image": "trainer:test"}],
                },
            },
            **spec,
        },
    }


def pods(kube: Kube) -> list[dict[str, Any]]:
    found = kube.list("Pod", "default", {"dreambooth.io/job-name": "toy"})
    return sorted(found, key=lambda p: p["spec"]["hostname"])


def condition(job: dict[str, Any], kind: str) -> dict[str, Any] | None:
    return next((c for c in job["status"].get("conditions") or () if c["type"] == kind), None)


def test_indexed_job_makes_one_pod_per_index_and_completes(kube):
    job = kube.create(indexed_job())
    assert job["spec"]["template"]["metadata"]["labels"]["batch.kubernetes.io/job-name"]
    jobs, kubelet = JobController(kube), Kubelet(kube)
    jobs.reconcile()
    made = pods(kube)
    assert [p["spec"]["hostname"] for p in made] == ["toy-trainer-0", "toy-trainer-1"]
    for index, pod in enumerate(made):
        meta = pod["metadata"]
        assert meta["name"].startswith(f"toy-trainer-{index}-")
        assert meta["annotations"]["batch.kubernetes.io/job-completion-index"] == str(index)
        assert meta["labels"]["batch.kubernetes.io/job-name"] == "toy-trainer"
        assert meta["labels"]["job-name"] == "toy-trainer"
        assert meta["labels"]["batch.kubernetes.io/controller-uid"] == job["metadata"]["uid"]
        assert meta["ownerReferences"][0]["uid"] == job["metadata"]["uid"]
        assert pod["status"] == {"phase": "Pending"}
    jobs.reconcile()
    assert len(pods(kube)) == 2  # idempotent
    assert kube.get("Job", "default", "toy-trainer")["status"]["active"] == 2

    running = kubelet.run(made[0], ip="127.0.0.2")
    assert running["status"]["podIP"] == "127.0.0.2"
    assert running["status"]["containerStatuses"][0]["state"]["running"]
    kubelet.run(made[1], ip="127.0.0.3")
    jobs.reconcile()
    assert kube.get("Job", "default", "toy-trainer")["status"]["ready"] == 2
    for pod in made:
        kubelet.succeed(pod)
    jobs.reconcile()
    status = kube.get("Job", "default", "toy-trainer")["status"]
    assert condition({"status": status}, "Complete")["status"] == "True"
    assert condition({"status": status}, "SuccessCriteriaMet")["status"] == "True"
    assert status["succeeded"] == 2 and status["active"] == 0
    assert status["completedIndexes"] == "0-1" and status["completionTime"]


def test_fail_job_rule_fails_the_job_at_once(kube):
    kube.create(indexed_job(backoff=6))
    jobs, kubelet = JobController(kube), Kubelet(kube)
    jobs.reconcile()
    first, second = pods(kube)
    kubelet.run(second)
    failed = kubelet.fail(first, exit_code=3, message='{"reason": "BadData"}')
    terminated = failed["status"]["containerStatuses"][0]["state"]["terminated"]
    assert terminated == {**terminated, "exitCode": 3, "reason": "Error", "message": '{"reason": "BadData"}'}
    jobs.reconcile()
    job = kube.get("Job", "default", "toy-trainer")
    assert condition(job, "Failed")["reason"] == "PodFailurePolicy"
    assert condition(job, "FailureTarget")["reason"] == "PodFailurePolicy"
    assert "exit code 3 matching FailJob rule at index 1" in condition(job, "Failed")["message"]
    assert [p["metadata"]["name"] for p in pods(kube)] == [first["metadata"]["name"]]


def test_other_failures_are_retried_until_the_backoff_limit(kube):
    kube.create(indexed_job(backoff=1))
    jobs, kubelet = JobController(kube), Kubelet(kube)
    jobs.reconcile()
    first = pods(kube)[0]
    kubelet.oom_kill(first)
    jobs.reconcile()
    job = kube.get("Job", "default", "toy-trainer")
    assert job["status"]["failed"] == 1 and condition(job, "Failed") is None
    retry = [p for p in pods(kube) if p["spec"]["hostname"] == "toy-trainer-0" and p["status"]["phase"] == "Pending"]
    assert len(retry) == 1 and retry[0]["metadata"]["name"] != first["metadata"]["name"]
    kubelet.fail(retry[0], exit_code=1)
    jobs.reconcile()
    job = kube.get("Job", "default", "toy-trainer")
    assert job["status"]["failed"] == 2
    assert condition(job, "Failed")["reason"] == "BackoffLimitExceeded"


def test_disruptions_are_not_counted(kube):
    kube.create(indexed_job(backoff=0))
    jobs, kubelet = JobController(kube), Kubelet(kube)
    jobs.reconcile()
    preempted = kubelet.preempt(pods(kube)[0])
    assert preempted["status"]["phase"] == "Failed"
    assert preempted["status"]["conditions"][0]["type"] == "DisruptionTarget"
    jobs.reconcile()
    job = kube.get("Job", "default", "toy-trainer")
    assert job["status"]["failed"] == 0 and condition(job, "Failed") is None
    assert job["status"]["active"] == 2  # index 0 was replaced


def test_suspend_deletes_pods_and_resume_recreates_them(kube):
    kube.create(indexed_job())
    jobs = JobController(kube)
    jobs.reconcile()
    kube.patch("Job", "default", "toy-trainer", {"spec": {"suspend": True}})
    jobs.reconcile()
    job = kube.get("Job", "default", "toy-trainer")
    assert pods(kube) == [] and job["status"]["active"] == 0
    assert condition(job, "Suspended")["status"] == "True"
    assert condition(job, "Suspended")["reason"] == "JobSuspended"
    kube.patch("Job", "default", "toy-trainer", {"spec": {"suspend": False}})
    jobs.reconcile()
    job = kube.get("Job", "default", "toy-trainer")
    assert len(pods(kube)) == 2 and job["status"]["failed"] == 0
    assert condition(job, "Suspended")["reason"] == "JobResumed"


def test_active_deadline(kube):
    now = [datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)]
    kube.create(indexed_job(activeDeadlineSeconds=60))
    jobs = JobController(kube, clock=lambda: now[0])
    jobs.reconcile()
    now[0] += datetime.timedelta(seconds=61)
    jobs.reconcile()
    job = kube.get("Job", "default", "toy-trainer")
    assert condition(job, "Failed")["reason"] == "DeadlineExceeded" and pods(kube) == []


def test_kubelet_pending_states(kube):
    kube.create(indexed_job(nodes=1))
    JobController(kube).reconcile()
    kubelet = Kubelet(kube)
    pod = pods(kube)[0]
    waiting = kubelet.pending(pod, "CreateContainerConfigError", 'secret "s3" not found')
    state = waiting["status"]["containerStatuses"][0]["state"]["waiting"]
    assert state == {"reason": "CreateContainerConfigError", "message": 'secret "s3" not found'}
    stuck = kubelet.unschedulable(pod)
    scheduled = stuck["status"]["conditions"][0]
    assert (scheduled["type"], scheduled["status"], scheduled["reason"]) == ("PodScheduled", "False", "Unschedulable")


def test_controller_loop_and_garbage_collection(kube):
    kubelet = Kubelet(kube)
    with ControllerLoop(kube, JobController(kube), GarbageCollector(kube)):
        kube.create(indexed_job())
        made = kube.wait_for(lambda: len(pods(kube)) == 2 and pods(kube))
        for pod in made:
            kubelet.succeed(pod)
        kube.wait_for(lambda: condition(kube.get("Job", "default", "toy-trainer"), "Complete"))
        kube.delete("Job", "default", "toy-trainer", propagation="Background")  # kubectl's default
        kube.wait_for(lambda: pods(kube) == [], what="pods collected")


def test_a_job_deleted_through_the_api_orphans_its_pods_unless_told_otherwise(kube):
    """batch/v1 keeps Orphan as its default propagationPolicy: a controller that deletes a
    Job and means its pods to go too must say Background (or Foreground)."""
    collector = GarbageCollector(kube)
    kube.create(indexed_job())
    JobController(kube).reconcile()
    uid = kube.get("Job", "default", "toy-trainer")["metadata"]["uid"]
    kube.delete("Job", "default", "toy-trainer")
    collector.collect()
    left = pods(kube)
    assert len(left) == 2 and all(not p["metadata"].get("ownerReferences") for p in left)
    assert all(p["metadata"]["labels"]["batch.kubernetes.io/controller-uid"] == uid for p in left)
    for p in left:
        kube.delete("Pod", "default", p["metadata"]["name"])
    kube.create(indexed_job())
    JobController(kube).reconcile()
    kube.delete("Job", "default", "toy-trainer", propagation="Background")
    collector.collect()
    assert pods(kube) == []
