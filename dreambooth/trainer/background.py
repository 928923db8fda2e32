"""Long storage work off the training's critical path, and waits that never trip a timeout.

Two pieces:

* :class:`Background`: one thread of the main process that uploads checkpoints and sample
  grids and runs the export, in the order they were handed over, while training goes on.
* :func:`together`: every process waits until each one's piece of work (a future; none on
  most ranks) is done, in a loop of tiny all-reduces that each return within ``poll_s``.
  A collective (NCCL, gloo) fails the run when it waits longer than
  ``runPolicy.collectiveTimeoutSeconds``; this wait takes as long as the work takes, and a
  failure on one process ends the wait on all of them, with its exit code, instead of
  leaving the others blocked until the timeout kills them.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any

import torch

from dreambooth.api.exitcodes import ExitCode
from dreambooth.trainer.errors import TrainerError

log = logging.getLogger("dreambooth.trainer")


def poll_seconds(collective_timeout_s: float) -> float:
    """How long one all-reduce of :func:`together` may wait: well inside the timeout."""
    return max(0.01, min(1.0, collective_timeout_s / 10))


def _use_device(device) -> None:
    """CUDA's current device is per thread: a new thread must pick this process's GPU."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.set_device(device)


class Background:
    """The main process's storage thread: jobs run one at a time, first in, first out."""

    def __init__(self, device=None) -> None:
        self._pool = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="dreambooth-storage", initializer=_use_device, initargs=(device,)
        )
        self._last: Future | None = None
        self._failed: list[BaseException] = []
        self._lock = threading.Lock()

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        """Run ``fn(*args)`` after everything handed over before; the caller waits on the
        future (e.g. with :func:`together`) and sees its exception."""
        self._last = self._pool.submit(fn, *args)
        return self._last

    def post(self, fn: Callable[..., Any], *args: Any) -> None:
        """Like :meth:`submit`, but nobody waits for this job: an exception it raises (a bug:
        jobs report expected storage trouble themselves) is raised by the next :meth:`fence`."""
        future = self.submit(fn, *args)
        future.add_done_callback(self._keep_failure)

    def _keep_failure(self, future: Future) -> None:
        if not future.cancelled() and future.exception() is not None:
            with self._lock:
                self._failed.append(future.exception())

    def fence(self) -> Future:
        """A future done once every job handed over so far is; it fails with the first
        exception of a posted job."""
        return self.submit(self._raise_failure)

    def _raise_failure(self) -> None:
        with self._lock:
            failed, self._failed = self._failed[:1], self._failed[1:]
        if failed:
            raise failed[0]

    @property
    def busy(self) -> bool:
        return self._last is not None and not self._last.done()

    def close(self) -> None:
        """Wait for the jobs handed over (a checkpoint upload in flight lands before the
        process exits), then stop the thread."""
        if self.busy:
            log.info("waiting for the storage work in flight before exiting")
        self._pool.shutdown(wait=True)


def _exit_code(error: BaseException) -> int:
    return int(error.exit_code) if isinstance(error, TrainerError) else int(ExitCode.UNEXPECTED)


def together(accelerator, work: Future | None, *, poll_s: float, what: str) -> Any:
    """Wait on every process until each one's ``work`` is done; return this process's result.

    Each round is one all-reduce of ``[busy, failure exit code, failed ranks...]``; a process
    whose work still runs gives it up to ``poll_s`` before the next round, the others wait in
    that round's all-reduce, so no collective waits longer than about ``poll_s``. If the work
    failed anywhere, it raises everywhere: the failed process its own exception, the others a
    :class:`TrainerError` with the same exit code.
    """
    processes = accelerator.num_processes
    if processes == 1:
        return work.result() if work is not None else None
    while True:
        done = work is None or work.done()
        error = work.exception() if work is not None and done else None
        flags = torch.zeros(2 + processes, device=accelerator.device)
        flags[0] = 0.0 if done else 1.0
        if error is not None:
            flags[1] = _exit_code(error)
            flags[2 + accelerator.process_index] = 1.0
        flags = accelerator.reduce(flags, reduction="max").tolist()
        if not flags[0]:
            break
        if not done:
            wait([work], timeout=poll_s)
    if error is not None:
        raise error
    if flags[1]:
        failed = [str(rank) for rank in range(processes) if flags[2 + rank]]
        raise TrainerError(
            f"process {', '.join(failed)} failed while {what}; its log has the cause", exit_code=ExitCode(int(flags[1]))
        )
    return work.result() if work is not None else None
