"""A job with sample grids turned off may not set their settings: settings of a disabled
feature are refused, never silently ignored (models and CRD agree)."""

from dreambooth.api import validate_spec
from dreambooth.api.crd import spec_schema
from kubesim.crds import violations

SPEC = {
    "baseModel": {"uri": "s3://models/sd15/"},
    "instance": {"uri": "s3://data/cat/", "prompt": "a photo of zwx cat"},
    "training": {"steps": 20},
    "validation": {"enabled": False, "everySteps": 100},
}


def cel_messages(spec: dict) -> list[str]:
    """The messages of the spec-level rules it breaks (on create: no transition rules)."""
    schema = {k: v for k, v in spec_schema().items() if k != "properties"}
    return [v.message for v in violations(spec, schema)]


def test_disabled_validation_may_not_name_a_cadence():
    try:
        validate_spec(SPEC, cluster=True)
    except ValueError as err:
        assert "spec.validation.everySteps: only used when validation.enabled is true" in str(err)
    else:
        raise AssertionError("a disabled validation's everySteps must be refused")
    # the API server applies defaults before CEL: feed it the defaulted spec
    spec = validate_spec({**SPEC, "validation": {"enabled": False}}, cluster=True)
    stored = spec.model_dump(mode="json", by_alias=True, exclude_none=True)
    assert not cel_messages(stored)
    stored["validation"]["everySteps"] = 100
    assert [m for m in cel_messages(stored) if "only used when validation.enabled" in m]


def test_enabled_validation_is_held_to_its_cadence():
    enabled = {**SPEC, "validation": {"everySteps": 100}}
    try:
        validate_spec(enabled, cluster=True)
    except ValueError as err:
        assert "spec.validation.everySteps" in str(err)
    else:
        raise AssertionError("validation.everySteps > training.steps must be refused")
    defaulted = {**SPEC, "validation": {"enabled": True, "everySteps": 100}}
    assert "validation.everySteps must be at most training.steps" in cel_messages(
        {
            **defaulted,
            "preset": "custom",
            "training": {"steps": 20, "gradientAccumulationSteps": 1, "mixedPrecision": "no"},
            "checkpointing": {},
            "prior": {},
            "resources": {"nodes": 1, "gpusPerNode": 1},
        }
    )
