"""Defect 3 of issue 18: multi-node jobs recover from one pod's failure, and a pod that
starts late still joins. A 2-node job on the simulated cluster (the real operator and
trainer, accelerate launch with gloo across two "nodes"; the test's Job controller, process
kubelet and garbage collector, kubesim/cluster.py).

An Indexed Job alone replaces only the failed index: the surviving rank waits in a
collective (NCCL's watchdog: 10 minutes) and the replacement meets a stale rendezvous. The
operator instead ends the whole attempt and starts all pods again, together, from the
newest checkpoint, once no pod of the old attempt is left."""

from __future__ import annotations

import json
import re

import pytest

from kubesim.cluster import LocalCluster, toy_cat_manifest
from kubesim.kubelet import PodProcess
from kubesim.procs import sleep_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

NAME = "toy-cat"
_CHECKPOINT = re.compile(r"INFO dreambooth\.trainer: checkpoint \S+/checkpoint-(\d+)/")
_RESUMED = re.compile(r"rank(\d) INFO \S+: resumed from \S+/checkpoint-(\d+)/ at step (\d+)")


def two_nodes(cluster: LocalCluster, steps: int, every: int, **run_policy) -> dict:
    return toy_cat_manifest(
        cluster.s3_endpoint,
        training={"batchSize": 2, "steps": steps},
        checkpointing={"everySteps": every},
        validation={"everySteps": steps},
        resources={"nodes": 2},
        runPolicy=run_policy,
    )


def of_index(runs: list[PodProcess], index: str) -> list[PodProcess]:
    return [r for r in runs if r.index == index]


def restarting_statuses(cluster: LocalCluster) -> list[dict]:
    """The Ready conditions of the statuses the job had between two attempts."""
    readies = [
        next(c for c in s.get("conditions") or () if c["type"] == "Ready")
        for s in cluster.history(NAME)
        if s.get("conditions")
    ]
    return [c for c in readies if c["reason"] == "Restarting"]


def test_multi_node_pod_failure_restarts_all_pods_together_from_the_newest_checkpoint(cluster: LocalCluster):
    steps, every = 60, 10  # ~6 s of training: pod 1 dies at its first checkpoint, well before the end
    cluster.apply(two_nodes(cluster, steps, every))

    def first_checkpoint() -> PodProcess | None:
        runs = cluster.processes(NAME)
        return next((r for r in of_index(runs, "0") if _CHECKPOINT.search(r.log())), None)

    rank0 = sleep_until(first_checkpoint, 120, interval=0.02)
    assert rank0 is not None, cluster.explain(NAME)
    (rank1,) = of_index(cluster.processes(NAME), "1")
    cluster.kubelet.kill(rank1)  # the node's OOM killer, a crash: pod 1 fails with 137
    # the operator ends the attempt: pod 0 is stopped too, not left waiting in a collective
    assert sleep_until(lambda: rank0.exit_code is not None and rank1.exit_code is not None, 60), cluster.explain(NAME)
    kept = cluster.checkpoint_steps(NAME)  # the complete checkpoints when the attempt ended
    assert kept and kept[-1] < steps, kept

    status = cluster.wait_phase(NAME, "Succeeded", timeout=180)
    runs = cluster.processes(NAME)
    assert len(runs) == 4, cluster.explain(NAME)
    first, second = runs[:2], runs[2:]
    assert {r.index for r in second} == {"0", "1"}  # a new pod 0 too
    assert not {r.name for r in second} & {r.name for r in first}
    # two generations never ran at once: the new pods started after the old ones ended
    assert min(r.started_at for r in second) >= max(r.ended_at for r in first)
    assert rank1.exit_code == 137 and all(r.exit_code == 0 for r in second)

    # both ranks of the new attempt resumed from the newest complete checkpoint
    for run in second:
        resumed = _RESUMED.search(run.log())
        assert resumed, run.log()[-3000:]
        assert (resumed.group(1), int(resumed.group(2))) == (run.index, kept[-1])
        assert "starting at step 0" not in run.log()

    assert status["restarts"] == 1 and status["progress"]["step"] == steps
    (between, *_) = restarting_statuses(cluster)
    assert "restarting all 2 pods from the newest checkpoint" in between["message"]
    assert rank1.name in between["message"] and "exit 137" in between["message"]
    reasons = [e["reason"] for e in cluster.kube.events(cluster.kube.get("dbj", "default", NAME))]
    assert reasons.count("Restarted") == 1, reasons

    # one set of outputs, written by global rank 0 of the last attempt
    keys = cluster.keys(NAME)
    assert sum(k.endswith("model_index.json") for k in keys) == 1
    assert json.loads(cluster.output(NAME).read_bytes("result.json"))["step"] == steps
    assert not any(_CHECKPOINT.search(r.log()) for r in of_index(runs, "1"))
    job = cluster.kube.get("jobs", "default", f"{NAME}-trainer")
    assert job["status"]["succeeded"] == 2 and job["spec"]["backoffLimit"] == 0


def test_multi_node_pod_that_starts_late_still_joins_within_the_rendezvous_timeout(cluster: LocalCluster):
    timeout, late = 10, 4  # runPolicy.rendezvousTimeoutSeconds; pod 1's lateness in attempt 2
    # attempt 1: pod 1's image pull takes far longer than the timeout (the attempt fails
    # before it ends); attempt 2: pod 1 is late, but within the timeout
    cluster.kubelet.hold_pull(120, index=1)
    cluster.kubelet.hold_pull(late, index=1)
    steps = 6
    cluster.apply(two_nodes(cluster, steps, 3, rendezvousTimeoutSeconds=timeout))

    status = cluster.wait_phase(NAME, "Succeeded", timeout=150)
    runs = cluster.processes(NAME)
    zero_first, zero, one = of_index(runs, "0") + of_index(runs, "1")
    # pod 0 of attempt 1 waited the configured timeout for pod 1, then gave up
    assert zero_first.exit_code == 1, cluster.explain(NAME)
    waited = re.search(r"Timed out after (\d+) seconds waiting for clients", zero_first.log())
    assert waited and timeout <= int(waited.group(1)) <= timeout + 2, zero_first.log()[-2000:]
    assert len(of_index(runs, "1")) == 1  # the first pod 1 never started: it was still pulling
    # attempt 2: pod 1 started late and joined
    assert one.started_at - zero.started_at >= late
    assert zero.exit_code == one.exit_code == 0
    assert status["restarts"] == 1 and status["progress"]["step"] == steps

    # what the status said between the attempts: pod 0 gave up waiting, and why
    (between, *_) = restarting_statuses(cluster)
    assert f"pod {zero_first.name}: RendezvousTimeout (exit 1): Timed out after" in between["message"]
    assert "1/2 clients joined" in between["message"] and "rendezvousTimeoutSeconds" in between["message"]
    assert "restarting all 2 pods from the newest checkpoint (restart 1 of at most 3)" in between["message"]
    script = zero.argv[2]
    assert f"--rdzv_conf timeout={timeout}" in script
