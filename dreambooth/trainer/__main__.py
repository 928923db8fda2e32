"""``python -m dreambooth.trainer --config trainer-config.json``: what a trainer pod runs
(under ``accelerate launch``). Exits with a code from :mod:`dreambooth.api.exitcodes` and
leaves its verdict (:class:`dreambooth.api.termination.TerminationSummary`) in
``/dev/termination-log`` for the operator and, under a launcher, in the pod's verdicts
folder for the launch script (:mod:`dreambooth.trainer.verdict`)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

from dreambooth.api.exitcodes import ExitCode, exit_reason
from dreambooth.api.termination import (
    STOP_FILE,
    SUCCEEDED,
    VERDICTS_DIR,
    TerminationSummary,
    verdict_name,
)

TERMINATION_LOG = Path("/dev/termination-log")
log = logging.getLogger("dreambooth.trainer")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dreambooth.trainer", description=__doc__)
    p.add_argument(
        "--config",
        type=Path,
        default=Path(os.environ.get("DREAMBOOTH_CONFIG", "/etc/dreambooth/config.json")),
        help="TrainerConfig JSON (default: $DREAMBOOTH_CONFIG or /etc/dreambooth/config.json)",
    )
    p.add_argument(
        "--workdir",
        type=Path,
        default=Path(os.environ.get("DREAMBOOTH_WORKDIR", "/tmp/dreambooth")),
        help="scratch space for downloads and exports (default: $DREAMBOOTH_WORKDIR or /tmp/dreambooth)",
    )
    p.add_argument(
        "--termination-log",
        type=Path,
        default=Path(os.environ.get("DREAMBOOTH_TERMINATION_LOG", str(TERMINATION_LOG))),
        help="where to write the one-line JSON summary, if that file's folder exists "
        "(default: $DREAMBOOTH_TERMINATION_LOG or /dev/termination-log)",
    )
    return p.parse_args(argv)


#: library loggers whose warnings say nothing about the user's run: bitsandbytes' notice
#: that an optional CPU kernel package is missing (it is imported by diffusers whether or
#: not a run uses 8-bit Adam), transformers' torchvision fallback for image processors
#: (ours read PIL images)
FOREIGN_NOISE = ("bitsandbytes.backends.cpu.ops", "transformers.utils.import_utils")


def quiet_foreign_warnings() -> None:
    """Keep the output of a run to our own lines (and the libraries' errors); call before
    torch, diffusers or transformers are imported."""
    for name in FOREIGN_NOISE:
        logging.getLogger(name).setLevel(logging.ERROR)


def setup_logging() -> None:
    quiet_foreign_warnings()
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("httpx", "urllib3", "huggingface_hub", "diffusers", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


class StopRequest:
    """Set by SIGTERM (a pod with one process) or by the launch script's ``STOP`` file (a
    pod with several: the script, not torchrun, takes the pod's SIGTERM, so no process is
    killed while the checkpoint is being written). Checked after every step."""

    def __init__(self, stop_file: Path) -> None:
        self.event, self.stop_file = threading.Event(), stop_file

    def set(self) -> None:
        self.event.set()

    def is_set(self) -> bool:
        return self.event.is_set() or self.stop_file.exists()


def write_summary(path: Path, summary: TerminationSummary) -> None:
    """The termination message (the operator reads it from the pod's status): written by
    the pod's first process (LOCAL_RANK 0); the launch script replaces it with the pod's
    verdict when the pod has several processes."""
    if os.environ.get("LOCAL_RANK", "0") != "0":
        return
    if path.parent.is_dir() and (path.exists() or path.parent != Path("/dev")):
        try:
            path.write_text(summary.dumps())
        except OSError:
            pass


def write_verdict(workdir: Path, summary: TerminationSummary) -> None:
    """Under a launcher (RANK set), this process's verdict for the launch script."""
    if "RANK" not in os.environ:
        return
    folder = workdir / VERDICTS_DIR
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{verdict_name(summary.rank or 0)}.tmp"
        tmp.write_text(summary.dumps())
        tmp.replace(folder / verdict_name(summary.rank or 0))
    except OSError as err:
        log.warning("could not leave this process's verdict in %s: %s", folder, err)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    stop = StopRequest(args.workdir / STOP_FILE)
    signal.signal(signal.SIGTERM, lambda *_: stop.set())

    from dreambooth.trainer.config import load_config
    from dreambooth.trainer.errors import TrainerError

    rank = int(os.environ["RANK"]) if "RANK" in os.environ else None
    try:
        config = load_config(args.config)
        from dreambooth.trainer.run import run

        outcome = run(config, args.workdir, stop=stop)
        # the last step's loss (none when resumed after it)
        summary = TerminationSummary(
            exit_code=ExitCode.OK,
            reason=SUCCEEDED,
            step=outcome.step,
            loss=outcome.loss,
            outputs=outcome.outputs or None,
            evaluation=outcome.evaluation,
        )
    except TrainerError as err:
        log.error("%s", err)
        summary = TerminationSummary(exit_code=err.exit_code, reason=err.reason, message=str(err))
    except Exception as err:  # noqa: BLE001  (a bug: keep the traceback, retry the pod)
        log.error("unexpected error: %s\n%s", err, traceback.format_exc())
        summary = TerminationSummary(
            exit_code=ExitCode.UNEXPECTED,
            reason=exit_reason(ExitCode.UNEXPECTED),
            message=f"{type(err).__name__}: {err}",
        )
    summary = summary.model_copy(update={"rank": rank, "finished_at": time.time()})
    write_verdict(args.workdir, summary)
    write_summary(args.termination_log, summary)
    return summary.exit_code


if __name__ == "__main__":
    sys.exit(main())
