"""``python -m dreambooth.trainer.verdict``: the launch script's last step."""

from __future__ import annotations

import json

from dreambooth.api.termination import TerminationSummary
from dreambooth.trainer.verdict import main


def test_the_pods_verdict_is_written_and_is_the_exit_code(tmp_path):
    verdicts = tmp_path / "verdicts"
    verdicts.mkdir()
    for rank, code, reason in ((0, 21, "Preempted"), (1, 13, "NotFound")):
        (verdicts / f"rank-{rank}.json").write_text(
            TerminationSummary(exit_code=code, reason=reason, rank=rank, finished_at=rank).dumps()
        )
    (verdicts / "rank-2.json").write_text("garbage")  # a process killed mid-write: not a verdict
    log = tmp_path / "termination-log"
    code = main(
        ["--processes", "2", "--launcher-exit-code", "1", "--workdir", str(tmp_path), "--termination-log", str(log)]
    )
    assert code == 13 and json.loads(log.read_text())["reason"] == "NotFound"


def test_without_any_verdict_the_launchers_log_tail_speaks(tmp_path):
    log = tmp_path / "termination-log"
    code = main(
        ["--processes", "2", "--launcher-exit-code", "1", "--workdir", str(tmp_path), "--termination-log", str(log)]
    )
    assert code == 1 and not log.exists()
