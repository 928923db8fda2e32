"""The chart's gallery (gallery.enabled): off by default; on, a Deployment, Service and a
ServiceAccount that may only read DreamBoothJobs (what dreambooth/gallery/kube.py calls),
with the S3 Secret mounted read only. Rendering and Kubernetes-schema validation with it on
are in test_chart.py's value sets."""

from __future__ import annotations

import pytest

from dreambooth.api.job import GROUP, PLURAL
from dreambooth.gallery import kube as gallery_kube
from dreambooth.operator import rbac
from tests.chart.support import EVERYTHING, NAMESPACE, RELEASE, objects, of_kind
from tests.chart.test_rbac import _rule_triples, kube_calls

GALLERY = f"{RELEASE}-gallery"
ON = {"gallery": {"enabled": True}, "storage": {"credentialsSecret": "minio"}}
ON_NAMESPACED = {**EVERYTHING, "gallery": {"enabled": True, "credentialsSecret": "minio-readonly"}}


def gallery_objects(values):
    return [o for o in objects(values) if o["metadata"]["name"] == GALLERY]


def test_the_gallery_is_off_by_default():
    assert not gallery_objects({}) and not gallery_objects(EVERYTHING)


@pytest.mark.parametrize("values, role", [(ON, "ClusterRole"), (ON_NAMESPACED, "Role")])
def test_its_rbac_only_reads_dreamboothjobs_and_covers_what_its_code_calls(values, role):
    objs = gallery_objects(values)
    roles = of_kind(objs, role)
    assert roles and not of_kind(objs, "ClusterRole" if role == "Role" else "Role")
    needed = {t for _, t in kube_calls(gallery_kube, frozenset({"custom"}))}
    assert needed == {(GROUP, PLURAL, "list"), (GROUP, PLURAL, "get")}
    for r in roles:
        granted = _rule_triples(r["rules"])
        assert granted == {(GROUP, PLURAL, verb) for verb in ("get", "list", "watch")} == rbac.triples(rbac.GALLERY)
        assert needed <= granted
    if role == "Role":
        assert sorted(r["metadata"]["namespace"] for r in roles) == sorted(values["watchNamespaces"])
    for binding in of_kind(objs, role + "Binding"):
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": GALLERY, "namespace": NAMESPACE}]
        assert binding["roleRef"]["kind"] == role and binding["roleRef"]["name"] == GALLERY


@pytest.mark.parametrize("values, secret", [(ON, "minio"), (ON_NAMESPACED, "minio-readonly")])
def test_the_s3_secret_is_mounted_read_only_and_never_in_the_environment(values, secret):
    (deployment,) = of_kind(gallery_objects(values), "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    volume = next(v for v in pod["volumes"] if "secret" in v)
    assert volume["secret"]["secretName"] == secret
    mount = next(m for m in container["volumeMounts"] if m["name"] == volume["name"])
    assert mount["readOnly"] is True
    env = {e["name"]: e for e in container["env"]}
    assert env["DREAMBOOTH_S3_CREDENTIALS_DIR"]["value"] == mount["mountPath"]
    assert not any("valueFrom" in e or e["name"].startswith("AWS_") for e in container["env"])
    assert container["command"][:2] == ["dreambooth", "gallery"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["serviceAccountName"] == GALLERY


def test_its_service_selects_the_gallery_and_the_operator_never_selects_it():
    objs = objects(ON)
    (service,) = of_kind(gallery_objects(ON), "Service")
    (gallery,) = of_kind(gallery_objects(ON), "Deployment")
    operator = next(d for d in of_kind(objs, "Deployment") if d["metadata"]["name"] == RELEASE)
    labels = gallery["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert not operator["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == "http"


def test_the_namespaces_it_shows_are_the_watched_ones():
    (deployment,) = of_kind(gallery_objects(ON_NAMESPACED), "Deployment")
    env = {e["name"]: e.get("value") for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["DREAMBOOTH_NAMESPACES"] == ",".join(EVERYTHING["watchNamespaces"])
