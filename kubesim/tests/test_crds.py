"""A CRD object given to the emulator makes it do what an API server does with the custom
resources it declares: the schema's defaults are stored, and its CEL rules
(``x-kubernetes-validations``, transition rules with ``oldSelf`` included) refuse a write
with a 422 that carries each rule's message, as kubectl shows it."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

import pytest

from kubesim.crds import apply_defaults, violations
from kubesim.kube import ApiError, Kube

ITEM = {
    "type": "object",
    "required": ["name"],
    "properties": {"name": {"type": "string"}, "value": {"type": "integer"}},
    "x-kubernetes-validations": [
        {"rule": "self.value >= 0", "message": "an item's value must not be negative"},
        {"rule": "self.value >= oldSelf.value", "message": "an item's value never goes down"},
    ],
}
SPEC = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "size": {"type": "integer", "default": 1},
        "mode": {"type": "string", "default": "fast"},
        "ratio": {"type": "number"},
        "items": {
            "type": "array",
            "items": ITEM,
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["name"],
        },
        "tags": {
            "type": "object",
            "additionalProperties": {
                "type": "string",
                "x-kubernetes-validations": [{"rule": "self.size() <= 8", "message": "a tag has at most 8 characters"}],
            },
        },
        "limits": {"type": "object", "default": {}, "properties": {"cpu": {"type": "integer", "default": 2}}},
    },
    "x-kubernetes-validations": [
        {"rule": "self.size <= 10", "message": "size must be at most 10"},
        {"rule": "!has(self.ratio) || self.ratio < 2.5", "message": "ratio must be under 2.5"},
        {"rule": "self.name == oldSelf.name", "message": "name is immutable"},
        {
            "rule": "self.mode != 'slow' || self.size < 5",
            "message": "slow widgets are small",
            "fieldPath": ".size",
            "reason": "FieldValueForbidden",
        },
    ],
}
CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "widgets.example.com"},
    "spec": {
        "group": "example.com",
        "scope": "Namespaced",
        "names": {"plural": "widgets", "singular": "widget", "kind": "Widget", "listKind": "WidgetList"},
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "properties": {
                            "metadata": {"type": "object"},  # as most CRDs declare it
                            "spec": SPEC,
                            "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
                        },
                    }
                },
            }
        ],
    },
}


def widget(name: str = "w", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "example.com/v1",
        "kind": "Widget",
        "metadata": {"name": name},
        "spec": {"name": "first", **spec},
    }


@pytest.fixture
def widgets(kube: Kube) -> Kube:
    kube.create(CRD)
    return kube


def refused(call, *args) -> ApiError:
    with pytest.raises(ApiError) as err:
        call(*args)
    assert (err.value.status, err.value.reason) == (422, "Invalid"), err.value
    return err.value


def test_the_schemas_defaults_are_stored(widgets):
    stored = widgets.create(widget())
    assert stored["spec"] == {"name": "first", "size": 1, "mode": "fast", "limits": {"cpu": 2}}
    assert widgets.get("widgets", "default", "w")["spec"] == stored["spec"]


def test_a_broken_rule_refuses_the_create_with_its_message_and_field(widgets):
    err = refused(widgets.create, widget(size=11))
    assert err.message == 'Widget.example.com "w" is invalid: spec: Invalid value: "object": size must be at most 10'
    assert err.details["kind"] == "Widget" and err.details["name"] == "w"
    assert err.details["causes"] == [
        {"reason": "FieldValueInvalid", "field": "spec", "message": 'Invalid value: "object": size must be at most 10'}
    ]
    assert widgets.find("widgets", "default", "w") is None


def test_several_broken_rules_are_all_reported(widgets):
    err = refused(widgets.create, widget(size=11, ratio=3, tags={"colour": "ultramarine"}))
    assert err.message.endswith(
        'is invalid: [spec: Invalid value: "object": size must be at most 10, '
        'spec: Invalid value: "object": ratio must be under 2.5, '
        'spec.tags.colour: Invalid value: "string": a tag has at most 8 characters]'
    )


def test_field_path_and_reason_shape_the_error(widgets):
    err = refused(widgets.create, widget(mode="slow", size=7))
    assert err.details["causes"] == [
        {"reason": "FieldValueForbidden", "field": "spec.size", "message": "Forbidden: slow widgets are small"}
    ]


def test_an_integer_in_a_number_field_is_a_double(widgets):
    widgets.create(widget(ratio=1))  # CEL would find no `int < double` overload otherwise
    refused(widgets.create, widget("w2", ratio=3))


def test_transition_rules_hold_on_update_only(widgets):
    created = widgets.create(widget(items=[{"name": "a", "value": 5}]))
    err = refused(widgets.patch, "widgets", "default", "w", {"spec": {"name": "second"}})
    assert err.details["causes"][0]["message"] == 'Invalid value: "object": name is immutable'
    changed = widgets.patch("widgets", "default", "w", {"spec": {"size": 3}})  # no rule against it
    assert changed["spec"]["size"] == 3
    assert changed["metadata"]["generation"] == created["metadata"]["generation"] + 1
    replaced = dict(changed, spec={**changed["spec"], "name": "third"})
    refused(widgets._call, widgets.emulator.op_replace, ("example.com", "v1", "widgets"), "default", "w", replaced)
    assert widgets.get("widgets", "default", "w")["spec"]["name"] == "first"


def test_map_list_items_are_matched_to_their_old_selves_by_key(widgets):
    widgets.create(widget(items=[{"name": "a", "value": 5}, {"name": "b", "value": 1}]))
    # reordered, b raised, a new item c: no item went down
    widgets.patch(
        "widgets",
        "default",
        "w",
        {"spec": {"items": [{"name": "c", "value": 0}, {"name": "b", "value": 2}, {"name": "a", "value": 5}]}},
    )
    err = refused(
        widgets.patch,
        "widgets",
        "default",
        "w",
        {"spec": {"items": [{"name": "a", "value": 4}, {"name": "b", "value": 2}, {"name": "c", "value": 0}]}},
    )
    assert [c["field"] for c in err.details["causes"]] == ["spec.items[0]"]
    assert "never goes down" in err.message


def test_status_writes_pass_and_run_no_spec_change(widgets):
    widgets.create(widget())
    done = widgets.patch_status("widgets", "default", "w", {"status": {"phase": "Ready"}})
    assert done["status"] == {"phase": "Ready"} and done["spec"]["name"] == "first"


def test_http_clients_and_dry_runs_get_the_422(widgets):
    url = f"{widgets.url}/apis/example.com/v1/namespaces/default/widgets?dryRun=All"
    request = urllib.request.Request(
        url, data=json.dumps(widget(size=12)).encode(), method="POST", headers={"Content-Type": "application/json"}
    )
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=10)
    body = json.loads(err.value.read())
    assert err.value.code == 422 and body["kind"] == "Status" and body["reason"] == "Invalid"
    assert "size must be at most 10" in body["message"]


def test_kubectl_shows_the_rules_message(widgets):
    widgets.create(widget())
    done = widgets.kubectl("patch", "widget", "w", "--type", "merge", "-p", '{"spec": {"name": "second"}}', check=False)
    assert done.returncode == 1
    assert 'The Widget "w" is invalid: spec: Invalid value: "object": name is immutable' in done.stderr


def test_without_a_crd_object_anything_is_stored(kube):
    """The conftest's DreamBoothJob is declared by name only: no schema, no rules."""
    stored = kube.create(
        {
            "apiVersion": "dreambooth.io/v1alpha1",
            "kind": "DreamBoothJob",
            "metadata": {"name": "x"},
            "spec": {"steps": "not even a number"},
        }
    )
    assert stored["spec"] == {"steps": "not even a number"}


def test_an_evaluation_error_is_an_error_of_the_field():
    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer"}},
        "x-kubernetes-validations": [{"rule": "self.n > 0", "message": "n must be positive"}],
    }
    (found,) = violations({}, schema, path="spec")
    assert found.error and "evaluating rule: self.n > 0" in found.message
    assert str(found).startswith('spec: Invalid value: "object": ')
    assert violations({"n": 1}, schema) == []
    assert [v.message for v in violations({"n": 0}, schema)] == ["n must be positive"]


def test_defaults_fill_objects_lists_and_maps_without_mutating():
    schema = {
        "type": "object",
        "properties": {
            "list": {
                "type": "array",
                "items": {"type": "object", "properties": {"x": {"type": "integer", "default": 7}}},
            },
            "map": {
                "type": "object",
                "additionalProperties": {"type": "object", "properties": {"y": {"type": "string", "default": "z"}}},
            },
        },
    }
    raw = {"list": [{}, {"x": 1}], "map": {"k": {}}}
    assert apply_defaults(raw, schema) == {"list": [{"x": 7}, {"x": 1}], "map": {"k": {"y": "z"}}}
    assert raw == {"list": [{}, {"x": 1}], "map": {"k": {}}}
