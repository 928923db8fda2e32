"""``make demo-cluster`` (README: "See it work on a simulated cluster") runs to the end and
shows the operator, the status and the outputs as it promises."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kubesim.s3server import weed_binary

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def test_the_demo_shows_operator_status_and_outputs(tmp_path):
    try:
        weed_binary()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    done = subprocess.run(
        [sys.executable, "-m", "kubesim.demo", "--steps", "100", "--workdir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=200,
        check=False,
    )
    out = done.stdout
    assert done.returncode == 0, out[-4000:] + done.stderr[-4000:]
    for shown in (
        "created Job default/toy-cat-trainer",  # what the operator does
        "phase Training, step ",  # the status as it changes
        "phase Succeeded, step 100/100",
        "outputs.model: s3://",
        "model.safetensors",
        "samples/progression.png",
    ):
        assert shown in out, f"{shown!r} not in the demo's output:\n{out[-4000:]}"
    assert (tmp_path / "cluster" / "model" / "model_index.json").is_file()
