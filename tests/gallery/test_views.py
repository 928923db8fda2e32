"""The gallery's pure functions: what the pages show, computed from job objects, history
lines and output keys (table tests with one builder each)."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from xml.etree import ElementTree

import pytest

from dreambooth.api.history import Point
from dreambooth.gallery.curve import loss_curve, nice_ticks
from dreambooth.gallery.keys import KeyRefused, served_key
from dreambooth.gallery.outputs import evaluation_figures, outputs_of
from dreambooth.gallery.pages.jobs import rows_html
from dreambooth.gallery.views import Filter, age, condition_lines, duration, job_rows

NOW = datetime(2026, 1, 2, 12, 0, 0, tzinfo=UTC)


def job(
    name: str,
    *,
    namespace: str = "ml",
    phase: str = "Training",
    step: int = 50,
    total: int = 100,
    loss: float | None = 0.1234,
    eta: int | None = 90,
    created: str = "2026-01-02T11:00:00Z",
    conditions: list[dict] | None = None,
) -> dict:
    progress = {
        "step": step,
        "totalSteps": total,
        "percent": 100 * step / total,
        "summary": f"{step}/{total}",
        "loss": loss,
        "etaSeconds": eta,
    }
    return {
        "kind": "DreamBoothJob",
        "metadata": {"name": name, "namespace": namespace, "creationTimestamp": created},
        "spec": {"baseModel": {"uri": "s3://m/"}},
        "status": {"phase": phase, "progress": progress, "family": "sd", "conditions": conditions or []},
    }


@pytest.mark.parametrize(
    "only, shown",
    [
        (Filter(), ["c", "b", "a"]),
        (Filter(namespace="ml"), ["b", "a"]),
        (Filter(phase="Succeeded"), ["c"]),
        (Filter(namespace="ml", phase="Succeeded"), []),
    ],
)
def test_the_jobs_page_filters_by_namespace_and_phase_newest_first(only, shown):
    objects = [
        job("a", created="2026-01-01T00:00:00Z"),
        job("b", created="2026-01-01T01:00:00Z"),
        job("c", namespace="art", phase="Succeeded", created="2026-01-02T00:00:00Z"),
    ]
    assert [r.name for r in job_rows(objects, only)] == shown


def test_a_row_shows_phase_progress_loss_eta_family_and_age():
    html = rows_html(job_rows([job("toy-cat")]), NOW)
    assert 'href="/jobs/ml/toy-cat"' in html and ">Training<" in html
    assert '<progress max="100" value="50">' in html and "50/100" in html
    assert "0.1234" in html and "1m 30s" in html and ">sd<" in html and "1h 00m" in html


def test_a_job_without_status_is_pending_and_names_are_escaped():
    obj = {"metadata": {"name": "<b>x</b>", "namespace": "ml"}, "spec": {}}
    html = rows_html(job_rows([obj]), NOW)
    assert "&lt;b&gt;x&lt;/b&gt;" in html and "<b>x</b>" not in html and ">Pending<" in html


@pytest.mark.parametrize(
    "seconds, text", [(None, ""), (0, "0s"), (59, "59s"), (61, "1m 01s"), (3600, "1h 00m"), (90000, "1d 1h")]
)
def test_durations_read_like_words(seconds, text):
    assert duration(seconds) == text


def test_age_of_an_unparseable_timestamp_is_blank():
    assert age("yesterday", NOW) == "" and age("2026-01-02T11:59:00Z", NOW) == "1m 00s"


def test_conditions_in_words_those_that_hold_first():
    lines = condition_lines(
        {
            "conditions": [
                {"type": "Stalled", "status": "False", "reason": "Progressing"},
                {"type": "Overfitting", "status": "True", "reason": "SamplesMatchInstances", "message": "step 300"},
            ]
        }
    )
    assert [(c.type, c.sentence) for c in lines] == [
        ("Overfitting", "The job is overfitting (SamplesMatchInstances)."),
        ("Stalled", "The job is not stalled: its step has not moved (Progressing)."),
    ]
    assert lines[0].message == "step 300"


@pytest.mark.parametrize(
    "key",
    [
        "samples/step-10.png",
        "samples/progression.png",
        "history.jsonl",
        "evaluation.jsonl",
        "result.json",
        "model.safetensors",
        "lora/pytorch_lora_weights.safetensors",
    ],
)
def test_the_outputs_a_page_shows_are_served(key):
    assert served_key(key) == key


@pytest.mark.parametrize(
    "key",
    [
        "",
        "../other/samples/step-1.png",
        "samples/../../x.png",
        "/etc/passwd",
        "samples//step-1.png",
        "checkpoints/checkpoint-10/optimizer.pt",
        "model/unet/config.json",
        "samples/step-1.png/../x",
        "samples%2fstep-1.png",
        "..",
        "samples\\step-1.png",
        "lora/../model.safetensors",
        "s3://b/x",
    ],
)
def test_anything_else_is_refused(key):
    with pytest.raises(KeyRefused):
        served_key(key)


def test_outputs_steps_from_grids_checkpoints_and_evaluation():
    keys = [
        "samples/step-10.png",
        "samples/step-20.png",
        "samples/progression.png",
        "history.jsonl",
        "checkpoints/checkpoint-20/manifest.json",
        "checkpoints/checkpoint-10/trainable.safetensors",
        "model/model_index.json",
        "model.safetensors",
        "result.json",
        "evaluation.jsonl",
    ]
    evaluation = b'{"step": 20, "clipI": 0.81, "dino": {"mean": 0.5}, "prompt": "x"}\nnot json\n'
    out = outputs_of(keys, evaluation)
    assert [(s.step, s.grid, s.checkpoint) for s in out.steps] == [
        (10, "samples/step-10.png", False),
        (20, "samples/step-20.png", True),
    ]
    assert out.steps[1].figures == {"clipI": 0.81, "dino.mean": 0.5}
    assert out.progression and out.history and out.result and out.evaluation
    assert out.exports == ["model/", "model.safetensors"]


def test_evaluation_lines_without_a_step_are_skipped():
    assert evaluation_figures(b'{"clipI": 1}\n{"step": "x"}\n{"step": 5, "ok": true}\n') == {5: {}}


def point(step: int, prior: float | None = None) -> Point:
    return Point(step, loss=1.0 / step, instance_loss=1.0 / step, lr=1e-4 * step, time=0.0, prior_loss=prior)


@pytest.mark.parametrize("prior, lines", [(None, {"loss", "lr"}), (0.3, {"loss", "prior", "lr"})])
def test_the_loss_curve_is_valid_svg_with_a_line_per_series(prior, lines):
    svg = loss_curve([point(s, prior) for s in range(1, 41)])
    root = ElementTree.fromstring(svg)
    polylines = [e for e in root.iter() if e.tag.endswith("polyline")]
    assert {e.get("class").split()[1] for e in polylines} == lines
    for e in polylines:
        coords = [tuple(map(float, p.split(","))) for p in e.get("points").split()]
        assert len(coords) == 40 and all(0 <= x <= 760 and 0 <= y <= 280 for x, y in coords)
    assert "step 40: loss 0.0250" in svg and "style=" not in svg and "<script" not in svg


def test_the_loss_curve_of_no_history_says_so():
    assert "no history.jsonl yet" in loss_curve([])


@pytest.mark.parametrize(
    "low, high, ticks",
    [
        (0, 1, [0, 0.2, 0.4, 0.6, 0.8, 1.0]),
        (0, 100, [0, 20, 40, 60, 80, 100]),
        (0.1, 0.35, [0.1, 0.15, 0.2, 0.25, 0.3, 0.35]),
    ],
)
def test_ticks_are_round_numbers(low, high, ticks):
    assert nice_ticks(low, high) == pytest.approx(ticks)
    assert all(re.fullmatch(r"[0-9.]+", f"{t:g}") for t in nice_ticks(low, high))
