"""The gallery under load: the jobs page with 1,000 DreamBoothJobs in the simulated cluster
and a job page with 50 checkpoints in loopback S3.

    OMP_NUM_THREADS=1 .venv/bin/python bench/gallery.py [--jobs 1000] [--checkpoints 50]

Runs the real ``dreambooth gallery`` as a process against the test suite's API emulator
(kubesim/kube.py, in this process) and SeaweedFS (kubesim/s3server.py). The job
with checkpoints has a sample grid per checkpoint (a 2 x 2 grid PNG), its checkpoint
manifests, a full history.jsonl (2,000 lines) and an evaluation.jsonl. Prints, per page,
the median and p95 of REQUESTS sequential requests (time to the last byte on loopback, the
gallery's cache of the job list warm), the bytes of the answer, and the gallery's RSS after
all requests. Not a timed test: docs/benchmarks.md records its numbers.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dreambooth.api import crd, layout
from dreambooth.api.history import MAX_POINTS, History, Point
from kubesim.api import decls_from_crd
from kubesim.gallery import GalleryServer, env_without_aws, rss_bytes
from kubesim.kube import running_kube
from kubesim.s3server import S3Server

REQUESTS = 20
NAMESPACE = "bench"
DREAMBOOTH_JOBS = tuple(decls_from_crd(crd.crd()))


def job(name: str, bucket: str, step: int) -> dict:
    return {
        "apiVersion": "dreambooth.io/v1alpha1",
        "kind": "DreamBoothJob",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "preset": "object",
            "baseModel": {"uri": "s3://models/sd15/"},
            "instance": {"uri": "s3://data/cat/", "prompt": "a photo of zwx toy cat"},
            "output": {"uri": f"s3://{bucket}/{NAMESPACE}/{name}/"},
        },
    }


def status(step: int, total: int = 400) -> dict:
    return {
        "status": {
            "phase": "Training" if step < total else "Succeeded",
            "family": "sd",
            "progress": {
                "step": step,
                "totalSteps": total,
                "percent": round(100 * step / total, 1),
                "summary": f"{step}/{total}",
                "loss": 0.1 + step / 10000,
                "etaSeconds": (total - step) * 2,
            },
        }
    }


def grid_png() -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (2 * 64, 2 * 64 + 40), (128, 90, 60)).save(out, format="PNG")
    return out.getvalue()


def fill_outputs(client, bucket: str, name: str, checkpoints: int) -> None:
    prefix = f"{NAMESPACE}/{name}/"
    png = grid_png()
    history = History()
    for step in range(1, checkpoints * 100 + 1):
        history.add(Point(step, 0.2, 0.2, 1e-6, 1.7e9 + step, 0.1))
    evaluation = "".join(
        json.dumps({"step": 100 * i, "clipI": 0.8, "clipT": 0.3}) + "\n" for i in range(1, checkpoints + 1)
    )
    objects = {layout.HISTORY: history.to_bytes(), layout.EVALUATION: evaluation.encode(), layout.PROGRESSION: png}
    for i in range(1, checkpoints + 1):
        objects[layout.sample_grid(100 * i)] = png
        objects[layout.checkpoint(100 * i) + layout.MANIFEST] = b'{"step": %d, "files": {}}' % (100 * i)
    for key, data in objects.items():
        client.put_object(bucket, prefix + key, io.BytesIO(data), len(data))
    assert len(history.points) <= MAX_POINTS


def measure(url: str) -> tuple[float, float, int]:
    times, size = [], 0
    urllib.request.urlopen(url, timeout=60).read()  # warm: the job list cached, connections open
    for _ in range(REQUESTS):
        started = time.perf_counter()
        size = len(urllib.request.urlopen(url, timeout=60).read())
        times.append(time.perf_counter() - started)
    times.sort()
    return statistics.median(times), times[int(0.95 * (len(times) - 1))], size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--checkpoints", type=int, default=50)
    args = parser.parse_args()
    with (
        tempfile.TemporaryDirectory() as tmp,
        S3Server() as s3,
        running_kube(Path(tmp), resources=DREAMBOOTH_JOBS) as kube,
    ):
        bucket = "gallery-bench"
        s3.client().make_bucket(bucket)
        kube.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}})
        for i in range(args.jobs):
            name = f"job-{i:04d}"
            kube.create(job(name, bucket, i))
            kube.patch_status("DreamBoothJob", NAMESPACE, name, status(i % 401))
        fill_outputs(s3.client(), bucket, "job-0000", args.checkpoints)
        env = {
            **env_without_aws(),
            **kube.env,
            "AWS_ACCESS_KEY_ID": s3.access_key,
            "AWS_SECRET_ACCESS_KEY": s3.secret_key,
        }
        gallery_args = ["--namespace", NAMESPACE, "--s3-endpoint", s3.endpoint, "--s3-insecure"]
        with GalleryServer(gallery_args, env, Path(tmp) / "gallery.log") as gallery:
            idle = rss_bytes(gallery.pid)
            print(f"gallery RSS idle: {idle / 2**20:.0f} MB")
            print("| page | median ms | p95 ms | bytes |")
            print("|---|---|---|---|")
            pages = [
                (f"jobs page, {args.jobs} jobs", gallery.url),
                (f"jobs page live rows, {args.jobs} jobs", gallery.url + "live"),
                (f"job page, {args.checkpoints} checkpoints", f"{gallery.url}jobs/{NAMESPACE}/job-0000"),
                (
                    f"job page live parts, {args.checkpoints} checkpoints",
                    f"{gallery.url}jobs/{NAMESPACE}/job-0000/live",
                ),
            ]
            for what, url in pages:
                median, p95, size = measure(url)
                print(f"| {what} | {median * 1000:.0f} | {p95 * 1000:.0f} | {size:,} |")
            print(f"gallery RSS after the requests: {rss_bytes(gallery.pid) / 2**20:.0f} MB")


if __name__ == "__main__":
    main()
