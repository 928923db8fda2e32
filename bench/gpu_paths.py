"""The trainer's CUDA paths that CI cannot run, each a short real run of the trainer.

Each path trains the tiny model (``dreambooth.trainer.tiny.build_tiny_model``) from
``file://`` inputs for a few steps, as a pod does:

- single-process paths: ``python bench/gpu_bench.py --child trainer ...``, which runs
  ``dreambooth.trainer.__main__.main`` (what ``python -m dreambooth.trainer`` runs) in a
  fresh process, with a probe on ``Loop.run_step`` that records, after every step, the
  loss, the fp16 loss scaler's scale, where the trained weights live and a checksum of
  them, and at the end the optimizer's 8-bit state and the peak memory;
- two processes: the pod's own launch script, ``dreambooth.operator.podtemplate.command()``
  of a ``gpusPerNode: 2`` job (``accelerate launch --multi_gpu --num_processes 2`` and the
  verdict step), with its config and work folder moved to a temporary folder and a free
  rendezvous port; every rank logs a checksum of its weights after each step
  (``DREAMBOOTH_DEBUG_WEIGHT_CHECKSUMS``), which must agree, and NCCL must be the backend.

With ``--cpu-smoke`` the paths that need CUDA say so and are skipped; bf16 and 8-bit AdamW
run on the CPU (bitsandbytes' CPU backend) and the two processes use gloo: the same code
end to end, so CI sees this script work.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import os
import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PROMPT = "a photo of zwx toy cat"
TI_PROMPT = "a photo of <zwx> toy cat"
STEPS = 4


@dataclass(frozen=True)
class Path_:
    key: str
    label: str
    training: dict = field(default_factory=dict)
    needs_cuda: str | None = None  # why it cannot run without CUDA
    processes: int = 1
    checks: tuple[str, ...] = ()
    family: str = "sd"  # the tiny model it trains: sd (build_tiny_model) or sd3 (build_tiny_sd3)
    spec: dict = field(default_factory=dict)  # other spec sections it sets


PATHS = [
    Path_(
        "gpu1",
        "gpusPerNode 1: trains on the GPU (fp32, TF32)",
        {"mixedPrecision": "no"},
        needs_cuda="no CUDA device: a gpusPerNode 1 job fails with GPU_UNAVAILABLE on a CPU",
        checks=("on_gpu", "tf32"),
    ),
    Path_("bf16", "bf16 autocast", {"mixedPrecision": "bf16"}, checks=("bf16",)),
    Path_(
        "fp16",
        "fp16 with loss scaling",
        {"mixedPrecision": "fp16"},
        needs_cuda="fp16 needs CUDA: the trainer refuses fp16 on a CPU",
        checks=("scaler",),
    ),
    Path_(
        "fp16-ti",
        "fp16 + textual inversion (3 TI steps, then 3 DreamBooth steps)",
        {
            "mixedPrecision": "fp16",
            "steps": 3,
            "textualInversion": {"steps": 3, "placeholderToken": "<zwx>", "initializerToken": "cat"},
        },
        needs_cuda="fp16 needs CUDA: the trainer refuses fp16 on a CPU",
        checks=("scaler", "two_phases"),
    ),
    Path_("adamw8bit", "8-bit AdamW (bitsandbytes)", {"optimizer": "adamw8bit"}, checks=("eight_bit",)),
    Path_("nccl2", "2 processes, one per GPU: the pod's launch script, NCCL", {"mixedPrecision": "bf16"}, processes=2),
    # SD3 LoRA, T5 kept, sampling at the end: its frozen text encoders wait on the CPU between
    # encodings, the VAE between sample rounds, and both come back to the GPU for the round
    Path_(
        "sd3-lora",
        "SD3 LoRA bf16, text encoders and VAE parked on the CPU, a sample round",
        {"mixedPrecision": "bf16", "method": "lora", "learningRate": 1e-3},
        checks=("parked",),
        family="sd3",
        spec={
            "validation": {"everySteps": STEPS, "inferenceSteps": 2, "imagesPerPrompt": 1},
            "output": {"formats": ["lora"]},
        },
    ),
]


def job_document(root: Path, path: Path_, *, gpus: int, nodes: int = 1) -> dict:
    training = {"steps": STEPS, "batchSize": 2, "resolution": 64, "learningRate": 1e-4, **copy.deepcopy(path.training)}
    prompt = TI_PROMPT if "textualInversion" in training else PROMPT
    steps = training["steps"] + training.get("textualInversion", {}).get("steps", 0)
    return {
        "apiVersion": "dreambooth.io/v1alpha1",
        "kind": "DreamBoothJob",
        "metadata": {
            "name": f"gpu-bench-{path.key}",
            "namespace": "bench",
            "uid": "00000000-0000-4000-8000-000000000000",
        },
        "spec": {
            "preset": "object",
            "baseModel": {"uri": model_dir(root, path.family).as_uri(), "family": path.family},
            "instance": {"uri": (root / "instance").as_uri(), "prompt": prompt},
            "training": training,
            "validation": {"enabled": False},
            "checkpointing": {"everySteps": steps, "keep": 1},
            "output": {"uri": (root / "out" / path.key).as_uri()},
            "resources": {"nodes": nodes, "gpusPerNode": gpus},
        }
        | {
            section: {**body, **({"uri": (root / "out" / path.key).as_uri()} if section == "output" else {})}
            for section, body in path.spec.items()
        },
    }


def model_dir(root: Path, family: str) -> Path:
    return root / ("base-model" if family == "sd" else f"base-model-{family}")


def write_config(doc: dict, folder: Path) -> Path:
    from dreambooth.api import Defaults, build_trainer_config, validate_job

    config = build_trainer_config(validate_job(doc), Defaults(output_root="file:///unused"))
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / "trainer-config.json"
    target.write_text(json.dumps(config.wire()))
    return target


def prepare_inputs(root: Path) -> None:
    from dreambooth.demo import draw_toy_cats
    from dreambooth.trainer.tiny import build_tiny_model
    from dreambooth.trainer.tiny_sd3 import build_tiny_sd3

    for family, build in (("sd", build_tiny_model), ("sd3", build_tiny_sd3)):
        if not (model_dir(root, family) / "model_index.json").is_file():
            build(model_dir(root, family), resolution=64)
    if not (root / "instance").is_dir():
        draw_toy_cats(root / "instance")


def child_env(smoke: bool) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        PYTHONUNBUFFERED="1",
        PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])]),
    )
    if smoke:
        env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    return env


# ------------------------------------------------------------------- one process: the probe


def probe_main(config: Path, workdir: Path, probe: Path) -> int:
    """Run the trainer's entry point in this process with a probe on every step."""
    import torch
    from gpu_common import peak_memory_bytes, reset_peak_memory

    from dreambooth.trainer import __main__ as trainer_main
    from dreambooth.trainer.loop import Loop
    from dreambooth.trainer.run import weights_checksum

    record: dict = {"steps": [], "phases": {}}
    original = Loop.run_step

    def run_step(self, step):
        phase = record["phases"].setdefault(self.phase, {"before": weights_checksum(self)})
        out = original(self, step)
        phase["after"] = weights_checksum(self)
        entry = {"step": step, "phase": self.phase, "loss": float(out["loss"])}
        scaler = self.accelerator.scaler
        if scaler is not None:
            entry["scale"] = float(scaler.get_scale())
        record["steps"].append(entry)
        record["devices"] = sorted({p.device.type for p in self.parameters})
        record["param_dtypes"] = sorted({str(p.dtype) for p in self.parameters})
        record["mixed_precision"] = self.accelerator.mixed_precision
        record["text_encoder_devices"] = sorted({p.device.type for te in self.text_encoders for p in te.parameters()})
        record["vae_devices"] = sorted({p.device.type for p in self.vae.parameters()})
        inner = getattr(self.optimizer, "optimizer", self.optimizer)
        record["optimizer"] = f"{type(inner).__module__}.{type(inner).__name__}"
        states = [t for s in inner.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
        eight_bit = [t for t in states if t.dtype == torch.uint8]
        record["uint8_states"] = len(eight_bit)
        record["state_devices"] = sorted({t.device.type for t in eight_bit})
        return out

    Loop.run_step = run_step
    reset_peak_memory()
    code = trainer_main.main(
        ["--config", str(config), "--workdir", str(workdir), "--termination-log", str(workdir / "termination-log")]
    )
    record["peak_memory_bytes"] = peak_memory_bytes()
    record["exit_code"] = int(code)
    probe.write_text(json.dumps(record))
    return int(code)


def judge(path: Path_, record: dict, *, cuda: bool, log: str = "") -> tuple[bool, str, list[str]]:
    """``(passed, key figure, problems)`` of a single-process run, from its probe record
    (and its log)."""
    problems: list[str] = []
    steps = record.get("steps", [])
    if record.get("exit_code") != 0:
        problems.append(f"exit code {record.get('exit_code')}")
    losses = [s["loss"] for s in steps]
    if not steps:
        problems.append("no step ran")
    if not all(math.isfinite(x) for x in losses):
        problems.append(f"loss not finite: {losses}")
    want = "cuda" if cuda else "cpu"
    if steps and record.get("devices") != [want]:
        problems.append(f"trained weights on {record.get('devices')}, not {want}")
    for phase, sums in record.get("phases", {}).items():
        if sums.get("before") == sums.get("after"):
            problems.append(f"{phase}: the trained weights did not change")
    figures = []
    if "on_gpu" in path.checks:
        figures.append(f"weights on {','.join(record.get('devices', []))}")
    if "tf32" in path.checks:
        if "TF32 allowed for fp32 matmuls" not in log:
            problems.append("the trainer did not allow TF32")
        else:
            figures.append("TF32 allowed")
    if "bf16" in path.checks:
        if record.get("mixed_precision") != "bf16":
            problems.append(f"mixed precision {record.get('mixed_precision')}, not bf16")
        figures.append(f"autocast {record.get('mixed_precision')}, weights {','.join(record.get('param_dtypes', []))}")
    if "scaler" in path.checks:
        scales = [s.get("scale") for s in steps]
        if not steps or None in scales:
            problems.append("no fp16 loss scaler on some steps")
        else:
            drops = sum(1 for a, b in itertools.pairwise(scales) if b < a)
            figures.append(f"scale {scales[0]:g} -> {scales[-1]:g} ({drops} overflow step(s) skipped)")
    if "two_phases" in path.checks:
        phases = [s["phase"] for s in steps]
        counts = {p: phases.count(p) for p in dict.fromkeys(phases)}
        if len(counts) != 2:
            problems.append(f"phases run: {counts}")
        figures.append(", ".join(f"{p}: {n} steps" for p, n in counts.items()))
    if "eight_bit" in path.checks:
        if not record.get("optimizer", "").startswith("bitsandbytes"):
            problems.append(f"optimizer {record.get('optimizer')}")
        if not record.get("uint8_states"):
            problems.append("no 8-bit optimizer state")
        if record.get("state_devices") and record.get("state_devices") != [want]:
            problems.append(f"optimizer state on {record.get('state_devices')}")
        figures.append(
            f"{record.get('optimizer', '?').rsplit('.', 1)[-1]}, {record.get('uint8_states', 0)} "
            f"uint8 state tensors on {','.join(record.get('state_devices', []))}"
        )
    if "parked" in path.checks:
        where, vae = record.get("text_encoder_devices"), record.get("vae_devices")
        if cuda and where != ["cpu"]:
            problems.append(f"the frozen text encoders were on {where} between steps, not parked on the CPU")
        if cuda and vae != ["cpu"]:
            problems.append(f"the VAE was on {vae} between steps, not parked on the CPU")
        if not record.get("sampled"):
            problems.append("no sample round was written")
        figures.append(
            f"text encoders on {','.join(where or ['?'])}, VAE on {','.join(vae or ['?'])} between "
            "steps; samples written"
        )
    return not problems, "; ".join(figures), problems


def run_single(path: Path_, root: Path, *, cuda: bool, smoke: bool, timeout: float, log) -> dict:
    folder = root / "runs" / path.key
    config = write_config(job_document(root, path, gpus=1 if cuda else 0), folder)
    probe = folder / "probe.json"
    cmd = [
        sys.executable,
        str(HERE / "gpu_bench.py"),
        "--child",
        "trainer",
        "--config",
        str(config),
        "--workdir",
        str(folder / "work"),
        "--probe",
        str(probe),
    ]
    start = time.perf_counter()
    try:
        done = subprocess.run(cmd, env=child_env(smoke), capture_output=True, text=True, timeout=timeout, check=False)
        output, code = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired as err:
        output, code = _text(err.stdout) + _text(err.stderr), None
    seconds = time.perf_counter() - start
    log(f"===== trainer path {path.key} (exit {code}, {seconds:.1f} s)\n{output}")
    if code is None:
        return {"status": f"FAIL: timed out after {timeout:.0f} s", "seconds": seconds}
    if not probe.is_file():
        return {"status": f"FAIL: exit {code}, no probe record: {last_error(output)}", "seconds": seconds}
    record = json.loads(probe.read_text())
    record["sampled"] = (root / "out" / path.key / "samples" / f"step-{STEPS}.png").is_file()
    passed, figure, problems = judge(path, record, cuda=cuda, log=output)
    losses = [s["loss"] for s in record["steps"]]
    return {
        "status": "pass" if passed else "FAIL: " + "; ".join(problems)[:300],
        "steps": len(losses),
        "final_loss": losses[-1] if losses else None,
        "figure": figure,
        "peak_memory_bytes": record.get("peak_memory_bytes"),
        "seconds": seconds,
    }


# ------------------------------------------------------------------- two processes


def pod_command(doc: dict) -> list[str]:
    """The trainer container's command the operator would give this job's pods."""
    from dreambooth.api import validate_job

    trainerinputs = operator_module("trainerinputs")
    inputs = trainerinputs.TrainerInputs(job=validate_job(doc), settings=operator_settings())
    return operator_module("podtemplate").command(inputs)


def operator_module(name: str):
    """``dreambooth.operator.<name>`` without running ``dreambooth/operator/__init__.py``,
    which imports kopf to register the handlers: the builders are pure functions that need
    only pydantic, and a GPU machine has no kopf."""
    import importlib
    import types

    if "dreambooth.operator" not in sys.modules:
        import dreambooth

        package = types.ModuleType("dreambooth.operator")
        package.__path__ = [str(Path(dreambooth.__file__).parent / "operator")]
        sys.modules["dreambooth.operator"] = package
    return importlib.import_module(f"dreambooth.operator.{name}")


def operator_settings():
    return operator_module("settings").OperatorSettings()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shims(folder: Path) -> Path:
    """``python`` and ``accelerate`` for the launch script: this interpreter's, as the
    trainer image's are on its PATH."""
    folder.mkdir(parents=True, exist_ok=True)
    # scripts, not symlinks: a symlink to a virtualenv's python starts the base interpreter
    # without the virtualenv's packages (python finds pyvenv.cfg beside the path it was run by)
    for name, args in (("python", ""), ("accelerate", " -m accelerate.commands.accelerate_cli")):
        shim = folder / name
        shim.write_text(f'#!/bin/sh\nexec "{sys.executable}"{args} "$@"\n')
        shim.chmod(0o755)
    return folder


def run_two_processes(path: Path_, root: Path, *, cuda: bool, gpus: int, smoke: bool, timeout: float, log) -> dict:
    if cuda and gpus < 2:
        return {"status": f"skipped: this machine has {gpus} CUDA device (2 needed: one process per GPU)"}
    folder = root / "runs" / path.key
    if smoke:  # gloo on the CPU; the command is still the one a 2-GPU pod gets
        training = {**path.training, "mixedPrecision": "no"}
        path = Path_(path.key, path.label, training, processes=2)
        config = write_config(job_document(root, path, gpus=0, nodes=2), folder)
    else:
        config = write_config(job_document(root, path, gpus=2), folder)
    argv = pod_command(job_document(root, path, gpus=2))
    if argv[:2] != ["/bin/sh", "-c"] or "--num_machines 1" not in argv[2]:
        return {"status": f"FAIL: unexpected pod command {argv!r:.200}"}
    port = free_port()
    argv = [*argv[:2], argv[2].replace("--num_machines 1", f"--num_machines 1 --main_process_port {port}", 1)]
    work = folder / "work"
    env = child_env(smoke)
    podtemplate = operator_module("podtemplate")
    env.update(
        DREAMBOOTH_CONFIG=str(config),
        DREAMBOOTH_WORKDIR=str(work),
        DREAMBOOTH_TERMINATION_LOG=str(folder / "termination-log"),
        DREAMBOOTH_DEBUG_WEIGHT_CHECKSUMS="1",
        TORCH_ELASTIC_SHUTDOWN_TIMEOUT=str(podtemplate.SHUTDOWN_TIMEOUT_SECONDS),
        PATH=os.pathsep.join([str(shims(folder / "bin")), env.get("PATH", "")]),
    )
    if cuda:
        env["NCCL_DEBUG"] = "INFO"
    start = time.perf_counter()
    try:
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout, check=False, cwd=ROOT)
        output, code = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired as err:
        output, code = _text(err.stdout) + _text(err.stderr), None
    seconds = time.perf_counter() - start
    log(f"===== trainer path {path.key} (exit {code}, {seconds:.1f} s)\n{output}")
    if code is None:
        return {"status": f"FAIL: timed out after {timeout:.0f} s", "seconds": seconds}
    problems = []
    if code != 0:
        problems.append(f"pod exit {code}: {last_error(output)}")
    sums: dict[str, dict[str, str]] = {}
    for rank, step, checksum in re.findall(r"rank(\d+) INFO \S+: weights step=(\d+) checksum=(\S+)", output):
        sums.setdefault(step, {})[rank] = checksum
    total = STEPS
    complete = [s for s, by_rank in sums.items() if set(by_rank) == {"0", "1"}]
    if len(complete) != total:
        problems.append(f"steps logged by both ranks: {len(complete)} of {total}")
    differ = [s for s in complete if len(set(sums[s].values())) != 1]
    if differ:
        problems.append(f"ranks' weights differ after steps {differ}")
    backend = "gloo" if smoke else "nccl"
    if cuda and "NCCL INFO" not in output:
        problems.append("no NCCL INFO lines: NCCL was not used")
    summary_file = folder / "termination-log"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    loss = summary.get("loss")
    if loss is None or not math.isfinite(loss):
        problems.append(f"pod verdict loss {loss!r}")
    figure = (
        f"{backend}, ranks' weights identical after {len(complete) - len(differ)} of {total} steps, "
        f"pod verdict exit {summary.get('exitCode')}"
    )
    return {
        "status": "pass" if not problems else "FAIL: " + "; ".join(problems)[:300],
        "steps": len(complete),
        "final_loss": loss,
        "figure": figure,
        "seconds": seconds,
    }


# ------------------------------------------------------------------- all paths


def run_paths(root: Path, *, cuda: bool, gpus: int, smoke: bool, deadline: float, log, emit) -> None:
    """Run every path (or say why not); ``emit(key, result)`` after each."""
    prepare_inputs(root)
    for path in PATHS:
        left = deadline - time.monotonic()
        if left < 20:
            emit(path, {"status": "not run: time budget"})
            continue
        if path.needs_cuda and not cuda:
            emit(path, {"status": f"skipped: {path.needs_cuda}"})
            continue
        timeout = min(left, 240.0 if path.processes > 1 else 180.0)
        if path.processes > 1:
            result = run_two_processes(path, root, cuda=cuda, gpus=gpus, smoke=smoke, timeout=timeout, log=log)
        else:
            result = run_single(path, root, cuda=cuda, smoke=smoke, timeout=timeout, log=log)
        emit(path, result)


def last_error(output: str) -> str:
    lines = [x for x in output.strip().splitlines() if "ERROR" in x or "Error" in x or "error" in x]
    return (lines[-1] if lines else (output.strip().splitlines() or ["(no output)"])[-1])[-240:]


def _text(data) -> str:
    if data is None:
        return ""
    return data.decode(errors="replace") if isinstance(data, bytes) else data
