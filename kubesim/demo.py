"""``make demo-cluster``: the toy-cat example on a simulated cluster, with live output.

    .venv/bin/python -m kubesim.demo [--steps 300] [--hold]

What runs for real: the Kubernetes API (kubesim's emulator, with the CRD), the operator
(``python -m dreambooth.operator``), the trainer (``python -m dreambooth.trainer`` in a
"pod"), S3 (SeaweedFS), Prometheus (where installed) and kubectl (where installed). What
stands in for the cluster: the Job controller, a kubelet that runs pods as local processes,
the garbage collector (kubesim/cluster.py; docs/testing.md lists the differences).
It is the first end-to-end scenario (tests/e2e/test_toy_cat.py) with a longer run, printed
as it happens: what the operator does, the pods, the job's status, the trainer's log, and
at the end the outputs in S3 and what Prometheus scraped.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ["HF_HUB_OFFLINE"] = "1"

ROOT = Path(__file__).resolve().parents[1]
NAME = "toy-cat"
#: trainer lines worth showing (the rest is library noise)
TRAINER_LINE = re.compile(r"rank\d (INFO|WARNING|ERROR) dreambooth\.")
OPERATOR_LINE = re.compile(r" (INFO|WARNING|ERROR) (dreambooth\.operator|kopf\.objects)")


class Printer:
    """One line per event: seconds since start, who, what."""

    def __init__(self) -> None:
        self.start = time.monotonic()
        self.lock = threading.Lock()
        self.color = sys.stdout.isatty() and not os.environ.get("NO_COLOR")

    def __call__(self, source: str, text: str) -> None:
        colors = {
            "operator": "35",
            "status": "1;32",
            "kubectl": "36",
            "cluster": "33",
            "pod": "34",
            "prometheus": "33",
            "s3": "33",
        }
        tag = f"{source:>9}"
        if self.color:
            code = colors.get(source, "90")
            tag = f"\033[{code}m{tag}\033[0m"
        with self.lock:
            print(f"{time.monotonic() - self.start:6.1f}s {tag}  {text}", flush=True)


def echo_filter(say: Printer):
    def echo(source: str, line: str) -> None:
        if source == "operator":
            if OPERATOR_LINE.search(line):
                say("operator", line.split(" ", 3)[-1])
        elif source == "kubectl":
            say("kubectl", line)
        elif TRAINER_LINE.search(line):  # a pod's container output
            say("trainer", f"[{source}] " + line.split(" ", 2)[-1])

    return echo


class PodWatcher:
    """Prints pods as the Job controller creates them and the kubelet runs them."""

    def __init__(self, say: Printer) -> None:
        self.say, self.seen, self.kube = say, {}, None

    def step(self) -> None:
        if self.kube is None:
            return
        for pod in self.kube.list("Pod"):
            name, status = pod["metadata"]["name"], pod.get("status") or {}
            phase = status.get("phase", "Pending")
            detail = ""
            cs = (status.get("containerStatuses") or [{}])[0].get("state") or {}
            if "waiting" in cs:
                detail = f"{cs['waiting'].get('reason')} {cs['waiting'].get('message', '')}"
            elif phase == "Running":
                detail = f"pod IP {status.get('podIP')}"
            elif "terminated" in cs:
                detail = f"exit code {cs['terminated']['exitCode']} ({cs['terminated']['reason']})"
            if pod["metadata"].get("deletionTimestamp"):
                phase, detail = "Terminating", "the kubelet stops its process"
            state = (phase, detail)
            if self.seen.get(name) != state:
                self.seen[name] = state
                self.say("pod", f"{name}: {phase} {detail}".rstrip())


class StatusWatcher:
    """Prints the DreamBoothJob's status when its phase, step, loss or headline changes."""

    def __init__(self, say: Printer) -> None:
        self.say, self.last = say, None

    def __call__(self, name: str, status: dict[str, Any]) -> None:
        progress = status.get("progress") or {}
        ready = next((c for c in status.get("conditions") or () if c["type"] == "Ready"), {})
        loss = progress.get("loss")
        shown = (status.get("phase"), progress.get("summary"), loss, ready.get("reason"), status.get("restarts"))
        if shown == self.last:
            return
        self.last = shown
        parts = [f"{name}: phase {status.get('phase')}"]
        if progress.get("summary"):
            parts.append(f"step {progress['summary']}")
        if loss is not None:
            parts.append(f"loss {loss:.4f}")
        if progress.get("etaSeconds") is not None:
            parts.append(f"ETA {progress['etaSeconds']}s")
        if ready.get("reason"):
            parts.append(f"[{ready['reason']}] {ready.get('message', '')}"[:140])
        self.say("status", ", ".join(parts))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kubesim.demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    parser.add_argument("--workdir", type=Path, default=ROOT / "runs" / "demo-cluster")
    parser.add_argument(
        "--hold", action="store_true", help="keep the cluster up at the end (Ctrl-C to stop) to try kubectl"
    )
    args = parser.parse_args(argv)

    from dreambooth.demo import draw_toy_cats
    from dreambooth.trainer.tiny import build_tiny_model
    from kubesim.cluster import LocalCluster, toy_cat_manifest
    from kubesim.s3server import S3Server

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # CPU-kernel notices
    say = Printer()
    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    say("cluster", "building a tiny Stable-Diffusion-shaped model and four toy-cat photos")
    model = build_tiny_model(args.workdir / "inputs" / "sd15", resolution=64)
    photos = args.workdir / "inputs" / "toy-cat"
    draw_toy_cats(photos)

    pods = PodWatcher(say)
    (args.workdir / "s3").mkdir()
    with S3Server(args.workdir / "s3") as s3:
        say("s3", f"SeaweedFS S3 on {s3.endpoint}")
        with LocalCluster(args.workdir / "cluster", s3, echo=echo_filter(say), watchers=[pods]) as cluster:
            pods.kube = cluster.kube
            cluster.recorder.on_change = StatusWatcher(say)
            say("cluster", f"Kubernetes API (emulator) on {cluster.kube.url}; KUBECONFIG={cluster.kube.kubeconfig}")
            say(
                "cluster",
                "controllers standing in: Job controller, kubelet (pods run as "
                "local processes on 127.0.0.x), garbage collector",
            )
            if cluster.prometheus is not None:
                say("prometheus", f"Prometheus on {cluster.prometheus.url}, scraping trainer pods every second")
            else:
                say(
                    "prometheus",
                    "not installed here (scripts/install-system-tools.sh): the "
                    "operator still reads the trainer's /metrics",
                )
            say("operator", f"running: python -m dreambooth.operator (pid {cluster.operator.proc.pid})")
            say(
                "s3",
                "uploading the base model to s3://models/sd15/ and the photos to "
                "s3://training-data/toy-cat/ (the example's URIs)",
            )
            cluster.upload_example_inputs(model, photos)

            manifest = toy_cat_manifest(
                cluster.s3_endpoint,
                training={"steps": args.steps},
                checkpointing={"everySteps": max(1, args.steps // 6)},
                validation={"everySteps": max(1, args.steps // 3)},
            )
            say(
                "cluster",
                "examples/toy-cat.yaml with storage.endpoint -> the local S3 and "
                f"tiny settings: {json.dumps(manifest['spec']['training'])}",
            )
            cluster.apply(manifest)
            status = cluster.wait_phase(NAME, "Succeeded", timeout=max(300, args.steps * 2))
            time.sleep(1.5)  # the last scrapes and pod updates
            report(cluster, status, say)
            if args.hold:
                say(
                    "cluster",
                    f"holding; try: kubectl --kubeconfig {cluster.kube.kubeconfig} "
                    "get dbj,jobs,pods   (Ctrl-C to stop)",
                )
                try:
                    while True:
                        time.sleep(3600)
                except KeyboardInterrupt:
                    pass
    return 0


def report(cluster: Any, status: dict[str, Any], say: Printer) -> None:
    say(
        "status", f"final: phase {status['phase']}, step {status['progress']['summary']}, restarts {status['restarts']}"
    )
    for kind, uri in (status.get("outputs") or {}).items():
        say("status", f"outputs.{kind}: {uri}")
    keys = sorted(cluster.keys(NAME))
    say("s3", f"{len(keys)} objects under s3://{cluster.bucket}/default/{NAME}/:")
    folders: dict[str, int] = {}
    for key in keys:  # a checkpoint or the diffusers model as one line
        top = (
            "/".join(key.split("/")[:2]) + "/"
            if key.startswith("checkpoints/")
            else ("model/" if key.startswith("model/") else key)
        )
        folders[top] = folders.get(top, 0) + 1
    for top, count in folders.items():
        say("s3", f"  {top}" + (f"  ({count} files)" if top.endswith("/") else ""))
    if cluster.prometheus is not None:
        selector = f'dreambooth_trainer_step{{dreambooth_job="{NAME}"}}'
        values = [int(v) for _, v in cluster.prometheus.samples(selector)]
        say("prometheus", f"{selector}: {len(values)} samples, {values}")
    if shutil.which("kubectl"):
        columns = (
            "NAME:.metadata.name,PHASE:.status.phase,STEP:.status.progress.summary,"
            "LOSS:.status.progress.loss,RESTARTS:.status.restarts"
        )
        for args in (("get", "dbj", "-o", f"custom-columns={columns}"), ("get", "jobs,pods")):
            say("kubectl", "kubectl " + " ".join(args))
            listed = cluster.kube.kubectl(*args, check=False)
            for line in listed.stdout.splitlines():
                say("kubectl", "  " + line)
    local = cluster.workdir / "model"
    cluster.output(NAME).download_prefix("model/", local)
    say("cluster", f"the model, downloaded: {local} (StableDiffusionPipeline.from_pretrained loads it)")
    say("cluster", f"operator log: {cluster.operator.log}; pod logs: {cluster.workdir / 'pods'}")


if __name__ == "__main__":
    sys.exit(main())
