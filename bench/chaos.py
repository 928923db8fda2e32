"""Chaos benches: the trainer killed again and again, storage gone for a while; figures for
docs/reliability.md. Loopback only, bounded in count and time; each stops by itself.

    OMP_NUM_THREADS=1 .venv/bin/python bench/chaos.py kills [--kills 50] [--steps 120] [--every 2]
    OMP_NUM_THREADS=1 .venv/bin/python bench/chaos.py outage [--outage-s 30]

**kills**: one run of a tiny SD model (S3 on loopback, the trainer as a pod runs it) is
killed with SIGKILL at ``--kills`` random moments and restarted each time, as a Job's pod
would be. Each moment is drawn at random in a window after a random step, after a
checkpoint step (while its upload is in flight: the trainer reaches S3 through a proxy
that limits the upload rate, so an upload takes about a second), or after the last step
(during the export). What the trainer was doing when it died is read afterwards from what
storage held at that moment (a checkpoint without its manifest: an upload; more complete
checkpoints than ``keep``: pruning; a partial model: the export). After every restart:

* it resumed from the newest *complete* checkpoint storage held when it was killed;
* no checkpoint was read half-written (no "corrupt" in any log; resume verifies sha256);
* steps lost = the step reached before the kill - the step resumed from;
* at the end the exported UNet equals, tensor for tensor, an uninterrupted run's; only the
  newest ``keep`` checkpoints are left, and the model folder holds exactly the files of the
  uninterrupted run's.

**outage**: the S3 server becomes unreachable for ``--outage-s`` seconds in the middle of a
run (connections reset, then refused), once in the middle of the run and once during a
checkpoint's multipart upload (``--part-mb``-sized parts: the run's checkpoint is several
parts). The trainer retries with backoff; a periodic checkpoint that cannot land is skipped
and the next one tried; a step that must reach storage (the export) exits with the
retryable code, and the bench restarts the trainer as the Job controller would. Checked:
the run ends Succeeded with the uninterrupted run's weights, every checkpoint left in
storage is complete and verifies, and no multipart upload is left open.

Both print a table and, with ``--json PATH``, write the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from dreambooth.api import Defaults, build_trainer_config, layout, validate_job
from dreambooth.trainer import checkpoints
from dreambooth.trainer.storage import S3Settings, open_storage
from kubesim.faultproxy import FaultProxy
from kubesim.s3server import S3Server

RESOLUTION = 64
STEP_METRIC = re.compile(r"^dreambooth_trainer_step (\S+)$", re.MULTILINE)
RESUMED = re.compile(r"resumed from \S+ at step (\d+)|no checkpoint in \S+: starting at step (0)")
EXIT_RETRYABLE = 20
OUTAGES = ("in the middle of the run", "during a multipart upload")


# --- one S3 world: server, bucket, inputs ---------------------------------------------------


@dataclass
class World:
    server: S3Server
    bucket: str
    model_uri: str
    photos_uri: str

    def settings(self, endpoint: str | None = None) -> S3Settings:
        return S3Settings(
            endpoint=endpoint or self.server.endpoint,
            secure=False,
            region="us-east-1",
            access_key=self.server.access_key,
            secret_key=self.server.secret_key,
        )

    def storage(self, prefix: str):
        return open_storage(f"s3://{self.bucket}/{prefix}", self.settings())


@contextlib.contextmanager
def world(tmp: Path, *, unet_width: int = 32):
    """A started S3 server with a bucket holding a tiny SD model and four toy-cat photos."""
    from dreambooth.demo import draw_toy_cats
    from dreambooth.trainer.tiny import build_tiny_model

    model = build_tiny_model(tmp / "tiny-sd", resolution=RESOLUTION, unet_width=unet_width)
    draw_toy_cats(tmp / "photos")
    (tmp / "weed").mkdir()
    with S3Server(tmp / "weed") as server:
        bucket = f"chaos-{uuid.uuid4().hex[:12]}"
        server.client().make_bucket(bucket)
        w = World(server, bucket, f"s3://{bucket}/models/tiny/", f"s3://{bucket}/data/cat/")
        w.storage("models/tiny/").upload_dir(model)
        w.storage("data/cat/").upload_dir(tmp / "photos")
        yield w


def job_document(w: World, output: str, *, steps: int, every: int, keep: int) -> dict:
    return {
        "apiVersion": "dreambooth.io/v1alpha1",
        "kind": "DreamBoothJob",
        "metadata": {"name": "chaos", "namespace": "bench"},
        "spec": {
            "preset": "object",
            "baseModel": {"uri": w.model_uri},
            "instance": {"uri": w.photos_uri, "prompt": "a photo of zwx toy cat"},
            "training": {"steps": steps, "batchSize": 2, "resolution": RESOLUTION, "learningRate": 1e-3},
            "validation": {"enabled": False},
            "checkpointing": {"everySteps": every, "keep": keep},
            "output": {"uri": f"s3://{w.bucket}/{output}/"},
            "resources": {"gpusPerNode": 0},
        },
    }


@dataclass
class Trainer:
    """``python -m dreambooth.trainer`` as a pod runs it, its log collected as it goes."""

    config: Path
    workdir: Path
    env: dict[str, str]
    port: int
    proc: subprocess.Popen | None = None
    lines: list[str] = field(default_factory=list)  # this start's
    earlier: list[str] = field(default_factory=list)  # the starts before

    def start(self) -> None:
        self.earlier += self.lines
        self.lines = []
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dreambooth.trainer",
                "--config",
                str(self.config),
                "--workdir",
                str(self.workdir),
                "--termination-log",
                str(self.workdir / "termination-log"),
            ],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        threading.Thread(target=self._read, args=(self.proc, self.lines), daemon=True).start()

    @staticmethod
    def _read(proc: subprocess.Popen, lines: list[str]) -> None:
        for line in proc.stdout:
            lines.append(line)  # noqa: PERF402 (line by line: the log is read while it runs)

    @property
    def log(self) -> str:
        return "".join(self.lines)

    @property
    def every_log(self) -> str:
        return "".join(self.earlier + self.lines)

    def step(self) -> int | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=1) as r:
                found = STEP_METRIC.search(r.read().decode())
        except OSError:
            return None
        return int(float(found.group(1))) if found else None

    def resumed(self) -> int | None:
        found = RESUMED.search(self.log)
        return int(found.group(1) or found.group(2)) if found else None

    def wait(self, timeout: float) -> int:
        code = self.proc.wait(timeout=timeout)
        time.sleep(0.05)  # the reader thread drains the pipe
        return code

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_trainer(w: World, tmp: Path, name: str, doc: dict, endpoint: str) -> Trainer:
    port = free_port()
    config = build_trainer_config(
        validate_job(doc),
        Defaults(output_root="file:///unused", s3_endpoint=endpoint, s3_secure=False, metrics_port=port),
    )
    folder = tmp / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "trainer-config.json").write_text(json.dumps(config.wire()))
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        PYTHONUNBUFFERED="1",
        AWS_ACCESS_KEY_ID=w.server.access_key,
        AWS_SECRET_ACCESS_KEY=w.server.secret_key,
    )
    return Trainer(folder / "trainer-config.json", folder / "work", env, port)


def exported_unet(w: World, output: str) -> dict:
    from safetensors.torch import load

    return load(w.storage(f"{output}/").read_bytes(f"{layout.MODEL}unet/diffusion_pytorch_model.safetensors"))


def differing(a: dict, b: dict) -> list[str]:
    if a.keys() != b.keys():
        return sorted(set(a) ^ set(b))
    return [k for k in a if not (a[k] == b[k]).all()]


def model_files(w: World, output: str) -> set[str]:
    return {o.key for o in w.storage(f"{output}/{layout.MODEL}").list("")}


def reference_run(w: World, tmp: Path, *, steps: int, every: int, keep: int) -> tuple[dict, set[str], int, float]:
    """An uninterrupted run: its UNet, its model files, one checkpoint's bytes, its seconds."""
    trainer = make_trainer(
        w, tmp, "reference", job_document(w, "reference", steps=steps, every=every, keep=keep), w.server.endpoint
    )
    started = time.monotonic()
    trainer.start()
    code = trainer.wait(timeout=1200)
    seconds = time.monotonic() - started
    if code != 0:
        raise SystemExit(f"the uninterrupted run failed ({code}):\n{trainer.log[-4000:]}")
    store = w.storage("reference/")
    newest = checkpoints.complete(store)[-1]
    size = sum(o.size for o in store.list(newest.prefix))
    return exported_unet(w, "reference"), model_files(w, "reference"), size, seconds


# --- kills ------------------------------------------------------------------------------


@dataclass
class Kill:
    aimed: str  # where the moment was drawn: step, checkpoint, export
    during: str  # what storage shows the trainer was doing: steps, upload, pruning, export
    step: int  # the step the trainer had reached
    newest_complete: int  # the newest complete checkpoint in storage at the kill
    resumed: int | None = None  # the step the next start resumed from
    lost: int | None = None


def during(w: World, output: str, *, keep: int, every: int, step: int, steps: int) -> str:
    store = w.storage(f"{output}/")
    groups = {o.key.split("/")[1] for o in store.list(layout.CHECKPOINTS)}
    complete = checkpoints.complete(store)
    begun = min(step, steps - 1) // every * every  # the newest checkpoint written to disk
    newest = complete[-1].step if complete else 0
    # its upload had not finished (maybe no object yet), or debris of one: past the last
    # step too, the export waits for it
    if begun > newest or len(groups) > len(complete):
        return "upload"
    if step >= steps:  # past the last step: the export (no checkpoint of the last step)
        return "export"
    if len(complete) > keep:
        return "pruning"
    return "steps"


def kills(args: argparse.Namespace) -> dict:
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="chaos-") as tmp_name:
        tmp = Path(tmp_name)
        with world(tmp) as w:
            unet, files, checkpoint_bytes, seconds = reference_run(
                w, tmp, steps=args.steps, every=args.every, keep=args.keep
            )
            print(
                f"uninterrupted run: {args.steps} steps in {seconds:.0f} s; a checkpoint is "
                f"{checkpoint_bytes / 2**20:.1f} MiB",
                flush=True,
            )
            with FaultProxy(w.server.endpoint) as proxy:
                proxy.limit(upload=checkpoint_bytes / args.upload_s)  # an upload takes ~upload_s
                doc = job_document(w, "killed", steps=args.steps, every=args.every, keep=args.keep)
                trainer = make_trainer(w, tmp, "killed", doc, proxy.endpoint)
                report = kill_loop(args, rng, w, trainer)
            final = differing(unet, exported_unet(w, "killed"))
            left = [c.step for c in checkpoints.complete(w.storage("killed/"))]
            report.update(
                weights_equal=not final,
                differing_tensors=len(final),
                model_files_equal=model_files(w, "killed") == {k.replace("reference/", "killed/", 1) for k in files},
                checkpoints_left=left,
                debris_left=len({o.key.split("/")[1] for o in w.storage("killed/").list(layout.CHECKPOINTS)})
                - len(left),
            )
    return report


def kill_loop(args: argparse.Namespace, rng: random.Random, w: World, trainer: Trainer) -> dict:
    done: list[Kill] = []
    corrupt = starts = 0
    deadline = time.monotonic() + args.max_minutes * 60
    step_s = 0.2
    while True:
        starts += 1
        trainer.start()
        previous = done[-1] if done else None
        moment = None
        if len(done) < args.kills:
            moment = watch_for_moment(args, rng, w, trainer, deadline, step_s, len(done))
        if moment is None:  # out of kills (or time): let this start finish the run
            code = trainer.wait(timeout=max(60.0, deadline - time.monotonic() + 600))
            note_resume(trainer, previous)
            corrupt += trainer.log.count("is corrupt")
            if code != 0:
                raise SystemExit(f"the last start failed ({code}):\n{trainer.log[-4000:]}")
            break
        aimed, reached, began, at_step = moment
        trainer.kill()
        store = w.storage("killed/")
        newest = checkpoints.complete(store)
        note_resume(trainer, previous)
        corrupt += trainer.log.count("is corrupt")
        if reached > at_step and time.monotonic() > began:
            step_s = max(0.01, (time.monotonic() - began) / max(1, reached - at_step))
        done.append(
            Kill(
                aimed,
                during(w, "killed", keep=args.keep, every=args.every, step=reached, steps=args.steps),
                reached,
                newest[-1].step if newest else 0,
            )
        )
        print(
            f"kill {len(done):3d}: aimed at {aimed:10s} step {reached:4d}, during {done[-1].during:7s}, "
            f"newest complete checkpoint {done[-1].newest_complete}",
            flush=True,
        )
    lost = [k.lost for k in done if k.lost is not None]
    return {
        "kills": len(done),
        "starts": starts,
        "steps": args.steps,
        "every_steps": args.every,
        "by_moment": {m: sum(k.during == m for k in done) for m in ("steps", "upload", "pruning", "export")},
        "resumed_from_newest_complete": all(k.resumed == k.newest_complete for k in done),
        "wrong_resumes": [asdict(k) for k in done if k.resumed != k.newest_complete],
        "corrupt_reads": corrupt,
        "max_steps_lost": max(lost, default=0),
        "mean_steps_lost": round(sum(lost) / len(lost), 2) if lost else 0,
        # a checkpoint uploads while training goes on (one in flight at most): a kill during
        # its upload loses it too, so at most two intervals; elsewhere at most one
        "kills_losing_more_than_every": sum(x > args.every for x in lost),
        "max_steps_lost_outside_uploads": max(
            (k.lost for k in done if k.lost is not None and k.during != "upload"), default=0
        ),
    }


def note_resume(trainer: Trainer, previous: Kill | None) -> None:
    if previous is not None and previous.resumed is None:
        previous.resumed = trainer.resumed()
        if previous.resumed is not None:
            previous.lost = previous.step - previous.resumed


def watch_for_moment(args, rng: random.Random, w: World, trainer: Trainer, deadline: float, step_s: float, kill: int):
    """Wait for a randomly drawn moment; returns (aimed, step reached, when, the step then)
    or None if the run ended first (or time ran out). The last fifth of the kills are aimed
    at the export; the others at a random step, a checkpoint's upload or its pruning (just
    after its manifest lands)."""
    while trainer.resumed() is None:  # a kill before the resume shows nothing new
        if trainer.proc.poll() is not None or time.monotonic() > deadline:
            return None
        time.sleep(0.02)
    start = trainer.resumed()
    if kill >= args.kills - max(1, args.kills // 5):
        aimed = "export"
    else:
        aimed = rng.choice(("step", "checkpoint", "pruning"))
    if aimed == "export":
        target, delay = args.steps, rng.uniform(0, 2 * args.upload_s)
    elif aimed in ("checkpoint", "pruning"):
        target = min(args.steps - 1, (start // args.every + 1 + rng.randrange(2)) * args.every)
        target -= target % args.every
        delay = rng.uniform(0, args.upload_s)
    else:
        target, delay = rng.randint(start + 1, min(args.steps, start + 2 * args.every)), rng.uniform(0, step_s)
    reached = None
    while reached is None or reached < target:
        if trainer.proc.poll() is not None or time.monotonic() > deadline:
            return None
        reached = trainer.step() or reached
        time.sleep(0.01)
    began = time.monotonic()
    if aimed == "pruning" and target > start:  # the manifest of `target` landed: pruning follows
        manifest = layout.checkpoint(target) + layout.MANIFEST
        store = w.storage("killed/")
        while not store.exists(manifest):
            if trainer.proc.poll() is not None or time.monotonic() > deadline:
                return None
            time.sleep(0.005)
        delay = rng.uniform(0, 0.02)
    time.sleep(delay)
    if trainer.proc.poll() is not None:
        return None
    return aimed, max(reached, trainer.step() or reached), began, reached


# --- outage -----------------------------------------------------------------------------


def outage(args: argparse.Namespace) -> dict:
    results = {}
    with tempfile.TemporaryDirectory(prefix="chaos-") as tmp_name:
        tmp = Path(tmp_name)
        with world(tmp, unet_width=args.unet_width) as w:
            unet, _, checkpoint_bytes, seconds = reference_run(w, tmp, steps=args.steps, every=args.every, keep=2)
            print(
                f"uninterrupted run: {args.steps} steps in {seconds:.0f} s; a checkpoint is "
                f"{checkpoint_bytes / 2**20:.1f} MiB",
                flush=True,
            )
            for case in OUTAGES[-1:] if args.only_upload else OUTAGES:
                results[case] = one_outage(args, w, tmp, case, unet, checkpoint_bytes)
                print(f"{case}: {results[case]}", flush=True)
    return results


def one_outage(args, w: World, tmp: Path, case: str, unet: dict, checkpoint_bytes: int) -> dict:
    output = "outage-" + ("upload" if case.startswith("during") else "run")
    doc = job_document(w, output, steps=args.steps, every=args.every, keep=2)
    with FaultProxy(w.server.endpoint) as proxy:
        if case.startswith("during"):
            proxy.limit(upload=checkpoint_bytes / 4)  # a checkpoint's upload lasts ~4 s
        trainer = make_trainer(w, tmp, output, doc, proxy.endpoint)
        starts, cut_at, retryable_exits = 0, None, 0
        started = time.monotonic()
        while True:
            starts += 1
            trainer.start()
            if cut_at is None:
                cut_at = cut_when(args, trainer, proxy, case)
                if cut_at is not None:
                    with proxy.down():
                        time.sleep(args.outage_s)
            code = trainer.wait(timeout=1800)
            if code == EXIT_RETRYABLE and starts < 5:
                retryable_exits += 1
                continue
            break
    if args.log_dir:
        args.log_dir.mkdir(parents=True, exist_ok=True)
        (args.log_dir / f"{output}.log").write_text(trainer.every_log)
    store = w.storage(f"{output}/")
    groups = {o.key.split("/")[1] for o in store.list(layout.CHECKPOINTS)}
    verified = [c.step for c in checkpoints.complete(store)]
    open_uploads = list_open_uploads(w)
    return {
        "outage_s": args.outage_s,
        "cut_at_step": cut_at,
        "exit_code": code,
        "starts": starts,
        "retryable_exits": retryable_exits,
        "seconds": round(time.monotonic() - started, 1),
        "retries_logged": trainer.every_log.count("retrying in"),
        "checkpoints_skipped": trainer.every_log.count("not saved, trying again"),
        "weights_equal": code == 0 and not differing(unet, exported_unet(w, output)),
        "incomplete_checkpoints": len(groups) - len(verified),
        "open_multipart_uploads": len(open_uploads),
    }


def cut_when(args, trainer: Trainer, proxy: FaultProxy, case: str) -> int | None:
    """Wait for the moment to cut storage off: mid-run between checkpoints, or while the
    proxy is carrying a checkpoint's upload; returns the step then."""
    target = args.steps // 2 + (args.every // 2 if case.startswith("in the middle") else 0)
    while True:
        if trainer.proc.poll() is not None:
            return None
        step = trainer.step()
        if step is not None and step >= target:
            break
        time.sleep(0.01)
    if case.startswith("during"):  # wait until part of the checkpoint is on the wire
        sent = proxy.sent
        deadline = time.monotonic() + 60
        while proxy.sent - sent < 2**20 and time.monotonic() < deadline:
            time.sleep(0.01)
    return step


def list_open_uploads(w: World) -> list[str]:
    """Multipart uploads begun and neither completed nor aborted (what a lifecycle rule's
    AbortIncompleteMultipartUpload would clean)."""
    client = w.server.client()
    found = client._list_multipart_uploads(w.bucket)
    return [u.object_name for u in found.uploads]


# --- command line -----------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="bench", required=True)
    k = sub.add_parser("kills", help="SIGKILL the trainer at random moments of one run")
    k.add_argument("--kills", type=int, default=50)
    k.add_argument("--steps", type=int, default=160)
    k.add_argument("--every", type=int, default=4, help="checkpointing.everySteps")
    k.add_argument("--keep", type=int, default=2)
    k.add_argument("--upload-s", type=float, default=0.5, help="seconds a checkpoint's upload takes")
    k.add_argument("--seed", type=int, default=0)
    k.add_argument("--max-minutes", type=float, default=40)
    o = sub.add_parser("outage", help="S3 unreachable for a while in the middle of a run")
    o.add_argument("--outage-s", type=float, default=30)
    o.add_argument("--steps", type=int, default=40)
    o.add_argument("--every", type=int, default=10)
    o.add_argument("--only-upload", action="store_true", help="only the outage during a multipart upload")
    o.add_argument(
        "--unet-width",
        type=int,
        default=64,
        help="the tiny UNet's width: 64 makes a checkpoint's optimizer state several 16 MiB parts",
    )
    for p in (k, o):
        p.add_argument("--json", type=Path, help="write the figures here")
        p.add_argument("--log-dir", type=Path, help="write the trainers' logs here")
    args = parser.parse_args(argv)
    report = kills(args) if args.bench == "kills" else outage(args)
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
