"""Every shipped example is a job the user can apply as is: the typed models, the generated
CRD schema (as the API server checks it) and ``dreambooth validate --cluster`` all accept it."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from openapi_schema_validator import OAS30Validator

from dreambooth.api import crd, manifest, validate_job
from dreambooth.api.exitcodes import ExitCode
from dreambooth.cli import main

ROOT = Path(__file__).resolve().parents[2]
#: the DreamBoothJob examples; sweep-*.yaml are DreamBoothSweeps (tests/api/test_sweep.py)
EXAMPLES = sorted(p for p in (ROOT / "examples").glob("*.yaml") if not p.name.startswith("sweep-"))


def jobs_in(path: Path) -> list[dict[str, Any]]:
    """As ``kubectl apply -f`` reads the file (dreambooth/api/manifest.py)."""
    return [d.data for d in manifest.read(path) if d.kind == "DreamBoothJob"]


def strict(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` with unknown fields rejected, as kubectl's default field validation
    (``--validate=strict``) does; plain OpenAPI validation would let typos through."""
    schema = copy.deepcopy(schema)

    def close(node: Any) -> None:
        if isinstance(node, dict):
            if "properties" in node and "additionalProperties" not in node:
                node["additionalProperties"] = False
            for value in node.values():
                close(value)
        elif isinstance(node, list):
            for value in node:
                close(value)

    close(schema)
    return schema


CRD_VALIDATOR = OAS30Validator(strict(crd.open_api_schema()))


def crd_errors(doc: dict[str, Any]) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}" for e in CRD_VALIDATOR.iter_errors(doc)]


def test_examples_exist():
    assert len(EXAMPLES) >= 5, EXAMPLES
    for path in EXAMPLES:
        assert len(jobs_in(path)) == 1, f"{path.name} should hold exactly one DreamBoothJob"


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_is_a_valid_cluster_job(path: Path):
    (doc,) = jobs_in(path)
    job = validate_job(doc, cluster=True)
    assert job.metadata.name == doc["metadata"]["name"]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_passes_the_crd_schema(path: Path):
    (doc,) = jobs_in(path)
    assert crd_errors(doc) == []


@pytest.mark.parametrize(
    "mutate, where",
    [
        (lambda d: d["spec"]["training"].update(steps=0), "spec.training.steps"),
        (lambda d: d["spec"]["training"].update(learningrate=1e-6), "spec.training"),
        (lambda d: d["spec"].update(preset="fancy"), "spec.preset"),
        (lambda d: d["spec"]["instance"].update(uri="gs://bucket/x"), "spec.instance.uri"),
    ],
    ids=["bound", "typo", "enum", "scheme"],
)
def test_crd_check_is_not_vacuous(mutate, where):
    """The schema check above really rejects broken jobs (and says where)."""
    (doc,) = jobs_in(ROOT / "examples" / "lora.yaml")
    doc = copy.deepcopy(doc)
    mutate(doc)
    errors = crd_errors(doc)
    assert errors and errors[0].startswith(where), errors


def test_cli_validate_cluster_accepts_every_example(capsys):
    code = main(["validate", "--cluster", *map(str, EXAMPLES)])
    out, err = capsys.readouterr()
    assert code == ExitCode.OK, err
    for path in EXAMPLES:
        assert f"{path}: DreamBoothJob" in out and "valid" in out
    assert out.count(": valid") == len(EXAMPLES)


def test_cli_validate_reports_a_broken_example(tmp_path, capsys):
    (doc,) = jobs_in(ROOT / "examples" / "toy-cat.yaml")
    doc["spec"]["training"] = {"steps": 0}
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(doc))
    code = main(["validate", "--cluster", str(EXAMPLES[0]), str(bad)])
    out, err = capsys.readouterr()
    assert code == ExitCode.INVALID_CONFIG
    assert "spec.training.steps" in err and "greater than or equal to 1" in err
    assert f"{EXAMPLES[0]}: DreamBoothJob" in out
