"""A real gallery for tests and the benchmark: ``dreambooth gallery`` in a subprocess (it
runs the product's command; imports none of it)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Self


class GalleryServer:
    """``dreambooth gallery <args>`` on a free port of 127.0.0.1; ``url`` once it serves."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.args, self.env, self.log = args, env, log
        self.url = ""
        self.proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> Self:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dreambooth.cli", "gallery", "--port", "0", *self.args],
            env={**self.env, "PYTHONUNBUFFERED": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        found = threading.Event()

        def copy() -> None:
            with self.log.open("w") as out:
                for line in self.proc.stdout:
                    out.write(line)
                    out.flush()
                    if (m := re.match(r"gallery: (http://\S+/)", line)) and not self.url:
                        self.url = m.group(1)
                        found.set()

        threading.Thread(target=copy, daemon=True).start()
        deadline = time.monotonic() + 30
        while not found.wait(0.1):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.__exit__()
                raise RuntimeError(f"the gallery did not start:\n{self.log.read_text()}")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    @property
    def pid(self) -> int:
        return self.proc.pid


def rss_bytes(pid: int) -> int:
    """Resident memory of a process (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def env_without_aws() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
