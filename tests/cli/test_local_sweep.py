"""`dreambooth sweep`: a sweep's runs one after another on this machine, a failed run does
not stop the others, and compare.png / compare.json land in the sweep's prefix."""

import json
import shutil

import yaml
from PIL import Image

from dreambooth.cli import main
from tests.support.grids import assert_grid

RESOLUTION, PROMPTS = 64, ["a photo of zwx toy cat", "a photo of zwx toy cat on the beach"]


def test_a_local_sweep_runs_each_job_once_and_compares_them(tiny_model_dir, toy_cat_dir, tmp_path, monkeypatch, capsys):
    shutil.copytree(tiny_model_dir, tmp_path / "models" / "sd15")
    shutil.copytree(toy_cat_dir, tmp_path / "photos" / "toy-cat")
    (tmp_path / "no-class-images").mkdir()
    from dreambooth.trainer.tiny_clip import build_tiny_clip

    build_tiny_clip(tmp_path / "clip")
    sweep = {
        "apiVersion": "dreambooth.io/v1alpha1",
        "kind": "DreamBoothSweep",
        "metadata": {"name": "study"},
        "spec": {
            "template": {
                "baseModel": {"uri": "file://./models/sd15"},
                "instance": {"uri": "file://./photos/toy-cat", "prompt": PROMPTS[0]},
                # the prior-on run fails (no class images there); the prior-off run drops prior.uri
                "prior": {"enabled": True, "classPrompt": "a photo of a cat", "uri": "file://./no-class-images"},
                "training": {"steps": 4, "batchSize": 1, "resolution": RESOLUTION, "learningRate": 1e-3},
                "validation": {"prompts": PROMPTS, "inferenceSteps": 2, "imagesPerPrompt": 1},
                "evaluation": {"enabled": True, "model": {"uri": "file://./clip"}},
                "resources": {"gpusPerNode": 0},
                "output": {"uri": "file://./runs/study"},
            },
            "axes": [
                {"field": "prior.enabled", "values": [False, True]},
                {"field": "training.steps", "values": [2, 4]},
                {"field": "validation.scheduler", "values": ["ddim", "pndm"]},
            ],
        },
    }
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    monkeypatch.chdir(tmp_path)

    assert main(["sweep", "sweep.yaml"]) == 0  # one run succeeded
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (summary["runs"], summary["failed"], summary["rows"]) == (2, ["study-2"], 8)

    out = tmp_path / "runs" / "study"
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["study-1"]  # study-2 failed before writing
    assert (out / "runs" / "study-1" / "result.json").is_file()
    assert not (out / "runs" / "study-2" / "result.json").exists()
    assert {p.name for p in (out / "runs" / "study-1" / "samples").glob("step-*.png")} == {
        "step-2.png",
        "step-2-pndm.png",
        "step-4.png",
        "step-4-pndm.png",
    }

    doc = json.loads((out / "compare.json").read_text())
    assert [(r["run"], r["step"], r["scheduler"]) for r in doc["rows"]] == [
        ("study-1", 2, "ddim"),
        ("study-1", 2, "pndm"),
        ("study-1", 4, "ddim"),
        ("study-1", 4, "pndm"),
        ("study-2", 2, "ddim"),
        ("study-2", 2, "pndm"),
        ("study-2", 4, "ddim"),
        ("study-2", 4, "pndm"),
    ]
    assert all(r["succeeded"] and r["samples"] for r in doc["rows"][:4])
    assert not any(r["succeeded"] or r["samples"] for r in doc["rows"][4:])
    assert doc["rows"][0]["values"] == {"prior.enabled": False}
    # every step of the run that trained is evaluated (its main scheduler's samples)
    figures = [(r["step"], r["evaluation"]) for r in doc["rows"][:4]]
    assert [(step, e["step"]) for step, e in figures if e] == [(2, 2), (4, 4)]
    assert all(e["subjectFidelity"] is not None for _, e in figures if e)
    assert [e is None for _, e in figures] == [False, True, False, True]  # pndm rows: drawn, not judged

    with Image.open(out / "compare.png") as png:  # rows: 2 runs x 2 steps x 2 schedulers, columns: prompts
        assert_grid(png, rows=8, columns=len(PROMPTS), size=RESOLUTION)
