"""Chaos benches for the operator: killed again and again under load, 1,000 jobs deleted at
once, an API server that fails a share of requests. Figures for docs/reliability.md.
Loopback only, bounded in count and time; each stops by itself.

    .venv/bin/python bench/operator_chaos.py kills [--jobs 200] [--kills 20]
    .venv/bin/python bench/operator_chaos.py mass-delete [--jobs 1000]
    .venv/bin/python bench/operator_chaos.py faults [--jobs 100] [--error 0.07 --conflict 0.05 --hang 0.03]

The real operator (``python -m dreambooth.operator``) runs as a process against the API
emulator of the simulated cluster (kubesim/kube.py, in this process), as in
bench/operator_scale.py. This process plays the cluster (kubesim/controllers.py): the Job
controller makes each trainer Job's pod, the kubelet runs it and, after a random time, ends
it with the trainer's real termination summary (dreambooth/api/termination.py) as its
termination message; the garbage collector deletes what lost its owner. No trainer runs:
hundreds of real trainings are far too heavy for a small machine, and what is under test
is the operator's bookkeeping, not training. Each job's fate is drawn (seeded): most
succeed; some fail once with a retryable code (StorageUnavailable, 20) and succeed in the
next pod (status ``restarts`` 1); some fail with BadData (11), which the Job's
podFailurePolicy makes final (phase Failed). Once a job's status shows its final phase,
the bench deletes it.

**kills**: ``--jobs`` jobs are created at ``--rate`` jobs/s, run and deleted while the
operator is killed with SIGKILL ``--kills`` times and restarted at once: kill k in the
k-th of ``--kills`` equal slices of the creation window, once its liveness endpoint
answers; a quarter of the kills (in a random, seeded order) come at once, the others are
aimed (:data:`AIMS`, a quarter each): the
emulator's change hook kills the operator right after the next write of a kind is stored,
before the operator has its answer (between a job's children, after its trainer Job but
before the status saying so, after a status write). **faults**: the same without kills, the emulator
answering a share of requests with 409 Conflict (writes), 500, or holding them
``--hang-s`` and cutting the connection (kubesim.api.FaultShare). **mass-delete**: ``--jobs``
jobs are created and given their children (ConfigMap, Service, Job, and the Job's pod),
then all deleted in one request (``kubectl delete dreamboothjobs --all``); the garbage
collector runs until nothing is left.

Checked, from the emulator's own change hooks (every write, not samples):

* duplicate children: a second ConfigMap, Service or Job created for one DreamBoothJob
  (another name, or the same name again after it was deleted);
* lost statuses: a job whose status went back (a finished phase left, the phase or
  ``restarts`` or ``startTime`` dropped), or that never showed its final phase, or showed
  another one than its fate (Succeeded/Failed) or another ``restarts`` count;
* orphans: a child (or pod) left whose owner is gone, after the garbage collector ran and
  two more poll intervals passed without it; and children created after their owner was
  deleted (the garbage collector removes them; a race of the operator's);
* the operator's exits not caused by the bench, and tracebacks in its log.

Prints a table and, with ``--json PATH``, writes the figures.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from operator_scale import JOB, cpu_seconds, job_name

from dreambooth.api import crd
from dreambooth.api.exitcodes import ExitCode
from dreambooth.api.termination import TerminationSummary
from dreambooth.operator.naming import JOB_NAME_LABEL, MANAGED_BY_LABEL, MANAGER
from kubesim.api import FaultShare, decls_from_crd
from kubesim.controllers import GarbageCollector, JobController, Kubelet
from kubesim.kube import Kube, running_kube
from kubesim.net import free_port
from kubesim.procs import stop_process

NAMESPACE = "default"
CHILD_KINDS = ("jobs", "configmaps", "services")
FINAL = ("Succeeded", "Failed")
#: phases in the order a job goes through them; a retry may go back to Pending
ORDER = {
    "Pending": 0,
    "Initializing": 1,
    "GeneratingClassImages": 2,
    "Training": 3,
    "Exporting": 4,
    "Suspended": 0,
    "Succeeded": 9,
    "Failed": 9,
}
AIM_WAIT_S = 5.0  # an aimed kill whose moment does not come this soon is a random one


# --- each job's fate ---------------------------------------------------------------------


@dataclass(frozen=True)
class Fate:
    outcome: str  # succeed, retry (fails once, retryably, then succeeds), fail (BadData)
    run_s: float  # how long each of its pods runs

    @property
    def phase(self) -> str:
        return "Failed" if self.outcome == "fail" else "Succeeded"

    @property
    def restarts(self) -> int:
        """``status.restarts``: the failures that counted against the backoff limit
        (docs/operator.md), the final BadData one included."""
        return 0 if self.outcome == "succeed" else 1


def draw_fates(rng: random.Random, n: int, retry: float, fail: float, run_s: tuple[float, float]) -> dict[str, Fate]:
    fates = {}
    for i in range(n):
        x = rng.random()
        outcome = "retry" if x < retry else "fail" if x < retry + fail else "succeed"
        fates[job_name(i)] = Fate(outcome, rng.uniform(*run_s))
    return fates


def summary(code: ExitCode, message: str | None = None, step: int | None = None) -> str:
    """The termination message a trainer writes (the real model, dumped as the trainer does)."""
    outputs = {"model": "s3://dreambooth/default/x/model/"} if code == ExitCode.OK else None
    return TerminationSummary(
        exit_code=int(code),
        reason="Succeeded" if code == ExitCode.OK else code.name.title().replace("_", ""),
        message=message,
        step=step,
        outputs=outputs,
    ).dumps()


# --- the cluster: Job controller, kubelet, garbage collector -------------------------------


class Cluster:
    """Plays the cluster in a thread, every ``period`` s: one pass of the Job controller,
    pods started and ended as their job's fate says, the garbage collector."""

    def __init__(self, kube: Kube, fates: dict[str, Fate], period: float = 0.25, gc: bool = True) -> None:
        self.kube, self.fates, self.period, self.gc = kube, fates, period, gc
        self.jc, self.kubelet, self.collector = JobController(kube), Kubelet(kube), GarbageCollector(kube)
        self.started: dict[str, float] = {}  # pod uid -> when it began running
        self.ended: collections.Counter[str] = collections.Counter()  # job name -> pods ended
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cluster", daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        try:
            while not self._stop.wait(self.period):
                self.step()
        except BaseException as exc:  # noqa: BLE001  (check() raises it)
            self.error = exc

    def check(self) -> None:
        if self.error is not None:
            raise RuntimeError("the cluster's stand-ins failed") from self.error

    def step(self) -> None:
        self.jc.reconcile(NAMESPACE)
        now = time.monotonic()
        for pod in self.kube.list("Pod", NAMESPACE):
            meta, phase = pod["metadata"], (pod.get("status") or {}).get("phase")
            name = (meta.get("labels") or {}).get(JOB_NAME_LABEL)
            fate = self.fates.get(name)
            if fate is None or phase in FINAL or meta.get("deletionTimestamp"):
                continue
            if phase != "Running":
                self.kubelet.run(pod)
                self.started[meta["uid"]] = now
            elif now - self.started.setdefault(meta["uid"], now) >= fate.run_s:
                self.end(pod, name, fate)
        self.jc.reconcile(NAMESPACE)
        if self.gc:
            self.collector.collect()

    def end(self, pod: dict, name: str, fate: Fate) -> None:
        attempt = self.ended[name]
        self.ended[name] += 1
        if fate.outcome == "fail":
            self.kubelet.fail(
                pod,
                int(ExitCode.BAD_DATA),
                message=summary(ExitCode.BAD_DATA, "no instance photos found under s3://training-data/x/ (on purpose)"),
            )
        elif fate.outcome == "retry" and attempt == 0:
            self.kubelet.fail(
                pod,
                int(ExitCode.STORAGE_UNAVAILABLE),
                message=summary(ExitCode.STORAGE_UNAVAILABLE, "storage unreachable (on purpose)", step=40),
            )
        else:
            self.kubelet.succeed(pod, message=summary(ExitCode.OK, step=100))


# --- what the emulator saw ------------------------------------------------------------------


def _ours(obj: dict) -> bool:
    return JOB_NAME_LABEL in (obj["metadata"].get("labels") or {})


#: the moments a kill may be aimed at, each a test of the write just stored; "random": none
AIMS = {
    # a job's ConfigMap created, its trainer Job not yet
    "between children": lambda plural, kind, obj, old: plural == "configmaps" and kind == "ADDED" and _ours(obj),
    # a trainer Job created, the status that says so not yet written
    "before the first status": lambda plural, kind, obj, old: plural == "jobs" and kind == "ADDED" and _ours(obj),
    # a status written (the operator has not seen the answer)
    "after a status write": lambda plural, kind, obj, old: (
        plural == "dreamboothjobs"
        and kind == "MODIFIED"
        and (obj.get("status") or {}) != ((old or {}).get("status") or {})
    ),
}


@dataclass
class Ledger:
    """Every change the emulator stored, as it stored it (a change hook on its loop)."""

    live: dict[str, str] = field(default_factory=dict)  # DreamBoothJob uid -> name
    names: dict[str, str] = field(default_factory=dict)  # uid -> name, all ever seen
    deleted: set[str] = field(default_factory=set)  # uids of deleted DreamBoothJobs
    created: dict[tuple[str, str], list[str]] = field(default_factory=lambda: collections.defaultdict(list))
    late_children: list[str] = field(default_factory=list)  # created after their owner was deleted
    regressions: list[str] = field(default_factory=list)
    final: dict[str, dict] = field(default_factory=dict)  # name -> the status that first showed a final phase
    final_at: dict[str, float] = field(default_factory=dict)
    status_writes: int = 0
    #: an aimed kill: SIGKILL ``pid`` right after the first write of this kind is stored
    #: (before the operator has its answer); ``fired`` once it was sent
    aim: str | None = None
    pid: int = 0
    fired: bool = False

    def __call__(self, resource: tuple[str, str, str], kind: str, obj: dict, old: dict | None) -> None:
        self.record(resource, kind, obj, old)
        if self.aim is not None and self.pid and AIMS[self.aim](resource[2], kind, obj, old):
            os.kill(self.pid, signal.SIGKILL)
            self.aim, self.fired = None, True

    def record(self, resource: tuple[str, str, str], kind: str, obj: dict, old: dict | None) -> None:
        plural, meta = resource[2], obj["metadata"]
        if plural == "dreamboothjobs":
            uid = meta["uid"]
            if kind == "DELETED":
                self.live.pop(uid, None)
                self.deleted.add(uid)
                return
            self.live[uid] = self.names[uid] = meta["name"]
            new_status, old_status = obj.get("status") or {}, (old or {}).get("status") or {}
            if new_status != old_status:
                self.status_writes += 1
                self.compare(meta["name"], old_status, new_status)
            if new_status.get("phase") in FINAL and meta["name"] not in self.final:
                self.final[meta["name"]] = copy.deepcopy(new_status)
                self.final_at[meta["name"]] = time.monotonic()
        elif plural in CHILD_KINDS and kind == "ADDED" and JOB_NAME_LABEL in (meta.get("labels") or {}):
            owners = [r["uid"] for r in meta.get("ownerReferences") or ()]
            owner = owners[0] if owners else "none"
            self.created[(owner, plural)].append(meta["name"])
            if owner not in self.live:
                self.late_children.append(f"{plural}/{meta['name']}")

    def compare(self, name: str, old: dict, new: dict) -> None:
        was, now = old.get("phase"), new.get("phase")
        problems = []
        if was and not now:
            problems.append("the phase was removed")
        elif was in FINAL and now != was:
            problems.append(f"left its final phase {was} for {now}")
        elif (
            was
            and now
            and ORDER[now] < ORDER[was]
            and not (now == "Pending" and new.get("restarts", 0) > old.get("restarts", 0))
        ):
            problems.append(f"went back from {was} to {now} without a restart")
        if new.get("restarts", 0) < old.get("restarts", 0):
            problems.append(f"restarts dropped from {old.get('restarts')} to {new.get('restarts')}")
        for stamp in ("startTime", "completionTime"):
            if old.get(stamp) and new.get(stamp) != old.get(stamp):
                problems.append(f"{stamp} changed from {old.get(stamp)} to {new.get(stamp)}")
        self.regressions += [f"{name}: {p}" for p in problems]

    def unbuilt(self) -> tuple[int, int]:
        """Live jobs with none of their children yet, and with some but not all."""
        kinds = collections.Counter(owner for (owner, _) in self.created)
        live = list(self.live)
        return sum(kinds[u] == 0 for u in live), sum(0 < kinds[u] < len(CHILD_KINDS) for u in live)

    def duplicates(self) -> list[str]:
        """Children beyond one of each kind per DreamBoothJob."""
        return [
            f"{self.names.get(owner, owner)}: {plural} {names}"
            for (owner, plural), names in self.created.items()
            if len(names) > 1
        ]


# --- the operator, killable -------------------------------------------------------------------


class Operator:
    """``python -m dreambooth.operator`` against the emulator; started, killed, restarted."""

    def __init__(self, kube: Kube, workdir: Path, poll_interval: int, api_timeout: int | None = None) -> None:
        self.health_port = free_port()
        self.env = {
            **kube.env,
            "DREAMBOOTH_POLL_INTERVAL_SECONDS": str(poll_interval),
            **({"DREAMBOOTH_API_TIMEOUT_SECONDS": str(api_timeout)} if api_timeout else {}),
            "DREAMBOOTH_METRICS_PORT": str(free_port()),
            "DREAMBOOTH_HEALTH_PORT": str(self.health_port),
            "DREAMBOOTH_TRAINER_METRICS_PORT": str(free_port()),
        }  # nothing listens: no metrics
        self.log_path = workdir / "operator.log"
        self.proc: subprocess.Popen | None = None
        self.starts = self.kills = self.exits = 0
        self.exit_codes: list[int] = []
        self.cpu_s = 0.0

    def start(self) -> None:
        self.starts += 1
        with open(self.log_path, "a") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "dreambooth.operator"], env=self.env, stdout=log, stderr=subprocess.STDOUT
            )

    def up(self) -> bool:
        """Whether its liveness endpoint answers (kopf runs)."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/healthz", timeout=1):
                return True
        except OSError:
            return False

    def wait_up(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not self.up():
            self.reap()
            if time.monotonic() > deadline:
                raise SystemExit(f"the operator did not come up:\n{self.log()[-3000:]}")
            time.sleep(0.05)

    def reap(self) -> bool:
        """True (and restarted) if it exited without the bench killing it."""
        if self.proc is None or self.proc.poll() is None:
            return False
        self.exits += 1
        self.exit_codes.append(self.proc.returncode)
        self.start()
        return True

    def note_cpu(self) -> None:
        """Count its CPU so far (a process killed by the change hook cannot be read after)."""
        with contextlib.suppress(OSError):
            self.cpu_s += cpu_seconds(self.proc.pid)

    def kill(self) -> None:
        self.note_cpu()
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.kills += 1

    def stop(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(OSError):
                self.cpu_s += cpu_seconds(self.proc.pid)
            stop_process(self.proc, timeout=30)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


# --- kills and faults: jobs created, run and deleted ------------------------------------------


def job_document(name: str) -> dict:
    doc = copy.deepcopy(JOB)
    doc["metadata"]["name"] = name
    return doc


def leftovers(kube: Kube) -> dict[str, int]:
    return {kind: len(kube.list(kind, NAMESPACE)) for kind in ("dbj", *CHILD_KINDS, "pods")}


def orphans(kube: Kube) -> list[str]:
    """Children of the operator (and pods) with no owner left, or none at all."""
    alive = {o["metadata"]["uid"] for kind in ("dbj", "jobs") for o in kube.list(kind, NAMESPACE)}
    found = []
    for kind in (*CHILD_KINDS, "pods"):
        for obj in kube.list(kind, NAMESPACE):
            meta = obj["metadata"]
            ours = (meta.get("labels") or {}).get(MANAGED_BY_LABEL) == MANAGER or kind == "pods"
            refs = meta.get("ownerReferences") or ()
            if ours and not any(r.get("uid") in alive for r in refs):
                found.append(f"{kind}/{meta['name']}")
    return found


def churn(args: argparse.Namespace, kills: int, share: FaultShare | None) -> dict:
    """Create ``args.jobs`` jobs at ``args.rate``/s; delete each once it shows its final
    phase; kill the operator ``kills`` times meanwhile; wait until nothing is left."""
    rng = random.Random(args.seed)
    fates = draw_fates(rng, args.jobs, args.retry, args.fail, (args.run_min_s, args.run_max_s))
    deadline = time.monotonic() + args.max_minutes * 60
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="operator-chaos-")))
        kube = stack.enter_context(running_kube(workdir, resources=decls_from_crd(crd.crd())))
        ledger = Ledger()
        stack.callback(kube.on_change(ledger))
        op = Operator(kube, workdir, args.poll_interval, getattr(args, "api_timeout", None))
        stack.callback(op.stop)
        cluster = stack.enter_context(Cluster(kube, fates))
        op.start()
        op.wait_up()
        if share is not None:
            kube.fault_share(share)
        started = time.monotonic()
        to_delete: dict[str, float] = {}
        deleted: set[str] = set()
        created = 0
        # kill k at a random moment of the k-th of `kills` equal slices of the creation
        # window, or as soon as the operator is up again if it is not yet by then
        window = args.jobs / args.rate
        kill_times = [started + (k + rng.random()) * window / kills for k in range(kills)]
        kinds = ("random", *AIMS)
        aims = [kinds[k % len(kinds)] for k in range(kills)]  # as many of each, in a random order
        rng.shuffle(aims)
        armed: tuple[str, float] | None = None  # an aimed kill waiting for its moment
        by_aim: collections.Counter[str] = collections.Counter()
        last_kill = None
        kill_moments: list[float] = []

        def record_kill(aim: str) -> None:
            nonlocal armed, last_kill
            armed, last_kill = None, time.monotonic()
            by_aim[aim] += 1
            op.start()
            print(
                f"kill {op.kills:3d} ({aim}) at {time.monotonic() - started:6.1f} s: {created} jobs created, "
                f"{len(ledger.final)} final, {len(deleted)} deleted",
                flush=True,
            )

        in_flight: list[int] = []  # jobs created and not yet final, at each kill
        unbuilt: list[tuple[int, int]] = []  # jobs without children / with some, at each kill

        while time.monotonic() < deadline:
            now = time.monotonic()
            cluster.check()
            if armed is not None and ledger.fired:  # an aimed kill went off
                op.proc.wait()
                op.kills += 1
                record_kill(armed[0])
            elif armed is not None and now - armed[1] > AIM_WAIT_S:  # it did not come: a random one
                ledger.aim = None
                if not ledger.fired and op.proc.poll() is None:
                    aim, armed = armed[0], None
                    op.kill()
                    record_kill(f"{aim} (not seen: random)")
                elif not ledger.fired:
                    armed = None  # it exited by itself: reap() counts it
            if armed is None:  # (while armed, the hook may kill it at any moment)
                op.reap()
            while created < args.jobs and now >= started + created / args.rate:
                kube.create(job_document(job_name(created)))
                created += 1
            for name in [n for n in list(ledger.final) if n not in to_delete]:  # the hook adds to it meanwhile
                to_delete[name] = now + rng.uniform(0, args.delete_max_s)
            for name, when in list(to_delete.items()):
                if when <= now and name not in deleted:
                    kube.delete("dbj", NAMESPACE, name, missing_ok=True)
                    deleted.add(name)
            if armed is None and op.kills < kills and now >= kill_times[op.kills] and op.up():
                kill_moments.append(round(now - started, 2))
                in_flight.append(created - len(ledger.final))
                unbuilt.append(ledger.unbuilt())
                aim = aims[op.kills]
                if aim == "random":
                    op.kill()
                    record_kill(aim)
                else:  # the hook kills it at the next such write
                    op.note_cpu()
                    ledger.fired, ledger.pid, ledger.aim = False, op.proc.pid, aim
                    armed = (aim, now)
            if created == args.jobs and len(deleted) == args.jobs and op.kills >= kills:
                left = leftovers(kube)
                if not any(left.values()):
                    break
            time.sleep(0.05)
        converged = time.monotonic()
        kube.fault_share(None)
        left = leftovers(kube)
        cluster.gc = False
        time.sleep(2 * args.poll_interval + 1)  # the operator's late creations, if any, stay
        left_over = orphans(kube)
        log = op.log()
        op.stop()
        wrong = [
            f"{n}: {fates[n].phase}/{fates[n].restarts} expected, {s.get('phase')}/{s.get('restarts', 0)} shown"
            for n, s in ledger.final.items()
            if (s.get("phase"), s.get("restarts", 0)) != (fates[n].phase, fates[n].restarts)
        ]
        never = sorted(job_name(i) for i in range(created) if job_name(i) not in ledger.final)
        report = {
            "jobs": args.jobs,
            "created": created,
            "fates": dict(collections.Counter(f.outcome for f in fates.values())),
            "kills": op.kills,
            "operator_starts": op.starts,
            "operator_exits_not_killed": op.exits,
            "exit_codes": op.exit_codes,
            "tracebacks_in_log": log.count("Traceback"),
            "warnings_in_log": log.count(" WARNING "),
            "errors_in_log": log.count(" ERROR ") + log.count(" CRITICAL "),
            "duplicates": ledger.duplicates(),
            "status_regressions": ledger.regressions,
            "never_final": never,
            "wrong_final": wrong,
            "late_children": len(ledger.late_children),
            "orphans": left_over,
            "left_at_end": left,
            "status_writes": ledger.status_writes,
            "operator_cpu_s": round(op.cpu_s, 1),
            "total_s": round(converged - started, 1),
            "converged_after_last_kill_s": round(converged - last_kill, 1) if last_kill else None,
            "kill_moments_s": kill_moments,
            "kills_by_aim": dict(by_aim),
            "jobs_in_flight_at_kills": {
                "min": min(in_flight),
                "mean": round(sum(in_flight) / len(in_flight), 1),
                "max": max(in_flight),
            }
            if in_flight
            else None,
            # what the kills interrupted: jobs not yet given any child, or only some
            "kills_with_jobs_unbuilt": sum(a > 0 for a, _ in unbuilt),
            "kills_with_jobs_half_built": sum(b > 0 for _, b in unbuilt),
            "timed_out": converged >= deadline,
        }
        if share is not None:
            report["faults"] = dict(share.counts)
            report["fault_share"] = {
                "conflict": share.conflict,
                "error": share.error,
                "hang": share.hang,
                "hang_s": share.hang_s,
            }
        if args.log_dir:
            args.log_dir.mkdir(parents=True, exist_ok=True)
            (args.log_dir / "operator.log").write_text(log)
    return report


# --- mass delete ---------------------------------------------------------------------------------


def mass_delete(args: argparse.Namespace) -> dict:
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="operator-chaos-")))
        kube = stack.enter_context(running_kube(workdir, resources=decls_from_crd(crd.crd())))
        ledger = Ledger()
        stack.callback(kube.on_change(ledger))
        op = Operator(kube, workdir, args.poll_interval)
        stack.callback(op.stop)
        op.start()
        op.wait_up()
        deadline = time.monotonic() + args.max_minutes * 60
        for i in range(args.jobs):
            kube.create(job_document(job_name(i)))

        def children_made() -> bool:
            kinds = collections.Counter(plural for (_, plural) in ledger.created)
            return all(kinds[k] >= args.jobs for k in CHILD_KINDS)

        while not children_made() and time.monotonic() < deadline:
            time.sleep(0.1)
        JobController(kube).reconcile(NAMESPACE)  # each Job's pod
        before = leftovers(kube)
        print(f"before the delete: {before}", flush=True)
        collector = GarbageCollector(kube)
        started = time.monotonic()
        deleted = kube.delete_all("dbj", NAMESPACE)
        passes = collected = 0
        while time.monotonic() < deadline:
            passes += 1
            collected += len(collector.collect())
            if not any(leftovers(kube).values()):
                break
            time.sleep(0.2)
        settled = time.monotonic() - started
        time.sleep(2 * args.poll_interval + 1)  # what the operator still does, without the GC
        left_over, left = orphans(kube), leftovers(kube)
        log = op.log()
        op.stop()
    return {
        "jobs": args.jobs,
        "before": before,
        "deleted_at_once": deleted,
        "gc_passes": passes,
        "collected": collected,
        "settle_s": round(settled, 2),
        "orphans": left_over,
        "left_at_end": left,
        "late_children": len(ledger.late_children),
        "duplicates": ledger.duplicates(),
        "operator_exits_not_killed": op.exits,
        "tracebacks_in_log": log.count("Traceback"),
    }


# --- command line ------------------------------------------------------------------------------


def table(report: dict) -> str:
    rows = []
    for key, value in report.items():
        shown = len(value) if isinstance(value, list) and key not in ("kill_moments_s", "exit_codes") else value
        rows.append(f"| {key} | {shown} |")
    return "| figure | value |\n|---|---|\n" + "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="bench", required=True)
    k = sub.add_parser("kills", help="SIGKILL the operator at random moments while jobs come and go")
    k.add_argument("--jobs", type=int, default=200)
    k.add_argument("--kills", type=int, default=20)
    f = sub.add_parser("faults", help="the API answers 409/500/cuts a share of requests")
    f.add_argument("--jobs", type=int, default=100)
    f.add_argument("--conflict", type=float, default=0.05, help="share of writes answered 409")
    f.add_argument("--error", type=float, default=0.07, help="share of requests answered 500")
    f.add_argument("--hang", type=float, default=0.03, help="share of requests held, then cut")
    f.add_argument("--hang-s", type=float, default=600.0, help="how long a held request is held (600: never, here)")
    f.add_argument("--api-timeout", type=int, default=5, help="the operator's DREAMBOOTH_API_TIMEOUT_SECONDS")
    for p in (k, f):
        p.add_argument("--rate", type=float, default=2.0, help="jobs created per second")
        p.add_argument("--retry", type=float, default=0.15, help="share of jobs failing once, retryably")
        p.add_argument("--fail", type=float, default=0.1, help="share of jobs failing for good (BadData)")
        p.add_argument("--run-min-s", type=float, default=0.5)
        p.add_argument("--run-max-s", type=float, default=3.0)
        p.add_argument("--delete-max-s", type=float, default=2.0, help="a final job is deleted 0 to this many s after")
    m = sub.add_parser("mass-delete", help="delete 1,000 jobs with children at once")
    m.add_argument("--jobs", type=int, default=1000)
    for p in (k, f, m):
        p.add_argument("--poll-interval", type=int, default=2)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--max-minutes", type=float, default=15)
        p.add_argument("--json", type=Path, help="write the figures here")
        p.add_argument("--log-dir", type=Path, help="write the operator's log here")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds: the operator is stopped
    if args.bench == "kills":
        report = churn(args, args.kills, None)
    elif args.bench == "faults":
        report = churn(
            args,
            0,
            FaultShare(conflict=args.conflict, error=args.error, hang=args.hang, hang_s=args.hang_s, seed=args.seed),
        )
    else:
        report = mass_delete(args)
    print(table(report))
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
