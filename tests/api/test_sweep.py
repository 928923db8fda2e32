"""DreamBoothSweep: the planner's table (steps and scheduler axes are never trained twice)
and bad sweeps refused with the field named, by the models and the generated CRD alike."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openapi_schema_validator import OAS30Validator

from dreambooth.api import crd_sweep, validate_spec
from dreambooth.api.sweep import AxisField, SpecError, child_spec, plan, validate_sweep
from kubesim import crds as kube_crds

ROOT = Path(__file__).resolve().parents[2]
CRD = crd_sweep.crd()
SCHEMA = CRD["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
SPEC_SCHEMA = SCHEMA["properties"]["spec"]

TEMPLATE = {
    "baseModel": {"uri": "s3://models/sd15/"},
    "instance": {"uri": "s3://training-data/toy-cat/", "prompt": "a photo of zwx toy cat"},
    "training": {"steps": 400},
}


def sweep(*axes: tuple[str, list[Any]], **spec: Any) -> dict[str, Any]:
    template = copy.deepcopy(TEMPLATE)
    if any(f == "prior.enabled" for f, _ in axes):  # the axis turns it off: its settings go
        template["prior"] = {"enabled": True, "classPrompt": "a photo of a cat"}
    return {
        "apiVersion": "dreambooth.io/v1alpha1",
        "kind": "DreamBoothSweep",
        "metadata": {"name": "toy-cat-study", "namespace": "team-a"},
        "spec": {"template": template, "axes": [{"field": f, "values": v} for f, v in axes], **spec},
    }


LR = ("training.learningRate", [5e-6, 2e-6])
STEPS = ("training.steps", [200, 400])
SCHEDULERS = ("validation.scheduler", ["ddim", "pndm"])


# --- the plan ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "axes, runs, rows",
    [
        ((LR, STEPS, SCHEDULERS), 2, 8),
        ((LR,), 2, 2),
        ((STEPS,), 1, 2),
        ((SCHEDULERS, STEPS), 1, 4),
        ((LR, ("prior.enabled", [True, False]), STEPS), 4, 8),
        ((LR, ("training.steps", [100, 200, 400]), ("validation.scheduler", ["ddim", "pndm", "lms"])), 2, 18),
    ],
    ids=["2lr-2steps-2sched", "lr-only", "steps-only", "sched-steps", "lr-prior-steps", "3x3"],
)
def test_only_training_axes_make_runs(axes, runs, rows):
    the_plan = plan(validate_sweep(sweep(*axes), cluster=True).spec)
    assert (len(the_plan.runs), len(the_plan.rows)) == (runs, rows)


def test_rows_are_runs_by_steps_by_schedulers_in_order():
    the_plan = plan(validate_sweep(sweep(LR, STEPS, SCHEDULERS)).spec)
    assert [(r.run, r.step, r.scheduler) for r in the_plan.rows] == [
        (1, 200, "ddim"),
        (1, 200, "pndm"),
        (1, 400, "ddim"),
        (1, 400, "pndm"),
        (2, 200, "ddim"),
        (2, 200, "pndm"),
        (2, 400, "ddim"),
        (2, 400, "pndm"),
    ]
    assert [r.label() for r in the_plan.runs] == ["learningRate=5e-06", "learningRate=2e-06"]


def test_a_child_trains_once_to_the_longest_steps_and_is_judged_at_each_value():
    spec = validate_sweep(sweep(LR, ("training.steps", [200, 300]), SCHEDULERS)).spec
    the_plan = plan(spec)
    child = child_spec(spec, the_plan.runs[1], the_plan)
    assert child["training"]["steps"] == 300
    assert child["training"]["learningRate"] == 2e-6
    every = child["checkpointing"]["everySteps"]
    assert every == 100 and all(s % every == 0 for s in (200, 300))
    assert child["validation"]["everySteps"] == every
    assert child["checkpointing"]["keep"] >= 3  # the checkpoints of every steps value stay
    assert (child["validation"]["scheduler"], child["validation"]["compareSchedulers"]) == ("ddim", ["pndm"])
    validate_spec(child, cluster=True)  # every child is a valid job


def test_turning_prior_preservation_off_drops_its_settings():
    raw = sweep(("prior.enabled", [True, False]))
    spec = validate_sweep(raw).spec
    the_plan = plan(spec)
    on, off = (child_spec(spec, r, the_plan) for r in the_plan.runs)
    assert on["prior"]["classPrompt"] == "a photo of a cat"
    assert off["prior"] == {"enabled": False}
    validate_spec(off)


def test_suspending_the_sweep_suspends_its_children():
    spec = validate_sweep(sweep(LR, suspend=True)).spec
    the_plan = plan(spec)
    assert child_spec(spec, the_plan.runs[0], the_plan)["runPolicy"]["suspend"] is True


# --- bad sweeps: the models and the CRD -------------------------------------------------------


def crd_problems(raw: dict[str, Any]) -> list[str]:
    """What the API server says: the structural schema, then (with its defaults) the CEL rules."""
    spec = raw["spec"]
    found = [".".join(map(str, e.absolute_path)) for e in OAS30Validator(SPEC_SCHEMA).iter_errors(spec)]
    if found:
        return found
    stored = kube_crds.apply_defaults(spec, SPEC_SCHEMA)
    return [f"{v.field}: {v.message}" for v in kube_crds.violations(stored, SPEC_SCHEMA)]


def model_problems(raw: dict[str, Any]) -> list[str]:
    with pytest.raises(SpecError) as err:
        validate_sweep(raw, cluster=True)
    return [str(i) for i in err.value.issues]


BAD = {
    "unknown axis field": (sweep(("training.colour", [1])), "spec.axes[0].field", "axes"),
    "empty values": (sweep(("training.learningRate", [])), "spec.axes[0].values", "axes"),
    "steps above the template's": (sweep(("training.steps", [200, 800])), "spec.axes[0].values[1]", "axes"),
    "too many runs": (sweep(LR, ("training.seed", [1, 2, 3]), maxRuns=4), "spec.axes", "axes"),
    "a string for a learning rate": (
        sweep(("training.learningRate", ["fast"])),
        "spec.axes[0].values[0]",
        "axes[0].values",
    ),
    "a number for prior.enabled": (sweep(("prior.enabled", [1])), "spec.axes[0].values[0]", "axes[0].values"),
    "a learning rate out of bounds": (
        sweep(("training.learningRate", [0.5])),
        "spec.axes[0].values[0]",
        "axes[0].values",
    ),
    "an unknown scheduler": (sweep(("validation.scheduler", ["fastest"])), "spec.axes[0].values[0]", "axes[0].values"),
    "an axis twice": (sweep(LR, ("training.learningRate", [1e-6])), "spec.axes[1].field", "axes"),
}


@pytest.mark.parametrize("name", BAD)
def test_bad_sweeps_are_refused_with_the_field_named_by_models_and_crd(name):
    raw, model_path, crd_path = BAD[name]
    model = model_problems(raw)
    assert any(p.startswith(model_path + ":") for p in model), model
    crd = crd_problems(raw)
    assert any(p.startswith(crd_path) for p in crd), crd


def test_the_steps_bound_comes_from_the_preset_when_the_template_sets_none():
    raw = sweep(("training.steps", [1200]))
    del raw["spec"]["template"]["training"]
    assert crd_problems(raw) and model_problems(raw)  # custom: 400 steps
    raw["spec"]["template"]["preset"] = "face"  # 1,200 steps (prior preservation on)
    validate_sweep(raw)
    assert crd_problems(raw) == []


@pytest.mark.parametrize(
    "axes",
    [
        (LR, STEPS, SCHEDULERS),
        (("training.method", ["full", "lora"]),),
        (("prior.enabled", [True, False]), ("training.seed", [0, 7])),
    ],
)
def test_good_sweeps_pass_both(axes):
    raw = sweep(*axes)
    validate_sweep(raw, cluster=True)
    assert crd_problems(raw) == []


# --- the generated CRD ---------------------------------------------------------------------


def test_crd_names_columns_and_validity():
    names = CRD["spec"]["names"]
    assert (names["kind"], names["plural"], names["shortNames"]) == ("DreamBoothSweep", "dreamboothsweeps", ["dbs"])
    version = CRD["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    assert [c["name"] for c in version["additionalPrinterColumns"]][:4] == ["Phase", "Runs", "Best", "Age"]
    assert kubernetes_validate.validate(CRD, "1.30.0", strict=True) == "1.30"


def test_every_cel_rule_compiles():
    rules = [r["rule"] for _, node in kube_crds.walk_schema(SCHEMA) for r in node.get("x-kubernetes-validations", ())]
    assert len(rules) > 20
    for rule in rules:
        kube_crds.program(rule)


def test_committed_crd_matches_the_types():
    for rel in crd_sweep.CRD_PATHS:
        assert (ROOT / rel).read_text() == crd_sweep.render(), f"{rel} out of date: run `make crds`"
    assert yaml.safe_load((ROOT / "crds" / crd_sweep.CRD_FILE).read_text()) == CRD


SWEEP_EXAMPLES = sorted((ROOT / "examples").glob("sweep-*.yaml"))


@pytest.mark.parametrize("path", SWEEP_EXAMPLES, ids=lambda p: p.name)
def test_sweep_examples_pass_models_and_crd(path):
    raw = yaml.safe_load(path.read_text())
    the_plan = plan(validate_sweep(raw, cluster=True).spec)
    assert crd_problems(raw) == []
    assert len(the_plan.runs) == 2  # both blog studies: two training runs


def test_the_blog_object_study_is_two_runs_and_twelve_rows():
    raw = yaml.safe_load((ROOT / "examples" / "sweep-object.yaml").read_text())
    the_plan = plan(validate_sweep(raw, cluster=True).spec)
    assert (len(the_plan.runs), the_plan.steps, the_plan.schedulers) == (2, (200, 400), ("ddim", "pndm", "lms"))
    assert len(the_plan.rows) == 12


def test_only_max_parallel_and_suspend_may_change_once_the_sweep_exists():
    old = kube_crds.apply_defaults(sweep(LR, STEPS)["spec"], SPEC_SCHEMA)
    for field, value in (("maxParallel", 3), ("suspend", True)):
        assert kube_crds.violations({**old, field: value}, SPEC_SCHEMA, old) == []
    for field, value in (
        ("axes", [{"field": "training.learningRate", "values": [1e-6]}]),
        ("maxRuns", 2),
        ("template", {**old["template"], "preset": "face"}),
    ):
        found = [v.message for v in kube_crds.violations({**old, field: value}, SPEC_SCHEMA, old)]
        assert any(m.startswith(f"{field} cannot change") for m in found), (field, found)


@pytest.mark.parametrize(
    "column", [c for c in crd_sweep.PRINTER_COLUMNS if c["name"] != "Age"], ids=lambda c: c["name"]
)
def test_printer_columns_point_at_status_fields(column):
    node = SCHEMA
    for part in column["jsonPath"].lstrip(".").split("."):
        assert part in node.get("properties", {}), f"{column['jsonPath']}: no field {part!r}"
        node = node["properties"][part]


@pytest.mark.parametrize(
    "validation, path",
    [
        ({"scheduler": "ddim", "compareSchedulers": ["pndm", "pndm"]}, "spec.validation.compareSchedulers[1]"),
        ({"scheduler": "ddim", "compareSchedulers": ["ddim"]}, "spec.validation.compareSchedulers[0]"),
        ({"enabled": False, "compareSchedulers": ["pndm"]}, "spec.validation.compareSchedulers"),
        ({"compareSchedulers": ["flow_euler"]}, "spec.validation.compareSchedulers[0]"),
    ],
    ids=["twice", "the-main-one", "validation-off", "not-for-sd"],
)
def test_compare_schedulers_are_checked_like_the_scheduler(validation, path):
    base = {**TEMPLATE["baseModel"], "family": "sd"}  # the family's samplers are checked once it is known
    with pytest.raises(SpecError) as err:
        validate_spec({**TEMPLATE, "baseModel": base, "validation": validation})
    assert any(i.path == path for i in err.value.issues), err.value.issues


@pytest.mark.parametrize(
    "validation",
    [
        {"scheduler": "ddim", "compareSchedulers": ["pndm", "pndm"]},
        {"scheduler": "ddim", "compareSchedulers": ["ddim"]},
    ],
    ids=["twice", "main"],
)
def test_the_job_crd_refuses_a_scheduler_sampled_twice(validation):
    from dreambooth.api import crd

    schema = crd.spec_schema()
    spec = kube_crds.apply_defaults({**TEMPLATE, "validation": validation}, schema)
    found = [v.message for v in kube_crds.violations(spec, schema)]
    assert any(m.startswith("validation.compareSchedulers") for m in found), found


def test_dreambooth_validate_checks_sweeps_too(tmp_path, capsys):
    from dreambooth.api.exitcodes import ExitCode
    from dreambooth.cli import main

    assert main(["validate", "--cluster", *map(str, SWEEP_EXAMPLES)]) == ExitCode.OK
    out = capsys.readouterr().out
    assert out.count("DreamBoothSweep") == len(SWEEP_EXAMPLES) and out.count(": valid") == len(SWEEP_EXAMPLES)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(sweep(("training.steps", [200, 800]))))
    assert main(["validate", str(bad)]) == ExitCode.INVALID_CONFIG
    assert "spec.axes[0].values[1]: 800 steps is outside 1..400" in capsys.readouterr().err


# --- the models and the CRD agree on every axis value --------------------------------------

#: what the template must have for each field's values to be about the value alone
NEEDS = {"training.lora.rank": {"method": "lora"}, "training.textEncoderLearningRate": {"trainTextEncoder": True}}
VALUE = st.one_of(
    st.booleans(),
    st.integers(-5, 2**31),
    st.floats(-1, 1, allow_nan=False, allow_infinity=False),
    st.sampled_from([0.0, 1e-2, 1e-2 + 1e-9, 5e-6, 2**31 - 1, 2**31, 1, 400, 401, 256, 257]),
    st.sampled_from(["full", "lora", "ddim", "pndm", "lms", "euler", "dpm", "fast", ""]),
)


@pytest.mark.parametrize("field", [f.value for f in AxisField])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(values=st.lists(VALUE, min_size=1, max_size=3, unique_by=repr))
def test_models_and_crd_accept_the_same_axis_values(field, values):
    raw = sweep((field, values))
    raw["spec"]["template"]["training"].update(NEEDS.get(field, {}))
    try:
        validate_sweep(raw, cluster=True)
        by_model = True
    except SpecError:
        by_model = False
    crd = crd_problems(raw)
    assert by_model == (crd == []), (values, crd)


def test_a_sweep_name_leaves_room_for_its_runs_names():
    raw = sweep(LR)
    raw["metadata"]["name"] = "s" * 57
    assert any(p.startswith("metadata.name:") for p in model_problems(raw))
    found = [v.message for v in kube_crds.violations(raw, SCHEMA)]
    assert any(m.startswith("metadata.name: at most 56") for m in found), found
    raw["metadata"]["name"] = "s" * 56
    assert kube_crds.violations(kube_crds.apply_defaults(raw, SCHEMA), SCHEMA) == []
