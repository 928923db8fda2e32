"""Checkpoint I/O: how long training is blocked by a checkpoint, how long one takes to land in
S3, and the peak memory of a 2-process resume; this tree against an older commit.

    OMP_NUM_THREADS=1 .venv/bin/python bench/checkpoint_io.py [--gb 1.5] [--repeat 3] [--before ad372f5]

Both trees are measured in one run, against one local S3 server (``weed mini``, the test
suite's), on the same synthetic state: a module of float32 parameters (a third of the
checkpoint) and AdamW's two moments (the other two thirds), as a full fine-tune has. The
"before" tree is ``git archive <commit> dreambooth`` unpacked into a temporary folder; each
measurement runs in a fresh process with that tree (or this one) first on ``sys.path`` and
calls the same functions of ``dreambooth.trainer.persist`` that a run calls:

* **save** (1 process): ``save_checkpoint(ctx, loop, step, must=False)`` as ``train()``
  calls it for a periodic checkpoint. *blocked s* is how long that call keeps the training
  loop (and, on GPUs, every GPU) from the next step; *landed s* is until the checkpoint is
  complete in S3 (manifest written); *s/GB* is landed s per GB of checkpoint. Between two
  checkpoints the bench waits until the previous one has landed, as a training interval
  longer than an upload would.
* **resume** (2 processes, ``accelerate launch``, gloo): ``fetch_checkpoint`` (the node's
  first process downloads) and ``restore`` into a fresh module and optimizer, then one
  optimizer step. Peak RSS per process, above what it held before the resume.
* **where to hash** (this tree's process only): ``torch.save`` of the AdamW state to local
  disk plainly, through a writer that hashes what it writes (sha256 on the training
  thread: what "hash while writing" would add to the blocked time), and sha256 of the
  written file read back (what the storage thread does instead, off the critical path).

Results and the command are recorded in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parent.parent
TENSOR_MB = 16  # one parameter tensor (SD's largest are a few tens of MB)


# --- in a child process: one tree's code --------------------------------------------------


def synthetic_loop(accelerator, gb: float, *, trained: bool):
    """Parameters of ``gb / 3`` GB and an AdamW over them (moments filled by one step)."""
    import torch

    count = max(1, round(gb / 3 * 1024 / TENSOR_MB))
    unet = torch.nn.Module()
    unet.weights = torch.nn.ParameterList(torch.nn.Parameter(torch.randn(TENSOR_MB * 2**20 // 4)) for _ in range(count))
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4, foreach=True)
    if trained:
        one_step(unet, optimizer)
    return SimpleNamespace(
        unet=unet,
        text_encoder=torch.nn.Linear(1, 1),
        optimizer=optimizer,
        lr_scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0),
        extras={},
        phase="dreambooth",
    )


def one_step(unet, optimizer) -> None:
    import torch

    for p in unet.parameters():
        p.grad = torch.full_like(p, 1e-3)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def context(workdir: Path, accelerator):
    from dreambooth.api import Defaults, build_trainer_config, validate_job
    from dreambooth.trainer.context import Context
    from dreambooth.trainer.metrics import TrainerMetrics
    from dreambooth.trainer.storage import S3Settings, open_storage

    env = os.environ
    doc = {
        "apiVersion": "dreambooth.io/v1alpha1",
        "kind": "DreamBoothJob",
        "metadata": {"name": "bench", "namespace": "bench"},
        "spec": {
            "baseModel": {"uri": "s3://models/x/"},
            "instance": {"uri": "s3://data/x/", "prompt": "zwx"},
            "training": {"steps": 100},
            "checkpointing": {"everySteps": 1, "keep": 2},
            "output": {"uri": env["BENCH_OUTPUT"]},
            "resources": {"gpusPerNode": 0},
        },
    }
    config = build_trainer_config(validate_job(doc), Defaults(output_root="file:///unused"))
    s3 = S3Settings(
        env["BENCH_ENDPOINT"],
        secure=False,
        access_key=env["AWS_ACCESS_KEY_ID"],
        secret_key=env["AWS_SECRET_ACCESS_KEY"],
    )
    metrics = TrainerMetrics() if accelerator.is_main_process else None
    return Context(config, workdir, accelerator, s3, open_storage(config.output_uri, s3), metrics, threading.Event())


def landed(ctx) -> None:
    """Wait until the checkpoints handed over have landed (this tree: its storage thread)."""
    background = getattr(ctx, "background", None)
    if background is not None:
        background.fence().result()


class HashingWriter:
    """A file for torch.save that hashes what it writes."""

    def __init__(self, out) -> None:
        import hashlib

        self.out, self.sha = out, hashlib.sha256()

    def write(self, data) -> int:
        self.sha.update(data)
        return self.out.write(data)

    def flush(self) -> None:
        self.out.flush()


def measure_hashing(loop, workdir: Path) -> dict:
    import hashlib

    import torch

    path, state = workdir / "optimizer.pt", loop.optimizer.state_dict()
    started = time.perf_counter()
    torch.save(state, path)
    plain = time.perf_counter() - started
    size = path.stat().st_size
    started = time.perf_counter()
    with open(path, "wb") as out:
        torch.save(state, HashingWriter(out))
    hashing = time.perf_counter() - started
    started = time.perf_counter()
    with open(path, "rb") as f:
        hashlib.file_digest(f, "sha256")
    after = time.perf_counter() - started
    path.unlink()
    return {
        "write_s_per_gb": plain / (size / 1e9),
        "hashing_write_s_per_gb": hashing / (size / 1e9),
        "hash_after_s_per_gb": after / (size / 1e9),
    }


def measure_save(gb: float, repeat: int, workdir: Path) -> dict:
    import torch
    from accelerate import Accelerator

    from dreambooth.trainer import persist

    torch.manual_seed(0)
    accelerator = Accelerator(cpu=True)
    ctx = context(workdir, accelerator)
    loop = synthetic_loop(accelerator, gb, trained=True)
    blocked, total = [], []
    for step in range(1, repeat + 1):
        started = time.perf_counter()
        persist.save_checkpoint(ctx, loop, step, must=False)
        blocked.append(time.perf_counter() - started)
        landed(ctx)
        total.append(time.perf_counter() - started)
    folder = ctx.output.list(f"checkpoints/checkpoint-{repeat}/")
    size = sum(o.size for o in folder)
    assert any(o.key.endswith("manifest.json") for o in folder), "the checkpoint did not land"
    hashing = measure_hashing(loop, workdir) if getattr(ctx, "background", None) is not None else {}
    return {
        "gb": size / 1e9,
        "blocked_s": statistics.median(blocked),
        "landed_s": statistics.median(total),
        "s_per_gb": statistics.median(total) / (size / 1e9),
        **hashing,
    }


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    """The kernel's high-water mark of RSS; it counts memory-mapped file pages (page cache,
    shared by a node's processes and reclaimable) as well as the process's own memory."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def anon() -> int:
    """The process's own (anonymous) resident memory now: what no page cache can give back."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))


class PeakAnon:
    """Samples :func:`anon` every few milliseconds on a thread; ``peak`` is the highest seen."""

    def __enter__(self):
        self.peak, self._done = anon(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._done.wait(0.002):
            self.peak = max(self.peak, anon())

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, anon())


def measure_resume(gb: float, workdir: Path, write: bool) -> dict:
    """Under accelerate launch: ``write`` a checkpoint of 2-process facts, or resume from it."""
    import torch
    from accelerate import Accelerator

    from dreambooth.trainer import persist

    accelerator = Accelerator(cpu=True)
    ctx = context(workdir, accelerator)
    loop = synthetic_loop(accelerator, gb, trained=write)
    if write:
        persist.save_checkpoint(ctx, loop, 1, must=True)
        landed(ctx)
        return {}
    import gc

    gc.collect()
    before, before_anon, started = rss(), anon(), time.perf_counter()
    with PeakAnon() as restoring:
        found = persist.fetch_checkpoint(ctx)
        persist.restore(ctx, loop, found, phase_start=0)
    took = time.perf_counter() - started
    restored = peak_rss()
    with PeakAnon() as stepping:
        one_step(loop.unet, loop.optimizer)
    assert found is not None and loop.optimizer.state, "nothing was resumed"
    accelerator.wait_for_everyone()
    del torch
    mb = 2**20
    return {
        "rank": accelerator.process_index,
        "before_mb": before / mb,
        "resume_s": took,
        "restore_rss_mb": (restored - before) / mb,
        "restore_anon_mb": (restoring.peak - before_anon) / mb,
        "step_anon_mb": (stepping.peak - before_anon) / mb,
    }


# --- the parent: trees, S3 server, table ----------------------------------------------


def child(tree: Path, mode: str, gb: float, repeat: int, env: dict, processes: int = 1) -> list[dict]:
    workdir = Path(tempfile.mkdtemp(prefix=f"bench-{mode}-"))
    args = [
        __file__,
        "--child",
        mode,
        "--tree",
        str(tree),
        "--gb",
        str(gb),
        "--repeat",
        str(repeat),
        "--workdir",
        str(workdir),
    ]
    if processes > 1:
        from kubesim.net import free_port

        cmd = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--num_processes",
            str(processes),
            "--num_machines",
            "1",
            "--multi_gpu",
            "--main_process_ip",
            "127.0.0.1",
            "--main_process_port",
            str(free_port()),
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            *args,
        ]
    else:
        cmd = [sys.executable, *args]
    try:
        proc = subprocess.run(cmd, check=False, env={**env, "CUDA_VISIBLE_DEVICES": ""}, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"{mode} on {tree} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
        return [json.loads(line[len("RESULT ") :]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def export_tree(commit: str, dest: Path) -> Path:
    archive = subprocess.run(["git", "-C", str(REPO), "archive", commit, "dreambooth"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return dest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gb", type=float, default=1.5, help="checkpoint size (default 1.5)")
    parser.add_argument("--repeat", type=int, default=3, help="checkpoints per save run (median)")
    parser.add_argument("--before", default="ad372f5", help="the commit to compare with (default ad372f5)")
    parser.add_argument("--child", choices=["save", "write", "resume"], help=argparse.SUPPRESS)
    parser.add_argument("--tree", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        sys.path.insert(0, str(args.tree))
        import torch

        torch.set_num_threads(1)
        if args.child == "save":
            result = measure_save(args.gb, args.repeat, args.workdir)
        else:
            result = measure_resume(args.gb, args.workdir, write=args.child == "write")
        print("RESULT " + json.dumps({**result, "tree": str(args.tree)}), flush=True)
        return

    sys.path.insert(0, str(REPO))
    from kubesim.s3server import S3Server

    scratch = Path(tempfile.mkdtemp(prefix="bench-trees-"))
    trees = {f"before ({args.before})": export_tree(args.before, scratch), "after (this tree)": REPO}
    print(
        f"synthetic checkpoint of {args.gb} GB (1/3 weights, 2/3 AdamW), {args.repeat} checkpoints per save "
        f"run, local S3 (weed mini), OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}\n"
    )
    rows = []
    with S3Server() as server:
        client = server.client()
        env = {
            **os.environ,
            "AWS_ACCESS_KEY_ID": server.access_key,
            "AWS_SECRET_ACCESS_KEY": server.secret_key,
            "BENCH_ENDPOINT": server.endpoint,
            "PYTHONPATH": "",
        }
        for i, (label, tree) in enumerate(trees.items()):
            client.make_bucket(f"bench-{i}")
            run_env = {**env, "BENCH_OUTPUT": f"s3://bench-{i}/save/"}
            [save] = child(tree, "save", args.gb, args.repeat, run_env)
            run_env["BENCH_OUTPUT"] = f"s3://bench-{i}/resume/"
            child(tree, "write", args.gb, 1, run_env, processes=2)
            resume = child(tree, "resume", args.gb, 1, run_env, processes=2)
            rows.append((label, save, sorted(resume, key=lambda r: r["rank"])))
    shutil.rmtree(scratch, ignore_errors=True)

    print(
        "| code | checkpoint GB | blocked s (GPU-idle) | landed s | s/GB | 2-process resume s | resume: "
        "peak RSS MB, rank 0 / 1 | resume: peak own memory MB, rank 0 / 1 | + first step: own memory MB |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for label, save, resume in rows:

        def each(key: str, resume: list[dict] = resume) -> str:
            return " / ".join(f"{r[key]:.0f}" for r in resume)

        print(
            f"| {label} | {save['gb']:.2f} | {save['blocked_s']:.2f} | {save['landed_s']:.2f} | "
            f"{save['s_per_gb']:.2f} | {max(r['resume_s'] for r in resume):.2f} | {each('restore_rss_mb')} | "
            f"{each('restore_anon_mb')} | {each('step_anon_mb')} |"
        )
    hashing = rows[-1][1]
    print(
        f"\nwhere to hash ({TENSOR_MB} MB tensors of AdamW state, torch.save to local disk): plain write "
        f"{hashing['write_s_per_gb']:.2f} s/GB, through a hashing writer {hashing['hashing_write_s_per_gb']:.2f} "
        f"s/GB, sha256 of the written file {hashing['hash_after_s_per_gb']:.2f} s/GB"
    )


if __name__ == "__main__":
    main()
