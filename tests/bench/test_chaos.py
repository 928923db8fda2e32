"""bench/chaos.py, short: a few SIGKILLs at random moments of one run and a storage outage
in the middle of one, with the same checks the full bench makes (docs/reliability.md)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import chaos

pytestmark = pytest.mark.slow


def run(tmp_path: Path, *argv: str) -> dict:
    out = tmp_path / "figures.json"
    assert chaos.main([*argv, "--json", str(out)]) == 0
    return json.loads(out.read_text())


def test_a_run_killed_at_random_moments_resumes_each_time_and_ends_with_the_same_weights(tmp_path):
    every = 2
    report = run(tmp_path, "kills", "--kills", "3", "--steps", "14", "--every", str(every), "--seed", "7")
    assert report["kills"] == 3 and report["starts"] == 4, report
    assert report["resumed_from_newest_complete"], report["wrong_resumes"]
    assert report["corrupt_reads"] == 0
    # one interval at most, two when the kill caught the newest checkpoint uploading
    assert report["max_steps_lost"] <= 2 * every and report["max_steps_lost_outside_uploads"] <= every, report
    assert report["weights_equal"] and report["model_files_equal"], report
    assert report["debris_left"] == 0 and len(report["checkpoints_left"]) == 2, report


def test_storage_gone_for_a_while_during_a_multipart_upload_loses_nothing(tmp_path):
    report = run(tmp_path, "outage", "--outage-s", "4", "--steps", "16", "--every", "4", "--only-upload")
    assert list(report) == ["during a multipart upload"]
    for case, figures in report.items():
        assert figures["exit_code"] == 0 and figures["weights_equal"], (case, figures)
        assert figures["retries_logged"] > 0, (case, figures)  # the outage was felt
        assert figures["incomplete_checkpoints"] == 0 and figures["open_multipart_uploads"] == 0, (case, figures)
