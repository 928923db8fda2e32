"""Defect 3 of issue 18: a multi-node job restarts all its pods together. The pure decision
(dreambooth/operator/restarts.py, through the phase machine) table-tested with the Job and
pod builders of test_status.py: what a failed Job of a 2-node job means (restart, budget
spent, not retried, disruption not counted, deadlines), counting that stays the same over
polls and operator restarts, and when the handler deletes or creates the trainer Job."""

from __future__ import annotations

import pytest

from dreambooth.api.exitcodes import ExitCode
from dreambooth.api.status import Phase
from dreambooth.operator.events import transition_events
from dreambooth.operator.pods import termination
from dreambooth.operator.restarts import Step, active_seconds_left, next_step
from dreambooth.operator.status import compute_status
from tests.operator.test_status import (
    T0,
    at,
    cond,
    failed_pod,
    job,
    obs,
    pod,
    ready,
    summary,
)

POD0, POD1 = "toy-cat-trainer-0-a", "toy-cat-trainer-1-b"
BACKOFF = cond("Failed", "BackoffLimitExceeded", "Job has reached the specified backoff limit")
BAD_DATA_RULE = cond(
    "Failed",
    "PodFailurePolicy",
    f"Container trainer for pod team-a/{POD1} failed with exit code 11 matching FailJob rule at index 1",
)
DISRUPTED_RULE = cond(
    "FailureTarget",
    "PodFailurePolicy",
    f"Pod team-a/{POD1} has condition DisruptionTarget matching FailJob rule at index 0",
)
DEADLINE = cond("Failed", "DeadlineExceeded", "Job was active longer than specified deadline")
PREEMPTION = cond("DisruptionTarget", "PreemptionByScheduler", "Preempted in order to admit critical pod")


def killed1(**kw):
    """Pod 1 died by itself (kill -9, the node's OOM killer): exit 137."""
    return failed_pod(137, name=POD1, index=1, **kw)


def stopped0(**kw):
    """Pod 0, stopped by the Job controller once the Job failed (a deletionTimestamp)."""
    return pod(POD0, index=0, deleting=True, **kw)


def two_nodes(job_, pods, **kw):
    kw.setdefault("nodes", 2)
    kw.setdefault("backoff_limit", 3)
    return obs(job_, pods, **kw)


def failed_job(condition, before=0, **kw):
    return job(conditions=[condition], backoff_limit=0, restarts_before=before, **kw)


CASES = [
    # id, observation, previous restarts, phase, Ready reason, in the message, restarts, next step
    (
        "a failure with budget left: all pods restart, counted",
        two_nodes(failed_job(BACKOFF), [killed1(), stopped0()]),
        0,
        Phase.PENDING,
        "Restarting",
        f"pod {POD1}: Error (exit 137); restarting all 2 pods from the newest checkpoint (restart 1 of at most 3)",
        1,
        Step.DELETE_JOB,
    ),
    (
        "the second failure counts on top of the first Job's",
        two_nodes(failed_job(BACKOFF, before=1), [killed1()]),
        1,
        Phase.PENDING,
        "Restarting",
        "(restart 2 of at most 3)",
        2,
        Step.DELETE_JOB,
    ),
    (
        "budget spent: failed, the last failure named",
        two_nodes(failed_job(BACKOFF, before=3), [killed1(), stopped0()]),
        3,
        Phase.FAILED,
        "BackoffLimitExceeded",
        f"the trainer failed 4 times (runPolicy.backoffLimit 3); last failure: pod {POD1}: Error (exit 137)",
        4,
        Step.NONE,
    ),
    (
        "backoffLimit 0: the first failure is final",
        two_nodes(failed_job(BACKOFF), [killed1()], backoff_limit=0),
        0,
        Phase.FAILED,
        "BackoffLimitExceeded",
        "failed 1 times (runPolicy.backoffLimit 0)",
        1,
        Step.NONE,
    ),
    (
        "out of memory, budget spent",
        two_nodes(
            failed_job(BACKOFF, before=3),
            [pod(POD1, index=1, phase="Failed", terminated={"exitCode": 137, "reason": "OOMKilled", "message": ""})],
        ),
        3,
        Phase.FAILED,
        "OOMKilled",
        "raise resources.memory",
        4,
        Step.NONE,
    ),
    (
        "a do-not-retry exit code: not retried, as before",
        two_nodes(
            failed_job(BAD_DATA_RULE),
            [
                failed_pod(
                    11,
                    name=POD1,
                    index=1,
                    message=summary(ExitCode.BAD_DATA, "BadData", "no images found under s3://data/toy-cat/"),
                ),
                stopped0(),
            ],
        ),
        0,
        Phase.FAILED,
        "BadData",
        "no images found under s3://data/toy-cat/ (not retried)",
        1,
        Step.NONE,
    ),
    (
        "a disruption: all pods restart, not counted (the pod itself is gone already)",
        two_nodes(failed_job(DISRUPTED_RULE, before=1), [stopped0()]),
        1,
        Phase.PENDING,
        "Preempted",
        (
            f"pod {POD1}: DisruptionTarget; restarting all 2 pods from the newest checkpoint (a disruption: "
            "not counted against runPolicy.backoffLimit)"
        ),
        1,
        Step.DELETE_JOB,
    ),
    (
        "a disruption seen on the pod",
        two_nodes(
            failed_job(cond("Failed", "PodFailurePolicy", "")),
            [failed_pod(143, name=POD1, index=1, conditions=[PREEMPTION])],
        ),
        0,
        Phase.PENDING,
        "Preempted",
        "disrupted (PreemptionByScheduler)",
        0,
        Step.DELETE_JOB,
    ),
    (
        "even with the budget spent, a disruption restarts",
        two_nodes(failed_job(DISRUPTED_RULE, before=4), []),
        4,
        Phase.PENDING,
        "Preempted",
        "not counted",
        4,
        Step.DELETE_JOB,
    ),
    (
        "the Job's own deadline: final",
        two_nodes(failed_job(DEADLINE, deadline=3600), [stopped0()], deadline_seconds=3600),
        0,
        Phase.FAILED,
        "DeadlineExceeded",
        "activeDeadlineSeconds (3600s)",
        0,
        Step.NONE,
    ),
    (
        "the deadline counted from the job's first start has passed: not restarted",
        two_nodes(failed_job(BACKOFF, start_time="2026-11-24T08:00:00Z"), [killed1()], deadline_seconds=3600),
        0,
        Phase.FAILED,
        "DeadlineExceeded",
        "counted from its first start at 2026-11-24T08:00:00Z): not restarted",
        1,
        Step.NONE,
    ),
    (
        "gloo: pod 0's collective failed in the same second; the killed pod is the cause",
        two_nodes(
            failed_job(BACKOFF),
            [
                failed_pod(
                    1, name=POD0, message=summary(1, "Unexpected", "RuntimeError: [gloo] Connection closed by peer")
                ),
                killed1(),
            ],
        ),
        0,
        Phase.PENDING,
        "Restarting",
        f"pod {POD1}: Error (exit 137); restarting",
        1,
        Step.DELETE_JOB,
    ),
    (
        "the first pod to fail is the cause",
        two_nodes(
            failed_job(BACKOFF),
            [
                failed_pod(1, name=POD0, finished="2026-11-24T10:30:09Z"),
                failed_pod(1, name=POD1, index=1, message="Traceback: ValueError: nan loss"),
            ],
        ),
        0,
        Phase.PENDING,
        "Restarting",
        f"pod {POD1}: Unexpected (exit 1): Traceback: ValueError: nan loss",
        1,
        Step.DELETE_JOB,
    ),
    (
        "torch's rendezvous timed out: said so, with what to do",
        two_nodes(
            failed_job(BACKOFF),
            [
                failed_pod(
                    1,
                    name=POD0,
                    message=(
                        "Traceback (most recent call last):\n  ...\ntorch.distributed.DistStoreError: Timed out after 11 "
                        "seconds waiting for clients. 1/2 clients joined."
                    ),
                ),
                pod(POD1, index=1, phase="Pending", deleting=True, waiting=("ContainerCreating", "")),
            ],
        ),
        0,
        Phase.PENDING,
        "Restarting",
        (
            f"pod {POD0}: RendezvousTimeout (exit 1): Timed out after 11 seconds waiting for clients. 1/2 clients "
            "joined. (the pods did not all start within runPolicy.rendezvousTimeoutSeconds"
        ),
        1,
        Step.DELETE_JOB,
    ),
    (
        "a single-node Job's failure stays final (its own backoffLimit retried the pod)",
        obs(job(conditions=[BACKOFF], failed=4), [failed_pod(1)]),
        3,
        Phase.FAILED,
        "BackoffLimitExceeded",
        "failed 4 times (backoffLimit 3)",
        4,
        Step.NONE,
    ),
]


@pytest.mark.parametrize(
    ("observation", "before", "phase", "reason", "message", "restarts", "step"),
    [pytest.param(*case[1:], id=case[0]) for case in CASES],
)
def test_multi_node_failure_decision(observation, before, phase, reason, message, restarts, step):
    previous = compute_status(two_nodes(job(active=2), [pod(POD0), pod(POD1, index=1)]), None, at(-60))
    previous = previous.model_copy(update={"restarts": before, "start_time": "2026-11-24T09:59:00Z"})
    if "first start" in message:
        previous = previous.model_copy(update={"start_time": "2026-11-24T08:00:00Z"})
    status = compute_status(observation, previous, T0)
    assert (status.phase, ready(status).reason) == (phase, reason)
    assert message in ready(status).message, ready(status).message
    assert status.restarts == restarts
    assert next_step(observation.job, observation.pods, status) is step


def test_counting_is_idempotent_over_polls_and_operator_restarts():
    failed = two_nodes(failed_job(BACKOFF, before=1), [killed1(), stopped0()])
    first = compute_status(failed, None, T0)  # an operator that just started: no status read yet
    assert first.restarts == 2 and ready(first).reason == "Restarting"
    again = compute_status(failed, first, at(1))  # the next poll sees the same failed Job
    assert again.restarts == 2 and again == compute_status(failed, again, at(1))
    # the Job is deleted: its pods stop, then the new Job carries the count
    gone = compute_status(two_nodes(None, [stopped0()]), again, at(2))
    assert (gone.phase, ready(gone).reason, gone.restarts) == (Phase.PENDING, "Restarting", 2)
    assert ready(gone).message == ready(again).message
    created = compute_status(two_nodes(job(active=2, restarts_before=2), [pod(POD0), pod(POD1, index=1)]), gone, at(3))
    assert created.restarts == 2 and created.phase is Phase.INITIALIZING
    # a later failure of the new attempt counts once more
    later = compute_status(two_nodes(failed_job(BACKOFF, before=2), [killed1()]), created, at(4))
    assert later.restarts == 3


def test_one_restarted_event_per_counted_restart_none_for_a_final_failure():
    running = compute_status(two_nodes(job(active=2), [pod(POD0), pod(POD1, index=1)]), None, at(0))
    failed = two_nodes(failed_job(BACKOFF), [killed1(), stopped0()])
    restarting = compute_status(failed, running, at(1))
    events = transition_events(running, restarting, failed)
    assert [(e.type, e.reason) for e in events] == [("Normal", "Pending"), ("Warning", "Restarted")]
    assert f"pod {POD1}: Error (exit 137)" in events[1].message
    assert transition_events(restarting, compute_status(failed, restarting, at(2)), failed) == []
    bad = two_nodes(failed_job(BAD_DATA_RULE), [failed_pod(11, name=POD1, index=1)])
    final = compute_status(bad, running, at(1))
    assert [e.reason for e in transition_events(running, final, bad)] == ["BadData"]


@pytest.mark.parametrize(
    ("job_", "pods", "step", "reason"),
    [
        pytest.param(None, [stopped0()], Step.WAIT, "Restarting", id="old pod still stopping: wait"),
        pytest.param(None, [pod(POD0, phase="Pending")], Step.WAIT, "Restarting", id="old pod not started: wait"),
        pytest.param(None, [killed1()], Step.CREATE_JOB, "Restarting", id="only ended pods left: create"),
        pytest.param(None, [], Step.CREATE_JOB, "Restarting", id="no pod left: create"),
        pytest.param(job(active=0, restarts_before=1), [], Step.NONE, "WaitingForPods", id="the new Job exists"),
    ],
)
def test_a_new_job_only_once_no_pod_of_the_old_one_runs_or_stops(job_, pods, step, reason):
    restarting = compute_status(two_nodes(failed_job(BACKOFF), [killed1(), stopped0()]), None, at(0))
    status = compute_status(two_nodes(job_, pods), restarting, at(1))
    assert ready(status).reason == reason and status.phase is Phase.PENDING
    assert next_step(job_, pods, status) is step


def test_a_job_deleted_by_hand_is_recreated_only_once_its_pod_has_stopped():
    """Single-node too: the old pod checkpoints on SIGTERM; a new pod must not start beside it."""
    training = compute_status(obs(job(active=1), [pod()]), None, at(0))
    deleting = obs(None, [pod(deleting=True)])
    waiting = compute_status(deleting, training, at(1))
    assert (waiting.phase, ready(waiting).reason) == (Phase.PENDING, "Recreating")
    assert "waiting for its 1 pod(s) to stop" in ready(waiting).message
    assert next_step(None, deleting.pods, waiting) is Step.WAIT
    assert not [e for e in transition_events(training, waiting, deleting) if e.type == "Warning"]
    gone = compute_status(obs(None, []), waiting, at(2))
    assert ready(gone).reason == "Creating" and next_step(None, [], gone) is Step.CREATE_JOB


def test_a_finished_job_gets_no_new_trainer_job():
    done = compute_status(obs(job(conditions=[cond("Complete")]), []), None, at(0))
    assert next_step(None, [], compute_status(obs(None, []), done, at(1))) is Step.NONE


def test_a_new_jobs_deadline_counts_from_the_first_start():
    assert active_seconds_left(None, "2026-11-24T09:00:00Z", T0) is None
    assert active_seconds_left(7200, None, T0) == 7200
    assert active_seconds_left(7200, "2026-11-24T09:00:00Z", T0) == 3600
    assert active_seconds_left(3600, "2026-11-24T08:00:00Z", T0) == 1


def test_a_rendezvous_timeout_is_named_on_either_side():
    pod0 = termination(
        failed_pod(
            1,
            message="torch.distributed.DistStoreError: Timed out after 1801 seconds "
            "waiting for clients. 1/2 clients joined.",
        )
    )
    pod1 = termination(
        failed_pod(
            1,
            name=POD1,
            index=1,
            message=(
                "torch.distributed.DistNetworkError: The client socket has timed out after 1800000ms while trying "
                "to connect to (toy-cat-trainer-0.toy-cat-trainer, 29500)."
            ),
        )
    )
    for t in (pod0, pod1):
        assert t.reason == "RendezvousTimeout" and "raise it above the slowest" in t.message
    assert "(toy-cat-trainer-0.toy-cat-trainer, 29500)" in pod1.message
    assert termination(failed_pod(1, message="ValueError: nan loss")).reason == "Unexpected"
    said = summary(
        1, "Unexpected", "DistStoreError: Timed out after 5 seconds waiting for clients. 1/2 clients joined."
    )
    assert termination(failed_pod(1, message=said)).reason == "Unexpected"  # the trainer's own word wins
