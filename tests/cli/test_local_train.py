"""`dreambooth train` on a manifest with relative file:// paths, as examples/local shows."""

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from dreambooth.cli import main


def test_train_a_manifest_with_relative_file_uris(tiny_model_dir, toy_cat_dir, tmp_path, monkeypatch, capsys):
    shutil.copytree(tiny_model_dir, tmp_path / "models" / "sd15")
    shutil.copytree(toy_cat_dir, tmp_path / "photos" / "toy-cat")
    job = yaml.safe_load((Path(__file__).parents[2] / "examples" / "local" / "toy-cat.yaml").read_text())
    job["spec"]["training"] = {"steps": 2, "batchSize": 1, "resolution": 64, "mixedPrecision": "no"}
    job["spec"]["resources"] = {"gpusPerNode": 0}
    job["spec"]["checkpointing"] = {"everySteps": 2}
    job["spec"]["validation"] = {"enabled": False}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    monkeypatch.chdir(tmp_path)

    assert main(["train", "job.yaml"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[0])
    assert summary["outputs"]["diffusers"] == (tmp_path / "runs" / "toy-cat" / "model").as_uri() + "/"
    assert (tmp_path / "runs" / "toy-cat" / "model" / "model_index.json").is_file()


@pytest.mark.slow
def test_the_readme_demo_trains_and_prints_only_our_own_lines(tmp_path):
    """`make demo`: a fresh process from the command line, as a newcomer runs it; the model
    is exported and every line printed is the trainer's log, its summary or the demo's own
    words (no library's notice about packages the run does not use)."""
    import re
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "dreambooth.cli", "demo", "--root", str(tmp_path / "demo")],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (tmp_path / "demo" / "output" / "model" / "model_index.json").is_file()
    ours = re.compile(
        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ rank0 (INFO|WARNING) dreambooth[.\w]*: |"
        r"demo: |\{\"exitCode\":0|Done\. |Next: |Look at it in the browser: |  then open http"
    )
    foreign = [line for line in (done.stdout + done.stderr).splitlines() if line and not ours.match(line)]
    assert not foreign, foreign
