"""What a batch/v1 Job and its pods say, read from their API dicts (camelCase, as the API
server sends them): how pods ended (the trainer's termination summary), and why a pod that
does not run yet waits. Pure functions, used by the phase machine (verdict.py)."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dreambooth.api.exitcodes import DO_NOT_RETRY, ExitCode, exit_reason
from dreambooth.api.status import BENIGN_PENDING, Phase, Reason
from dreambooth.api.termination import TerminationSummary

_REASON = re.compile(r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")


@dataclass(frozen=True)
class Verdict:
    phase: Phase
    reason: str
    message: str = ""


def get(obj: Mapping[str, Any] | None, *path: str) -> Any:
    for key in path:
        if not isinstance(obj, Mapping):
            return None
        obj = obj.get(key)
    return obj


def true_condition(obj: Mapping[str, Any] | None, ctype: str) -> Mapping[str, Any] | None:
    for cond in get(obj, "status", "conditions") or ():
        if cond.get("type") == ctype and cond.get("status") == "True":
            return cond
    return None


def pod_name(obj: Mapping[str, Any]) -> str:
    return get(obj, "metadata", "name") or "?"


def _job_uid(pod: Mapping[str, Any]) -> str | None:
    labels = get(pod, "metadata", "labels") or {}
    named = labels.get("batch.kubernetes.io/controller-uid") or labels.get("controller-uid")
    owners = [r.get("uid") for r in get(pod, "metadata", "ownerReferences") or () if r.get("kind") == "Job"]
    return named or (owners[0] if owners else None)


def of_job(job: Mapping[str, Any] | None, pods: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The pods of ``job`` (all of them without one): a pod that names another Job (its
    controller-uid) belongs to an earlier attempt that is still going away."""
    uid = get(job, "metadata", "uid")
    return [p for p in pods if not uid or _job_uid(p) in (None, uid)]


def is_active(pod: Mapping[str, Any]) -> bool:
    return get(pod, "status", "phase") in (None, "Pending", "Running", "Unknown") and not get(
        pod, "metadata", "deletionTimestamp"
    )


def camel_reason(text: str | None, fallback: str) -> str:
    """``text`` if it is a valid condition reason, else its words joined in CamelCase."""
    if text and _REASON.match(text):
        return text
    words = re.split(r"[^A-Za-z0-9]+", text or "")
    joined = "".join(w[:1].upper() + w[1:] for w in words if w)
    return joined if joined and _REASON.match(joined) else fallback


@dataclass(frozen=True)
class Termination:
    """How one finished pod ended: the container's terminated state and the trainer's
    one-line JSON summary (its termination message)."""

    pod: str
    exit_code: int | None
    k8s_reason: str | None  # OOMKilled, Error, Completed, Evicted, ...
    trainer_reason: str | None
    message: str
    finished_at: str = ""
    disruption: str | None = None  # the pod's DisruptionTarget reason: preempted, evicted
    summary: TerminationSummary | None = None

    @property
    def oom(self) -> bool:
        return self.k8s_reason == "OOMKilled" or (self.exit_code == 137 and self.k8s_reason is None)

    @property
    def do_not_retry(self) -> bool:
        return self.exit_code in DO_NOT_RETRY or (self.summary is not None and self.summary.do_not_retry)

    @property
    def reason(self) -> str:
        if self.oom:
            return Reason.OOM_KILLED
        if self.trainer_reason == exit_reason(ExitCode.UNEXPECTED) and "OutOfMemoryError" in self.message:
            return Reason.CUDA_OUT_OF_MEMORY
        return (
            camel_reason(self.trainer_reason, "")
            or exit_reason(self.exit_code)
            or camel_reason(self.k8s_reason, Reason.ERROR)
        )

    def describe(self) -> str:
        text = f"pod {self.pod}: {self.reason}"
        if self.exit_code not in (None, 0):
            text += f" (exit {self.exit_code})"
        if self.disruption:
            text += f", disrupted ({self.disruption})"
        if self.oom:
            return text + (
                ": the trainer ran out of memory; raise resources.memory, lower "
                "training.batchSize or turn on training.gradientCheckpointing"
            )
        return text + (f": {self.message}" if self.message else "")


#: torch's static rendezvous giving up (in the log tail when the trainer never started):
#: pod 0 waiting for the others, or another pod waiting for pod 0
_RENDEZVOUS_TIMEOUT = re.compile(
    r"Timed out after \d+ seconds waiting for clients\. \d+/\d+ clients joined\."
    r"|The client socket has timed out after \d+ms while trying to connect to \([^)]*\)"
)
RENDEZVOUS_HINT = (
    "the pods did not all start within runPolicy.rendezvousTimeoutSeconds: raise it above "
    "the slowest scheduling and image pull, or let Kueue admit the pods together"
)


def termination(pod: Mapping[str, Any]) -> Termination | None:
    """How ``pod`` ended, or None while it has not."""
    if get(pod, "status", "phase") not in ("Failed", "Succeeded"):
        return None
    terminated = [
        t
        for cs in get(pod, "status", "containerStatuses") or ()
        for t in (get(cs, "state", "terminated"), get(cs, "lastState", "terminated"))
        if t
    ]
    terminated.sort(key=lambda t: t.get("exitCode") == 0)  # a failing container first
    disruption = true_condition(pod, "DisruptionTarget")
    disrupted = camel_reason(disruption.get("reason"), Reason.DISRUPTED) if disruption else None
    if not terminated:  # evicted, or deleted before it started
        return Termination(
            pod=pod_name(pod),
            exit_code=None,
            k8s_reason=get(pod, "status", "reason"),
            trainer_reason=None,
            message=get(pod, "status", "message") or "",
            disruption=disrupted,
        )
    t = terminated[0]
    raw = (t.get("message") or "").strip()
    summary = TerminationSummary.loads(raw)
    reason = summary.reason if summary else None
    message = (summary.message or "") if summary else raw
    if summary is None and t.get("exitCode") and (found := _RENDEZVOUS_TIMEOUT.search(raw)):
        reason, message = Reason.RENDEZVOUS_TIMEOUT, f"{found.group(0)} ({RENDEZVOUS_HINT})"
    return Termination(
        pod=pod_name(pod),
        exit_code=t.get("exitCode"),
        k8s_reason=t.get("reason"),
        trainer_reason=reason,
        message=message,
        finished_at=t.get("finishedAt") or "",
        disruption=disrupted,
        summary=summary,
    )


def terminations(pods: Sequence[Mapping[str, Any]]) -> list[Termination]:
    found = [t for t in map(termination, pods) if t is not None]
    return sorted(found, key=lambda t: (t.finished_at, t.pod))


_SECRET = re.compile(r'secret "([^"]+)" not found', re.IGNORECASE)
_SECRET_KEY = re.compile(r"couldn't find key (\S+) in Secret (\S+)", re.IGNORECASE)
_CONFIGMAP = re.compile(r'configmap "([^"]+)" not found', re.IGNORECASE)


def waiting_verdict(pod: Mapping[str, Any], reason: str, message: str) -> Verdict:
    namespace = get(pod, "metadata", "namespace") or "the job's namespace"
    where = f"pod {pod_name(pod)}: {message}" if message else f"pod {pod_name(pod)}: {reason}"
    if reason in ("ErrImagePull", "ImagePullBackOff"):
        return Verdict(Phase.PENDING, Reason.IMAGE_PULL_BACK_OFF, where + " (check resources.image and pull secrets)")
    if reason == "CreateContainerConfigError":
        if m := _SECRET.search(message):
            return Verdict(
                Phase.PENDING,
                Reason.SECRET_NOT_FOUND,
                f'{where}: create Secret "{m.group(1)}" in {namespace}, or point '
                "spec.storage.credentialsSecret at one that exists",
            )
        if m := _SECRET_KEY.search(message):
            return Verdict(
                Phase.PENDING,
                Reason.SECRET_KEY_NOT_FOUND,
                f"{where}: add key {m.group(1)} to that Secret, or set "
                "spec.storage.credentialsSecret's accessKeyKey/secretKeyKey",
            )
        if _CONFIGMAP.search(message):
            return Verdict(Phase.PENDING, Reason.CONFIG_MAP_NOT_FOUND, where)
    return Verdict(Phase.PENDING, camel_reason(reason, Reason.CONTAINER_WAITING), where)


def pod_blocked(pod: Mapping[str, Any]) -> Verdict | None:
    """Why ``pod`` (not yet running the trainer) waits, or None if it runs."""
    scheduled = next((c for c in get(pod, "status", "conditions") or () if c.get("type") == "PodScheduled"), None)
    if scheduled is not None and scheduled.get("status") == "False":
        reason = camel_reason(scheduled.get("reason"), Reason.UNSCHEDULABLE)
        message = scheduled.get("message") or ""
        return Verdict(Phase.PENDING, reason, f"pod {pod_name(pod)}: {message}" if message else f"pod {pod_name(pod)}")
    statuses = [
        *(get(pod, "status", "initContainerStatuses") or ()),
        *(get(pod, "status", "containerStatuses") or ()),
    ]
    benign: Verdict | None = None
    for cs in statuses:
        waiting = get(cs, "state", "waiting")
        if not waiting:
            continue
        reason, message = waiting.get("reason") or Reason.CONTAINER_CREATING, waiting.get("message") or ""
        if reason in BENIGN_PENDING:
            benign = benign or Verdict(Phase.PENDING, reason, f"pod {pod_name(pod)}: starting containers")
            continue
        return waiting_verdict(pod, reason, message)
    if benign is not None:
        return benign
    if get(pod, "status", "phase") in (None, "Pending"):
        if scheduled is None:
            return Verdict(Phase.PENDING, Reason.SCHEDULING, f"pod {pod_name(pod)}: waiting for a node")
        return Verdict(Phase.PENDING, Reason.CONTAINER_CREATING, f"pod {pod_name(pod)}: starting containers")
    return None
