"""Child processes of tests and benchmarks, and waiting for what happens outside the API."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from typing import Any


def stop_process(proc: subprocess.Popen | None, timeout: float = 10) -> None:
    """SIGTERM, then SIGKILL if it is still there after ``timeout`` seconds; a process
    that already ended (or None) is left alone."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def sleep_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.1) -> Any:
    """Poll ``predicate`` (for things outside the API, e.g. processes): its value or None."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return None
