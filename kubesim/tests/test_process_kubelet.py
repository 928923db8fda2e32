"""The process kubelet itself (kubesim/kubelet.py), on small shell pods: what
it resolves, maps and reports is what the end-to-end scenarios rely on. No operator, no
trainer; the Job controller and garbage collector stand-ins run beside it."""

from __future__ import annotations

import base64
import os
import signal

import pytest

from kubesim.controllers import ControllerLoop, GarbageCollector, JobController
from kubesim.kubelet import FINALIZER, ProcessKubelet, container_pids
from kubesim.procs import sleep_until

pytestmark = pytest.mark.timeout(60)


def pod(name: str, script: str, **extra) -> dict:
    container = {
        "name": "main",
        "image": "busybox",
        "command": ["/bin/sh", "-c", script],
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "volumeMounts": [
            {"name": "config", "mountPath": "/etc/app", "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
        **extra.pop("container", {}),
    }
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": "default",
            "annotations": {"batch.kubernetes.io/job-completion-index": "0"},
        },
        "spec": {
            "containers": [container],
            "terminationGracePeriodSeconds": 5,
            "volumes": [{"name": "config", "configMap": {"name": "app"}}, {"name": "tmp", "emptyDir": {}}],
            **extra,
        },
    }


@pytest.fixture
def node(kube, tmp_path):
    kube.create(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "app"},
            "data": {"greeting.txt": "hello from a ConfigMap"},
        }
    )
    kubelet = ProcessKubelet(kube, tmp_path / "pods", max_grace=5)
    with ControllerLoop(kube, JobController(kube), GarbageCollector(kube), kubelet, interval=0.05):
        yield kubelet
    kubelet.shutdown()


def phase(kube, name):
    return (kube.find("pods", "default", name) or {}).get("status", {}).get("phase")


def terminated(kube, name):
    return kube.get("pods", "default", name)["status"]["containerStatuses"][0]["state"]["terminated"]


def test_volumes_env_and_secrets_are_resolved_and_mapped(kube, node):
    kube.create(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "keys"},
            "data": {"token": base64.b64encode(b"s3cr3t").decode()},
        }
    )
    script = (
        'cat "$CONFIG"; echo; echo "token=$TOKEN index=$INDEX greeting=$GREETING";'
        ' echo "tmp=$TMPDIR work=$(pwd)"; printf done > /dev/termination-log'
    )
    kube.create(
        pod(
            "env",
            script,
            container={
                "env": [
                    {"name": "CONFIG", "value": "/etc/app/greeting.txt"},
                    {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "keys", "key": "token"}}},
                    {
                        "name": "INDEX",
                        "valueFrom": {
                            "fieldRef": {
                                "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"
                            }
                        },
                    },
                    {"name": "GREETING", "value": "$(CONFIG) says hi"},
                ]
            },
        )
    )
    kube.wait_for(lambda: phase(kube, "env") == "Succeeded", what="the pod to succeed")
    run = node.process("env")
    log = run.log()
    assert "hello from a ConfigMap" in log and "token=s3cr3t index=0" in log
    folder = run.folder
    assert f"greeting={folder}/volumes/config/greeting.txt says hi" in log  # $(VAR), mapped
    assert f"tmp={folder}/volumes/tmp work={folder}/volumes/tmp/dreambooth" in log
    assert run.ip == "127.0.0.2" and run.env["OMP_NUM_THREADS"] == "1"
    state = terminated(kube, "env")
    assert (state["exitCode"], state["reason"], state["message"]) == (0, "Completed", "done")
    assert FINALIZER not in kube.get("pods", "default", "env")["metadata"].get("finalizers", [])


def test_a_missing_secret_keeps_the_pod_pending_until_it_exists(kube, node):
    env = [{"name": "KEY", "valueFrom": {"secretKeyRef": {"name": "later", "key": "k"}}}]
    kube.create(pod("waits", 'echo "key=$KEY"', container={"env": env}))

    def waiting():
        statuses = (kube.get("pods", "default", "waits").get("status") or {}).get("containerStatuses") or [{}]
        return statuses[0].get("state", {}).get("waiting")

    found = kube.wait_for(waiting, what="a waiting container")
    assert found == {"reason": "CreateContainerConfigError", "message": 'secret "later" not found'}
    assert node.history == []
    kube.create(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "later"},
            "data": {"x": base64.b64encode(b"1").decode()},
        }
    )
    kube.wait_for(
        lambda: "couldn't find key k in Secret default/later" in str(waiting()), what="the missing key reported"
    )
    kube.patch("secrets", "default", "later", {"data": {"k": base64.b64encode(b"v").decode()}})
    kube.wait_for(lambda: phase(kube, "waits") == "Succeeded", what="the pod to run")
    assert "key=v" in node.process("waits").log()


def test_exit_codes_and_the_termination_message_fallback(kube, node):
    kube.create(pod("fails", "echo line one; echo last words; exit 3"))
    kube.create(
        pod(
            "killed",
            "sleep 30",
        )
    )
    kube.wait_for(lambda: phase(kube, "fails") == "Failed", what="a failed pod")
    state = terminated(kube, "fails")
    assert (state["exitCode"], state["reason"]) == (3, "Error")
    assert state["message"] == "line one\nlast words"  # the log: the file was empty

    run = sleep_until(lambda: node.process("killed"), 10)
    node.kill(run)  # kill -9
    kube.wait_for(lambda: phase(kube, "killed") == "Failed", what="the killed pod")
    assert terminated(kube, "killed")["exitCode"] == 128 + signal.SIGKILL


def test_deleting_a_pod_sends_sigterm_then_removes_it(kube, node):
    kube.create(
        pod("graceful", "trap 'echo bye > /tmp/got-term; exit 0' TERM; echo trapped; while true; do sleep 0.1; done")
    )
    run = sleep_until(lambda: node.process("graceful"), 10)
    assert sleep_until(lambda: "trapped" in run.log(), 10)  # a TERM before the trap kills the shell
    marker = run.folder / "volumes" / "tmp" / "got-term"  # the pod's /tmp is its emptyDir
    assert kube.wait_for(lambda: phase(kube, "graceful") == "Running", what="running")
    kube.delete("pods", "default", "graceful")
    deleting = kube.find("pods", "default", "graceful")
    assert deleting is None or deleting["metadata"].get("deletionTimestamp")
    kube.wait_for(lambda: kube.find("pods", "default", "graceful") is None, what="pod gone")
    assert marker.read_text() == "bye\n" and not run.running

    kube.create(
        pod("stubborn", "trap '' TERM; echo trapped; while true; do sleep 0.1; done", terminationGracePeriodSeconds=1)
    )
    run = sleep_until(lambda: node.process("stubborn"), 10)
    assert sleep_until(lambda: "trapped" in run.log(), 10)
    kube.wait_for(lambda: phase(kube, "stubborn") == "Running", what="running")
    kube.delete("pods", "default", "stubborn")
    kube.wait_for(
        lambda: kube.find("pods", "default", "stubborn") is None, timeout=20, what="killed after the grace period (1 s)"
    )
    assert run.exit_code == 128 + signal.SIGKILL


def test_pods_of_an_indexed_job_find_pod_zero_by_its_dns_name(kube, node):
    template = pod(
        "unused",
        "echo rendezvous at toy-trainer-0.toy-trainer:29500",
        container={"ports": [{"name": "rendezvous", "containerPort": 29500}]},
    )
    template["spec"]["subdomain"] = "toy-trainer"
    kube.create(
        {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {"name": "toy-trainer"},
            "spec": {
                "completionMode": "Indexed",
                "completions": 2,
                "parallelism": 2,
                "template": {"spec": template["spec"]},
            },
        }
    )
    kube.wait_for(
        lambda: any(
            c["type"] == "Complete"
            for c in (kube.get("jobs", "default", "toy-trainer").get("status") or {}).get("conditions") or ()
        ),
        what="the Job complete",
    )
    zero, one = sorted(node.history, key=lambda r: r.index)
    port = zero.log().split(":")[-1].strip()
    assert zero.log() == one.log() == f"rendezvous at {zero.ip}:{port}\n"
    assert port != "29500" and zero.ip != one.ip


def test_a_held_image_pull_starts_one_index_late(kube, node):
    """What a test uses to start pod 1 of a multi-node job late (a slow pull on a fresh node)."""
    hold = 2.0
    node.hold_pull(hold, index=1)
    template = pod("unused", "echo started")
    kube.create(
        {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {"name": "late"},
            "spec": {
                "completionMode": "Indexed",
                "completions": 2,
                "parallelism": 2,
                "template": {"spec": template["spec"]},
            },
        }
    )
    kube.wait_for(lambda: len(node.history) == 1, what="pod 0 started")
    (held,) = [
        p
        for p in kube.list("pods", "default")
        if p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] == "1"
    ]
    status = kube.wait_for(
        lambda: (
            (s := kube.get("pods", "default", held["metadata"]["name"]).get("status"))
            and s.get("containerStatuses")
            and s
        ),
        what="pod 1's container status",
    )
    assert status["phase"] == "Pending"
    assert status["containerStatuses"][0]["state"] == {"waiting": {"reason": "ContainerCreating"}}
    kube.wait_for(
        lambda: any(
            c["type"] == "Complete"
            for c in (kube.get("jobs", "default", "late").get("status") or {}).get("conditions") or ()
        ),
        what="the Job complete",
    )
    zero, one = sorted(node.history, key=lambda r: r.index)
    assert one.started_at - zero.started_at >= hold
    assert zero.ended_at is not None and one.ended_at >= one.started_at

    # the hold applied once: the next pod of index 1 starts at once
    again = pod("index-1-again", "echo quick")
    again["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] = "1"
    kube.create(again)
    kube.wait_for(
        lambda: phase(kube, "index-1-again") == "Succeeded",
        timeout=hold * 0.75,
        what="a pod of index 1 started without waiting",
    )


def test_killing_the_main_process_ends_every_process_of_the_container(kube, node):
    """As a container's PID namespace goes with its PID 1: torchrun starts its workers in
    sessions of their own, and a killed pod's workers must not train on."""
    kube.create(pod("tree", "setsid sleep 300 & setsid sh -c 'sleep 300' & sleep 300"))
    run = sleep_until(lambda: node.process("tree"), 10)

    def own_sessions() -> list[int]:
        return [p for p in container_pids(run.uid) if os.getsid(p) != run.pid]

    assert sleep_until(lambda: len(own_sessions()) >= 2, 10), container_pids(run.uid)
    node.kill(run)
    kube.wait_for(lambda: phase(kube, "tree") == "Failed", what="the killed pod")
    assert sleep_until(lambda: not container_pids(run.uid), 5), container_pids(run.uid)
