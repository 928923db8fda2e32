"""A DreamBoothSweep's runs and status (dreambooth/operator/sweeps.py): the runs are owned,
labelled DreamBoothJobs below the sweep's prefix, never more than maxParallel unfinished,
suspended with the sweep; the status is one row per (run, step, scheduler)."""

from __future__ import annotations

import copy
from typing import Any

from dreambooth.api import layout, validate_job
from dreambooth.api.config import Defaults
from dreambooth.api.sweep import validate_sweep
from dreambooth.api.sweep_runs import RUN_LABEL, SWEEP_LABEL
from dreambooth.operator import sweeps

DEFAULTS = Defaults(output_root="s3://dreambooth", s3_endpoint="minio:9000")
UID = "6b1d8a52-0c3e-4f7a-9d2b-1e5f3a4c7b80"


def sweep_doc(max_parallel: int = 1, suspend: bool = False) -> dict[str, Any]:
    return {
        "apiVersion": "dreambooth.io/v1alpha1",
        "kind": "DreamBoothSweep",
        "metadata": {
            "name": "study",
            "namespace": "team-a",
            "uid": UID,
            "generation": 1,
            "labels": {"kueue.x-k8s.io/queue-name": "gpus"},
        },
        "spec": {
            "template": {
                "baseModel": {"uri": "s3://models/sd15/"},
                "instance": {"uri": "s3://training-data/toy-cat/", "prompt": "a photo of zwx toy cat"},
                "training": {"steps": 4},
            },
            "axes": [
                {"field": "training.learningRate", "values": [5e-6, 2e-6]},
                {"field": "training.steps", "values": [2, 4]},
                {"field": "validation.scheduler", "values": ["ddim", "pndm"]},
            ],
            "maxParallel": max_parallel,
            "suspend": suspend,
        },
    }


def typed(**kw):
    return validate_sweep(sweep_doc(**kw), cluster=True)


def with_status(job: dict[str, Any], phase: str, **status: Any) -> dict[str, Any]:
    job = copy.deepcopy(job)
    job["status"] = {"phase": phase, **status}
    return job


def test_runs_are_owned_labelled_valid_jobs_below_the_sweeps_prefix():
    sweep = typed(max_parallel=2)
    created = sweeps.actions(sweep, {}, DEFAULTS).create
    assert [j["metadata"]["name"] for j in created] == ["study-1", "study-2"]
    job = created[0]
    (owner,) = job["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["name"], owner["uid"], owner["controller"]) == ("DreamBoothSweep", "study", UID, True)
    assert job["metadata"]["labels"] == {"kueue.x-k8s.io/queue-name": "gpus", SWEEP_LABEL: "study", RUN_LABEL: "1"}
    assert job["spec"]["output"]["uri"] == "s3://dreambooth/team-a/study/runs/study-1/"
    outs = [validate_job(j, cluster=True).spec.output.uri for j in created]
    # the runs share the bucket's class-image cache (and so its generated class images)
    assert {layout.class_cache_uri(o) for o in outs} == {"s3://dreambooth/.cache/class-images/"}


def test_never_more_than_max_parallel_unfinished():
    sweep = typed(max_parallel=1)
    first = sweeps.actions(sweep, {}, DEFAULTS).create
    assert len(first) == 1
    running = {"study-1": with_status(first[0], "Training")}
    assert sweeps.actions(sweep, running, DEFAULTS).create == []
    failed = {"study-1": with_status(first[0], "Failed")}  # a failed run is finished: the next goes
    assert [j["metadata"]["name"] for j in sweeps.actions(sweep, failed, DEFAULTS).create] == ["study-2"]


def test_suspend_is_mirrored_onto_unfinished_runs_and_creates_nothing():
    created = sweeps.actions(typed(max_parallel=2), {}, DEFAULTS).create
    children = {"study-1": with_status(created[0], "Training"), "study-2": with_status(created[1], "Succeeded")}
    suspended = sweeps.actions(typed(max_parallel=2, suspend=True), children, DEFAULTS)
    assert suspended.create == [] and suspended.suspend == [("study-1", True)]
    children["study-1"]["spec"]["runPolicy"]["suspend"] = True
    assert sweeps.actions(typed(max_parallel=2), children, DEFAULTS).suspend == [("study-1", False)]


def figures(step: int, subject: float) -> dict[str, Any]:
    return {"step": step, "subjectFidelity": subject, "memorization": 0.5, "score": subject}


def test_status_rows_counts_failure_and_best_run():
    sweep = typed(max_parallel=2)
    jobs = sweeps.actions(sweep, {}, DEFAULTS).create
    children = {
        "study-1": with_status(
            jobs[0],
            "Succeeded",
            progress={"step": 4, "totalSteps": 4, "loss": 0.12},
            evaluation=figures(4, 0.8),
            outputs={"bestCheckpoint": "s3://x/model/"},
        ),
        "study-2": with_status(
            jobs[1],
            "Failed",
            conditions=[
                {
                    "type": "Failed",
                    "status": "True",
                    "reason": "BadData",
                    "message": "no photos under s3://...",
                    "lastTransitionTime": "2026-12-04T20:00:00Z",
                }
            ],
        ),
    }
    status = sweeps.sweep_status(sweep, children, DEFAULTS)
    assert len(status.rows) == 8
    assert (status.runs_total, status.runs_succeeded, status.runs_failed, status.summary) == (2, 1, 1, "2/2")
    assert status.phase.value == "Comparing"  # compare.png is written next
    first = [r for r in status.rows if r.run == "study-1"]
    assert [(r.step, r.scheduler) for r in first] == [(2, "ddim"), (2, "pndm"), (4, "ddim"), (4, "pndm")]
    assert all(r.phase == "Succeeded" and r.final_loss == 0.12 for r in first)
    assert first[2].evaluation.subject_fidelity == 0.8 and first[0].evaluation is None
    assert first[3].samples == "s3://dreambooth/team-a/study/runs/study-1/samples/step-4-pndm.png"
    assert first[2].values == {"training.learningRate": "5e-06"}
    failed = [r for r in status.rows if r.run == "study-2"]
    assert all(r.phase == "Failed" and r.message.startswith("BadData") for r in failed)
    assert status.best_run == "study-1"
    done = sweeps.sweep_status(sweep, children, DEFAULTS, compared=True)
    assert done.phase.value == "Succeeded" and done.compare == "s3://dreambooth/team-a/study/compare.png"


def test_phases_before_the_end():
    sweep = typed()
    assert sweeps.sweep_status(sweep, {}, DEFAULTS).phase.value == "Pending"
    job = sweeps.actions(sweep, {}, DEFAULTS).create[0]
    running = sweeps.sweep_status(sweep, {"study-1": with_status(job, "Training")}, DEFAULTS)
    assert (running.phase.value, running.runs_created, running.summary) == ("Running", 1, "0/2")
    assert sweeps.sweep_status(typed(suspend=True), {"study-1": job}, DEFAULTS).phase.value == "Suspended"


def test_the_comparison_is_a_cpu_job_of_the_trainer_image_owned_by_the_sweep():
    from dreambooth.api.sweep_runs import CONFIG_ENV, CompareConfig
    from dreambooth.operator.settings import OperatorSettings

    settings = OperatorSettings(
        trainer_image="registry.example/dreambooth-trainer:1.0", credentials_secret="minio-credentials"
    )
    job = sweeps.compare_job(typed(), settings)
    assert job["metadata"]["name"] == "study-compare"
    assert job["metadata"]["ownerReferences"][0]["uid"] == UID
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "registry.example/dreambooth-trainer:1.0"
    assert container["command"] == ["python", "-m", "dreambooth.trainer.compare"]
    assert "resources" not in container  # no GPU
    env = {e["name"]: e for e in container["env"]}
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["name"] == "minio-credentials"
    config = CompareConfig.model_validate_json(env[CONFIG_ENV]["value"])
    assert config.output == "s3://dreambooth/team-a/study/"
    assert [r.output for r in config.runs] == [
        "s3://dreambooth/team-a/study/runs/study-1/",
        "s3://dreambooth/team-a/study/runs/study-2/",
    ]
    assert (config.steps, config.schedulers) == ([2, 4], ["ddim", "pndm"])
    assert sweeps.compare_outcome(None) is None
    assert sweeps.compare_outcome({"status": {"conditions": [{"type": "Complete", "status": "True"}]}}) is True
    assert sweeps.compare_outcome({"status": {"conditions": [{"type": "Failed", "status": "True"}]}}) is False


def test_the_comparison_pods_figures_fill_every_steps_row():
    from dreambooth.api.sweep_runs import TERMINATION_MAX, CompareSummary, summary_of

    compare_json = {
        "rows": [
            {
                "run": "study-1",
                "step": 2,
                "scheduler": "ddim",
                "evaluation": {**figures(2, 0.6), "prompts": [{"x": 1}]},
            },
            {"run": "study-1", "step": 2, "scheduler": "pndm", "evaluation": None},
            {"run": "study-1", "step": 4, "scheduler": "ddim", "evaluation": figures(4, 0.7)},
        ]
    }
    summary = summary_of(compare_json)
    assert [(r.run, r.figures.step) for r in summary.rows] == [("study-1", 2), ("study-1", 4)]
    pod = {
        "status": {
            "phase": "Succeeded",
            "containerStatuses": [
                {"name": "compare", "state": {"terminated": {"exitCode": 0, "message": summary.dumps()}}}
            ],
        }
    }
    assert sweeps.compare_summary([pod]) == summary

    sweep = typed(max_parallel=2)
    jobs = sweeps.actions(sweep, {}, DEFAULTS).create
    children = {j["metadata"]["name"]: with_status(j, "Succeeded", evaluation=figures(4, 0.7)) for j in jobs}
    status = sweeps.sweep_status(sweep, children, DEFAULTS, compared=True, summary=summary)
    judged = {(r.run, r.step, r.scheduler): r.evaluation for r in status.rows}
    assert judged[("study-1", 2, "ddim")].subject_fidelity == 0.6  # not the run's latest round
    assert judged[("study-1", 2, "pndm")] is None
    assert judged[("study-2", 2, "ddim")] is None and judged[("study-2", 4, "ddim")].subject_fidelity == 0.7
    assert (status.best_run, status.best_step) == ("study-1", 4)  # 0.7 > 0.6, over every step
    better = summary_of({"rows": [{"run": "study-2", "step": 2, "evaluation": figures(2, 0.9)}, *compare_json["rows"]]})
    status = sweeps.sweep_status(sweep, children, DEFAULTS, compared=True, summary=better)
    assert (status.best_run, status.best_step) == ("study-2", 2)  # an earlier checkpoint of another run

    many = CompareSummary(rows=summary.rows * 200)  # more than a termination message holds
    text = many.dumps()
    assert len(text.encode()) <= TERMINATION_MAX
    short = CompareSummary.model_validate_json(text)
    assert not short.complete and 0 < len(short.rows) < 400
    assert "compare.json" in sweeps.sweep_status(sweep, children, DEFAULTS, compared=True, summary=short).message
