"""The main process's storage thread, and waits for slow work that never trip the collective
timeout (dreambooth/trainer/background.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest

from dreambooth.trainer.background import Background
from kubesim.net import free_port

# Each process: an accelerate process group with a 1 s collective timeout (gloo), then
# together() over work that takes 3 s on rank 0: once succeeding, once failing.
WORKER = """
import json, time
from concurrent.futures import ThreadPoolExecutor
from accelerate import Accelerator
from dreambooth.trainer.background import together
from dreambooth.trainer.devices import process_group_kwargs
from dreambooth.trainer.errors import StorageUnavailableError, TrainerError

a = Accelerator(cpu=True, kwargs_handlers=[process_group_kwargs(1)])

def slow(fail):
    time.sleep(3)
    if fail:
        raise StorageUnavailableError("storage went away")
    return "exported"

for fail in (False, True):
    with ThreadPoolExecutor(1) as pool:
        work = pool.submit(slow, fail) if a.is_main_process else None
        started = time.monotonic()
        try:
            result = {"result": together(a, work, poll_s=0.1, what="exporting the model")}
        except TrainerError as err:
            result = {"error": str(err), "code": int(err.exit_code)}
    print("RESULT " + json.dumps({"rank": a.process_index, "fail": fail, "waited": time.monotonic() - started,
                                  **result}), flush=True)
a.end_training()  # the process group down before exit, as the trainer's own run ends (gloo's threads
# left running at exit can abort the interpreter: "terminate called without an active exception")
"""


def two_processes() -> dict[tuple[bool, int], dict]:
    port = str(free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={
                **os.environ,
                "RANK": str(rank),
                "LOCAL_RANK": str(rank),
                "WORLD_SIZE": "2",
                "LOCAL_WORLD_SIZE": "2",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": port,
                "CUDA_VISIBLE_DEVICES": "",
            },
        )
        for rank in (0, 1)
    ]
    results = {}
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-3000:]
        for line in out.splitlines():
            if line.startswith("RESULT "):
                found = json.loads(line[len("RESULT ") :])
                results[found["fail"], found["rank"]] = found
    return results


@pytest.mark.slow
def test_processes_wait_for_work_longer_than_the_collective_timeout_and_share_its_failure():
    results = two_processes()
    ok = results[False, 0], results[False, 1]
    assert ok[0]["result"] == "exported" and ok[1]["result"] is None
    assert all(r["waited"] >= 2.5 for r in ok), ok  # 3 s of work, a 1 s timeout
    failed = results[True, 0], results[True, 1]
    assert failed[0]["error"] == "storage went away" and failed[0]["code"] == 20
    assert failed[1]["code"] == 20 and "process 0 failed while exporting the model" in failed[1]["error"]


def test_the_storage_thread_runs_jobs_in_order_and_a_fence_raises_what_a_posted_job_raised():
    background = Background()
    done: list[int] = []
    release = threading.Event()
    background.post(lambda: (release.wait(5), done.append(1)))

    def broken() -> None:
        raise RuntimeError("a bug in an upload")

    background.post(broken)
    background.post(done.append, 3)
    assert background.busy
    release.set()
    with pytest.raises(RuntimeError, match="a bug"):
        background.fence().result(timeout=5)
    assert done == [1, 3]
    background.fence().result(timeout=5)  # reported once
    assert background.submit(lambda: 42).result(timeout=5) == 42


def test_closing_waits_for_the_job_in_flight():
    background = Background()
    landed = []
    background.post(lambda: (time.sleep(0.3), landed.append("checkpoint")))
    background.close()
    assert landed == ["checkpoint"]
