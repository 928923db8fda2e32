"""The operator under load: N DreamBoothJobs created in a burst against the API emulator.

    .venv/bin/python bench/operator_scale.py [--jobs 100 1000]

Runs the real operator (``python -m dreambooth.operator``) as a process against the
stateful API emulator of the test suite (tests/support/kube.py, in this process), creates N
jobs at once, and prints: time from create to the trainer Job existing (p50/p99), time to
the first status (phase Pending), time until all jobs converged, status freshness once a
poll cycle has passed (age of .status.progress... here: of the last status write), and the
operator's peak RSS. Results and the command are in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.kube import running_kube  # noqa: E402
from tests.support.net import free_port  # noqa: E402

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


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def measure(n: int, poll_interval: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp, running_kube(Path(tmp)) as kube:
        env = {**kube.env, "DREAMBOOTH_POLL_INTERVAL_SECONDS": str(poll_interval),
               "DREAMBOOTH_METRICS_PORT": str(free_port()), "DREAMBOOTH_HEALTH_PORT": str(free_port())}
        log = open(Path(tmp) / "operator.log", "w")
        profile = ["-m", "cProfile", "-o", os.environ["PROFILE_TO"]] if os.environ.get("PROFILE_TO") else []
        proc = subprocess.Popen([sys.executable, *profile, "-m", "dreambooth.operator"], env=env, stdout=log,
                                stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 60
            while sum(1 for m, p in kube.requests if m == "GET" and "dreamboothjobs" in p) < 2:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise SystemExit(f"the operator did not start:\n{(Path(tmp) / 'operator.log').read_text()}")
                time.sleep(0.05)
            rss_idle = peak_rss_mb(proc.pid)
            cpu_before = cpu_seconds(proc.pid)
            created: dict[str, float] = {}
            for i in range(n):
                job = copy.deepcopy(JOB)
                job["metadata"]["name"] = f"job-{i:04d}"
                kube.create(job)
                created[f"job-{i:04d}"] = time.monotonic()
            job_seen: dict[str, float] = {}
            status_seen: dict[str, float] = {}
            deadline = time.monotonic() + max(120, n * 0.5)
            # The emulator shares this process: poll gently (every 0.2 s) so that the
            # measurement does not become the load; times are rounded up to the poll.
            while (len(job_seen) < n or len(status_seen) < n) and time.monotonic() < deadline:
                time.sleep(0.2)
                now = time.monotonic()
                if len(job_seen) < n:
                    for j in kube.list("jobs", "default"):
                        job_seen.setdefault(j["metadata"]["name"].removesuffix("-trainer"), now)
                for d in kube.list("dbj", "default"):
                    if (d.get("status") or {}).get("phase"):
                        status_seen.setdefault(d["metadata"]["name"], now)
            converged = max(status_seen.values(), default=float("nan")) - min(created.values())
            operator_cpu = cpu_seconds(proc.pid) - cpu_before
            # after a full poll cycle every job's status has been rewritten or found unchanged
            time.sleep(poll_interval * 2)
            to_job = [job_seen[k] - created[k] for k in job_seen]
            to_status = [status_seen[k] - created[k] for k in status_seen]
            return {
                "jobs": n,
                "children_p50": statistics.median(to_job),
                "children_p99": percentile(to_job, 0.99),
                "status_p50": statistics.median(to_status),
                "status_p99": percentile(to_status, 0.99),
                "converged_s": converged,
                "missing": n - len(status_seen),
                "operator_cpu_s": operator_cpu,
                "rss_idle_mb": rss_idle,
                "rss_peak_mb": peak_rss_mb(proc.pid),
            }
        finally:
            proc.terminate()
            proc.wait(timeout=30)
            log.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--poll-interval", type=int, default=10)
    args = parser.parse_args()
    print("| jobs | create -> Job p50 s | p99 s | create -> status p50 s | p99 s | all converged s "
          "| operator CPU s | operator RSS idle MB | peak MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n in args.jobs:
        r = measure(n, args.poll_interval)
        print(f"| {r['jobs']} | {r['children_p50']:.2f} | {r['children_p99']:.2f} | {r['status_p50']:.2f} "
              f"| {r['status_p99']:.2f} | {r['converged_s']:.1f} | {r['operator_cpu_s']:.1f} | {r['rss_idle_mb']:.0f} | {r['rss_peak_mb']:.0f} |"
              + (f" ({r['missing']} never got a status)" if r["missing"] else ""))


if __name__ == "__main__":
    main()
