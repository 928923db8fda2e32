"""A pod's verdict from its processes' verdicts: the first do-not-retry failure wins,
whichever process had it; what a dead or silent process means; the 4 KiB message limit."""

from __future__ import annotations

import json

import pytest

from dreambooth.api.exitcodes import ExitCode
from dreambooth.api.termination import MAX_BYTES, TerminationSummary, pod_verdict


def v(rank: int, code: ExitCode, at: float, reason: str | None = None) -> TerminationSummary:
    return TerminationSummary(
        exit_code=code, reason=reason or code.name.title().replace("_", ""), rank=rank, finished_at=at
    )


OK, STOP, BUG, BAD, AUTH = (
    ExitCode.OK,
    ExitCode.PREEMPTED,
    ExitCode.UNEXPECTED,
    ExitCode.BAD_DATA,
    ExitCode.STORAGE_AUTH,
)
CASES = {  # name: (verdicts, processes) -> (exit code, reason, rank)
    "all succeeded: rank 0's summary": (([v(1, OK, 2), v(0, OK, 3)], 2), (0, "Ok", 0)),
    "rank 1's do-not-retry beats rank 0's stop": (([v(0, STOP, 5), v(1, BAD, 4)], 2), (11, "BadData", 1)),
    "do-not-retry beats an earlier bug": (([v(0, BUG, 1), v(1, BAD, 4)], 2), (11, "BadData", 1)),
    "the first of two do-not-retry": (([v(0, AUTH, 9), v(1, BAD, 4)], 2), (11, "BadData", 1)),
    "a bug beats the stops it caused": (([v(0, STOP, 5), v(1, BUG, 4), v(2, STOP, 6)], 3), (1, "Unexpected", 1)),
    "all stopped (a pod's SIGTERM)": (([v(0, STOP, 5), v(1, STOP, 4)], 2), (21, "Preempted", 1)),
    "a silent process beats the stops": (([v(0, STOP, 5)], 2), (1, "ProcessLost", None)),
    "a silent process, the rest fine": (([v(0, OK, 5)], 2), (1, "ProcessLost", None)),
}


@pytest.mark.parametrize("case", CASES)
def test_pod_verdict(case):
    (verdicts, processes), expected = CASES[case]
    got = pod_verdict(verdicts, processes)
    assert (got.exit_code, got.reason, got.rank) == expected


def test_no_process_reported_leaves_the_message_to_the_logs_tail():
    """The launcher failed first (a rendezvous timeout, bad arguments): what it printed,
    which the kubelet takes as the termination message, says more than any summary."""
    assert pod_verdict([], 2) is None


def test_the_message_fits_a_termination_message():
    long = TerminationSummary(exit_code=11, reason="BadData", message="photo.png is broken " * 1000)
    text = long.dumps()
    assert len(text.encode()) <= MAX_BYTES and json.loads(text)["message"].endswith("...")
    assert TerminationSummary.loads(text).exit_code == 11


@pytest.mark.parametrize("text", ["", "Traceback (most recent call last):", "{not json", '{"reason": "x"}', "[1]"])
def test_anything_else_is_not_a_summary(text):
    assert TerminationSummary.loads(text) is None


def test_the_wire_format_is_camel_case_and_omits_what_is_unset():
    text = TerminationSummary(exit_code=0, reason="Succeeded", step=400, loss=0.1).dumps()
    assert json.loads(text) == {"exitCode": 0, "reason": "Succeeded", "step": 400, "loss": 0.1}
