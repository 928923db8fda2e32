"""bench/operator_chaos.py, short: the operator killed a few times while jobs come and go,
the API failing a share of requests, jobs deleted at once; the zeros the full benches
print (docs/reliability.md) asserted."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import operator_chaos


def run(tmp_path: Path, *argv: str) -> dict:
    out = tmp_path / "figures.json"
    assert operator_chaos.main([*argv, "--json", str(out), "--max-minutes", "3"]) == 0
    return json.loads(out.read_text())


def assert_nothing_lost(report: dict, jobs: int) -> None:
    assert not report["timed_out"], report
    assert report["created"] == jobs and report["never_final"] == [], report
    assert report["duplicates"] == [] and report["status_regressions"] == [], report
    assert report["wrong_final"] == [], report  # the phase and restarts each job's fate gives
    assert report["orphans"] == [] and not any(report["left_at_end"].values()), report
    assert report["operator_exits_not_killed"] == 0 and report["tracebacks_in_log"] == 0, report
    assert report["errors_in_log"] == 0, report


@pytest.mark.slow
def test_the_operator_killed_while_jobs_come_and_go_loses_nothing_and_duplicates_nothing(tmp_path):
    report = run(tmp_path, "kills", "--jobs", "24", "--kills", "4", "--rate", "3", "--seed", "1")
    assert report["kills"] == 4 and report["operator_starts"] == 5, report
    # one at random, one aimed at each moment (the hook fired: no fallback to random)
    assert report["kills_by_aim"] == {aim: 1 for aim in ("random", *operator_chaos.AIMS)}, report
    assert report["jobs_in_flight_at_kills"]["max"] > 0, report  # the kills came under load
    assert set(report["fates"]) == {"succeed", "retry", "fail"}, report
    assert_nothing_lost(report, 24)


@pytest.mark.slow
def test_an_api_failing_a_share_of_requests_leaves_the_operator_running_and_every_job_converged(tmp_path):
    report = run(
        tmp_path,
        "faults",
        "--jobs",
        "20",
        "--rate",
        "4",
        "--seed",
        "1",
        "--error",
        "0.1",
        "--conflict",
        "0.1",
        "--hang",
        "0.03",
        "--api-timeout",
        "2",
    )
    faults = report["faults"]
    assert faults["error"] > 0 and faults["conflict"] > 0, faults  # the faults were felt
    assert report["operator_starts"] == 1, report  # no crash loop: never restarted
    assert_nothing_lost(report, 20)


@pytest.mark.slow
def test_jobs_deleted_at_once_leave_no_orphan(tmp_path):
    report = run(tmp_path, "mass-delete", "--jobs", "40")
    assert report["before"]["pods"] == 40 and report["deleted_at_once"] == 40, report
    assert report["orphans"] == [] and not any(report["left_at_end"].values()), report
    assert report["duplicates"] == [] and report["operator_exits_not_killed"] == 0, report


# --- the checks themselves can fail (fast) -------------------------------------------------

DBJ, JOBS, CONFIGMAPS = (
    ("dreambooth.io", "v1alpha1", "dreamboothjobs"),
    ("batch", "v1", "jobs"),
    ("", "v1", "configmaps"),
)


def dbj(status: dict | None = None) -> dict:
    return {"metadata": {"name": "a", "uid": "u1"}, "status": status or {}}


def child(name: str, owner: str = "u1") -> dict:
    return {"metadata": {"name": name, "labels": {"dreambooth.io/job-name": "a"}, "ownerReferences": [{"uid": owner}]}}


def test_the_ledger_sees_a_second_child_of_one_job_and_a_child_made_after_its_owner_went():
    ledger = operator_chaos.Ledger()
    ledger(DBJ, "ADDED", dbj(), None)
    ledger(JOBS, "ADDED", child("a-trainer"), None)
    ledger(CONFIGMAPS, "ADDED", child("a-trainer-config"), None)
    assert ledger.duplicates() == [] and ledger.late_children == []
    ledger(JOBS, "ADDED", child("a-trainer-2"), None)
    assert ledger.duplicates() == ["a: jobs ['a-trainer', 'a-trainer-2']"]
    ledger(DBJ, "DELETED", dbj(), None)
    ledger(CONFIGMAPS, "ADDED", child("a-trainer-config"), None)
    assert ledger.late_children == ["configmaps/a-trainer-config"] and len(ledger.duplicates()) == 2


@pytest.mark.parametrize(
    ("old", "new", "problem"),
    [
        ({"phase": "Succeeded"}, {"phase": "Training"}, "left its final phase Succeeded for Training"),
        ({"phase": "Training"}, {}, "the phase was removed"),
        ({"phase": "Training"}, {"phase": "Pending"}, "went back from Training to Pending without a restart"),
        ({"phase": "Pending", "restarts": 1}, {"phase": "Pending", "restarts": 0}, "restarts dropped from 1 to 0"),
        ({"phase": "Pending", "startTime": "t1"}, {"phase": "Pending", "startTime": "t2"}, "startTime changed"),
    ],
)
def test_the_ledger_sees_a_status_that_went_back(old, new, problem):
    ledger = operator_chaos.Ledger()
    ledger(DBJ, "ADDED", dbj(old), None)
    ledger(DBJ, "MODIFIED", dbj(new), dbj(old))
    assert len(ledger.regressions) == 1 and problem in ledger.regressions[0], ledger.regressions


def test_a_restart_may_take_a_job_back_to_pending():
    ledger = operator_chaos.Ledger()
    old, new = {"phase": "Training", "restarts": 0}, {"phase": "Pending", "restarts": 1}
    ledger(DBJ, "MODIFIED", dbj(new), dbj(old))
    assert ledger.regressions == []
