"""What a real cluster does that the emulator does not: explicit stand-ins for controllers.

The emulator only stores objects. In a cluster, kube-controller-manager's Job controller
makes pods, the scheduler and kubelets move them through their phases, and the garbage
collector deletes what lost its owner. Here tests play those parts, explicitly:

* :class:`JobController` - ``reconcile()`` does one pass of the Job controller over
  Indexed batch/v1 Jobs: pods per index, ``spec.suspend``, outcomes into ``.status``,
  ``backoffLimit``, ``podFailurePolicy``, ``activeDeadlineSeconds``.
* :class:`Kubelet` - puts a pod into a state: pending with a waiting reason,
  unschedulable, running with an IP, succeeded or failed with a container's exit code,
  reason and termination message, preempted (``DisruptionTarget``).
* :class:`GarbageCollector` - ``collect()`` deletes objects whose owners (by uid) are gone.
* :class:`ControllerLoop` - runs controllers in a thread after every change, for tests
  that want a "live" cluster (e.g. kopf reacting to Job status).

All writes go through the API's semantics (status through the status subresource, new
resourceVersions, watch events) but not over HTTP, so they are not in ``kube.requests``.

Simplifications, on purpose: pods are created and deleted at once (no scheduling, no
graceful termination, no ``batch.kubernetes.io/job-tracking`` finalizer); only Indexed
Jobs; ``backoffLimitPerIndex``/``FailIndex``, ``successPolicy`` and
``ttlSecondsAfterFinished`` are not implemented; a pod that vanishes while active counts as
a failure (as with the real controller, whose finalizer turns it into a Failed pod).
"""

from __future__ import annotations

import datetime
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Self

from kubesim.api import now_iso, parse_iso
from kubesim.kube import Kube

JOB_NAME = "batch.kubernetes.io/job-name"
CONTROLLER_UID = "batch.kubernetes.io/controller-uid"
INDEX = "batch.kubernetes.io/job-completion-index"
Clock = Callable[[], datetime.datetime]


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _is_true(conditions: Iterable[Mapping[str, Any]], kind: str) -> bool:
    return any(c.get("type") == kind and c.get("status") == "True" for c in conditions)


def _set_condition(
    conditions: list[dict[str, Any]], kind: str, status: str, reason: str, message: str, now: str
) -> list[dict[str, Any]]:
    """Set a Job condition; lastTransitionTime moves only when the status changes."""
    old = next((c for c in conditions if c["type"] == kind), None)
    if old is not None and (old["status"], old.get("reason"), old.get("message")) == (status, reason, message):
        return conditions
    changed = old is None or old["status"] != status
    new = {
        "type": kind,
        "status": status,
        "reason": reason,
        "message": message,
        "lastProbeTime": now,
        "lastTransitionTime": now if changed else old.get("lastTransitionTime", now),
    }
    return [new if c is old else c for c in conditions] if old else [*conditions, new]


def _terminal(pod: Mapping[str, Any]) -> bool:
    return (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed")


def _ranges(indexes: Iterable[int]) -> str:
    """``completedIndexes`` notation: ``0-2,5``."""
    out: list[str] = []
    for i in sorted(indexes):
        if out and out[-1][1] == i - 1:
            out[-1] = (out[-1][0], i)  # type: ignore[assignment]
        else:
            out.append((i, i))  # type: ignore[arg-type]
    return ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in out)  # type: ignore[misc]


def _ref(obj: Mapping[str, Any]) -> tuple[str, str]:
    return obj["metadata"]["namespace"], obj["metadata"]["name"]


class JobController:
    """The Job controller for Indexed Jobs; call :meth:`reconcile` whenever the test wants
    the cluster to catch up. ``clock`` is injectable for ``activeDeadlineSeconds``."""

    def __init__(self, kube: Kube, clock: Clock = _utcnow):
        self.kube, self.clock = kube, clock
        self._outcomes: dict[str, dict[str, str]] = {}  # job uid -> pod uid -> outcome
        self._active: dict[str, set[str]] = {}  # job uid -> uids of pods last seen active
        self._removed: set[str] = set()  # pods this controller deleted itself

    def reconcile(self, namespace: str | None = None) -> None:
        for job in self.kube.list("Job", namespace):
            self.reconcile_job(job)

    step = reconcile

    def pods(self, job: Mapping[str, Any]) -> list[dict[str, Any]]:
        return self.kube.list("Pod", job["metadata"]["namespace"], labels={CONTROLLER_UID: job["metadata"]["uid"]})

    def reconcile_job(self, job: Mapping[str, Any]) -> None:
        spec, status = job["spec"], dict(job.get("status") or {})
        if spec.get("completionMode") != "Indexed":
            raise NotImplementedError("the JobController stand-in handles Indexed Jobs only")
        uid, now = job["metadata"]["uid"], self.clock()
        stamp = now_iso(now)
        conditions: list[dict[str, Any]] = list(status.get("conditions") or [])
        pods = self.pods(job)
        if _is_true(conditions, "Complete") or _is_true(conditions, "Failed"):
            self._remove([p for p in pods if not _terminal(p)])
            return

        outcomes = self._outcomes.setdefault(uid, {})
        failure: tuple[str, str] | None = None
        for pod in sorted(pods, key=lambda p: p["metadata"]["creationTimestamp"]):
            pod_uid, phase = pod["metadata"]["uid"], (pod.get("status") or {}).get("phase")
            if pod_uid in outcomes or phase not in ("Succeeded", "Failed"):
                continue
            if phase == "Succeeded":
                outcomes[pod_uid] = "Succeeded:" + pod["metadata"]["annotations"][INDEX]
                continue
            action, message = self._policy(spec, pod)
            outcomes[pod_uid] = "Ignored" if action == "Ignore" else "Failed"
            if action == "FailJob" and failure is None:
                failure = ("PodFailurePolicy", message)
        live = {p["metadata"]["uid"] for p in pods}
        for gone in self._active.get(uid, set()) - live - self._removed:
            outcomes.setdefault(gone, "Failed")  # deleted while running: a failed pod
        active = [p for p in pods if not _terminal(p) and not p["metadata"].get("deletionTimestamp")]
        succeeded = {int(o.split(":")[1]) for o in outcomes.values() if o.startswith("Succ")}
        failed = sum(o == "Failed" for o in outcomes.values())
        completions = spec.get("completions", 1)

        deadline = spec.get("activeDeadlineSeconds")
        if failure is None and failed > spec.get("backoffLimit", 6):
            failure = ("BackoffLimitExceeded", "Job has reached the specified backoff limit")
        if (
            failure is None
            and deadline is not None
            and status.get("startTime")
            and not spec.get("suspend")
            and (now - parse_iso(status["startTime"])).total_seconds() >= deadline
        ):
            failure = ("DeadlineExceeded", "Job was active longer than specified deadline")

        if failure is not None:
            self._remove(active)
            active = []
            for kind in ("FailureTarget", "Failed"):
                conditions = _set_condition(conditions, kind, "True", *failure, stamp)
        elif len(succeeded) >= completions:
            self._remove(active)
            active = []
            for kind in ("SuccessCriteriaMet", "Complete"):
                conditions = _set_condition(
                    conditions, kind, "True", "CompletionsReached", "Reached expected number of succeeded pods", stamp
                )
            status["completionTime"] = stamp
        elif spec.get("suspend"):
            self._remove(active)
            active = []
            status["startTime"] = None
            conditions = _set_condition(conditions, "Suspended", "True", "JobSuspended", "Job suspended", stamp)
        else:
            if _is_true(conditions, "Suspended"):
                conditions = _set_condition(conditions, "Suspended", "False", "JobResumed", "Job resumed", stamp)
            if not status.get("startTime"):
                status["startTime"] = stamp
            busy = {int(p["metadata"]["annotations"][INDEX]) for p in active}
            room = spec.get("parallelism", 1) - len(active)
            for index in range(completions):
                if room <= 0:
                    break
                if index not in succeeded and index not in busy:
                    active.append(self.kube.create(self._pod(job, index)))
                    room -= 1

        self._active[uid] = {p["metadata"]["uid"] for p in active}
        status.update(
            active=len(active),
            failed=failed,
            succeeded=len(succeeded),
            ready=sum(_is_true((p.get("status") or {}).get("conditions") or (), "Ready") for p in active),
            completedIndexes=_ranges(succeeded) or None,
            conditions=conditions or None,
            uncountedTerminatedPods={},
        )
        if spec.get("podReplacementPolicy"):
            status["terminating"] = 0
        old = job.get("status") or {}
        if {k: v for k, v in status.items() if v is not None} != old:
            self.kube.patch_status("Job", *_ref(job), {"status": status})

    def _policy(self, spec: Mapping[str, Any], pod: Mapping[str, Any]) -> tuple[str, str]:
        """The podFailurePolicy action for a failed pod (``Count`` if no rule matches)."""
        pstatus = pod.get("status") or {}
        where = "/".join(_ref(pod))
        for i, rule in enumerate((spec.get("podFailurePolicy") or {}).get("rules") or ()):
            codes = rule.get("onExitCodes")
            if codes is not None:
                values = set(codes.get("values") or ())
                for cs in pstatus.get("containerStatuses") or ():
                    if codes.get("containerName") not in (None, cs["name"]):
                        continue
                    code = ((cs.get("state") or {}).get("terminated") or {}).get("exitCode")
                    if code in (None, 0):
                        continue
                    if (code in values) == (codes.get("operator", "In") == "In"):
                        return rule["action"], (
                            f"Container {cs['name']} for pod {where} failed with exit code "
                            f"{code} matching {rule['action']} rule at index {i}"
                        )
            for pattern in rule.get("onPodConditions") or ():
                for cond in pstatus.get("conditions") or ():
                    if cond.get("type") == pattern.get("type") and cond.get("status") == (
                        pattern.get("status", "True")
                    ):
                        return rule["action"], (
                            f"Pod {where} has condition {cond['type']} matching {rule['action']} rule at index {i}"
                        )
        return "Count", ""

    def _pod(self, job: Mapping[str, Any], index: int) -> dict[str, Any]:
        """Pod ``index`` from the template, as the real controller makes it."""
        name, uid = job["metadata"]["name"], job["metadata"]["uid"]
        template = job["spec"]["template"]
        meta = template.get("metadata") or {}
        spec = dict(template.get("spec") or {})
        env = {
            "name": "JOB_COMPLETION_INDEX",
            "valueFrom": {"fieldRef": {"fieldPath": f"metadata.annotations['{INDEX}']"}},
        }
        for field in ("initContainers", "containers"):
            if field in spec:
                spec[field] = [{**c, "env": [*(c.get("env") or ()), env]} for c in spec[field]]
        spec["hostname"] = f"{name}-{index}"
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "generateName": f"{name}-{index}-",
                "namespace": job["metadata"]["namespace"],
                "labels": {
                    **(meta.get("labels") or {}),
                    JOB_NAME: name,
                    CONTROLLER_UID: uid,
                    "job-name": name,
                    "controller-uid": uid,
                    INDEX: str(index),
                },
                "annotations": {**(meta.get("annotations") or {}), INDEX: str(index)},
                "ownerReferences": [
                    {
                        "apiVersion": "batch/v1",
                        "kind": "Job",
                        "name": name,
                        "uid": uid,
                        "controller": True,
                        "blockOwnerDeletion": True,
                    }
                ],
            },
            "spec": spec,
        }

    def _remove(self, pods: Iterable[Mapping[str, Any]]) -> None:
        for pod in pods:
            self._removed.add(pod["metadata"]["uid"])
            self.kube.delete("Pod", *_ref(pod), missing_ok=True)


class Kubelet:
    """Sets pod states as the scheduler and a kubelet would (through ``/status``). ``pod``
    is a pod object or ``(namespace, name)``; each method returns the updated pod."""

    def __init__(self, kube: Kube, clock: Clock = _utcnow, host_ip: str = "127.0.0.1"):
        self.kube, self.clock, self.host_ip = kube, clock, host_ip

    def _pod(self, pod: Mapping[str, Any] | tuple[str, str]) -> dict[str, Any]:
        ns, name = pod if isinstance(pod, tuple) else _ref(pod)
        return self.kube.get("Pod", ns, name)

    def _write(self, pod: Mapping[str, Any], status: dict[str, Any]) -> dict[str, Any]:
        return self.kube.patch_status("Pod", *_ref(pod), {"status": status})

    def _conditions(
        self, scheduled: bool, ready: bool, reason: str | None = None, message: str | None = None
    ) -> list[dict[str, Any]]:
        now = now_iso(self.clock())
        if not scheduled:
            return [
                {
                    "type": "PodScheduled",
                    "status": "False",
                    "reason": reason,
                    "message": message,
                    "lastTransitionTime": now,
                    "lastProbeTime": None,
                }
            ]
        return [
            {
                "type": kind,
                "status": "True" if ok else "False",
                "lastTransitionTime": now,
                "lastProbeTime": None,
                **({} if ok or not reason else {"reason": reason}),
            }
            for kind, ok in (
                ("PodReadyToStartContainers", True),
                ("Initialized", True),
                ("ContainersReady", ready),
                ("Ready", ready),
                ("PodScheduled", True),
            )
        ]

    def _containers(
        self,
        pod: Mapping[str, Any],
        state: dict[str, Any],
        ready: bool,
        container: str | None = None,
        others: dict[str, Any] | None = None,
    ) -> list[dict[str, Any]]:
        return [
            {
                "name": c["name"],
                "image": c.get("image", ""),
                "imageID": "",
                "containerID": f"containerd://{pod['metadata']['uid']}-{c['name']}",
                "ready": ready,
                "started": "running" in state,
                "restartCount": 0,
                "state": state if container in (None, c["name"]) else (others or state),
            }
            for c in pod["spec"].get("containers") or ()
        ]

    def pending(
        self, pod: Mapping[str, Any] | tuple[str, str], reason: str = "ContainerCreating", message: str = ""
    ) -> dict[str, Any]:
        """Scheduled, containers waiting: ``ImagePullBackOff``, ``ErrImagePull``,
        ``CreateContainerConfigError`` (message e.g. ``secret "x" not found``)..."""
        pod = self._pod(pod)
        waiting = {"waiting": {"reason": reason, **({"message": message} if message else {})}}
        return self._write(
            pod,
            {
                "phase": "Pending",
                "hostIP": self.host_ip,
                "conditions": self._conditions(True, False, "ContainersNotReady"),
                "containerStatuses": self._containers(pod, waiting, False),
            },
        )

    def unschedulable(
        self,
        pod: Mapping[str, Any] | tuple[str, str],
        message: str = "0/1 nodes are available: 1 Insufficient nvidia.com/gpu. "
        "preemption: 0/1 nodes are available: 1 No preemption victims found "
        "for incoming pod.",
    ) -> dict[str, Any]:
        pod = self._pod(pod)
        return self._write(
            pod, {"phase": "Pending", "conditions": self._conditions(False, False, "Unschedulable", message=message)}
        )

    def run(
        self, pod: Mapping[str, Any] | tuple[str, str], ip: str = "127.0.0.2", ready: bool = True
    ) -> dict[str, Any]:
        """Running with ``ip`` as its pod IP (the test picks a loopback address)."""
        pod = self._pod(pod)
        now = now_iso(self.clock())
        return self._write(
            pod,
            {
                "phase": "Running",
                "hostIP": self.host_ip,
                "podIP": ip,
                "podIPs": [{"ip": ip}],
                "startTime": now,
                "conditions": self._conditions(True, ready, None if ready else "ContainersNotReady"),
                "containerStatuses": self._containers(pod, {"running": {"startedAt": now}}, ready),
            },
        )

    def terminate(
        self,
        pod: Mapping[str, Any] | tuple[str, str],
        exit_code: int,
        reason: str,
        message: str = "",
        container: str | None = None,
        conditions: Iterable[dict[str, Any]] = (),
    ) -> dict[str, Any]:
        """Succeeded (all exit codes 0) or Failed: ``container`` (default: every one)
        terminated with ``exit_code``, ``reason`` and ``message`` (the termination
        message); the other containers exit 0."""
        pod = self._pod(pod)
        now = now_iso(self.clock())
        started = ((pod.get("status") or {}).get("startTime")) or now
        state = {
            "terminated": {
                "exitCode": exit_code,
                "reason": reason,
                "startedAt": started,
                "finishedAt": now,
                **({"message": message} if message else {}),
            }
        }
        done = {"terminated": {"exitCode": 0, "reason": "Completed", "startedAt": started, "finishedAt": now}}
        phase = "Succeeded" if exit_code == 0 else "Failed"
        reason_text = "PodCompleted" if phase == "Succeeded" else "PodFailed"
        return self._write(
            pod,
            {
                "phase": phase,
                "hostIP": self.host_ip,
                "startTime": started,
                "conditions": [*conditions, *self._conditions(True, False, reason_text)],
                "containerStatuses": self._containers(pod, state, False, container, done),
            },
        )

    def succeed(self, pod: Mapping[str, Any] | tuple[str, str], message: str = "") -> dict[str, Any]:
        return self.terminate(pod, 0, "Completed", message)

    def fail(
        self,
        pod: Mapping[str, Any] | tuple[str, str],
        exit_code: int = 1,
        reason: str = "Error",
        message: str = "",
        container: str | None = None,
    ) -> dict[str, Any]:
        return self.terminate(pod, exit_code, reason, message, container)

    def oom_kill(self, pod: Mapping[str, Any] | tuple[str, str], container: str | None = None) -> dict[str, Any]:
        return self.terminate(pod, 137, "OOMKilled", "", container)

    def preempt(
        self,
        pod: Mapping[str, Any] | tuple[str, str],
        reason: str = "PreemptionByScheduler",
        message: str = "Preempted in order to admit critical pod",
    ) -> dict[str, Any]:
        """A disruption (preemption, eviction, drain): ``DisruptionTarget`` and Failed; the
        containers were killed (143)."""
        disruption = {
            "type": "DisruptionTarget",
            "status": "True",
            "reason": reason,
            "message": message,
            "lastTransitionTime": now_iso(self.clock()),
        }
        return self.terminate(pod, 143, "Error", "", None, [disruption])


class GarbageCollector:
    """Deletes dependents whose owners are all gone (background cascade), when told to."""

    def __init__(self, kube: Kube):
        self.kube = kube

    def collect(self) -> list[tuple[str, str | None, str]]:
        """One full pass; returns the ``(kind, namespace, name)`` deleted."""
        return self.kube._server.call(self.kube.emulator.collect_garbage)

    step = collect


class ControllerLoop:
    """Runs ``step()`` of each controller in a thread after every change (and every
    ``interval`` s, for deadlines) until stopped. An error stops the loop and is raised
    from :meth:`stop` (or the ``with`` block's end)."""

    def __init__(self, kube: Kube, *controllers: Any, interval: float = 0.2):
        self.kube, self.controllers, self.interval = kube, controllers, interval
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="kube-controllers", daemon=True)

    def _run(self) -> None:
        changed = self.kube._changed
        try:
            while not self._stop.is_set():
                with changed:
                    seen = self.kube._revision
                for controller in self.controllers:
                    controller.step()
                with changed:
                    changed.wait_for(
                        lambda seen=seen: self.kube._revision != seen or self._stop.is_set(), self.interval
                    )
        except BaseException as exc:  # noqa: BLE001  (stop() raises it)
            self._error = exc

    def start(self) -> Self:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        with self.kube._changed:
            self.kube._changed.notify_all()
        self._thread.join(30)
        if self._error is not None:
            raise self._error

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
