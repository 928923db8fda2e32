"""The operator under load: N DreamBoothJobs against the API emulator.

    .venv/bin/python bench/operator_scale.py [--jobs 100 1000]             # one burst
    .venv/bin/python bench/operator_scale.py --jobs 1000 --rate 50 100     # paced arrival
    .venv/bin/python bench/operator_scale.py --jobs 100 1000 --freshness   # + N jobs training
    .venv/bin/python bench/operator_scale.py --jobs 1000 --freshness --baseline main --repeat 2

Runs the real operator (``python -m dreambooth.operator``) as a process against the
stateful API emulator of the simulated cluster (kubesim/kube.py, in this process), serving
DreamBoothJobs as the CRD names them, without its schema (no CEL cost in these numbers).

Arrival (always): creates N jobs, at once (``--rate 0``, the default) or at a steady rate
of R jobs/s (``--rate R``, as ``kubectl apply -f dir/`` would), and prints: time from
create to the trainer Job existing (p50/p99), time to the first status (phase Pending),
time until all jobs converged, the operator's CPU until then, and its RSS when idle and at
its peak (after two more poll cycles). Several rates give one run (and row) each.

Freshness (``--freshness``): then plays the Job controller and the kubelet
(kubesim/controllers.py): each job's rank-0 pod runs with a pod IP of its own
(127.0.x.y, all loopback). One HTTP server in a subprocess, bound to 0.0.0.0 on the port
the operator is told trainers use (DREAMBOOTH_TRAINER_METRICS_PORT), stands in for all N
trainers: it tells them apart by the address a request arrived on and serves the trainer's
real metrics (dreambooth/trainer/metrics.py) with phase training and a step that advances
with wall time (STEPS_PER_SECOND), so the step in a job's ``.status.progress`` says when
it was read. After WARMUP_CYCLES poll cycles it samples every job's status SAMPLES times
over MEASURE_CYCLES cycles and prints the age of the progress shown (now - when the shown
step was current, rounded up to 1 / STEPS_PER_SECOND: what ``kubectl get`` shows)
p50/p99/max, the jobs that lacked progress in any sample, the poll cycle's length (from
the scrapes the server counted) and the operator's CPU seconds per cycle.

Before/after (``--baseline REV``): each measurement runs twice, the operator of git
revision REV (its ``dreambooth`` package exported with ``git archive`` and put first on
the operator's PYTHONPATH; emulator and bench are this tree's) and this tree's, alternating
(``--repeat K``: K pairs), so that both see the same phase of a machine whose speed
varies between runs. Each row then starts with the code it measured.

Arrival times are taken by the emulator as it stores each object (kubesim/kube.py's
``on_change``), not by polling it.

Results and the commands are in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import copy
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dreambooth.api import crd
from dreambooth.operator.naming import JOB_NAME_LABEL
from kubesim.api import decls_from_crd
from kubesim.controllers import INDEX, JobController, Kubelet
from kubesim.kube import Kube, running_kube
from kubesim.net import free_port
from kubesim.procs import stop_process

JOB = {
    "apiVersion": "dreambooth.io/v1alpha1",
    "kind": "DreamBoothJob",
    "metadata": {"namespace": "default"},
    "spec": {
        "preset": "object",
        "baseModel": {"uri": "s3://models/sd15/"},
        "instance": {"uri": "s3://training-data/toy-cat/", "prompt": "a photo of zwx toy cat"},
    },
}
NAMESPACE = "default"

#: the fake trainers' pace: the age of a status is known to 1 / STEPS_PER_SECOND s
STEPS_PER_SECOND = 10
TOTAL_STEPS = 10**8  # never reached: every job stays in training
#: the trainer server's own address; trainers (pods) get 127.0.1.1 and up
CONTROL_IP = "127.0.0.1"
WARMUP_CYCLES = 2
MEASURE_CYCLES = 3
SAMPLES = 11  # over MEASURE_CYCLES cycles: phases of the poll cycle ~0.9 s apart


# --- small helpers -----------------------------------------------------------------------


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def job_name(i: int) -> str:
    return f"job-{i:04d}"


def pod_ip(i: int) -> str:
    """The ``i``-th trainer's pod IP: 127.0.1.1, 127.0.1.2, ... (never CONTROL_IP)."""
    return f"127.0.{1 + i // 254}.{1 + i % 254}"


# --- the operator against the emulator -----------------------------------------------------


@contextlib.contextmanager
def operator_process(
    kube: Kube, workdir: Path, poll_interval: int, trainer_port: int | None, source: Path | None = None
) -> Iterator[subprocess.Popen]:
    """The operator (``source``: the ``dreambooth`` package under that folder, else this
    tree's), started and watching DreamBoothJobs; stopped (killed if need be) after."""
    env = {
        **kube.env,
        "DREAMBOOTH_POLL_INTERVAL_SECONDS": str(poll_interval),
        "DREAMBOOTH_METRICS_PORT": str(free_port()),
        "DREAMBOOTH_HEALTH_PORT": str(free_port()),
    }
    if source is not None:
        env["PYTHONPATH"] = str(source)
    if trainer_port:
        env["DREAMBOOTH_TRAINER_METRICS_PORT"] = str(trainer_port)
    log_path = workdir / "operator.log"
    profile = ["-m", "cProfile", "-o", os.environ["PROFILE_TO"]] if os.environ.get("PROFILE_TO") else []
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, *profile, "-m", "dreambooth.operator"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=source,
        )  # -m: the cwd comes first
        try:
            deadline = time.monotonic() + 60
            while sum(1 for m, p in kube.requests if m == "GET" and "dreamboothjobs" in p) < 2:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise SystemExit(f"the operator did not start:\n{log_path.read_text()}")
                time.sleep(0.05)
            yield proc
        finally:
            stop_process(proc, timeout=30)


# --- arrival: create -> trainer Job, create -> status ------------------------------------


def create_jobs(kube: Kube, n: int, rate: float, created: dict[str, float], stopped: threading.Event) -> None:
    """Create N jobs, job ``i`` at ``i / rate`` s (``rate`` 0: all at once), until
    ``stopped``; ``created`` gets each job's create time (another thread reads it)."""
    start = time.monotonic()
    for i in range(n):
        if stopped.wait(max(0.0, start + i / rate - time.monotonic()) if rate > 0 else 0):
            return
        job = copy.deepcopy(JOB)
        job["metadata"]["name"] = job_name(i)
        kube.create(job)
        created[job_name(i)] = time.monotonic()


class ArrivalClock:
    """When each DreamBoothJob, its trainer Job and its first status (a phase) were stored,
    timed by the emulator itself (its change hooks run on its loop, in this process): no
    polling, which at 1,000 jobs would load the emulator (a list of 1,000 Jobs takes ~0.15 s
    of its time) and round the figures up."""

    def __init__(self) -> None:
        self.created: dict[str, float] = {}
        self.job: dict[str, float] = {}
        self.status: dict[str, float] = {}

    def __call__(self, resource: tuple[str, str, str], kind: str, obj: dict, old: dict | None) -> None:
        now, plural, meta = time.monotonic(), resource[2], obj["metadata"]
        if plural == "dreamboothjobs":
            if kind == "ADDED":
                self.created.setdefault(meta["name"], now)
            elif _phase(obj) and not _phase(old):
                self.status.setdefault(meta["name"], now)
        elif plural == "jobs" and kind == "ADDED" and (meta.get("labels") or {}).get(JOB_NAME_LABEL):
            self.job.setdefault(meta["labels"][JOB_NAME_LABEL], now)


def _phase(obj: dict | None) -> str | None:
    return ((obj or {}).get("status") or {}).get("phase")


def wait_arrival(clock: ArrivalClock, n: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while (len(clock.job) < n or len(clock.status) < n) and time.monotonic() < deadline:
        time.sleep(0.05)


def measure_arrival(kube: Kube, proc: subprocess.Popen, n: int, rate: float) -> dict:
    rss_idle = peak_rss_mb(proc.pid)
    cpu_before = cpu_seconds(proc.pid)
    created: dict[str, float] = {}
    stopped = threading.Event()
    clock = ArrivalClock()
    remove_clock = kube.on_change(clock)
    with ThreadPoolExecutor(1) as pool:
        creating = pool.submit(create_jobs, kube, n, rate, created, stopped)
        try:
            wait_arrival(clock, n, max(120, n * 0.5) + (n / rate if rate else 0))
        finally:
            stopped.set()  # on an error or ^C; otherwise all jobs were created already
        creating.result()
    remove_clock()
    operator_cpu = cpu_seconds(proc.pid) - cpu_before
    job_seen, status_seen, created = clock.job, clock.status, clock.created
    to_job = [job_seen[k] - created[k] for k in job_seen if k in created]
    to_status = [status_seen[k] - created[k] for k in status_seen if k in created]
    first, last = min(created.values()), max(created.values())
    return {
        "jobs": n,
        "rate": rate,
        "achieved_rate": (n - 1) / (last - first) if rate and n > 1 else float("nan"),
        "children_p50": statistics.median(to_job),
        "children_p99": percentile(to_job, 0.99),
        "status_p50": statistics.median(to_status),
        "status_p99": percentile(to_status, 0.99),
        "converged_s": max(status_seen.values(), default=float("nan")) - first,
        "missing": n - len(status_seen),
        "operator_cpu_s": operator_cpu,
        "rss_idle_mb": rss_idle,
    }


# --- freshness: N trainers serving metrics -------------------------------------------------


class TrainerEndpoints:
    """The fake trainers' server (:func:`serve_trainers`) as a subprocess, so that it does
    not compete with the emulator for this process's GIL. Talks to it on CONTROL_IP."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--serve-trainers"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        line = self.proc.stdout.readline()  # its port, once it listens
        if not line.strip().isdigit():
            stop_process(self.proc, timeout=30)
            raise SystemExit("the trainers' metrics server did not start")
        self.port = int(line)

    def _call(self, path: str, body: dict | None = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        with urllib.request.urlopen(f"http://{CONTROL_IP}:{self.port}{path}", data, timeout=30) as r:
            return json.load(r)

    def start_training(self, started: dict[str, float]) -> None:
        """From now on, answer on these pod IPs: step = (time.time() - start) x pace."""
        self._call("/trainers", started)

    def scrapes(self) -> int:
        """Scrapes answered so far, all trainers."""
        return self._call("/scrapes")["total"]

    def close(self) -> None:
        self.proc.stdin.close()  # it exits on EOF (also when this process dies)
        stop_process(self.proc, timeout=30)


def serve_trainers() -> None:
    """Run by the subprocess: serve ``/metrics`` of every trainer on 0.0.0.0 (a free port,
    printed on stdout), each trainer's by the local address of the request; on CONTROL_IP,
    POST /trainers registers trainers, GET /scrapes counts scrapes. Exits at stdin's EOF."""
    from aiohttp import web
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    from dreambooth.trainer.metrics import TrainerMetrics

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's ^C: the bench stops it
    started: dict[str, float] = {}
    scrapes: collections.Counter[str] = collections.Counter()
    metrics = TrainerMetrics()  # one registry, its step set per request (one thread)
    metrics.phase.state("training")
    metrics.total_steps.set(TOTAL_STEPS)
    metrics.loss.set(0.1234)
    metrics.learning_rate.set(1e-6)
    metrics.images_per_second.set(8.0)

    async def control(request: web.Request) -> web.Response:
        if request.method == "POST" and request.path == "/trainers":
            started.update(await request.json())
            return web.json_response({"trainers": len(started)})
        if request.path == "/scrapes":
            return web.json_response({"total": sum(scrapes.values())})
        return web.Response(status=404)

    async def handle(request: web.Request) -> web.Response:
        local = request.transport.get_extra_info("sockname")[0] if request.transport else None
        if local == CONTROL_IP:
            return await control(request)
        start = started.get(local)
        if start is None or request.path != "/metrics":
            return web.Response(status=404)
        scrapes[local] += 1
        metrics.step.set(int((time.time() - start) * STEPS_PER_SECOND))
        return web.Response(body=generate_latest(metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def main() -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        sock = socket.create_server(("0.0.0.0", 0), backlog=1024)
        await web.SockSite(runner, sock).start()
        print(sock.getsockname()[1], flush=True)
        try:
            await asyncio.to_thread(sys.stdin.read)  # until the bench closes stdin or dies
        finally:
            await runner.cleanup()

    asyncio.run(main())


def run_trainers(kube: Kube) -> dict[str, tuple[str, float]]:
    """Play the Job controller and kubelet: every Job's rank-0 pod created and Running
    with its own pod IP. Returns job -> (pod IP, when it started running)."""
    controller, kubelet = JobController(kube), Kubelet(kube)
    controller.reconcile(NAMESPACE)  # pods for every Job
    pods = [p for p in kube.list("Pod", NAMESPACE) if p["metadata"]["annotations"].get(INDEX) == "0"]
    running: dict[str, tuple[str, float]] = {}
    for i, pod in enumerate(sorted(pods, key=lambda p: p["metadata"]["name"])):
        kubelet.run(pod, ip=pod_ip(i))
        running[pod["metadata"]["labels"][JOB_NAME_LABEL]] = (pod_ip(i), time.time())
    controller.reconcile(NAMESPACE)  # the Jobs' active/ready counts
    return running


def progress_ages(kube: Kube, running: dict[str, tuple[str, float]]) -> dict[str, float | None]:
    """Each job's status now: the age of its progress (None: no progress shown)."""
    before = time.time()
    jobs = kube.list("dbj", NAMESPACE)
    now = (before + time.time()) / 2  # the list is one snapshot taken in between
    ages: dict[str, float | None] = {}
    for d in jobs:
        name = d["metadata"]["name"]
        progress = (d.get("status") or {}).get("progress") or {}
        if name not in running or not progress.get("step"):
            ages[name] = None
            continue
        current_since = running[name][1] + progress["step"] / STEPS_PER_SECOND
        ages[name] = now - current_since
    return ages


def measure_freshness(kube: Kube, proc: subprocess.Popen, trainers: TrainerEndpoints, poll_interval: int) -> dict:
    running = run_trainers(kube)
    trainers.start_training({ip: start for ip, start in running.values()})
    time.sleep(WARMUP_CYCLES * poll_interval)
    cpu_before, scrapes_before, t_before = cpu_seconds(proc.pid), trainers.scrapes(), time.monotonic()
    ages: list[float] = []
    without: set[str] = set()
    spacing = MEASURE_CYCLES * poll_interval / SAMPLES
    for k in range(SAMPLES):
        time.sleep(max(0.0, t_before + k * spacing - time.monotonic()))
        for name, age in progress_ages(kube, running).items():
            if age is None:
                without.add(name)
            else:
                ages.append(age)
    time.sleep(max(0.0, t_before + MEASURE_CYCLES * poll_interval - time.monotonic()))
    cycles = (trainers.scrapes() - scrapes_before) / len(running)
    return {
        "jobs": len(running),
        "age_p50": statistics.median(ages) if ages else float("nan"),
        "age_p99": percentile(ages, 0.99),
        "age_max": max(ages, default=float("nan")),
        "without_progress": len(without),
        "cycle_s": (time.monotonic() - t_before) / cycles if cycles else float("nan"),
        "cpu_per_cycle_s": (cpu_seconds(proc.pid) - cpu_before) / cycles if cycles else float("nan"),
        "rss_peak_mb": peak_rss_mb(proc.pid),
    }


# --- one run, tables -----------------------------------------------------------------------


def export_source(rev: str, into: Path) -> Path:
    """The ``dreambooth`` package of git revision ``rev``, under ``into`` (checked: an
    operator started with it on PYTHONPATH imports that copy, not this tree's)."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "dreambooth"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    found = subprocess.run(
        [sys.executable, "-c", "import dreambooth.operator as o; print(o.__file__)"],
        env={**os.environ, "PYTHONPATH": str(into)},
        cwd=into,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if not Path(found).is_relative_to(into):
        raise SystemExit(f"the operator of {rev} would not be used: {found}")
    return into


def measure(
    n: int, poll_interval: int, rate: float, freshness: bool, source: Path | None = None
) -> tuple[dict, dict | None]:
    """One operator, N jobs: arrival (and, with ``freshness``, N jobs training)."""
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        kube = stack.enter_context(running_kube(workdir, resources=decls_from_crd(crd.crd())))
        trainers = TrainerEndpoints() if freshness else None
        if trainers is not None:
            stack.callback(trainers.close)
        proc = stack.enter_context(
            operator_process(kube, workdir, poll_interval, trainers.port if trainers else None, source)
        )
        arrival = measure_arrival(kube, proc, n, rate)
        time.sleep(poll_interval * 2)  # a full poll cycle over every job, for the peak RSS
        arrival["rss_peak_mb"] = peak_rss_mb(proc.pid)
        fresh = measure_freshness(kube, proc, trainers, poll_interval) if trainers else None
        return arrival, fresh


def arrival_row(r: dict) -> str:
    arrival = "burst" if not r["rate"] else f"{r['rate']:g}/s"
    notes = []
    if r["rate"] and r["achieved_rate"] < 0.95 * r["rate"]:
        notes.append(f"created at only {r['achieved_rate']:.0f}/s")
    if r["missing"]:
        notes.append(f"{r['missing']} never got a status")
    return (
        f"| {r['jobs']} | {arrival} | {r['children_p50']:.3f} | {r['children_p99']:.3f} "
        f"| {r['status_p50']:.3f} | {r['status_p99']:.3f} | {r['converged_s']:.1f} "
        f"| {r['operator_cpu_s']:.1f} | {r['rss_idle_mb']:.0f} | {r['rss_peak_mb']:.0f} |"
        + (f" ({'; '.join(notes)})" if notes else "")
    )


def freshness_row(r: dict) -> str:
    return (
        f"| {r['jobs']} | {r['age_p50']:.1f} | {r['age_p99']:.1f} | {r['age_max']:.1f} "
        f"| {r['without_progress']} | {r['cycle_s']:.1f} | {r['cpu_per_cycle_s']:.2f} "
        f"| {r['rss_peak_mb']:.0f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, nargs="+", default=[100, 1000])
    parser.add_argument(
        "--rate",
        type=float,
        nargs="+",
        default=[0.0],
        help="jobs created per second (0: all in one burst); one run per value",
    )
    parser.add_argument(
        "--freshness",
        action="store_true",
        help="then run every job's trainer and measure how fresh .status.progress is",
    )
    parser.add_argument("--poll-interval", type=int, default=10)
    parser.add_argument(
        "--baseline", metavar="REV", help="measure the operator of this git revision too, alternating with this tree's"
    )
    parser.add_argument("--repeat", type=int, default=1, help="measurements (pairs with --baseline) per row kind")
    parser.add_argument("--serve-trainers", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_trainers:
        return serve_trainers()
    # SIGTERM unwinds like ^C: the operator and the trainers' server are stopped
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with tempfile.TemporaryDirectory() as exported:
        codes: list[tuple[str, Path | None]] = [("this tree", None)]
        if args.baseline:
            codes.insert(0, (args.baseline, export_source(args.baseline, Path(exported))))
        run(args, codes)


def run(args: argparse.Namespace, codes: list[tuple[str, Path | None]]) -> None:
    code = "| code " if len(codes) > 1 else ""

    def labelled(label: str, row: str) -> str:
        return f"| {label} {row}" if code else row

    print(
        f"{code}| jobs | arrival | create -> Job p50 s | p99 s | create -> status p50 s | p99 s "
        "| all converged s | operator CPU s | operator RSS idle MB | peak MB |"
    )
    print("|---" * (10 + bool(code)) + "|", flush=True)
    fresh_rows = []
    for n in args.jobs:
        for rate in args.rate:
            for _ in range(args.repeat):
                for label, source in codes:
                    arrival, fresh = measure(n, args.poll_interval, rate, args.freshness, source)
                    print(labelled(label, arrival_row(arrival)), flush=True)
                    if fresh is not None:
                        fresh_rows.append(labelled(label, freshness_row(fresh)))
    if fresh_rows:
        print(f"\nStatus freshness while the jobs train (poll interval {args.poll_interval} s):\n")
        print(
            f"{code}| jobs | progress age p50 s | p99 s | max s | jobs without progress | poll cycle s "
            "| operator CPU s / cycle | operator RSS peak MB |"
        )
        print("|---" * (8 + bool(code)) + "|")
        print("\n".join(fresh_rows))


if __name__ == "__main__":
    main()
