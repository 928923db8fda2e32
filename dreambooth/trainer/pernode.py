"""Work done once per node (pod) and shared by the processes on it: downloads.

The pod's first process (local rank 0) does the work; the others wait for its answer, a
small JSON file under the work folder, and then read what it fetched. They wait by
polling that file, not in a collective: a download of many GB never trips the collective
timeout, and nothing is fetched twice into a folder another process is reading. A
failure reaches every process of the pod as the same :class:`TrainerError`, so all of
them exit with the same code.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from dreambooth.api.exitcodes import ExitCode
from dreambooth.trainer.errors import TrainerError

log = logging.getLogger("dreambooth.trainer")

POLL_SECONDS = 0.1
REPORT_EVERY_SECONDS = 60.0


def _launch_token() -> str:
    """Names this launch of the pod's processes: they share a parent (torchrun's agent),
    and the agent counts its restarts. Answers of an earlier launch are never read."""
    return f"{os.getppid()}-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"


def once_per_node(accelerator, workdir: Path, key: str, work: Callable[[], str]) -> str:
    """``work()`` on the pod's first process; its result (a string, e.g. a folder) on all."""
    if accelerator.num_processes == 1:
        return work()
    answer = workdir / "pernode" / f"{key}.{_launch_token()}.json"
    if accelerator.is_local_main_process:
        try:
            value = work()
        except TrainerError as err:
            _publish(answer, {"error": {"code": int(err.exit_code), "message": str(err)}})
            raise
        except Exception as err:
            _publish(answer, {"error": {"code": int(ExitCode.UNEXPECTED), "message": f"{type(err).__name__}: {err}"}})
            raise
        _publish(answer, {"value": value})
        return value
    return _await(answer, key)


def _publish(path: Path, content: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(content))
    tmp.replace(path)  # atomic: a reader sees all of it or nothing


def _await(path: Path, key: str) -> str:
    started = last_report = time.monotonic()
    while not path.is_file():
        time.sleep(POLL_SECONDS)
        if time.monotonic() - last_report >= REPORT_EVERY_SECONDS:
            last_report = time.monotonic()
            log.info("waiting for this pod's first process to fetch %s (%.0f s so far)", key, last_report - started)
    content = json.loads(path.read_text())
    if "error" in content:
        error = content["error"]
        raise TrainerError(f"{error['message']} (seen by this pod's first process)", exit_code=ExitCode(error["code"]))
    return content["value"]
