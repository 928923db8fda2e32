"""``python -m dreambooth.trainer --config trainer-config.json``: what a trainer pod runs
(under ``accelerate launch``). Exits with a code from :mod:`dreambooth.api.exitcodes` and
leaves a one-line JSON summary in ``/dev/termination-log`` for the operator."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import traceback
from pathlib import Path

from dreambooth.api.exitcodes import ExitCode

TERMINATION_LOG = Path("/dev/termination-log")
log = logging.getLogger("dreambooth.trainer")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dreambooth.trainer", description=__doc__)
    p.add_argument("--config", type=Path, default=Path(os.environ.get("DREAMBOOTH_CONFIG", "/etc/dreambooth/config.json")),
                   help="TrainerConfig JSON (default: $DREAMBOOTH_CONFIG or /etc/dreambooth/config.json)")
    p.add_argument("--workdir", type=Path, default=Path(os.environ.get("DREAMBOOTH_WORKDIR", "/tmp/dreambooth")),
                   help="scratch space for downloads and exports (default: $DREAMBOOTH_WORKDIR or /tmp/dreambooth)")
    p.add_argument("--termination-log", type=Path,
                   default=Path(os.environ.get("DREAMBOOTH_TERMINATION_LOG", str(TERMINATION_LOG))),
                   help="where to write the one-line JSON summary, if that file's folder exists "
                   "(default: $DREAMBOOTH_TERMINATION_LOG or /dev/termination-log)")
    return p.parse_args(argv)


def setup_logging() -> None:
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


def write_summary(path: Path, summary: dict) -> None:
    """The operator reads this as the container's termination message (max 4 KiB).

    All processes of a pod share the file: the pod's first process (LOCAL_RANK 0) writes it.
    """
    if os.environ.get("LOCAL_RANK", "0") != "0":
        return
    if path.parent.is_dir() and (path.exists() or path.parent != Path("/dev")):
        try:
            path.write_text(json.dumps(summary)[:4000])
        except OSError:
            pass


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())

    from dreambooth.trainer.config import load_config
    from dreambooth.trainer.errors import TrainerError

    step = None
    try:
        config = load_config(args.config)
        from dreambooth.trainer.run import run

        outcome = run(config, args.workdir, stop=stop)
        step = outcome.step
        summary = {"exitCode": 0, "reason": "Succeeded", "step": step, "outputs": outcome.outputs}
        if outcome.loss is not None:  # the last step's loss (not run when resumed after it)
            summary["loss"] = outcome.loss
        code = ExitCode.OK
    except TrainerError as err:
        log.error("%s", err)
        code = err.exit_code
        summary = {"exitCode": int(code), "reason": err.reason, "message": str(err)}
    except Exception as err:  # noqa: BLE001  (a bug: keep the traceback, retry the pod)
        log.error("unexpected error: %s\n%s", err, traceback.format_exc())
        code = ExitCode.UNEXPECTED
        summary = {"exitCode": int(code), "reason": "Unexpected", "message": f"{type(err).__name__}: {err}"}
    write_summary(args.termination_log, summary)
    return int(code)


if __name__ == "__main__":
    sys.exit(main())
