"""The generated CustomResourceDefinition: in sync with the types, structural, documented,
accepted by Kubernetes' own schema, and its CEL rules do what they say.

The CEL rules are evaluated for real with cel-python, by the code the simulated cluster's
API server enforces them with (kubesim/crds.py). The API server applies the schema's
defaults *before* it runs CEL, so the rules are fed what the typed model dumps
(``model_dump(mode="json", by_alias=True, exclude_none=True)``), which holds the same
defaults; ``test_model_dump_stands_in_for_api_server_defaulting`` checks that the two give
the same verdicts.
"""

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

from dreambooth.api import DreamBoothJobSpec, SpecError, crd, validate_spec
from dreambooth.api.job import CATEGORIES, GROUP, KIND, PLURAL, SHORT_NAMES, VERSION
from kubesim import crds as kube_crds
from tests.support.jobs import with_paths

ROOT = Path(__file__).resolve().parents[2]
CRD = crd.crd()
(VERSION_ENTRY,) = CRD["spec"]["versions"]
SCHEMA = VERSION_ENTRY["schema"]["openAPIV3Schema"]
SPEC_SCHEMA = SCHEMA["properties"]["spec"]


# --- generated file in sync --------------------------------------------------------------


def test_committed_crd_matches_the_types():
    paths = [ROOT / rel for rel in crd.CRD_PATHS if (ROOT / rel).parent.parent.is_dir()]
    assert ROOT / "crds" / crd.CRD_FILE in paths
    rendered = crd.render()
    stale = [str(p.relative_to(ROOT)) for p in paths if not p.is_file() or p.read_text() != rendered]
    assert not stale, f"{', '.join(stale)} out of date: run `make crds` and commit the result"


def test_committed_crd_is_the_object_we_generate():
    text = (ROOT / "crds" / crd.CRD_FILE).read_text()
    assert text.startswith("# Generated from dreambooth/api by `make crds`")
    assert yaml.safe_load(text) == CRD


# --- structural schema -------------------------------------------------------------------


schema_nodes = kube_crds.walk_schema  # every schema node below one, with a readable path


NODES = list(schema_nodes(SCHEMA))
FORBIDDEN = {"$ref", "$defs", "definitions", "anyOf", "allOf", "oneOf", "not", "title", "const"}


def test_schema_has_no_constructs_a_structural_schema_forbids():
    offenders = [f"{path}: {sorted(FORBIDDEN & set(node))}" for path, node in NODES if FORBIDDEN & set(node)]
    offenders += [f"{path}: nullable without type" for path, node in NODES if "nullable" in node and "type" not in node]
    assert offenders == []


def test_every_schema_node_has_a_type():
    exempt = {"x-kubernetes-int-or-string", "x-kubernetes-preserve-unknown-fields"}
    untyped = [path for path, node in NODES if "type" not in node and not exempt & set(node)]
    assert untyped == []
    assert len(NODES) > 100  # the walk really went everywhere


def test_objects_say_what_they_hold():
    """An object with neither properties nor additionalProperties is pruned to {} by the
    API server (only the root's metadata is special)."""
    empty = [
        path
        for path, node in NODES
        if node.get("type") == "object"
        and path != ".metadata"
        and "properties" not in node
        and "additionalProperties" not in node
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ]
    both = [path for path, node in NODES if "properties" in node and "additionalProperties" in node]
    assert (empty, both) == ([], [])


def test_defaults_and_enums_are_valid_for_their_own_schema():
    """The API server refuses a CRD whose defaults do not validate (and would store them)."""
    bad = []
    for path, node in NODES:
        check = {k: v for k, v in node.items() if not k.startswith("x-kubernetes")}
        if "default" in node and not OAS30Validator(check).is_valid(node["default"]):
            bad.append(f"{path}: default {node['default']!r}")
        for member in node.get("enum", []):
            typed = {k: v for k, v in check.items() if k in {"type", "pattern", "maxLength"}}
            if not OAS30Validator(typed).is_valid(member):
                bad.append(f"{path}: enum member {member!r}")
    assert bad == []


def test_map_lists_have_required_keys():
    for path, node in NODES:
        if node.get("x-kubernetes-list-type") == "map":
            item = node["items"]
            for key in node["x-kubernetes-list-map-keys"]:
                assert key in item.get("required", []) or "default" in item["properties"][key], path


def test_every_property_has_a_description():
    missing = [
        f"{path}.{name}"
        for path, node in NODES
        for name, prop in (node.get("properties") or {}).items()
        if not str(prop.get("description", "")).strip()
    ]
    assert missing == [], "properties without a description (kubectl explain shows nothing):\n" + ("\n".join(missing))


# --- names, printer columns, subresources --------------------------------------------------


def test_names_scope_and_version():
    spec = CRD["spec"]
    assert CRD["metadata"]["name"] == f"{PLURAL}.{GROUP}" == "dreamboothjobs.dreambooth.io"
    assert spec["group"] == "dreambooth.io" and spec["scope"] == "Namespaced"
    names = spec["names"]
    assert names["kind"] == KIND == "DreamBoothJob"
    assert names["shortNames"] == SHORT_NAMES == ["dbj"]
    assert names["categories"] == CATEGORIES and "dreambooth" in names["categories"]
    assert (names["singular"], names["plural"], names["listKind"]) == (
        "dreamboothjob",
        "dreamboothjobs",
        "DreamBoothJobList",
    )
    assert VERSION_ENTRY["name"] == VERSION == "v1alpha1"
    assert VERSION_ENTRY["served"] and VERSION_ENTRY["storage"]
    assert VERSION_ENTRY["subresources"] == {"status": {}}


def test_printer_columns():
    columns = VERSION_ENTRY["additionalPrinterColumns"]
    assert [(c["name"], c.get("priority", 0)) for c in columns] == [
        ("Phase", 0),
        ("Progress", 0),
        ("Loss", 0),
        ("Age", 0),
        ("Family", 1),
        ("Checkpoint", 1),
        ("Model", 1),
    ]
    assert next(c for c in columns if c["name"] == "Age")["type"] == "date"


@pytest.mark.parametrize("column", [c for c in crd.PRINTER_COLUMNS if c["name"] != "Age"], ids=lambda c: c["name"])
def test_printer_columns_point_at_status_fields(column):
    """A column whose jsonPath names no field shows an empty cell forever."""
    node = SCHEMA
    for part in column["jsonPath"].lstrip(".").split("."):
        assert part in node.get("properties", {}), f"{column['jsonPath']}: no field {part!r}"
        node = node["properties"][part]
    want = {"string": "string", "number": "number", "integer": "integer"}[column["type"]]
    assert node["type"] in ({want, "integer"} if want == "number" else {want})


# --- Kubernetes' own schema for CRDs ------------------------------------------------------


def test_crd_is_a_valid_customresourcedefinition():
    assert kubernetes_validate.validate(CRD, "1.30.0", strict=True) == "1.30"


@pytest.mark.parametrize(
    "break_it",
    [
        lambda c: c["spec"]["versions"][0].update(printerColumns=[]),
        lambda c: c["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"].update(
            {"x-kubernetes-validation": []}
        ),
        lambda c: c["spec"]["names"].update(shortNames="dbj"),
    ],
    ids=["unknown-version-field", "misspelt-extension", "wrong-type"],
)
def test_kubernetes_validate_is_strict_enough_to_matter(break_it):
    broken = copy.deepcopy(CRD)
    break_it(broken)
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, "1.30.0", strict=True)


# --- CEL rules ----------------------------------------------------------------------------

program = kube_crds.program


def all_rules() -> list[tuple[str, dict[str, str]]]:
    return [(path, r) for path, node in NODES for r in node.get("x-kubernetes-validations", [])]


def test_every_cel_rule_compiles_and_explains_itself():
    rules = all_rules()
    assert len(rules) >= 20
    for path, r in rules:
        program(r["rule"])  # raises CELParseError on a syntax error
        assert r.get("message", "").strip(), f"{path}: {r['rule']} has no message"


def cel_violations(new: Any, old: Any = None, schema: dict[str, Any] = SPEC_SCHEMA) -> list[str]:
    """Messages of the rules that ``new`` breaks, evaluated node by node as the API server
    does; rules that use ``oldSelf`` (transition rules) only run on update, where the old
    object has the node too. A rule that cannot be evaluated is a broken rule."""
    found = kube_crds.violations(new, schema, old)
    assert not [v for v in found if v.error], [(v.rule, v.error) for v in found if v.error]
    return [v.message for v in found]


def as_stored(raw: dict[str, Any]) -> dict[str, Any]:
    """The spec as CEL sees it: defaults applied (see the module docstring)."""
    spec = DreamBoothJobSpec.model_validate(raw, context={"cluster": True, "skip_rules": True})
    return spec.model_dump(mode="json", by_alias=True, exclude_none=True)


def python_accepts(raw: dict[str, Any]) -> bool:
    try:
        validate_spec(raw, cluster=True)
    except SpecError:
        return False
    return True


def example_specs() -> list[dict[str, Any]]:
    specs = []
    for path in sorted((ROOT / "examples").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and doc.get("kind") == "DreamBoothJob":
                specs.append(doc["spec"])
    return specs


@pytest.mark.parametrize("raw", example_specs(), ids=lambda s: s["instance"]["uri"])
def test_examples_pass_every_rule_on_create_and_on_an_unchanged_update(raw):
    stored = as_stored(raw)
    assert cel_violations(stored) == []
    assert cel_violations(stored, old=copy.deepcopy(stored)) == []


def _immutable_message(field: str) -> str:
    return (
        f"{field} cannot change once the job exists; delete and re-create the job (only runPolicy.suspend may change)"
    )


@pytest.mark.parametrize(
    "changes, rejected_for",
    [
        ({"runPolicy.suspend": True}, None),
        ({}, None),
        ({"training.steps": 800}, "training"),
        ({"training.learningRate": 1e-6}, "training"),
        ({"preset": "face"}, "preset"),
        ({"instance.prompt": "a photo of zwx toy dog"}, "instance"),
        ({"baseModel.uri": "hf://org/sd15"}, "baseModel"),
        ({"resources.gpusPerNode": 2}, "resources"),
        ({"validation.prompts": ["a photo of zwx toy cat in space"]}, "validation"),
        ({"checkpointing.keep": 5}, "checkpointing"),
        ({"output.uri": "s3://elsewhere/"}, "output"),
        ({"storage.endpoint": "minio2:9000"}, "storage"),
        ({"prior.enabled": False}, "prior"),
        ({"runPolicy.backoffLimit": 9}, "backoffLimit"),
        ({"runPolicy.activeDeadlineSeconds": 3600}, "activeDeadlineSeconds"),
        ({"runPolicy.ttlSecondsAfterFinished": 60}, "ttlSecondsAfterFinished"),
        ({"runPolicy.rendezvousTimeoutSeconds": 60}, "rendezvousTimeoutSeconds"),
        ({"runPolicy.collectiveTimeoutSeconds": 60}, "collectiveTimeoutSeconds"),
    ],
    ids=lambda v: "-".join(v) if isinstance(v, dict) else str(v),
)
def test_only_suspend_may_change_on_update(changes, rejected_for, minimal_spec):
    base = with_paths(minimal_spec, {"training.steps": 400, "training.batchSize": 2})
    old = as_stored(base)
    new = as_stored(with_paths(base, changes))
    expected = [] if rejected_for is None else [_immutable_message(rejected_for)]
    assert cel_violations(new, old=old) == expected


def test_every_field_but_suspend_has_a_rule_that_keeps_it():
    """Nothing else tells a user that an edit has no effect on a running job (the operator
    keeps no record of the spec it started from), so every field must be covered."""
    kept = {(path, r["message"].split(" cannot change")[0]) for path, r in all_rules() if "oldSelf" in r["rule"]}
    run_policy = SPEC_SCHEMA["properties"]["runPolicy"]["properties"]
    assert kept == {(".spec", f) for f in SPEC_SCHEMA["properties"] if f != "runPolicy"} | {
        (".spec.runPolicy", f) for f in run_policy if f != "suspend"
    }


def test_suspend_can_be_switched_back_and_forth(minimal_spec):
    off = as_stored(minimal_spec)
    on = as_stored(with_paths(minimal_spec, {"runPolicy.suspend": True}))
    assert cel_violations(on, old=off) == cel_violations(off, old=on) == []


def test_removing_a_deadline_is_a_change_too(minimal_spec):
    with_deadline = as_stored(with_paths(minimal_spec, {"runPolicy.activeDeadlineSeconds": 60}))
    without = as_stored(minimal_spec)
    assert cel_violations(without, old=with_deadline) == [_immutable_message("activeDeadlineSeconds")]


#: (id, change to the minimal spec, valid?) for the rules that the API server checks: CEL
#: and the python rules must say the same. Every case sets the fields the CEL rule reads.
AGREE = [
    ("validation-every-ok", {"training.steps": 100, "validation.everySteps": 100}, True),
    ("validation-every-over", {"training.steps": 100, "validation.everySteps": 101}, False),
    ("checkpoint-every-ok", {"training.steps": 100, "checkpointing.everySteps": 50}, True),
    ("checkpoint-every-over", {"training.steps": 100, "checkpointing.everySteps": 101}, False),
    ("fp16-gpu", {"training.mixedPrecision": "fp16", "resources.gpusPerNode": 1}, True),
    ("fp16-cpu", {"training.mixedPrecision": "fp16", "resources.gpusPerNode": 0}, False),
    ("bf16-cpu", {"training.mixedPrecision": "bf16", "resources.gpusPerNode": 0}, True),
    ("batch-2-gpus", {"training.batchSize": 4, "resources.gpusPerNode": 2}, True),
    ("batch-3-gpus", {"training.batchSize": 4, "resources.gpusPerNode": 3}, False),
    ("batch-cpu", {"training.batchSize": 3, "resources.gpusPerNode": 0}, True),
    ("batch-cpu-nodes", {"training.batchSize": 3, "resources.gpusPerNode": 0, "resources.nodes": 2}, False),
    (
        "batch-accumulation",
        {"training.batchSize": 8, "resources.gpusPerNode": 2, "training.gradientAccumulationSteps": 4},
        True,
    ),
    (
        "batch-accumulation-over",
        {"training.batchSize": 8, "resources.gpusPerNode": 2, "training.gradientAccumulationSteps": 3},
        False,
    ),
    ("batch-nodes", {"training.batchSize": 32, "resources.nodes": 2, "resources.gpusPerNode": 8}, True),
    ("batch-nodes-over", {"training.batchSize": 24, "resources.nodes": 2, "resources.gpusPerNode": 8}, False),
    (
        "prior-uri-enabled",
        {"prior.enabled": True, "prior.classPrompt": "a cat", "prior.uri": "s3://training-data/cats/"},
        True,
    ),
    ("prior-uri-disabled", {"prior.enabled": False, "prior.uri": "s3://training-data/cats/"}, False),
    ("prior-uri-unset-object", {"preset": "object", "prior.uri": "s3://training-data/cats/"}, False),
    ("prior-uri-face", {"preset": "face", "prior.uri": "s3://training-data/people/"}, True),
    (
        "prior-uri-face-switched-off",
        {"preset": "face", "prior.enabled": False, "prior.uri": "s3://training-data/people/"},
        False,
    ),
    ("lora-with-lora", {"training.method": "lora", "training.lora": {"rank": 8}}, True),
    ("lora-with-full", {"training.method": "full", "training.lora": {"rank": 8}}, False),
    ("kohya-with-lora", {"training.method": "lora", "output.formats": ["lora", "lora-kohya"]}, True),
    ("kohya-with-full", {"training.method": "full", "output.formats": ["diffusers", "lora-kohya"]}, False),
    ("kohya-default-method-sd", {"output.formats": ["lora-kohya"]}, False),
    ("kohya-default-method-sdxl", {"baseModel.family": "sdxl", "output.formats": ["lora-kohya"]}, True),
    ("te-steps-ok", {"training.steps": 100, "training.trainTextEncoder": True, "training.textEncoderSteps": 100}, True),
    (
        "te-steps-over",
        {"training.steps": 100, "training.trainTextEncoder": True, "training.textEncoderSteps": 101},
        False,
    ),
    ("warmup-ok", {"training.steps": 100, "training.lrWarmupSteps": 99}, True),
    ("warmup-equal", {"training.steps": 100, "training.lrWarmupSteps": 100}, False),
    ("warmup-none", {"training.steps": 1, "training.lrWarmupSteps": 0}, True),
    ("mig-one", {"resources.gpu": {"resourceName": "nvidia.com/mig-3g.20gb"}, "resources.gpusPerNode": 1}, True),
    (
        "mig-two",
        {
            "resources.gpu": {"resourceName": "nvidia.com/mig-3g.20gb"},
            "resources.gpusPerNode": 2,
            "training.batchSize": 2,
        },
        False,
    ),
    ("gpus-two", {"resources.gpusPerNode": 2, "training.batchSize": 2}, True),
    (
        "env-nccl",
        {"resources.env": [{"name": "NCCL_IB_HCA", "value": "mlx5"}, {"name": "NCCL_DEBUG", "value": "INFO"}]},
        True,
    ),
    *[
        (f"env-{name.lower()}", {"resources.env": [{"name": "NCCL_DEBUG"}, {"name": name}]}, False)
        for name in (
            "HOME",
            "HF_HOME",
            "XDG_CACHE_HOME",
            "JOB_COMPLETION_INDEX",
            "DREAMBOOTH_X",
            "AWS_REGION",
            "PYTHONPATH",
            "RANK",
            "MASTER_ADDR",
            "TORCHELASTIC_RUN_ID",
            "TORCH_ELASTIC_SHUTDOWN_TIMEOUT",
            "ACCELERATE_MIXED_PRECISION",
            "CUDA_VISIBLE_DEVICES",
            "NVIDIA_VISIBLE_DEVICES",
            "HF_TOKEN",
            "db_password",
            "MY_API_KEY",
            "AccessKey",
        )
    ],
    ("buckets-ok", {"training.buckets": {"enabled": True, "minSide": 256, "maxSide": 1024}}, True),
    ("buckets-min-off-step", {"training.buckets": {"enabled": True, "minSide": 200, "maxSide": 1024}}, False),
    ("buckets-max-off-step", {"training.buckets": {"enabled": True, "maxSide": 1000}}, False),
    (
        "buckets-min-over-max",
        {"training.buckets": {"enabled": True, "minSide": 512, "maxSide": 256, "step": 64}},
        False,
    ),
    ("extra-rdma", {"resources.extraResources": {"rdma/rdma_shared_device_a": "1"}}, True),
    ("extra-gpu", {"resources.extraResources": {"nvidia.com/gpu": "1"}}, False),
    (
        "extra-own-gpu",
        {"resources.gpu": {"resourceName": "amd.com/gpu"}, "resources.extraResources": {"amd.com/gpu": "1"}},
        False,
    ),
    ("extra-cpu", {"resources.extraResources": {"cpu": "1"}}, False),
    ("extra-memory", {"resources.extraResources": {"memory": "1Gi"}}, False),
    ("te-steps-without-te", {"training.textEncoderSteps": 10}, False),
    ("te-steps-face", {"preset": "face", "training.textEncoderSteps": 10}, True),
    ("te-steps-face-lora", {"preset": "face", "training.method": "lora", "training.textEncoderSteps": 10}, False),
    ("ema-with-lora", {"training.method": "lora", "training.ema": True}, False),
    ("ema-with-sdxl-default", {"baseModel.family": "sdxl", "training.ema": True}, False),
    ("ema-with-full", {"training.method": "full", "training.ema": True}, True),
    # what a named family cannot take (SD3: T5, flow matching, nf4; the others: none of it)
    ("sd3-t5-length", {"baseModel.family": "sd3", "training.maxSequenceLength": 256}, True),
    (
        "sd3-t5-length-t5-kept",
        {"baseModel.family": "sd3", "training.t5": "keep", "training.maxSequenceLength": 512},
        True,
    ),
    (
        "sd3-t5-length-t5-dropped",
        {"baseModel.family": "sd3", "training.t5": "drop", "training.maxSequenceLength": 256},
        False,
    ),
    ("sd3-t5-drop", {"baseModel.family": "sd3", "training.t5": "drop"}, True),
    ("sdxl-t5", {"baseModel.family": "sdxl", "training.t5": "drop"}, False),
    ("sd-t5-length", {"baseModel.family": "sd", "training.maxSequenceLength": 77}, False),
    ("sd3-flow-mode", {"baseModel.family": "sd3", "training.flowMatching": {"weighting": "mode"}}, True),
    ("sdxl-flow", {"baseModel.family": "sdxl", "training.flowMatching": {"weighting": "mode"}}, False),
    ("sd3-snr", {"baseModel.family": "sd3", "training.snrGamma": 5.0}, False),
    ("sd-snr", {"baseModel.family": "sd", "training.snrGamma": 5.0}, True),
    ("sd3-nf4-cpu", {"baseModel.family": "sd3", "baseModel.quantization": "nf4", "resources.gpusPerNode": 0}, False),
    (
        "sd3-nf4-full",
        {
            "baseModel.family": "sd3",
            "baseModel.quantization": "nf4",
            "resources.gpusPerNode": 1,
            "training.method": "full",
            "output.formats": ["diffusers"],
        },
        False,
    ),
    (
        "sd3-nf4-lora-gpu",
        {
            "baseModel.family": "sd3",
            "baseModel.quantization": "nf4",
            "resources.gpusPerNode": 1,
            "training.method": "lora",
        },
        False,
    ),  # not yet
    ("sdxl-nf4", {"baseModel.family": "sdxl", "baseModel.quantization": "nf4", "resources.gpusPerNode": 1}, False),
    ("sd3-none-quantization", {"baseModel.family": "sd3", "baseModel.quantization": "none"}, True),
    ("sd3-own-sampler", {"baseModel.family": "sd3", "validation.scheduler": "flow_euler"}, True),
    ("sd3-ddim", {"baseModel.family": "sd3", "validation.scheduler": "ddim"}, False),
    (
        "sd3-ddim-validation-off",
        {"baseModel.family": "sd3", "validation.enabled": False, "validation.scheduler": "ddim"},
        False,
    ),  # the export's scheduler
    ("sd-flow-euler", {"baseModel.family": "sd", "validation.scheduler": "flow_euler"}, False),
    (
        "sd3-full-text-encoder",
        {
            "baseModel.family": "sd3",
            "training.method": "full",
            "output.formats": ["diffusers"],
            "training.trainTextEncoder": True,
        },
        False,
    ),
    (
        "sd3-lora-text-encoder-adapters",
        {"baseModel.family": "sd3", "training.method": "lora", "training.lora": {"textEncoder": True}},
        True,
    ),
    (
        "sd3-single-file",
        {"baseModel.family": "sd3", "training.method": "full", "output.formats": ["safetensors"]},
        False,
    ),
]


@pytest.mark.parametrize("changes, valid", [c[1:] for c in AGREE], ids=[c[0] for c in AGREE])
def test_cel_rules_agree_with_the_python_rules(changes, valid, minimal_spec):
    raw = with_paths(minimal_spec, changes)
    assert python_accepts(raw) is valid
    assert (cel_violations(as_stored(raw)) == []) is valid


#: Rules that depend on preset values the API server cannot see (or on rules CEL does not
#: repeat): the API server lets these through, the operator reports them as InvalidSpec.
PYTHON_ONLY = [
    ("preset-batch-over-gpus", {"preset": "face", "resources.gpusPerNode": 4}),
    ("preset-steps-under-checkpoint", {"preset": "object", "checkpointing.everySteps": 500}),
    ("bucket-max-under-preset-resolution", {"training.buckets": {"enabled": True, "maxSide": 448}}),
    # extraResources keys are not scanned by CEL (a schema cannot bound a map key's length,
    # so the API server's cost estimate of a string function on keys would be huge)
    ("extra-not-extended", {"resources.extraResources": {"ephemeral-storage": "1"}}),
    ("extra-fraction", {"resources.extraResources": {"rdma/hca": "500m"}}),
    ("hugepages-without-memory", {"resources.extraResources": {"hugepages-2Mi": "1Gi"}}),
]


@pytest.mark.parametrize("changes", [c[1] for c in PYTHON_ONLY], ids=[c[0] for c in PYTHON_ONLY])
def test_preset_dependent_rules_are_left_to_the_operator(changes, minimal_spec):
    raw = with_paths(minimal_spec, changes)
    assert not python_accepts(raw)
    assert cel_violations(as_stored(raw)) == []


def test_env_names_are_a_map_list_so_the_api_server_refuses_duplicates():
    """cel-python does not see x-kubernetes-list-type; the API server refuses two items with
    one name, and the python rules say so with the field (tests/api/test_invalid_specs.py)."""
    env = SPEC_SCHEMA["properties"]["resources"]["properties"]["env"]
    assert env["x-kubernetes-list-type"] == "map"
    assert env["x-kubernetes-list-map-keys"] == ["name"] and "name" in env["items"]["required"]


apply_crd_defaults = kube_crds.apply_defaults  # what the API server stores


@pytest.mark.parametrize("changes", [c[1] for c in AGREE + PYTHON_ONLY], ids=[c[0] for c in AGREE + PYTHON_ONLY])
def test_model_dump_stands_in_for_api_server_defaulting(changes, minimal_spec):
    raw = with_paths(minimal_spec, changes)
    defaulted = apply_crd_defaults(raw, SPEC_SCHEMA)
    assert cel_violations(defaulted) == cel_violations(as_stored(raw))
    assert cel_violations(defaulted, old=defaulted) == cel_violations(as_stored(raw), old=as_stored(raw))


# The API server must never refuse a job that the typed models accept: whatever the rules
# read, a CEL rejection implies a python rejection.
_maybe_int = lambda lo, hi: st.none() | st.integers(lo, hi)


@st.composite
def rule_inputs(draw) -> dict[str, Any]:
    changes: dict[str, Any] = {
        "preset": draw(st.sampled_from(["object", "face", "style", "custom"])),
        "training.method": draw(st.sampled_from(["full", "lora"])),
        "training.mixedPrecision": draw(st.sampled_from(["no", "fp16", "bf16"])),
        "training.gradientAccumulationSteps": draw(st.integers(1, 4)),
        "training.lrWarmupSteps": draw(st.integers(0, 30)),
        "resources.nodes": draw(st.integers(1, 3)),
        "resources.gpusPerNode": draw(st.integers(0, 4)),
    }
    optional = {
        "training.steps": _maybe_int(1, 30),
        "training.batchSize": _maybe_int(1, 24),
        "training.textEncoderSteps": _maybe_int(1, 30),
        "training.trainTextEncoder": st.none() | st.booleans(),
        "validation.everySteps": _maybe_int(1, 30),
        "checkpointing.everySteps": _maybe_int(1, 30),
        "prior.enabled": st.none() | st.booleans(),
        "prior.classPrompt": st.none() | st.just("a photo of a cat"),
        "prior.uri": st.none() | st.just("s3://training-data/cats/"),
        "training.lora": st.none() | st.just({"rank": 4}),
        "resources.gpu": st.none()
        | st.sampled_from([{"resourceName": "nvidia.com/mig-3g.20gb"}, {"resourceName": "amd.com/gpu"}]),
        "resources.env": st.none()
        | st.lists(
            st.builds(
                lambda name: {"name": name, "value": "1"},
                st.sampled_from(
                    [
                        "NCCL_DEBUG",
                        "NCCL_IB_HCA",
                        "HOME",
                        "AWS_REGION",
                        "RANK",
                        "NVIDIA_VISIBLE_DEVICES",
                        "HF_TOKEN",
                        "OMP_NUM_THREADS",
                    ]
                ),
            ),
            max_size=3,
            unique_by=lambda v: v["name"],
        ),
        "resources.extraResources": st.none()
        | st.dictionaries(
            st.sampled_from(["rdma/hca", "nvidia.com/gpu", "amd.com/gpu", "cpu", "hugepages-2Mi", "ephemeral-storage"]),
            st.sampled_from(["0", "1", "500m", "1Gi"]),
            max_size=3,
        ),
        "resources.memory": st.none() | st.just("64Gi"),
    }
    for path, strategy in optional.items():
        value = draw(strategy)
        if value is not None:
            changes[path] = value
    return changes


@settings(
    max_examples=300,
    derandomize=True,
    deadline=None,  # minimal_spec is only read: with_paths copies
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(changes=rule_inputs())
def test_cel_never_rejects_what_python_accepts(changes, minimal_spec):
    raw = with_paths(minimal_spec, changes)
    if cel_violations(as_stored(raw)):
        assert not python_accepts(raw), f"the API server would refuse a valid job: {changes}"
