"""bench/gpu.sh: the GPU benchmark runs end to end here (--cpu-smoke, tiny models), its
full-size UNets are the published ones, and what it concludes from a run is right."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import gpu_common
import gpu_paths
import gpu_unet
import gpu_wheels


def table(text: str, heading: str) -> list[dict[str, str]]:
    """The markdown table under ``## heading`` as dicts keyed by its header cells."""
    section = text.split(f"## {heading}", 1)[1].split("\n## ", 1)[0]
    lines = [x for x in section.splitlines() if x.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert set(lines[1].replace("|", "")) == {"-"}
    rows = []
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        assert len(cells) == len(header), line
        rows.append(dict(zip(header, cells, strict=True)))
    return rows


def positive(cell: str) -> float:
    value = float(cell.rstrip("%"))
    assert math.isfinite(value) and value > 0, cell
    return value


@pytest.mark.slow
def test_cpu_smoke_runs_every_row_and_path(tmp_path):
    out = tmp_path / "gpu.md"
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu.sh"), "--cpu-smoke", "--out", str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    text = out.read_text()
    assert text in done.stdout  # printed and written
    assert "MFU peak: n/a: no datasheet peak for a CPU" in text
    assert re.search(r"measured bf16 matmul: [0-9.]+ TFLOP/s", text)
    assert out.with_suffix(".log").stat().st_size > 0

    # the UNet table: one row per planned configuration, in order, every number positive
    rows = table(text, "UNet training step")
    plan = [row for group in gpu_unet.plan() for row in group]
    models = gpu_unet.models(smoke=True)
    assert [(r["model"], int(r["batch"]), r["method"], r["optimizer"], r["compile"], r["grad ckpt"]) for r in rows] == [
        (models[p.model].label, p.batch, p.method, p.optimizer, p.compile, "on" if p.checkpointing else "off")
        for p in plan
    ]
    flops: dict[tuple[str, str], dict[int, float]] = {}
    trainable: dict[tuple[str, str], float] = {}
    for r in rows:
        assert r["result"] == "ok", r
        for column in (
            "px",
            "steps/s",
            "images/s",
            "first step s",
            "TFLOP/step",
            "TFLOP/s",
            "of matmul",
            "peak mem GB",
            "trainable M",
        ):
            positive(r[column])
        assert r["MFU"] == "n/a"  # a CPU has no datasheet peak
        assert float(r["images/s"]) == pytest.approx(float(r["steps/s"]) * int(r["batch"]), rel=0.02)
        flops.setdefault((r["model"], r["method"]), {})[int(r["batch"])] = float(r["TFLOP/step"])
        trainable[(r["model"], r["method"])] = float(r["trainable M"])
    for (model, method), by_batch in flops.items():
        assert by_batch[4] == pytest.approx(4 * by_batch[1], rel=1e-3), (model, method)
    for model in {m for m, _ in flops}:
        # LoRA trains a small fraction, and skips the weight gradients of the frozen layers
        assert trainable[(model, "lora")] < 0.1 * trainable[(model, "full")]
        assert flops[(model, "lora")][1] < flops[(model, "full")][1]
    # both architectures really are different models (SDXL's added text/time embedding)
    assert len({by_batch[1] for (_, method), by_batch in flops.items() if method == "full"}) == 2

    # the trainer's CUDA paths: what runs on a CPU passes, the rest says why not
    paths = table(text, "The trainer's CUDA paths")
    assert [p["path"] for p in paths] == [p.label for p in gpu_paths.PATHS]
    by_key = dict(zip([p.key for p in gpu_paths.PATHS], paths, strict=True))
    for key in ("gpu1", "fp16", "fp16-ti"):
        assert by_key[key]["result"].startswith("skipped: ") and "CUDA" in by_key[key]["result"], by_key[key]
    for key in ("bf16", "adamw8bit", "nccl2", "sd3-lora"):
        p = by_key[key]
        assert p["result"] == "pass", p
        assert int(p["steps"]) == gpu_paths.STEPS
        positive(p["final loss"])
        positive(p["seconds"])
        assert p["key figure"]
    positive(by_key["bf16"]["peak mem GB"])
    assert "autocast bf16" in by_key["bf16"]["key figure"]
    assert re.search(r"AdamW8bit, [1-9]\d* uint8 state tensors on cpu", by_key["adamw8bit"]["key figure"])
    assert "gloo, ranks' weights identical after 4 of 4 steps, pod verdict exit 0" in by_key["nccl2"]["key figure"]
    # on a CPU the text encoders stay where they are (nothing to park them from)
    assert by_key["sd3-lora"]["key figure"] == "text encoders on cpu, VAE on cpu between steps; samples written"

    raw = json.loads(out.with_suffix(".json").read_text())
    assert set(raw["unet"]) == {p.key for p in plan}
    assert raw["info"]["kind"] == "cpu"


def test_full_size_unets_are_the_published_ones():
    """SD 1.5's UNet has 859,520,964 parameters and SDXL base's 2,567,463,684 (their
    diffusers checkpoints); built on the meta device, so nothing is allocated."""
    import torch
    from diffusers import UNet2DConditionModel

    counts = {}
    for key, model in gpu_unet.models(smoke=False).items():
        with torch.device("meta"):
            counts[key] = sum(p.numel() for p in UNet2DConditionModel(**model.config).parameters())
    assert counts == {"sd15": 859_520_964, "sdxl": 2_567_463_684}
    assert {k: m.pixels for k, m in gpu_unet.models(smoke=False).items()} == {"sd15": 512, "sdxl": 1024}


@pytest.mark.parametrize(
    ("name", "tflops"),
    [
        ("NVIDIA H100 80GB HBM3", 989.5),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H100 NVL", 835.5),
        ("NVIDIA H200", 989.5),
        ("NVIDIA H200 NVL", 835.5),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA A100 80GB PCIe", 312.0),
        ("NVIDIA L40S", 362.05),
        ("NVIDIA L4", 121.0),
        ("NVIDIA A10G", 70.0),
        ("NVIDIA A10", 125.0),
        ("NVIDIA L40", None),
        ("Tesla T4", None),
    ],
)
def test_bf16_peak_from_the_device_name(name, tflops):
    peak, source = gpu_common.bf16_peak(name)
    assert peak == tflops
    assert source


def record(steps, *, devices=("cuda",), changed=True, **extra) -> dict:
    phases = {}
    for s in steps:
        phases.setdefault(s.get("phase", "dreambooth"), {"before": "0x1", "after": "0x2" if changed else "0x1"})
    return {
        "exit_code": 0,
        "steps": steps,
        "phases": phases,
        "devices": list(devices),
        "param_dtypes": ["torch.float32"],
        "mixed_precision": "fp16",
        **extra,
    }


def path(key: str) -> gpu_paths.Path_:
    return next(p for p in gpu_paths.PATHS if p.key == key)


def test_judging_the_fp16_runs():
    steps = [
        {"step": i, "phase": "dreambooth", "loss": 0.5, "scale": s} for i, s in enumerate([65536.0, 32768.0, 32768.0])
    ]
    ok, figure, problems = gpu_paths.judge(path("fp16"), record(steps), cuda=True)
    assert (ok, figure, problems) == (True, "scale 65536 -> 32768 (1 overflow step(s) skipped)", [])

    no_scaler = [{k: v for k, v in s.items() if k != "scale"} for s in steps]
    assert "no fp16 loss scaler on some steps" in gpu_paths.judge(path("fp16"), record(no_scaler), cuda=True)[2]
    assert (
        "dreambooth: the trained weights did not change"
        in gpu_paths.judge(path("fp16"), record(steps, changed=False), cuda=True)[2]
    )
    assert (
        "trained weights on ['cpu'], not cuda"
        in gpu_paths.judge(path("fp16"), record(steps, devices=("cpu",)), cuda=True)[2]
    )
    nan = [{**steps[0], "loss": float("nan")}]
    assert not gpu_paths.judge(path("fp16"), record(nan), cuda=True)[0]

    ti = [
        {"step": i, "phase": p, "loss": 0.4, "scale": 256.0}
        for i, p in enumerate(["textual_inversion"] * 3 + ["dreambooth"] * 3)
    ]
    ok, figure, _ = gpu_paths.judge(path("fp16-ti"), record(ti), cuda=True)
    assert ok and "textual_inversion: 3 steps, dreambooth: 3 steps" in figure
    assert "phases run" in gpu_paths.judge(path("fp16-ti"), record(ti[3:]), cuda=True)[2][0]
    crashed = {**record(ti[:1]), "exit_code": 1}
    assert "exit code 1" in gpu_paths.judge(path("fp16-ti"), crashed, cuda=True)[2]


def test_judging_the_gpu_run():
    steps = [{"step": 0, "phase": "dreambooth", "loss": 0.5}]
    log = "rank0 INFO dreambooth.trainer: TF32 allowed for fp32 matmuls and convolutions on NVIDIA H200\n"
    assert gpu_paths.judge(path("gpu1"), record(steps), cuda=True, log=log) == (
        True,
        "weights on cuda; TF32 allowed",
        [],
    )
    assert gpu_paths.judge(path("gpu1"), record(steps), cuda=True, log="")[2] == ["the trainer did not allow TF32"]
    assert gpu_paths.judge(path("gpu1"), record(steps, devices=("cpu",)), cuda=True, log=log)[2] == [
        "trained weights on ['cpu'], not cuda"
    ]


def test_judging_the_parked_text_encoders():
    steps = [{"step": s, "phase": "dreambooth", "loss": 0.1} for s in range(4)]

    def record(where, vae=("cpu",), sampled=True):
        return {
            "exit_code": 0,
            "steps": steps,
            "devices": ["cuda"],
            "phases": {"dreambooth": {"before": 1, "after": 2}},
            "text_encoder_devices": where,
            "vae_devices": list(vae),
            "sampled": sampled,
        }

    ok, figure, _ = gpu_paths.judge(path("sd3-lora"), record(["cpu"]), cuda=True)
    assert ok and figure == "text encoders on cpu, VAE on cpu between steps; samples written"
    assert "text encoders were on ['cuda']" in gpu_paths.judge(path("sd3-lora"), record(["cuda"]), cuda=True)[2][0]
    assert "VAE was on ['cuda']" in gpu_paths.judge(path("sd3-lora"), record(["cpu"], ["cuda"]), cuda=True)[2][0]
    assert (
        "no sample round was written" in gpu_paths.judge(path("sd3-lora"), record(["cpu"], sampled=False), cuda=True)[2]
    )


def test_judging_the_8bit_optimizer_run():
    steps = [{"step": 0, "phase": "dreambooth", "loss": 0.5}]
    good = record(steps, optimizer="bitsandbytes.optim.adamw.AdamW8bit", uint8_states=12, state_devices=["cuda"])
    ok, figure, _ = gpu_paths.judge(path("adamw8bit"), good, cuda=True)
    assert ok and figure == "AdamW8bit, 12 uint8 state tensors on cuda"
    plain = record(steps, optimizer="torch.optim.adamw.AdamW", uint8_states=0, state_devices=[])
    assert set(gpu_paths.judge(path("adamw8bit"), plain, cuda=True)[2]) == {
        "optimizer torch.optim.adamw.AdamW",
        "no 8-bit optimizer state",
    }


def test_bitsandbytes_wheel_keeps_only_the_cpu_and_cuda13_libraries(tmp_path):
    wheel = tmp_path / "bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl"
    names = [
        "bitsandbytes/__init__.py",
        "bitsandbytes/libbitsandbytes_cpu.so",
        "bitsandbytes/libbitsandbytes_cuda118.so",
        "bitsandbytes/libbitsandbytes_cuda128.so",
        "bitsandbytes/libbitsandbytes_cuda130.so",
        "bitsandbytes/libbitsandbytes_rocm64.so",
    ]
    record_name = "bitsandbytes-0.50.2.dist-info/RECORD"
    with zipfile.ZipFile(wheel, "w") as z:
        for n in names:
            z.writestr(n, b"x" * 1000)
        z.writestr(record_name, "\n".join(f"{n},sha256=abc,1000" for n in names) + f"\n{record_name},,\n")
    gpu_wheels.slim(wheel)
    with zipfile.ZipFile(wheel) as z:
        kept = [n for n in z.namelist() if n != record_name]
        listed = [line.split(",")[0] for line in z.read(record_name).decode().splitlines() if line]
    assert kept == [
        "bitsandbytes/__init__.py",
        "bitsandbytes/libbitsandbytes_cpu.so",
        "bitsandbytes/libbitsandbytes_cuda130.so",
    ]
    assert listed == [*kept, record_name]


def test_a_row_that_fails_is_reported_and_the_next_one_runs(capsys):
    gpu_unet.run_group(
        [gpu_unet.Row("sd15", 1, optimizer="adamw16"), gpu_unet.Row("nope", 1)], smoke=True, warmup=1, steps=1
    )
    results = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["row"]["model"] for r in results] == ["sd15", "nope"]
    assert results[0]["status"].startswith("error: SpecError: invalid DreamBoothJob")
    assert "training.optimizer" in results[0]["status"] and "\n" not in results[0]["status"]
    assert results[1]["status"] == "error: KeyError: 'nope'"


def test_mfu_is_model_flops_per_second_over_the_named_peak(tmp_path):
    import argparse

    import gpu_bench

    args = argparse.Namespace(cpu_smoke=False, peak_tflops=None, warmup=3, steps=10, budget=450.0, argv=[])
    info = {
        "kind": "cuda",
        "name": "NVIDIA H200",
        "count": 1,
        "memory_gb": 139.8,
        "capability": "9.0",
        "cuda": "13.0",
        "host": "h",
        "python": "3.12.3",
        "versions": {"torch": "2.11.0"},
        "matmul_tflops": 790.0,
        "matmul_how": "8192x8192x8192 bf16, median of 10",
    }
    report = gpu_bench.Report(tmp_path / "gpu.md", args, info)
    first, second, *rest = report.rows
    report.row(
        first.key,
        {
            "status": "ok",
            "steps_per_s": 40.0,
            "images_per_s": 40.0,
            "first_step_s": 0.5,
            "flops_per_step": 2.4e12,
            "peak_memory_bytes": 20 * 2**30,
            "params": 859_520_964,
            "trainable": 859_520_964,
        },
    )
    report.row(second.key, {"status": "OOM"})
    rows = table((tmp_path / "gpu.md").read_text(), "UNet training step")
    assert rows[0]["TFLOP/s"] == "96" and rows[0]["MFU"] == "9.7%" and rows[0]["of matmul"] == "12.2%"
    assert rows[0]["peak mem GB"] == "20.00" and rows[0]["trainable M"] == "859.52"
    assert rows[1]["result"] == "OOM" and rows[1]["MFU"] == "" and rows[1]["steps/s"] == ""
    assert all(r["result"] == "pending" for r in rows[2:])
    assert "MFU peak: 989.5 TFLOP/s dense bf16 (NVIDIA H200 datasheet" in (tmp_path / "gpu.md").read_text()
    assert report.failed() == []
    report.row(rest[0].key, {"status": "error: RuntimeError: boom"})
    assert report.failed() == [f"row {rest[0].key}: error: RuntimeError: boom"]
