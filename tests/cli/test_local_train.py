"""`dreambooth train` on a manifest with relative file:// paths, as examples/local shows."""

import json
import shutil
from pathlib import Path

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
