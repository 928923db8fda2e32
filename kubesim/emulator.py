"""A stateful Kubernetes API: :class:`KubeEmulator`, a ``kmock.KubernetesEmulator``.

kmock 0.8 provides the HTTP server (``kmock.Server`` on 127.0.0.1), the resource
declarations (``emulator.resources``, ``kmock.ResourceInfo``) and the ``Status`` error
envelope. Its own request handling cannot run kopf (see docs/testing.md), so this subclass
replaces it entirely (``__call__``, in :mod:`kubesim.rest`), adding:

* server-side metadata on create (namespace from the URL, ``uid``, ``creationTimestamp``,
  ``generation``, ``resourceVersion`` from one global counter, ``generateName``), the
  create-time defaults of Jobs and Services, and a fresh ``.status``;
* PATCH as JSON merge patch, JSON patch (dry-applied: a failed ``test`` op is a 422) or an
  approximate strategic merge patch; a stale ``metadata.resourceVersion`` in a merge patch
  or PUT is a 409; no change means no new resourceVersion and no watch event;
* the ``status`` subresource as on a real server: ``/status`` writes change only
  ``.status`` and writes to the object never change ``.status``; ``generation`` grows on
  changes outside ``metadata`` (and ``status``, where it is a subresource);
* DELETE (finalizers: ``deletionTimestamp`` first, deletion once they are gone;
  ``propagationPolicy: Orphan``, the default for batch/v1 Jobs, removes the
  ownerReferences of the dependents), delete-collection, ``labelSelector`` and ``fieldSelector`` on lists and watches;
* lists with ``kind: <Kind>List``, ``apiVersion`` and the current resourceVersion;
  watches that replay only events newer than ``resourceVersion`` (410 once compacted),
  ``sendInitialEvents``, bookmarks, ``timeoutSeconds``, ``Content-Type: application/json``;
* discovery (``/api``, ``/apis``, groups, resource lists, ``/version``);
* CRD objects: storing one declares its resources, and its schema then holds for their
  objects on every create and update (status writes and dry runs included): defaults
  filled in, CEL rules (``x-kubernetes-validations``, transition rules against the stored
  object) enforced with a 422 ``Invalid`` naming each rule's message and field
  (:mod:`kubesim.crds`, which also lists what of a schema is not checked).

State lives in dicts keyed by resource and ``(namespace, name)``; every change is built as
a new dict (stored objects are never mutated), so events can share them. All state changes
run on the server's event loop thread without awaiting, so a watch takes its snapshot and
its place in the event history atomically. The request log is a bounded deque of
``(method, path)``: kmock's own log (replayed through its filters on every request, which
made 200 objects take 43 s) is never filled.

Also PUT (replace), ``dryRun=All``, delete preconditions. Not emulated: validation of
built-in kinds and of resources declared without a CRD object (any field is accepted), the
structural schema's types, patterns and bounds (see :mod:`kubesim.crds`), server-side
apply, OpenAPI, admission, RBAC and authentication (any token is fine), Tables for
``kubectl get`` (it falls back to its default columns), controllers of any kind (see
:mod:`kubesim.controllers`), ownerReference garbage collection (ditto),
namespace deletion cascades, graceful pod termination, shared storage between
``v1/events`` and ``events.k8s.io/v1/events``.
"""

from __future__ import annotations

import copy
import random
import string
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

import jsonpatch
import jsonpointer
import kmock

from kubesim.api import (
    ALL_VERBS,
    APPLY,
    DEFAULT_RESOURCES,
    DEFAULTERS,
    INITIAL_STATUS,
    JSON_PATCH,
    MERGE,
    STRATEGIC,
    ApiError,
    Decl,
    DefaultContext,
    Fault,
    FaultShare,
    Key,
    NotFound,
    RecordedRequest,
    Table,
    decls_from_crd,
    field_selector,
    gv,
    label_selector,
    merge_patch,
    now_iso,
    object_order,
    resource_name,
    strategic_merge_patch,
    version_priority,
)
from kubesim.crds import apply_defaults, field_error_body, violations
from kubesim.rest import KubeHttp

__all__ = ["JSON_PATCH", "MERGE", "Fault", "FaultShare", "KubeEmulator", "RecordedRequest"]


class KubeEmulator(KubeHttp, kmock.KubernetesEmulator):
    """The emulator. Use it through :func:`kubesim.kube.running_kube` or the ``kube``
    fixture; its ``op_*`` methods are the API's verbs and must run on the server's loop."""

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.rv = 0
        self.tables: dict[Key, Table] = {}
        #: the openAPIV3Schema of each custom resource version a CRD object declared
        self.schemas: dict[Key, Mapping[str, Any]] = {}
        self.request_log: deque[RecordedRequest] = deque(maxlen=20_000)
        self.faults: list[Fault] = []
        self.fault_share: FaultShare | None = None  # faults on a random share of requests
        self.listeners: list[Callable[[int], None]] = []  # called after every change
        #: called after every change with (resource, ADDED/MODIFIED/DELETED, new, old), on
        #: the server's loop: for timing what clients do without polling (bench/)
        self.change_hooks: list[Callable[[Key, str, dict[str, Any], dict[str, Any] | None], None]] = []
        self.internal_errors: list[str] = []  # emulator bugs: the fixture fails the test
        self.max_history = 10_000  # watch events kept per resource
        self.bookmark_interval = 30.0  # kopf reconnects after 70 s without any event
        self.strict_namespaces = False  # True: namespaced writes need the Namespace object
        self.closing = False
        self._ips = 10
        for decl in DEFAULT_RESOURCES:
            self.declare(decl)

    # -- declarations ---------------------------------------------------------------------

    def declare(self, decl: Decl) -> None:
        self.resources[kmock.resource(decl.group, decl.version, decl.plural)] = kmock.ResourceInfo(
            kind=decl.kind,
            namespaced=decl.namespaced,
            singular=decl.kind.lower(),
            verbs=set(ALL_VERBS),
            shortnames=set(decl.shortnames),
            categories=set(decl.categories),
            subresources=set(decl.subresources),
        )

    def info(self, key: Key) -> kmock.ResourceInfo:
        res = kmock.resource(*key)
        if res not in self.resources:
            raise NotFound("the server could not find the requested resource")
        return self.resources[res]

    def keys(self) -> list[Key]:
        return [(r.group, r.version, r.plural) for r in self.resources]

    def resolve(self, name: str, api_version: str | None = None) -> Key:
        """A resource from a kind, plural, short name, ``plural.group`` or ``group/v/plural``
        (``api_version`` narrows a kind); the core group wins ambiguities, as in kubectl."""
        matches = []
        for key in self.keys():
            info = self.info(key)
            group_version = gv(key[0], key[1])
            if api_version is not None and group_version != api_version:
                continue
            names = {
                key[2],
                info.kind,
                info.singular,
                *info.shortnames,
                resource_name(key),
                f"{group_version}/{key[2]}",
            }
            if name in names or name.lower() in {n.lower() for n in names if n}:
                matches.append(key)
        if not matches:
            raise NotFound(f'the server doesn\'t have a resource type "{name}"')
        return min(matches, key=lambda k: (k[0] != "", k[0], version_priority(k[1])))

    def table(self, key: Key) -> Table:
        self.info(key)
        return self.tables.setdefault(key, Table())

    # -- the verbs (synchronous; run on the server loop) ----------------------------------

    def _scope(self, key: Key, namespace: str | None, *, writing: bool) -> str | None:
        info = self.info(key)
        if not info.namespaced:
            if namespace is not None:
                raise NotFound("the server could not find the requested resource")
            return None
        if namespace is None and writing:
            raise NotFound("the server could not find the requested resource")
        if writing and self.strict_namespaces and (None, namespace) not in self.table(("", "v1", "namespaces")).objects:
            raise NotFound(f'namespaces "{namespace}" not found', {"name": namespace, "kind": "namespaces"})
        return namespace

    def _missing(self, key: Key, name: str) -> NotFound:
        return NotFound(f'{resource_name(key)} "{name}" not found', {"name": name, "group": key[0], "kind": key[2]})

    def op_get(self, key: Key, namespace: str | None, name: str) -> dict[str, Any]:
        namespace = self._scope(key, namespace, writing=True)
        obj = self.table(key).objects.get((namespace, name))
        if obj is None:
            raise self._missing(key, name)
        return obj

    def matching(
        self,
        key: Key,
        namespace: str | None,
        labels: str | None = None,
        fields: str | None = None,
        name: str | None = None,
    ) -> Callable[[dict], bool]:
        by_labels, by_fields = label_selector(labels), field_selector(fields)
        return lambda obj: (
            (namespace is None or obj["metadata"].get("namespace") == namespace)
            and (name is None or obj["metadata"]["name"] == name)
            and by_labels(obj)
            and by_fields(obj)
        )

    def op_list(
        self, key: Key, namespace: str | None, labels: str | None = None, fields: str | None = None
    ) -> dict[str, Any]:
        namespace = self._scope(key, namespace, writing=False)
        match = self.matching(key, namespace, labels, fields)
        table = self.table(key)
        items = [table.objects[k] for k in sorted(table.objects, key=object_order)]
        return {
            "apiVersion": gv(key[0], key[1]),
            "kind": f"{self.info(key).kind}List",
            "metadata": {"resourceVersion": str(self.rv)},
            "items": [obj for obj in items if match(obj)],
        }

    def op_create(self, key: Key, namespace: str | None, body: Any, dry_run: bool = False) -> dict[str, Any]:
        info = self.info(key)
        namespace = self._scope(key, namespace, writing=True)
        if not isinstance(body, Mapping):
            raise ApiError(400, "BadRequest", "the body of the request was not an object")
        obj = copy.deepcopy(dict(body))
        meta = obj.get("metadata") or {}
        obj["metadata"] = meta
        if meta.get("resourceVersion"):
            raise ApiError(400, "BadRequest", "resourceVersion should not be set on objects to be created")
        if obj.get("kind") not in (None, info.kind) or obj.get("apiVersion") not in (None, gv(key[0], key[1])):
            raise ApiError(
                400,
                "BadRequest",
                f"the API version in the data ({obj.get('apiVersion')}) and kind "
                f"({obj.get('kind')}) do not match the URL ({gv(*key[:2])}/{key[2]})",
            )
        if info.namespaced:
            if meta.get("namespace") not in (None, "", namespace):
                raise ApiError(
                    400,
                    "BadRequest",
                    "the namespace of the provided object does not match the namespace sent on the request",
                )
            meta["namespace"] = namespace
        else:
            meta.pop("namespace", None)
        if not meta.get("name"):
            if not meta.get("generateName"):
                raise ApiError(
                    422,
                    "Invalid",
                    f"{info.kind}.{key[0] or 'core'} is invalid: "
                    "metadata.name: Required value: name or generateName is required",
                )
            suffix = "".join(random.choices(string.ascii_lowercase + string.digits, k=5))
            meta["name"] = meta["generateName"] + suffix
        if (namespace, meta["name"]) in self.table(key).objects:
            raise ApiError(
                409,
                "AlreadyExists",
                f'{resource_name(key)} "{meta["name"]}" already exists',
                {"name": meta["name"], "group": key[0], "kind": key[2]},
            )
        for server_owned in ("deletionTimestamp", "deletionGracePeriodSeconds", "managedFields", "selfLink"):
            meta.pop(server_owned, None)
        meta.update(uid=str(uuid.uuid4()), creationTimestamp=now_iso(), generation=1)
        obj["apiVersion"], obj["kind"] = gv(key[0], key[1]), info.kind
        if "status" in info.subresources:
            obj.pop("status", None)
            if (key[0], key[2]) in INITIAL_STATUS:
                obj["status"] = copy.deepcopy(INITIAL_STATUS[key[0], key[2]])
        if (key[0], key[2]) in DEFAULTERS:
            DEFAULTERS[key[0], key[2]](obj, DefaultContext(meta["uid"], self._next_ip))
        obj = self._admit(key, obj, None)
        if dry_run:
            return obj
        self._commit(key, "ADDED", obj, None)
        self._serve_crd(key, obj)
        return obj

    def _serve_crd(self, key: Key, crd: Mapping[str, Any]) -> None:
        """A stored CRD object declares its resources, with their schemas."""
        if key[:1] != ("apiextensions.k8s.io",) or key[2] != "customresourcedefinitions":
            return
        for decl in decls_from_crd(crd):
            self.declare(decl)
        spec = crd.get("spec") or {}
        for ver in spec.get("versions") or ():
            schema = (ver.get("schema") or {}).get("openAPIV3Schema")
            resource = (spec.get("group", ""), ver["name"], (spec.get("names") or {})["plural"])
            if schema and ver.get("served", True):
                self.schemas[resource] = schema
            else:
                self.schemas.pop(resource, None)

    def _admit(self, key: Key, obj: dict[str, Any], old: dict[str, Any] | None) -> dict[str, Any]:
        """What the API server does with a custom resource before storing it: the schema's
        defaults, then its CEL rules (transition rules against ``old``): 422 if one fails."""
        schema = self.schemas.get(key)
        if schema is None:
            return obj
        obj = apply_defaults(obj, schema)
        found = violations(obj, schema, old)
        if found:
            kind, name = self.info(key).kind, obj["metadata"]["name"]
            raise ApiError(
                422,
                "Invalid",
                f'{kind}.{key[0]} "{name}" is invalid: {field_error_body(found)}',
                {
                    "name": name,
                    "group": key[0],
                    "kind": kind,
                    "causes": [{"reason": v.reason, "message": v.body(), "field": v.field} for v in found],
                },
            )
        return obj

    def _next_ip(self) -> str:
        self._ips += 1
        return f"10.96.{self._ips // 250}.{self._ips % 250 + 1}"

    def op_patch(
        self,
        key: Key,
        namespace: str | None,
        name: str,
        patch: Any,
        content_type: str = MERGE,
        subresource: str | None = None,
        dry_run: bool = False,
    ) -> dict[str, Any]:
        old = self.op_get(key, namespace, name)
        content_type = content_type.split(";")[0].strip()
        if content_type in (MERGE, STRATEGIC):
            if not isinstance(patch, Mapping):
                raise ApiError(400, "BadRequest", "a merge patch must be a JSON object")
            self._check_version(key, old, (patch.get("metadata") or {}).get("resourceVersion"))
            merge = merge_patch if content_type == MERGE else strategic_merge_patch
            new = merge(old, patch)
        elif content_type == JSON_PATCH:
            if not isinstance(patch, list):
                raise ApiError(400, "BadRequest", "a JSON patch must be a list of operations")
            try:
                new = jsonpatch.apply_patch(old, patch)  # on a deep copy: a dry run
            except (jsonpatch.JsonPatchException, jsonpointer.JsonPointerException) as exc:
                raise ApiError(422, "Invalid", f"the JSON patch could not be applied: {exc}")
        elif content_type == APPLY:
            raise ApiError(415, "UnsupportedMediaType", "server-side apply is not emulated")
        else:
            raise ApiError(
                415, "UnsupportedMediaType", f"the body of the request was in an unknown format: {content_type}"
            )
        return self._update(key, old, new, subresource, dry_run)

    def op_replace(
        self,
        key: Key,
        namespace: str | None,
        name: str,
        body: Any,
        subresource: str | None = None,
        dry_run: bool = False,
    ) -> dict[str, Any]:
        old = self.op_get(key, namespace, name)
        if not isinstance(body, Mapping):
            raise ApiError(400, "BadRequest", "the body of the request was not an object")
        if (body.get("metadata") or {}).get("name") not in (None, name):
            raise ApiError(400, "BadRequest", "the name of the object does not match the URL")
        self._check_version(key, old, (body.get("metadata") or {}).get("resourceVersion"))
        return self._update(key, old, copy.deepcopy(dict(body)), subresource, dry_run)

    def _check_version(self, key: Key, old: Mapping, version: str | None) -> None:
        if version is not None and str(version) != old["metadata"]["resourceVersion"]:
            raise ApiError(
                409,
                "Conflict",
                f"Operation cannot be fulfilled on {resource_name(key)} "
                f'"{old["metadata"]["name"]}": the object has been modified; please '
                "apply your changes to the latest version and try again",
                {"name": old["metadata"]["name"], "group": key[0], "kind": key[2]},
            )

    def _update(
        self, key: Key, old: dict[str, Any], new: Any, subresource: str | None, dry_run: bool
    ) -> dict[str, Any]:
        info = self.info(key)
        if subresource is not None and subresource not in info.subresources:
            raise NotFound("the server could not find the requested resource")
        if not isinstance(new, dict) or not isinstance(new.get("metadata"), dict):
            raise ApiError(422, "Invalid", "the patched object has no metadata")
        with_status = "status" in info.subresources
        if subresource == "status":
            status = new.get("status")
            new = copy.deepcopy(old)
            new.pop("status", None)
            if status is not None:
                new["status"] = copy.deepcopy(status)
        else:
            new = copy.deepcopy(new)
            if with_status:
                new.pop("status", None)
                if "status" in old:
                    new["status"] = copy.deepcopy(old["status"])
        meta = new["metadata"]
        for owned in (
            "name",
            "namespace",
            "uid",
            "creationTimestamp",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "generation",
            "resourceVersion",
        ):
            meta.pop(owned, None)
            if owned in old["metadata"]:
                meta[owned] = old["metadata"][owned]
        new["apiVersion"], new["kind"] = old["apiVersion"], old["kind"]
        if meta.get("deletionTimestamp") and not set(meta.get("finalizers") or ()) <= set(
            old["metadata"].get("finalizers") or ()
        ):
            raise ApiError(
                422,
                "Invalid",
                "metadata.finalizers: Forbidden: no new finalizers can be added if the object is being deleted",
            )
        new = self._admit(key, new, old)  # a copy: its metadata is what is stored
        meta = new["metadata"]
        if new == old:
            return old
        outside = ("metadata", "status") if with_status else ("metadata",)
        if {k: v for k, v in new.items() if k not in outside} != {k: v for k, v in old.items() if k not in outside}:
            meta["generation"] = old["metadata"].get("generation", 0) + 1
        if dry_run:
            return new
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            return self._commit(key, "DELETED", new, old)
        self._commit(key, "MODIFIED", new, old)
        self._serve_crd(key, new)
        return new

    def op_delete(
        self, key: Key, namespace: str | None, name: str, options: Mapping | None = None, dry_run: bool = False
    ) -> dict[str, Any]:
        old = self.op_get(key, namespace, name)
        pre = (options.get("preconditions") if isinstance(options, Mapping) else None) or {}
        if pre.get("uid") not in (None, old["metadata"]["uid"]):
            raise ApiError(
                409,
                "Conflict",
                f"Precondition failed: UID in precondition: {pre['uid']}, UID in object meta: {old['metadata']['uid']}",
            )
        self._check_version(key, old, pre.get("resourceVersion"))
        if old["metadata"].get("deletionTimestamp") or dry_run:
            return old
        if self._propagation(key, options) == "Orphan":
            self._orphan(old["metadata"]["uid"])
        if old["metadata"].get("finalizers"):
            new = copy.deepcopy(old)
            new["metadata"].update(
                deletionTimestamp=now_iso(),
                deletionGracePeriodSeconds=0,
                generation=old["metadata"].get("generation", 0) + 1,
            )
            return self._commit(key, "MODIFIED", new, old)
        return self._commit(key, "DELETED", copy.deepcopy(old), old)

    @staticmethod
    def _propagation(key: Key, options: Mapping | None) -> str:
        """The deletion's propagationPolicy. Unset: ``Orphan`` for batch/v1 Jobs (the API
        server keeps that default for compatibility: their pods stay), else ``Background``."""
        options = options if isinstance(options, Mapping) else {}
        if options.get("propagationPolicy"):
            return str(options["propagationPolicy"])
        if options.get("orphanDependents") is not None:
            return "Orphan" if options["orphanDependents"] else "Background"
        return "Orphan" if key == ("batch", "v1", "jobs") else "Background"

    def _orphan(self, owner_uid: str) -> None:
        """Remove the ownerReferences to ``owner_uid`` (what the garbage collector does for
        an orphaning deletion), so that collection leaves the dependents alone."""
        for key, table in list(self.tables.items()):
            for obj in list(table.objects.values()):
                refs = obj["metadata"].get("ownerReferences") or []
                kept = [r for r in refs if r.get("uid") != owner_uid]
                if len(kept) != len(refs):
                    new = copy.deepcopy(obj)
                    new["metadata"]["ownerReferences"] = kept or None
                    if not kept:
                        del new["metadata"]["ownerReferences"]
                    self._commit(key, "MODIFIED", new, obj)

    def op_delete_collection(
        self, key: Key, namespace: str | None, labels: str | None = None, fields: str | None = None
    ) -> dict[str, Any]:
        listed = self.op_list(key, namespace, labels, fields)
        items = [
            self.op_delete(key, obj["metadata"].get("namespace"), obj["metadata"]["name"]) for obj in listed["items"]
        ]
        return {**listed, "metadata": {"resourceVersion": str(self.rv)}, "items": items}

    def collect_garbage(self) -> list[tuple[str, str | None, str]]:
        """Delete every object all of whose owners (by uid) are gone, until none is left:
        the background cascade of a real cluster's garbage collector."""
        deleted: list[tuple[str, str | None, str]] = []
        while True:
            alive = {obj["metadata"]["uid"] for table in self.tables.values() for obj in table.objects.values()}
            orphans = [
                (key, obj)
                for key, table in self.tables.items()
                for obj in table.objects.values()
                if obj["metadata"].get("ownerReferences")
                and not obj["metadata"].get("deletionTimestamp")
                and not any(ref.get("uid") in alive for ref in obj["metadata"]["ownerReferences"])
            ]
            if not orphans:
                return deleted
            for key, obj in orphans:  # a cascade goes on down (a Job's pods go too)
                self.op_delete(
                    key, obj["metadata"].get("namespace"), obj["metadata"]["name"], {"propagationPolicy": "Background"}
                )
                deleted.append((obj["kind"], obj["metadata"].get("namespace"), obj["metadata"]["name"]))

    def _commit(self, key: Key, kind: str, obj: dict[str, Any], old: dict[str, Any] | None) -> dict[str, Any]:
        table = self.table(key)
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)
        okey = (obj["metadata"].get("namespace"), obj["metadata"]["name"])
        if kind == "DELETED":
            table.objects.pop(okey, None)
        else:
            table.objects[okey] = obj
        table.events.append((self.rv, kind, obj, old))
        if len(table.events) > self.max_history:
            drop = len(table.events) // 2
            table.compacted = table.events[drop - 1][0]
            del table.events[:drop]
            table.base += drop
        for waiter in table.watchers:
            waiter.set()
        for listener in self.listeners:
            listener(self.rv)
        for hook in self.change_hooks:
            hook(key, kind, obj, old)
        return obj
