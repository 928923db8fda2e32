"""``python -m dreambooth.trainer.verdict``: the pod's verdict, once its processes ended.

The launch script of a pod with several training processes runs this after ``accelerate
launch`` returns (which exits 1 whatever its processes exited with). It reads every
process's verdict from ``<workdir>/verdicts/``, picks the pod's
(:func:`dreambooth.api.termination.pod_verdict`: a do-not-retry failure of any process
wins), writes it as the termination message and exits with its code, so that the Job's
podFailurePolicy and the operator see what really happened. When no process reported, it
writes nothing: the kubelet then takes the log's tail, where the launcher said why. Imports no torch: it must be
quick, it runs while the pod terminates.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from dreambooth.api.exitcodes import ExitCode
from dreambooth.api.termination import VERDICTS_DIR, TerminationSummary, pod_verdict


def read_verdicts(folder: Path) -> list[TerminationSummary]:
    found = (TerminationSummary.loads(p.read_text(errors="replace")) for p in sorted(folder.glob("rank-*.json")))
    return [v for v in found if v is not None]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dreambooth.trainer.verdict", description=__doc__)
    p.add_argument("--processes", type=int, required=True, help="training processes of this pod")
    p.add_argument("--launcher-exit-code", type=int, required=True, help="what accelerate launch exited with")
    p.add_argument("--workdir", type=Path, default=Path(os.environ.get("DREAMBOOTH_WORKDIR", "/tmp/dreambooth")))
    p.add_argument(
        "--termination-log",
        type=Path,
        default=Path(os.environ.get("DREAMBOOTH_TERMINATION_LOG", "/dev/termination-log")),
    )
    args = p.parse_args(argv)
    verdict = pod_verdict(read_verdicts(args.workdir / VERDICTS_DIR), args.processes)
    if verdict is None:  # the launcher failed before any process reported: its log says why
        print(
            f"dreambooth: no training process reported; accelerate launch exited with {args.launcher_exit_code}",
            file=sys.stderr,
        )
        return args.launcher_exit_code or ExitCode.UNEXPECTED
    try:
        args.termination_log.write_text(verdict.dumps())
    except OSError as err:
        print(f"dreambooth: could not write the termination message {args.termination_log}: {err}", file=sys.stderr)
    where = f" (rank {verdict.rank})" if verdict.rank is not None else ""
    print(
        f"dreambooth: pod verdict: exit {verdict.exit_code} {verdict.reason}{where}"
        + (f": {verdict.message}" if verdict.message and verdict.exit_code else ""),
        file=sys.stderr,
    )
    return verdict.exit_code


if __name__ == "__main__":
    sys.exit(main())
