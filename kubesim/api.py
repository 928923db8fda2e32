"""Pure pieces of the Kubernetes API emulator (:mod:`kubesim.emulator`).

No I/O here: shared types, API errors as ``Status`` objects, resource declarations, label
and field selectors, JSON merge patch (RFC 7386), an approximate strategic merge patch, and
the defaulting a real API server applies on create.
"""

from __future__ import annotations

import asyncio
import copy
import datetime
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

Key = tuple[str, str, str]  # group, version, plural
ObjKey = tuple[str | None, str]  # namespace, name
Event = tuple[int, str, dict[str, Any], dict[str, Any] | None]  # rv, type, object, previous

MERGE = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"
STRATEGIC = "application/strategic-merge-patch+json"
APPLY = "application/apply-patch+yaml"

ALL_VERBS = ("create", "delete", "deletecollection", "get", "list", "patch", "update", "watch")
SUBRESOURCE_VERBS = ("get", "patch", "update")


def gv(group: str, version: str) -> str:
    """``apiVersion``: ``batch/v1``, or ``v1`` for the core group."""
    return f"{group}/{version}" if group else version


def resource_name(key: Key) -> str:
    """``jobs.batch``, ``pods``: how error messages name a resource."""
    group, _, plural = key
    return f"{plural}.{group}" if group else plural


def object_order(key: ObjKey) -> tuple[str, str]:
    """Lists and initial watch events come in the order of etcd keys: namespace, name."""
    return key[0] or "", key[1]


@dataclass
class Table:
    """One resource's objects and its history of watch events."""

    objects: dict[ObjKey, dict[str, Any]] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)
    base: int = 0  # events dropped from the front of the history
    compacted: int = 0  # a watch from a resourceVersion below this gets 410 Gone
    watchers: set[asyncio.Event] = field(default_factory=set)


class RecordedRequest(NamedTuple):
    method: str
    path: str


@dataclass
class Fault:
    """An injected failure: the next ``times`` HTTP requests matching it get ``status``
    (with ``hang_s``: are held that long, then cut without an answer, as a dead connection
    looks to a client)."""

    method: str
    path: str  # a substring of the request path
    status: int = 500
    times: int = 1
    reason: str = "InternalError"
    message: str = "injected by the test"
    hang_s: float = 0.0


#: the methods that write (a 409 Conflict is only ever an answer to one of these)
WRITES = ("POST", "PUT", "PATCH", "DELETE")


@dataclass
class FaultShare:
    """Faults on a share of all HTTP requests, drawn at random (seeded), as a flaky API
    server or the network in front of it gives them: ``conflict`` of the writes answered
    409 Conflict, ``error`` of all requests answered 500, ``hang`` of them held for
    ``hang_s`` seconds and then cut without an answer (a timeout; a watch is cut too).
    ``counts`` says how many of each were given."""

    conflict: float = 0.0
    error: float = 0.0
    hang: float = 0.0
    hang_s: float = 30.0
    seed: int = 0
    counts: dict[str, int] = field(default_factory=lambda: {"requests": 0, "conflict": 0, "error": 0, "hang": 0})

    def __post_init__(self) -> None:
        import random

        self._rng = random.Random(self.seed)

    def draw(self, method: str) -> str | None:
        """The fault for this request, or None."""
        self.counts["requests"] += 1
        x = self._rng.random()
        for kind, share in (
            ("hang", self.hang),
            ("error", self.error),
            ("conflict", self.conflict if method in WRITES else 0.0),
        ):
            if x < share:
                self.counts[kind] += 1
                return kind
            x -= share
        return None


def now_iso(now: datetime.datetime | None = None) -> str:
    """RFC 3339 in UTC with second precision, as the API server writes timestamps."""
    now = now or datetime.datetime.now(datetime.UTC)
    return now.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_iso(text: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(text)


class ApiError(Exception):
    """An API failure, rendered as a ``Status`` object with the HTTP code ``status``."""

    def __init__(self, status: int, reason: str, message: str, details: Mapping | None = None):
        super().__init__(f"{status} {reason}: {message}")
        self.status, self.reason, self.message = status, reason, message
        self.details = dict(details or {})

    def body(self) -> dict[str, Any]:
        return {
            "apiVersion": "v1",
            "kind": "Status",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "details": self.details,
            "code": self.status,
        }


class NotFound(ApiError, LookupError):
    def __init__(self, message: str, details: Mapping | None = None):
        super().__init__(404, "NotFound", message, details)


# ---------------------------------------------------------------------------------------------
# Resource declarations


@dataclass(frozen=True)
class Decl:
    """One resource as discovery shows it (``group`` is ``""`` for the core API)."""

    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool = True
    shortnames: tuple[str, ...] = ()
    subresources: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version


#: What every emulator serves. kopf needs ``namespaces`` to start its watchers; it also lists
#: and watches CRDs (storing one also declares its resource, as a server would). Custom
#: resources come from CRD objects or ``running_kube(resources=...)``.
DEFAULT_RESOURCES: tuple[Decl, ...] = (
    Decl("", "v1", "namespaces", "Namespace", False, ("ns",), ("status",)),
    Decl("", "v1", "pods", "Pod", True, ("po",), ("status",), ("all",)),
    Decl("", "v1", "services", "Service", True, ("svc",), ("status",), ("all",)),
    Decl("", "v1", "configmaps", "ConfigMap", True, ("cm",)),
    Decl("", "v1", "secrets", "Secret", True),
    Decl("", "v1", "events", "Event", True, ("ev",)),
    Decl("", "v1", "persistentvolumeclaims", "PersistentVolumeClaim", True, ("pvc",), ("status",)),
    Decl("batch", "v1", "jobs", "Job", True, (), ("status",), ("all",)),
    Decl("events.k8s.io", "v1", "events", "Event", True, ("ev",)),
    Decl("coordination.k8s.io", "v1", "leases", "Lease", True),
    Decl(
        "apiextensions.k8s.io",
        "v1",
        "customresourcedefinitions",
        "CustomResourceDefinition",
        False,
        ("crd", "crds"),
        ("status",),
    ),
)

#: For operators run without ``--standalone`` (kopf's peering); not declared by default.
KOPF_PEERINGS: tuple[Decl, ...] = (
    Decl("kopf.dev", "v1", "clusterkopfpeerings", "ClusterKopfPeering", False),
    Decl("kopf.dev", "v1", "kopfpeerings", "KopfPeering", True),
)


def decls_from_crd(crd: Mapping[str, Any]) -> list[Decl]:
    """The resources a CustomResourceDefinition object serves."""
    spec = crd.get("spec") or {}
    names = spec.get("names") or {}
    return [
        Decl(
            group=spec.get("group", ""),
            version=ver["name"],
            plural=names["plural"],
            kind=names["kind"],
            namespaced=spec.get("scope", "Namespaced") == "Namespaced",
            shortnames=tuple(names.get("shortNames") or ()),
            subresources=tuple(sorted((ver.get("subresources") or {}).keys())),
            categories=tuple(names.get("categories") or ()),
        )
        for ver in spec.get("versions") or ()
        if ver.get("served", True)
    ]


def version_priority(version: str) -> tuple[int, int, int]:
    """Kubernetes' version order: GA before beta before alpha, higher numbers first."""
    match = re.fullmatch(r"v(\d+)(?:(alpha|beta)(\d+))?", version)
    if not match:
        return (3, 0, 0)
    level = {"": 0, "beta": 1, "alpha": 2}[match.group(2) or ""]
    return (level, -int(match.group(1)), -int(match.group(3) or 0))


# ---------------------------------------------------------------------------------------------
# Selectors

Predicate = Callable[[Mapping[str, Any]], bool]
_LABEL_TERM = re.compile(
    r"^(?P<neg>!)?\s*(?P<key>[A-Za-z0-9._/-]+)\s*"
    r"(?:(?P<op>==|=|!=)\s*(?P<value>[A-Za-z0-9._-]*)"
    r"|\s+(?P<setop>in|notin)\s*\((?P<values>[^()]*)\))?$"
)


def _split_terms(text: str) -> list[str]:
    terms, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += char == "("
        depth -= char == ")"
        if char == "," and depth == 0:
            terms.append(text[start:i])
            start = i + 1
    terms.append(text[start:])
    return [term.strip() for term in terms if term.strip()]


def label_selector(text: str | None) -> Predicate:
    """A predicate over an object for a ``labelSelector`` (equality- and set-based)."""
    checks: list[Callable[[Mapping[str, str]], bool]] = []
    for term in _split_terms(text or ""):
        match = _LABEL_TERM.match(term)
        if not match or (match["neg"] and (match["op"] or match["setop"])):
            raise ApiError(400, "BadRequest", f"unable to parse requirement: {term!r}")
        key, op, value = match["key"], match["op"], match["value"]
        if match["neg"]:
            checks.append(lambda labels, k=key: k not in labels)
        elif op in ("=", "=="):
            checks.append(lambda labels, k=key, v=value: labels.get(k) == v)
        elif op == "!=":
            checks.append(lambda labels, k=key, v=value: labels.get(k) != v)
        elif match["setop"]:
            values = {v.strip() for v in match["values"].split(",") if v.strip()}
            inside = match["setop"] == "in"
            checks.append(lambda labels, k=key, vs=values, inside=inside: (k in labels and labels[k] in vs) == inside)
        else:
            checks.append(lambda labels, k=key: k in labels)

    def predicate(obj: Mapping[str, Any]) -> bool:
        labels = (obj.get("metadata") or {}).get("labels") or {}
        return all(check(labels) for check in checks)

    return predicate


def labels_to_selector(labels: Mapping[str, str] | str | None) -> str | None:
    if labels is None or isinstance(labels, str):
        return labels
    return ",".join(f"{key}={value}" for key, value in labels.items())


def _field_value(obj: Mapping[str, Any], path: str) -> str:
    value: Any = obj
    for part in path.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    if value is None:
        return ""
    return str(value).lower() if isinstance(value, bool) else str(value)


def field_selector(text: str | None) -> Predicate:
    """``fieldSelector`` with ``=``, ``==``, ``!=`` on any dotted path (a real server allows
    only a few fields per resource; this one allows all)."""
    checks: list[Predicate] = []
    for term in _split_terms(text or ""):
        match = re.fullmatch(r"([A-Za-z0-9._-]+)\s*(==|=|!=)\s*(.*)", term)
        if not match:
            raise ApiError(400, "BadRequest", f"invalid field selector: {term!r}")
        path, op, value = match.groups()
        equal = op != "!="
        checks.append(lambda obj, p=path, v=value, eq=equal: (_field_value(obj, p) == v) == eq)
    return lambda obj: all(check(obj) for check in checks)


# ---------------------------------------------------------------------------------------------
# Patches


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch; never mutates its arguments."""
    if not isinstance(patch, Mapping):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, Mapping) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


#: Lists merged by a key in a strategic merge patch (the rest are replaced, as in the API's
#: ``patchStrategy`` tags for the fields our objects use).
_MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "ephemeralContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "conditions": "type",
    "ownerReferences": "uid",
    "imagePullSecrets": "name",
    "hostAliases": "ip",
}
_PRIMITIVE_MERGE = {"finalizers"}


def _merge_key(key: str, items: Iterable[Any]) -> str | None:
    if key == "ports":
        first = next(iter(items), None)
        return "containerPort" if isinstance(first, Mapping) and "containerPort" in first else "port"
    return _MERGE_KEYS.get(key)


def strategic_merge_patch(target: Any, patch: Any) -> Any:
    """An approximation of a strategic merge patch: a merge patch in which the lists above
    are merged by key and ``finalizers`` are unioned; ``$patch: replace|delete``,
    ``$deleteFromPrimitiveList/`` are honoured, ``$setElementOrder/`` and ``$retainKeys``
    are ignored. No OpenAPI schema is consulted."""
    if not isinstance(patch, Mapping):
        return copy.deepcopy(patch)
    if patch.get("$patch") == "replace":
        return {k: copy.deepcopy(v) for k, v in patch.items() if k != "$patch"}
    result = dict(target) if isinstance(target, Mapping) else {}
    for key, value in patch.items():
        if key in ("$patch", "$retainKeys") or key.startswith("$setElementOrder/"):
            continue
        if key.startswith("$deleteFromPrimitiveList/"):
            name = key.split("/", 1)[1]
            result[name] = [x for x in result.get(name) or () if x not in value]
        elif value is None or (isinstance(value, Mapping) and value.get("$patch") == "delete"):
            result.pop(key, None)
        elif isinstance(value, list):
            result[key] = _merge_list(key, result.get(key), value)
        else:
            result[key] = strategic_merge_patch(result.get(key), value)
    return result


def _merge_list(key: str, old: Any, new: list[Any]) -> list[Any]:
    old = list(old) if isinstance(old, list) else []
    if key in _PRIMITIVE_MERGE:
        return old + [x for x in new if x not in old]
    merge_key = _merge_key(key, new or old)
    if merge_key is None or not all(isinstance(item, Mapping) for item in new):
        return copy.deepcopy(new)
    items = old
    for item in new:
        found = next(
            (i for i, o in enumerate(items) if isinstance(o, Mapping) and o.get(merge_key) == item.get(merge_key)), None
        )
        if item.get("$patch") == "delete":
            if found is not None:
                items.pop(found)
        elif found is not None:
            items[found] = strategic_merge_patch(items[found], item)
        else:
            items.append({k: copy.deepcopy(v) for k, v in item.items() if k != "$patch"})
    return items


# ---------------------------------------------------------------------------------------------
# Server-side defaults on create (the few fields operators compare against)

Defaulter = Callable[[dict[str, Any], "DefaultContext"], None]


@dataclass
class DefaultContext:
    uid: str
    next_cluster_ip: Callable[[], str] = field(default=lambda: "10.96.0.10")


def _default_job(obj: dict[str, Any], ctx: DefaultContext) -> None:
    spec = obj.setdefault("spec", {})
    name = obj["metadata"]["name"]
    spec.setdefault("completions", 1)
    spec.setdefault("parallelism", 1)
    spec.setdefault("backoffLimit", 6)
    spec.setdefault("completionMode", "NonIndexed")
    spec.setdefault("suspend", False)
    spec.setdefault("manualSelector", False)
    spec.setdefault("podReplacementPolicy", "Failed" if spec.get("podFailurePolicy") else "TerminatingOrFailed")
    spec.setdefault("selector", {"matchLabels": {"batch.kubernetes.io/controller-uid": ctx.uid}})
    template_meta = spec.setdefault("template", {}).setdefault("metadata", {})
    template_meta["labels"] = {
        **(template_meta.get("labels") or {}),
        "batch.kubernetes.io/controller-uid": ctx.uid,
        "batch.kubernetes.io/job-name": name,
        "controller-uid": ctx.uid,
        "job-name": name,
    }


def _default_service(obj: dict[str, Any], ctx: DefaultContext) -> None:
    spec = obj.setdefault("spec", {})
    spec.setdefault("type", "ClusterIP")
    if spec["type"] == "ClusterIP" and not spec.get("clusterIP"):
        spec["clusterIP"] = ctx.next_cluster_ip()
    if spec.get("clusterIP"):
        spec.setdefault("clusterIPs", [spec["clusterIP"]])
    for port in spec.get("ports") or ():
        port.setdefault("protocol", "TCP")
        port.setdefault("targetPort", port.get("port"))


DEFAULTERS: dict[tuple[str, str], Defaulter] = {
    ("batch", "jobs"): _default_job,
    ("", "services"): _default_service,
}

#: ``.status`` a new object gets when its resource has the status subresource (the body's
#: own status is dropped, as a real server does); missing entries mean no status.
INITIAL_STATUS: dict[tuple[str, str], dict[str, Any]] = {
    ("", "pods"): {"phase": "Pending"},
    ("", "namespaces"): {"phase": "Active"},
    ("", "services"): {"loadBalancer": {}},
    ("", "persistentvolumeclaims"): {"phase": "Pending"},
}
