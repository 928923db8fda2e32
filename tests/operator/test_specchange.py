"""Spec edits a running job ignores: recorded spec vs current spec, and the condition."""

from __future__ import annotations

import json

from dreambooth.api import validate_spec
from dreambooth.operator.specchange import (
    SPEC_ANNOTATION,
    changed_paths,
    ignored_changes,
    spec_record,
)

SPEC = {"baseModel": {"uri": "s3://models/sd15/"},
        "instance": {"uri": "s3://data/cat/", "prompt": "a photo of zwx cat"},
        "training": {"steps": 400}}


def job_built_from(spec: dict) -> dict:
    return {"metadata": {"annotations": {SPEC_ANNOTATION: spec_record(validate_spec(spec))}}}


def edited(**training) -> dict:
    return {**SPEC, "training": {**SPEC["training"], **training}}


def test_the_record_holds_only_what_the_user_set():
    assert json.loads(spec_record(validate_spec(SPEC))) == SPEC


def test_changed_paths_name_every_leaf_that_differs():
    assert changed_paths({"a": {"b": 1, "c": 2}}, {"a": {"b": 1, "c": 3, "d": 4}}) == ["spec.a.c", "spec.a.d"]
    assert changed_paths({"a": 1}, {"a": {"b": 2}}) == ["spec.a.b"]
    assert changed_paths(SPEC, SPEC) == []


def test_edits_that_do_not_take_effect_are_named():
    job = job_built_from(SPEC)
    assert ignored_changes(job, validate_spec(SPEC)) == ()
    assert ignored_changes(job, validate_spec(edited(steps=999, learningRate=1e-5))) == (
        "spec.training.learningRate", "spec.training.steps")
    followed = {**SPEC, "runPolicy": {"suspend": True, "ttlSecondsAfterFinished": 60}}
    assert ignored_changes(job, validate_spec(followed)) == ()  # suspend and ttl take effect
    assert ignored_changes(job, validate_spec({**followed, "runPolicy": {"backoffLimit": 9}})) == (
        "spec.runPolicy.backoffLimit",)


def test_no_record_no_verdict():
    spec = validate_spec(edited(steps=999))
    assert ignored_changes(None, spec) == ()  # no Job yet
    assert ignored_changes({"metadata": {}}, spec) == ()  # a Job of an older operator
    assert ignored_changes({"metadata": {"annotations": {SPEC_ANNOTATION: "{not json"}}}, spec) == ()
