"""How a trainer pod ends: the contract between the trainer, the pod's launch script and the
operator.

Every training process writes its verdict, a :class:`TerminationSummary`. A pod with one
process writes it to its termination message (``/dev/termination-log``, which Kubernetes
keeps up to 4 KiB and the operator reads from the pod's status). In a pod with several
processes (``accelerate launch``), each process also leaves its verdict in
``<workdir>/verdicts/rank-<rank>.json``, and the launch script, once they have all ended,
forms the pod's verdict with :func:`pod_verdict` (``python -m dreambooth.trainer.verdict``):
a do-not-retry failure of any process wins, whichever process it was, so the Job's
podFailurePolicy sees it. The launch script asks the processes to stop (a pod's SIGTERM:
preemption, suspend, drain) by creating ``<workdir>/STOP``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic.alias_generators import to_camel

from dreambooth.api.exitcodes import DO_NOT_RETRY, ExitCode
from dreambooth.api.status import Evaluation

#: below the work folder of a pod: one verdict per process, and the stop request
VERDICTS_DIR = "verdicts"
STOP_FILE = "STOP"
#: Kubernetes keeps 4096 bytes of a termination message; leave room for the JSON around it
MAX_BYTES = 4000


#: the reasons of verdicts that no exit code names (the others: ``exit_reason(code)``)
SUCCEEDED = "Succeeded"
PROCESS_LOST = "ProcessLost"


def verdict_name(rank: int) -> str:
    return f"rank-{rank}.json"


class TerminationSummary(BaseModel):
    """One line of JSON: ``{"exitCode": 0, "reason": "Succeeded", "step": 400, ...}``."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore", frozen=True)

    exit_code: int
    #: CamelCase, for conditions: Succeeded, BadData, Preempted, Unexpected, ProcessLost, ...
    reason: str
    message: str | None = None
    #: on success: the last step, its loss and what was written where (format -> URI)
    step: int | None = None
    loss: float | None = None
    outputs: dict[str, str] | None = None
    #: on success with spec.evaluation: the last round's figures and the best checkpoint
    evaluation: Evaluation | None = None
    #: the process this verdict is from (pods with several processes)
    rank: int | None = None
    #: when the process ended (seconds since the epoch): the first failure is the cause
    finished_at: float | None = None

    @property
    def do_not_retry(self) -> bool:
        return self.exit_code in DO_NOT_RETRY

    def dumps(self) -> str:
        """The JSON line, within :data:`MAX_BYTES` (a long message is cut)."""
        text = self.model_dump_json(by_alias=True, exclude_none=True)
        excess = len(text.encode()) - MAX_BYTES
        if excess > 0 and self.message:
            keep = self.message.encode()[: max(0, len(self.message.encode()) - excess - 3)]
            text = self.model_copy(update={"message": keep.decode(errors="ignore") + "..."}).model_dump_json(
                by_alias=True, exclude_none=True
            )
        return text

    @classmethod
    def loads(cls, text: str | None) -> TerminationSummary | None:
        """The summary in ``text``, or None if it is not one (e.g. a log tail)."""
        if not text or not text.strip().startswith("{"):
            return None
        try:
            return cls.model_validate(json.loads(text))
        except (ValueError, ValidationError):
            return None


def pod_verdict(verdicts: Sequence[TerminationSummary], processes: int) -> TerminationSummary | None:
    """The verdict of a pod whose ``processes`` training processes left ``verdicts``.

    In order: the first do-not-retry failure; else the first other failure that is not a
    stop (a stop is what the others do once one process failed); a process that ended
    without a verdict (killed: the out-of-memory killer, a signal); the first stop; all
    succeeded: the first process's summary. None when no process reported: the launcher
    failed before (e.g. a rendezvous timeout), and the pod's log says what it saw (the
    kubelet takes its tail as the termination message)."""

    def first(found: list[TerminationSummary]) -> TerminationSummary | None:
        return min(found, key=lambda v: (v.finished_at or 0.0, v.rank or 0), default=None)

    failed = [v for v in verdicts if v.exit_code != ExitCode.OK]
    stopped = [v for v in failed if v.exit_code == ExitCode.PREEMPTED]
    cause = first([v for v in failed if v.do_not_retry]) or first([v for v in failed if v not in stopped])
    if cause is not None:
        return cause
    if not verdicts:
        return None
    ranks = {v.rank for v in verdicts}
    if len(ranks) < processes:
        missing = processes - len(ranks)
        return TerminationSummary(
            exit_code=ExitCode.UNEXPECTED,
            reason=PROCESS_LOST,
            message=f"{missing} of the pod's {processes} training processes ended without a verdict "
            "(killed by a signal, e.g. the out-of-memory killer): see the pod's log",
        )
    if stopped:
        return first(stopped)
    return min(verdicts, key=lambda v: v.rank or 0)
