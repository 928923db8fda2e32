"""GPU benchmark of the training step, and the trainer's CUDA paths that CI cannot run.

    bash bench/gpu.sh [--out bench/results/gpu-<date>-<device>.md] [--budget 450]
    bash bench/gpu.sh --cpu-smoke --out /tmp/gpu-smoke.md      # what CI runs (tiny, ~1 min)

(``bench/gpu.sh`` installs the packages a GPU machine lacks from ``.gpu-wheels/``, see
``--prepare-wheels``, and runs this module.)

1. **The trainer's CUDA paths** (bench/gpu_paths.py), each a short real run of the trainer
   on the tiny model: gpusPerNode 1 on the GPU, bf16, fp16 with loss scaling, fp16 +
   textual inversion, 8-bit AdamW, and two processes with NCCL through the pod's launch
   script when the machine has 2 or more GPUs. Pass/fail and the key figure of each.
2. **The UNet training step** (bench/gpu_unet.py): random-weight full-size SD 1.5 UNet at
   512 px and SDXL UNet at 1024 px; batch 1 and 4, full fine-tune and LoRA, bf16 autocast,
   compile off/on, gradient checkpointing, 8-bit AdamW (the rows and why: ``gpu_unet.plan``).
   steps/s and images/s (median of the timed steps, after warm-up), the first step's time
   (a compiled row's includes its compilation), model FLOPs per step, MFU against the
   device's dense bf16 peak from its name (``gpu_common.BF16_PEAKS``, with sources) and
   against the bf16 matmul rate measured here first, and peak memory per row.

Each group of rows runs in a fresh process; the paths run first (they are quick and check
correctness), then the UNet groups, most important first, until ``--budget`` seconds are
spent: a row that did not fit says so. The tables are rewritten after every row, so a run
cut short still leaves what it measured. Exit code: 1 if a path failed or a row errored
(an OOM is a result, not an error), else 0.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(ROOT))

GB = 2**30


class Report:
    """The tables, rewritten to ``out`` (markdown) and ``out.json`` after every result."""

    def __init__(self, out: Path, args: argparse.Namespace, info: dict) -> None:
        import gpu_common
        import gpu_paths
        import gpu_unet

        self.out, self.args, self.info = out, args, info
        self.models = gpu_unet.models(args.cpu_smoke)
        self.rows = [row for group in gpu_unet.plan() for row in group]
        self.unet: dict[str, dict] = {}
        self.path_keys = [p.key for p in gpu_paths.PATHS]
        self.path_labels = {p.key: p.label for p in gpu_paths.PATHS}
        self.paths: dict[str, dict] = {}
        peak, source = (
            (args.peak_tflops, "given with --peak-tflops")
            if args.peak_tflops
            else (
                gpu_common.bf16_peak(info["name"]) if info["kind"] == "cuda" else (None, "no datasheet peak for a CPU")
            )
        )
        self.peak, self.peak_source = peak, source
        self.memory_kind = gpu_common.memory_kind()
        self.started = time.monotonic()

    # ---- results
    def path(self, path, result: dict) -> None:
        self.paths[path.key] = result
        self.write()

    def row(self, key: str, result: dict) -> None:
        self.unet[key] = result
        self.write()

    def failed(self) -> list[str]:
        bad = [f"path {k}: {r['status']}" for k, r in self.paths.items() if r["status"].startswith("FAIL")]
        bad += [f"row {k}: {r['status']}" for k, r in self.unet.items() if r["status"].startswith("error")]
        return bad

    # ---- rendering
    def header(self) -> list[str]:
        i, a = self.info, self.args
        versions = ", ".join(f"{k} {v}" for k, v in i["versions"].items())
        device = (
            f"{i['count']} x {i['name']} ({i['memory_gb']:.0f} GiB, compute capability {i['capability']}, "
            f"CUDA {i['cuda']}; nvidia-smi {i.get('driver') or 'not available'})"
            if i["kind"] == "cuda"
            else f"CPU: {i['name']} (no CUDA device)"
        )
        peak = f"{self.peak:g} TFLOP/s dense bf16 ({self.peak_source})" if self.peak else f"n/a: {self.peak_source}"
        mode = (
            "--cpu-smoke: tiny UNets at 64 px, compile with the dynamo-only 'eager' backend (inductor "
            "takes minutes on a CPU), 1 warm-up + 2 timed steps: this checks that the script works; "
            "its numbers are not benchmarks"
            if a.cpu_smoke
            else f"{a.warmup} warm-up + {a.steps} timed steps per row (median), budget {a.budget:.0f} s"
        )
        return [
            f"# GPU bench, {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC",
            "",
            f"- command: `bash bench/gpu.sh {' '.join(a.argv)}`".replace("  ", " "),
            f"- device: {device}; host {i['host']}",
            f"- software: Python {i['python']}, {versions}",
            f"- MFU peak: {peak}",
            f"- measured bf16 matmul: {i['matmul_tflops']:.1f} TFLOP/s ({i['matmul_how']})",
            f"- peak memory: {self.memory_kind}",
            f"- mode: {mode}",
            f"- elapsed: {time.monotonic() - self.started:.0f} s",
            "",
        ]

    def path_table(self) -> list[str]:
        lines = [
            "## The trainer's CUDA paths (tiny model, a few steps each)",
            "",
            "| path | result | steps | final loss | key figure | peak mem GB | seconds |",
            "|---|---|---|---|---|---|---|",
        ]
        for key in self.path_keys:
            r = self.paths.get(key, {"status": "pending"})
            lines.append(
                f"| {self.path_labels[key]} | {_cell(r['status'])} | {r.get('steps', '')} | "
                f"{_num(r.get('final_loss'), '.4f')} | {_cell(r.get('figure', ''))} | "
                f"{_num(_gb(r.get('peak_memory_bytes')), '.2f')} | {_num(r.get('seconds'), '.1f')} |"
            )
        return lines + [""]

    def unet_table(self) -> list[str]:
        lines = [
            "## UNet training step (random weights, bf16 autocast, fp32 master weights)",
            "",
            (
                "| model | px | batch | method | optimizer | compile | grad ckpt | result | steps/s | images/s "
                "| first step s | TFLOP/step | TFLOP/s | MFU | of matmul | peak mem GB | trainable M |"
            ),
            "|" + "---|" * 17,
        ]
        for row in self.rows:
            m = self.models[row.model]
            r = self.unet.get(row.key, {"status": "pending"})
            ok = r["status"] == "ok"
            tflops = r["flops_per_step"] * r["steps_per_s"] / 1e12 if ok else None
            mfu = f"{100 * tflops / self.peak:.1f}%" if ok and self.peak else ("n/a" if ok else "")
            of_matmul = f"{100 * tflops / self.info['matmul_tflops']:.1f}%" if ok else ""
            lines.append(
                f"| {m.label} | {m.pixels} | {row.batch} | {row.method} | {row.optimizer} | {row.compile} | "
                f"{'on' if row.checkpointing else 'off'} | {_cell(r['status'])} | {_num(r.get('steps_per_s'), '.2f')} | "
                f"{_num(r.get('images_per_s'), '.2f')} | {_num(r.get('first_step_s'), '.2f')} | "
                f"{_num(r['flops_per_step'] / 1e12 if ok else None, '.4g')} | {_num(tflops, '.4g')} | {mfu} | "
                f"{of_matmul} | {_num(_gb(r.get('peak_memory_bytes')), '.2f')} | "
                f"{_num(r['trainable'] / 1e6 if ok else None, '.2f')} |"
            )
        notes = [
            "",
            (
                "- TFLOP/step: model FLOPs of forward + backward (torch.utils.flop_counter under the math SDPA "
                "kernel, counted once per model and method at batch 1, times the batch; checkpointing's "
                "recomputation is not counted, so its MFU shows what it costs); the optimizer step is not counted."
            ),
            "- MFU: TFLOP/s over the datasheet peak above; 'of matmul': over the measured bf16 matmul rate.",
            (
                "- first step s: the first step's time (model and optimizer state already built); a compiled "
                "row's includes the compilation."
            ),
        ]
        params = {self.models[k].label: v for k, v in self._params().items()}
        if params:
            notes.append("- parameters: " + ", ".join(f"{k} {v / 1e6:.1f} M" for k, v in params.items()))
        return lines + notes + [""]

    def _params(self) -> dict[str, int]:
        found = {}
        for row in self.rows:
            r = self.unet.get(row.key, {})
            if "params" in r:
                found[row.model] = r["params"]
        return found

    def write(self) -> None:
        text = "\n".join(self.header() + self.path_table() + self.unet_table())
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(text)
        self.out.with_suffix(".json").write_text(
            json.dumps(
                {
                    "info": self.info,
                    "peak_tflops": self.peak,
                    "peak_source": self.peak_source,
                    "paths": self.paths,
                    "unet": self.unet,
                },
                indent=1,
            )
        )

    def text(self) -> str:
        return self.out.read_text()


def _cell(text: str) -> str:
    """Text for a table cell: one line, no column separators."""
    return " ".join(str(text).split()).replace("|", "/")


def _num(value, fmt: str) -> str:
    return "" if value is None else format(value, fmt)


def _gb(value) -> float | None:
    return None if value is None else value / GB


# --------------------------------------------------------------------------- children


def child_command(*args: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), *args]


def child_env(smoke: bool) -> dict[str, str]:
    import gpu_paths

    return gpu_paths.child_env(smoke)


def run_info(smoke: bool) -> dict:
    """The device, in a child process: the parent never initialises CUDA. (With
    --cpu-smoke, in this process: one interpreter start less.)"""
    if smoke:
        import gpu_common

        return gpu_common.device_info(smoke)
    done = subprocess.run(
        child_command("--child", "info", *(["--cpu-smoke"] if smoke else [])),
        env=child_env(smoke),
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    if done.returncode != 0:
        sys.exit(f"gpu bench: could not read the device:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def stream_rows(proc: subprocess.Popen, deadline: float, report: Report) -> tuple[set[str], bool]:
    """Record each row the child prints as it comes, until it exits or the deadline passes:
    ``(keys of the rows measured, whether the deadline passed)``."""
    import gpu_unet

    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    done: set[str] = set()
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return done, True
        try:
            line = lines.get(timeout=min(left, 5.0))
        except queue.Empty:
            continue
        if line is None:
            return done, False
        try:
            item = json.loads(line)
        except json.JSONDecodeError:
            continue
        row = gpu_unet.Row(**item.pop("row"))
        done.add(row.key)
        report.row(row.key, item)


def run_unet_group(rows, args, report: Report, deadline: float, log) -> None:
    left = deadline - time.monotonic()
    if left < 30:
        for row in rows:
            report.row(row.key, {"status": f"not run: time budget ({args.budget:.0f} s) spent"})
        return
    spec = json.dumps([asdict(r) for r in rows])
    cmd = child_command(
        "--child",
        "unet",
        "--rows",
        spec,
        "--warmup",
        str(args.warmup),
        "--steps",
        str(args.steps),
        *(["--cpu-smoke"] if args.cpu_smoke else []),
    )
    with tempfile.TemporaryFile(mode="w+") as stderr_file:
        proc = subprocess.Popen(
            cmd,
            env=child_env(args.cpu_smoke),
            stdout=subprocess.PIPE,
            stderr=stderr_file,
            text=True,
            start_new_session=True,
        )  # a kill reaches inductor's workers too
        done, timed_out = stream_rows(proc, deadline, report)
        if timed_out:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        stderr_file.seek(0)
        log(f"===== UNet rows {[r.key for r in rows]} (exit {proc.returncode})\n{stderr_file.read()}")
    for row in rows:
        if row.key not in done:
            why = (
                f"not run: time budget ({args.budget:.0f} s) spent"
                if timed_out
                else f"error: the bench process exited {proc.returncode} (see the log)"
            )
            report.row(row.key, {"status": why})


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(
        prog="bench/gpu.sh", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--cpu-smoke", action="store_true", help="tiny models on this CPU, 1-2 steps: check that the script works (CI)"
    )
    p.add_argument(
        "--out",
        type=Path,
        help="markdown table to write (also OUT.json and OUT.log); default bench/results/gpu-<date>-<device>.md",
    )
    p.add_argument("--budget", type=float, help="seconds for the whole bench (default 450 on a GPU)")
    p.add_argument("--only", choices=("paths", "unet"), help="run one part only")
    p.add_argument("--warmup", type=int, help="warm-up steps per row (default 3; smoke 1)")
    p.add_argument("--steps", type=int, help="timed steps per row (default 10; smoke 2)")
    p.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak, if its name is not known")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder of the trainer runs")
    # children
    p.add_argument("--child", choices=("info", "unet", "trainer"), help=argparse.SUPPRESS)
    p.add_argument("--rows", help=argparse.SUPPRESS)
    p.add_argument("--config", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--probe", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.argv = argv
    smoke = args.cpu_smoke
    args.warmup = args.warmup or (1 if smoke else 3)
    args.steps = args.steps or (2 if smoke else 10)
    args.budget = args.budget or (600.0 if smoke else 450.0)

    if args.child == "info":
        import gpu_common

        print(json.dumps(gpu_common.device_info(smoke)))
        return 0
    if args.child == "unet":
        import gpu_unet

        rows = [gpu_unet.Row(**r) for r in json.loads(args.rows)]
        gpu_unet.run_group(rows, smoke=smoke, warmup=args.warmup, steps=args.steps)
        return 0
    if args.child == "trainer":
        import gpu_paths

        return gpu_paths.probe_main(args.config, args.workdir, args.probe)

    start = time.monotonic()
    deadline = start + args.budget
    info = run_info(smoke)
    if info["kind"] != "cuda" and not smoke:
        print(
            "gpu bench: this machine has no CUDA device; run with --cpu-smoke to check the script here", file=sys.stderr
        )
        return 2
    out = args.out or ROOT / "bench" / "results" / (
        f"gpu-{dt.date.today():%Y-%m-%d}-{re.sub(r'[^A-Za-z0-9]+', '-', info['name']).strip('-').lower()}.md"
    )
    report = Report(out, args, info)
    log_file = out.with_suffix(".log")
    out.parent.mkdir(parents=True, exist_ok=True)
    log_file.write_text("")

    def log(text: str) -> None:
        with log_file.open("a") as f:
            f.write(text.rstrip() + "\n")

    report.write()
    print("\n".join(report.header()), flush=True)
    root = Path(tempfile.mkdtemp(prefix="gpu-bench-"))
    try:
        if args.only != "unet":
            import gpu_paths

            def emit(path, result):
                report.path(path, result)
                print(f"path {path.key}: {result['status']}", flush=True)

            gpu_paths.run_paths(
                root,
                cuda=info["kind"] == "cuda",
                gpus=info["count"],
                smoke=smoke,
                deadline=deadline,
                log=log,
                emit=emit,
            )
        else:
            for key in report.path_keys:
                report.paths[key] = {"status": "not run: --only unet"}
        if args.only != "paths":
            import gpu_unet

            groups = gpu_unet.plan()
            if smoke:  # one process for all: the groups are separate on a GPU to contain compile failures
                groups = [[row for group in groups for row in group]]
            for group in groups:
                run_unet_group(group, args, report, deadline, log)
                for row in group:
                    print(f"row {row.key}: {report.unet[row.key]['status']}", flush=True)
        else:
            for row in report.rows:
                report.unet[row.key] = {"status": "not run: --only paths"}
        report.write()
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print()
    print(report.text())
    print(f"\nwritten: {out} (and {out.with_suffix('.json').name}, {log_file.name})")
    bad = report.failed()
    if bad:
        print("\nFAILED:\n  " + "\n  ".join(bad), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
