"""Jobs living through what a cluster does to them: a trainer killed mid-run, a suspend and
resume, a 2-node job, a deletion while training. The real operator, trainer and S3; the
test's Job controller, kubelet (local processes) and garbage collector
(kubesim/cluster.py)."""

from __future__ import annotations

import json
import re

import pytest

from dreambooth.api.exitcodes import ExitCode
from kubesim.cluster import TINY, LocalCluster, toy_cat_manifest
from kubesim.kubelet import PodProcess
from kubesim.procs import sleep_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

NAME = "toy-cat"
STEPS = TINY["training"]["steps"]
EVERY = TINY["checkpointing"]["everySteps"]
_CHECKPOINT = re.compile(r"INFO dreambooth\.trainer: checkpoint \S+/checkpoint-(\d+)/")
_RESUMED = re.compile(r"resumed from \S+/checkpoint-(\d+)/ at step (\d+)")


def first_checkpoint(cluster: LocalCluster, timeout: float = 90) -> PodProcess:
    """Wait for the job's (only) trainer process to log its first checkpoint; return it."""

    def logged() -> PodProcess | None:
        runs = cluster.processes(NAME)
        return runs[-1] if runs and _CHECKPOINT.search(runs[-1].log()) else None

    found = sleep_until(logged, timeout, interval=0.02)
    assert found is not None, cluster.explain(NAME)
    return found


def pods_gone(cluster: LocalCluster) -> bool:
    return not cluster.pods(NAME)


def test_a_killed_trainer_is_retried_and_resumes_from_the_newest_checkpoint(cluster: LocalCluster):
    cluster.apply(toy_cat_manifest(cluster.s3_endpoint))
    first = first_checkpoint(cluster)
    cluster.kubelet.kill(first)  # kill -9 of the trainer: the container dies, the pod fails
    assert sleep_until(lambda: first.exit_code is not None, 10)
    kept = cluster.checkpoint_steps(NAME)  # complete checkpoints when it died
    assert kept and kept[-1] < STEPS, kept

    status = cluster.wait_phase(NAME, "Succeeded", timeout=120)
    failed, second = cluster.processes(NAME)
    assert failed is first and failed.exit_code == 137
    pod = cluster.kube.get("pods", "default", failed.name)
    terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert (pod["status"]["phase"], terminated["exitCode"], terminated["reason"]) == ("Failed", 137, "Error")
    job = cluster.kube.get("jobs", "default", f"{NAME}-trainer")
    assert job["status"]["failed"] == 1 and job["status"]["succeeded"] == 1

    # the new pod resumed from the newest complete checkpoint: no checkpoint was lost
    resumed = _RESUMED.search(second.log())
    assert resumed and int(resumed.group(2)) == kept[-1], second.log()[-3000:]
    assert "starting at step 0" not in second.log()
    assert second.exit_code == 0 and second.name != failed.name
    assert status["restarts"] == 1 and status["progress"]["step"] == STEPS
    assert json.loads(cluster.output(NAME).read_bytes("result.json"))["step"] == STEPS
    assert cluster.checkpoint_steps(NAME) == [STEPS - 2 * EVERY, STEPS - EVERY]  # the last step is exported
    steps_done_twice = int(_last_step(first.log())) - kept[-1]
    assert 0 <= steps_done_twice < EVERY + 5  # at most one checkpoint interval is redone
    reasons = [e["reason"] for e in cluster.kube.events(cluster.kube.get("dbj", "default", NAME))]
    assert "Restarted" in reasons, reasons


def _last_step(log: str) -> int:
    """The highest step a trainer log mentions (a progress line or a checkpoint)."""
    found = re.findall(r"step (\d+)/\d+|checkpoint-(\d+)/", log)
    return max((int(a or b) for a, b in found), default=0)


def test_suspend_then_resume_continues_from_the_checkpoint(cluster: LocalCluster):
    steps = 300  # the operator acts within a poll interval (1 s): the run must not end first
    cluster.apply(toy_cat_manifest(cluster.s3_endpoint, training={"steps": steps}))
    first = first_checkpoint(cluster)
    cluster.patch(NAME, {"runPolicy": {"suspend": True}})  # kubectl patch, as a user

    # the operator suspends the Job, the Job controller deletes the pod, the kubelet sends
    # SIGTERM: the trainer saves a checkpoint and exits "preempted"
    cluster.wait_phase(NAME, "Suspended", timeout=30)
    cluster.wait_for(lambda: pods_gone(cluster), timeout=60, what="the pod gone", name=NAME)
    assert first.exit_code == ExitCode.PREEMPTED, first.log()[-3000:]
    assert "stopped by SIGTERM" in first.log()
    saved = cluster.checkpoint_steps(NAME)[-1]
    assert EVERY <= saved < steps and saved == _last_step(first.log())  # nothing lost
    assert cluster.ready_condition(NAME)["reason"] == "SuspendRequested"
    assert not cluster.kubelet.running()

    cluster.patch(NAME, {"runPolicy": {"suspend": False}})
    status = cluster.wait_phase(NAME, "Succeeded", timeout=120)
    first_again, second = cluster.processes(NAME)
    resumed = _RESUMED.search(second.log())
    assert resumed and int(resumed.group(2)) == saved, second.log()[-3000:]
    assert first_again is first and second.exit_code == 0
    assert status["progress"]["step"] == steps and status["restarts"] == 0
    assert json.loads(cluster.output(NAME).read_bytes("result.json"))["step"] == steps
    phases = [s["phase"] for s in cluster.history(NAME)]
    assert phases.index("Suspended") < phases.index("Succeeded") and "Training" in phases


def test_a_two_node_job_trains_with_gloo_and_writes_one_set_of_outputs(cluster: LocalCluster):
    steps, every = 60, 10
    manifest = toy_cat_manifest(
        cluster.s3_endpoint,
        training={"batchSize": 2, "steps": steps},
        checkpointing={"everySteps": every},
        validation={"everySteps": steps},
        resources={"nodes": 2},
    )
    cluster.apply(manifest)
    cluster.wait_phase(NAME, "Succeeded", timeout=150)

    rank0, rank1 = cluster.processes(NAME)
    assert {rank0.index, rank1.index} == {"0", "1"} and rank0.index == "0"
    assert rank0.argv[:2] == ["/bin/sh", "-c"]
    script = rank0.argv[2]
    # accelerate launch across 2 "machines", rendezvous at pod 0's IP
    assert "--num_machines 2" in script and f"--main_process_ip {rank0.ip}" in script
    assert "--main_process_port 29500" not in script  # a free host port instead
    assert f"--main_process_ip {rank0.ip}" in rank1.argv[2]
    assert rank0.exit_code == rank1.exit_code == 0
    assert "rank1" in rank1.log()

    # one set of outputs: only global rank 0 wrote checkpoints, samples and the model
    uploads0 = _CHECKPOINT.findall(rank0.log())  # the last step is exported, not checkpointed
    assert uploads0 == [str(s) for s in range(every, steps, every)], rank0.log()[-2000:]
    assert not _CHECKPOINT.findall(rank1.log()) and "exported" not in rank1.log()
    keys = cluster.keys(NAME)
    assert sum(k.endswith("model_index.json") for k in keys) == 1
    assert {"result.json", "model.safetensors", f"samples/step-{steps}.png"} <= keys
    result = json.loads(cluster.output(NAME).read_bytes("result.json"))
    assert result["step"] == steps
    state = json.loads(cluster.output(NAME).read_bytes(f"checkpoints/checkpoint-{steps - every}/state.json"))
    assert state["processes"] == 2 and state["step"] == steps - every  # trained as 2 processes
    job = cluster.kube.get("jobs", "default", f"{NAME}-trainer")
    assert job["status"]["succeeded"] == 2 and job["status"]["completedIndexes"] == "0-1"


def test_deleting_a_running_job_stops_its_processes_and_removes_its_children(cluster: LocalCluster):
    cluster.apply(toy_cat_manifest(cluster.s3_endpoint, training={"steps": 2000}, checkpointing={"everySteps": 10}))
    process = first_checkpoint(cluster)
    cluster.wait_phase(NAME, "Training", timeout=30)
    assert process.running

    cluster.delete(NAME)  # kubectl delete dbj toy-cat (or the API without kubectl)
    # the garbage collector deletes the ConfigMap, Service and Job, then the Job's pods;
    # the kubelet stops the pod's process (SIGTERM: it checkpoints and exits)
    for kind in ("dbj", "jobs", "configmaps", "services", "pods"):
        cluster.wait_for(
            lambda kind=kind: not cluster.kube.list(kind, "default"), timeout=60, what=f"no {kind} left", name=NAME
        )
    assert process.exit_code == ExitCode.PREEMPTED, process.log()[-3000:]
    assert not cluster.kubelet.running()
    assert len(cluster.processes(NAME)) == 1  # nothing was restarted
