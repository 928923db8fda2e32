"""The Kubernetes permissions the operator needs, as data.

The chart's Role/ClusterRole rules (``charts/dreambooth-operator/templates/_rbac.tpl``) are
generated from these rules (:func:`render_template`, by ``make crds``), and tests hold both ends: ``tests/chart/test_rbac.py`` derives the API calls of
:mod:`dreambooth.operator.kube` (from the kubernetes_asyncio methods it uses), the kopf
handlers of :mod:`dreambooth.operator.handlers` and the owner references of
:mod:`dreambooth.operator.resources`, and checks that they need exactly :data:`OPERATOR`;
it also renders the chart and compares its rules with :func:`policy_rules`.

What kopf 1.45 itself needs, read from its source (``kopf/_core/reactor/observation.py``,
``kopf/_core/engines/posting.py``, ``kopf/_cogs/clients/patching.py``):

- the served resource: list + watch (cluster-wide or per namespace); with change handlers
  (on.create/update/resume, timers) also patch of the object for its annotations and
  finalizers, which the operator avoids: it has a raw-event handler only;
- Events: core v1 ``events`` (``references.EVENTS``), create (POST) only;
- ``customresourcedefinitions`` list + watch, cluster-wide, to notice CRD changes (without
  it kopf logs a warning and only scans resources at start);
- ``namespaces`` list + watch only when it serves a list of namespaces (never when
  cluster-wide); without it kopf logs a warning and assumes the named namespaces exist;
- discovery (``/api``, ``/apis``, ``/version``) is granted to every authenticated user by
  Kubernetes' default ``system:discovery`` role: nothing to add;
- standalone mode (one replica, the Deployment's ``Recreate`` strategy): no peering objects.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dreambooth.api.job import GROUP, PLURAL
from dreambooth.api.sweep import PLURAL as SWEEPS


@dataclass(frozen=True)
class Permission:
    """``verbs`` on ``resource`` (``plural`` or ``plural/subresource``) of API ``group``."""

    group: str
    resource: str
    verbs: tuple[str, ...]
    why: str

    def triples(self) -> set[tuple[str, str, str]]:
        return {(self.group, self.resource, verb) for verb in self.verbs}


#: In every watched namespace (a Role per namespace, or the ClusterRole when cluster-wide).
OPERATOR: tuple[Permission, ...] = (
    Permission(
        GROUP,
        PLURAL,
        ("list", "watch", "delete"),
        "kopf watches jobs (raw events only: it never patches them); the operator deletes a job "
        "after ttlSecondsAfterFinished",
    ),
    Permission(GROUP, f"{PLURAL}/status", ("patch",), "the operator is the only writer of .status"),
    Permission(
        GROUP,
        f"{PLURAL}/finalizers",
        ("update",),
        "children carry ownerReferences with blockOwnerDeletion (OwnerReferencesPermissionEnforcement)",
    ),
    Permission(GROUP, SWEEPS, ("list", "watch"), "the operator runs each DreamBoothSweep's jobs"),
    Permission(GROUP, f"{SWEEPS}/status", ("patch",), "the operator is the only writer of a sweep's .status"),
    Permission(
        GROUP, f"{SWEEPS}/finalizers", ("update",), "a sweep's jobs carry ownerReferences with blockOwnerDeletion"
    ),
    Permission(
        GROUP,
        PLURAL,
        ("create", "patch"),
        "a sweep's runs are DreamBoothJobs: create them, suspend and resume them with the sweep",
    ),
    Permission("", "configmaps", ("create",), "the trainer config of each job"),
    Permission("", "services", ("create",), "the headless Service of each job's pods"),
    Permission(
        "batch",
        "jobs",
        ("create", "get", "list", "patch", "delete"),
        "the Indexed Job: create, observe (all of a namespace's at once), suspend/resume; "
        "delete a multi-node job's failed Job to restart all its pods together (the garbage "
        "collector deletes it with its DreamBoothJob)",
    ),
    Permission("", "pods", ("list",), "pod states (reasons such as Unschedulable, OOMKilled) and rank 0's IP"),
    Permission("", "events", ("create",), "kopf posts Events about jobs (core v1 events)"),
)

#: Cluster-scoped reads kopf makes in either mode.
KOPF_CLUSTER: tuple[Permission, ...] = (
    Permission(
        "apiextensions.k8s.io",
        "customresourcedefinitions",
        ("list", "watch"),
        "kopf follows CRD changes (observation.resource_observer)",
    ),
)

#: Cluster-scoped reads kopf makes only when it serves a list of namespaces.
KOPF_NAMESPACES: tuple[Permission, ...] = (
    Permission(
        "", "namespaces", ("list", "watch"), "kopf follows the watched namespaces (observation.namespace_observer)"
    ),
)

#: The gallery's (gallery.enabled, its own ServiceAccount): it only reads DreamBoothJobs.
GALLERY: tuple[Permission, ...] = (
    Permission(
        GROUP,
        PLURAL,
        ("get", "list", "watch"),
        "dreambooth/gallery/kube.py lists a namespace's jobs and reads one; it never writes",
    ),
)

_VERB_ORDER = ("get", "list", "watch", "create", "update", "patch", "delete", "deletecollection")


def triples(permissions: Iterable[Permission]) -> set[tuple[str, str, str]]:
    out: set[tuple[str, str, str]] = set()
    for permission in permissions:
        out |= permission.triples()
    return out


def cluster_wide() -> tuple[Permission, ...]:
    """The ClusterRole of an operator watching every namespace."""
    return OPERATOR + KOPF_CLUSTER


def namespaced() -> tuple[tuple[Permission, ...], tuple[Permission, ...]]:
    """(the Role in each watched namespace, the small ClusterRole) for a list of namespaces."""
    return OPERATOR, KOPF_CLUSTER + KOPF_NAMESPACES


def policy_rules(permissions: Iterable[Permission]) -> list[dict[str, Any]]:
    """Kubernetes PolicyRules, one per (group, verbs) with its resources sorted."""
    by_key: dict[tuple[str, tuple[str, ...]], list[str]] = {}
    for p in permissions:
        verbs = tuple(sorted(set(p.verbs), key=_VERB_ORDER.index))
        by_key.setdefault((p.group, verbs), []).append(p.resource)
    return [
        {"apiGroups": [group], "resources": sorted(resources), "verbs": list(verbs)}
        for (group, verbs), resources in sorted(by_key.items())
    ]


# --- the chart's rules, generated -------------------------------------------------------

#: the chart's template of these rules, written by ``make crds`` (a test holds it in sync)
TEMPLATE = Path("charts/dreambooth-operator/templates/_rbac.tpl")
#: (the chart's template name, the constant, where it applies)
_DEFINES = (
    ("operator", "OPERATOR", "in each watched namespace (or cluster-wide)."),
    ("kopfCluster", "KOPF_CLUSTER", "kopf follows CRD changes (cluster-scoped, read-only)."),
    ("kopfNamespaces", "KOPF_NAMESPACES", "kopf follows the watched namespaces (only with a list of them)."),
    ("gallery", "GALLERY", "the gallery (gallery.enabled) reads DreamBoothJobs, nothing else."),
)


def _flow(items: Iterable[str]) -> str:
    return "[" + ", ".join(json.dumps(i) if i == "" else i for i in items) + "]"


def render_template() -> str:
    """The chart's ``_rbac.tpl``: one named template per group of permissions, their rules
    as :func:`policy_rules` gives them."""
    out = [
        "{{/*",
        "Generated from dreambooth/operator/rbac.py by `make crds`. Do not edit by hand.",
        "The operator's permissions; tests/chart/test_rbac.py checks rbac.py against the API",
        "calls in the operator's code and renders the chart. These rules do not depend on values.",
        "*/}}",
    ]
    for name, constant, where in _DEFINES:
        out += ["", f"{{{{/* rbac.{constant}: {where} */}}}}", f'{{{{- define "dreambooth-operator.rules.{name}" -}}}}']
        for rule in policy_rules(globals()[constant]):
            out += [
                f"- apiGroups: {_flow(rule['apiGroups'])}",
                f"  resources: {_flow(rule['resources'])}",
                f"  verbs: {_flow(rule['verbs'])}",
            ]
        out.append("{{- end }}")
    return "\n".join(out) + "\n"


def write(root: Path) -> Path:
    path = root / TEMPLATE
    path.write_text(render_template())
    return path


if __name__ == "__main__":
    print(f"wrote {write(Path.cwd())}")
