"""What every part of the GPU bench shares: the device, its peak, peak memory per row.

Used by ``bench/gpu_bench.py`` and its child processes (``gpu_unet.py``, ``gpu_paths.py``).
"""

from __future__ import annotations

import platform
import re
import time
from importlib import metadata

#: Dense (no 2:4 sparsity) bf16 tensor-core peaks, TFLOP/s, by device name. NVIDIA's
#: datasheets give the sparse figure with a footnote; the dense one is half of it.
#: (pattern, TFLOP/s, source); the first match wins, so the specific names come first.
BF16_PEAKS: list[tuple[str, float, str]] = [
    (r"\bH100\b.*\bPCIe\b", 756.0, "NVIDIA H100 datasheet: PCIe, 1,513 sparse / 2"),
    (r"\bH[12]00\b.*\bNVL\b", 835.5, "NVIDIA H100/H200 datasheets: NVL, 1,671 sparse / 2"),
    (r"\bH200\b", 989.5, "NVIDIA H200 datasheet: SXM, 1,979 sparse / 2 (the H100 SXM's rate)"),
    (r"\bH100\b", 989.5, "NVIDIA H100 datasheet: SXM, 1,979 sparse / 2"),
    (r"\bA100\b", 312.0, "NVIDIA A100 datasheet: 312 dense (624 sparse)"),
    (r"\bL40S\b", 362.05, "NVIDIA L40S datasheet: 362.05 dense (733 sparse)"),
    (r"\bL4\b", 121.0, "NVIDIA L4 datasheet: 121 dense (242 sparse)"),
    (
        r"\bA10G\b",
        70.0,
        (
            "no datasheet (AWS publishes none); the commonly cited figure for "
            "the A10G; the A10's datasheet says 125 dense"
        ),
    ),
    (r"\bA10\b", 125.0, "NVIDIA A10 datasheet: 125 dense (250 sparse)"),
]


def bf16_peak(name: str) -> tuple[float | None, str]:
    """``(TFLOP/s, source)`` of the dense bf16 peak of the device called ``name``."""
    for pattern, tflops, source in BF16_PEAKS:
        if re.search(pattern, name):
            return tflops, source
    return None, f"no datasheet peak known for {name!r} (give one with --peak-tflops)"


def cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def reset_peak_memory() -> None:
    """Start a row's peak-memory window: CUDA's allocator peak, else the process's peak RSS
    (Linux: writing 5 to /proc/self/clear_refs resets VmHWM to the current RSS)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_memory_bytes() -> int:
    """Peak since :func:`reset_peak_memory`: ``torch.cuda.max_memory_allocated`` on CUDA, the
    process's peak RSS (VmHWM) on a CPU."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated())
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def memory_kind() -> str:
    return (
        "torch.cuda.max_memory_allocated, reset per row"
        if cuda()
        else "process peak RSS (VmHWM, reset per row; includes ~0.5 GB of imports)"
    )


def versions() -> dict[str, str]:
    found = {}
    for name in ("torch", "diffusers", "transformers", "accelerate", "peft", "bitsandbytes"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "missing"
    return found


def matmul_tflops(smoke: bool) -> tuple[float, str]:
    """The bf16 matmul rate this device reaches on random data (median of timed products):
    the practical ceiling beside the datasheet peak."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    n, reps = (8192, 10) if device == "cuda" and not smoke else (512, 5)
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    times = []
    for i in range(reps + 3):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= 3:
            times.append(time.perf_counter() - start)
    times.sort()
    return 2 * n**3 / times[len(times) // 2] / 1e12, f"{n}x{n}x{n} bf16, median of {reps}"


def device_info(smoke: bool) -> dict:
    import torch

    info: dict = {
        "host": platform.node(),
        "python": platform.python_version(),
        "versions": versions(),
        "cuda": torch.version.cuda,
    }
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        props = torch.cuda.get_device_properties(0)
        info.update(
            kind="cuda",
            name=torch.cuda.get_device_name(0),
            count=count,
            memory_gb=props.total_memory / 2**30,
            capability=f"{props.major}.{props.minor}",
        )
    else:
        info.update(kind="cpu", name=platform.processor() or cpu_model(), count=0, memory_gb=None, capability=None)
        info["driver"] = nvidia_smi("driver_version,clocks.max.sm,power.limit")
    info["matmul_tflops"], info["matmul_how"] = matmul_tflops(smoke)
    return info


def nvidia_smi(fields: str) -> str | None:
    """The first GPU's ``fields`` as nvidia-smi reports them (read only), if it is there."""
    import subprocess

    try:
        done = subprocess.run(
            ["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = done.stdout.strip().splitlines()
    return f"{fields}: {lines[0]}" if done.returncode == 0 and lines else None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()
