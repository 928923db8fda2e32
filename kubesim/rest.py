"""The HTTP side of the emulator: routing, discovery and watch streams (a mixin of
:class:`kubesim.emulator.KubeEmulator`, which holds the state and the verbs).

It replaces kmock's request handling (``RawHandler.__call__``): kmock's URL parser fails
on ``/api/v1/namespaces`` and its DSL replays the whole request log on every request.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import json
import time
import traceback
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp.web

from kubesim.api import (
    SUBRESOURCE_VERBS,
    ApiError,
    Event,
    Key,
    NotFound,
    RecordedRequest,
    Table,
    gv,
    object_order,
    version_priority,
)


def _flag(value: str | None) -> bool:
    """A boolean query parameter as Go's ``strconv.ParseBool`` reads it."""
    return (value or "").lower() in ("1", "t", "true")


class KubeHttp:
    """``__call__`` serves the Kubernetes REST API from the emulator's verbs.

    The host class provides ``op_*``, ``info``, ``keys``, ``table``, ``tables``,
    ``matching``, ``_scope``, ``rv`` and the settings ``faults``, ``fault_share``, ``request_log``,
    ``internal_errors``, ``bookmark_interval``, ``closing``.
    """

    # -- HTTP -----------------------------------------------------------------------------

    async def __call__(self, raw: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        self.request_log.append(RecordedRequest(raw.method, raw.path))
        try:
            body = await raw.read()
            for fault in self.faults:
                if fault.times > 0 and fault.method.upper() == raw.method and fault.path in raw.path:
                    fault.times -= 1
                    if fault.hang_s:
                        await self._hang(raw, fault.hang_s)
                    raise ApiError(fault.status, fault.reason, fault.message)
            share = self.fault_share.draw(raw.method) if self.fault_share else None
            if share == "hang":
                await self._hang(raw, self.fault_share.hang_s)
            if share == "error":
                raise ApiError(500, "InternalError", "an error on the server (injected by the fault share)")
            if share == "conflict":
                raise ApiError(
                    409,
                    "Conflict",
                    "the object has been modified; please apply your changes to "
                    "the latest version and try again (injected by the fault share)",
                )
            return await self._route(raw, body)
        except ApiError as exc:
            return self._json(exc.body(), exc.status)
        except (ConnectionResetError, asyncio.CancelledError):
            raise
        except Exception as exc:  # noqa: BLE001  (an emulator bug: the fixture fails the test)
            self.internal_errors.append(f"{raw.method} {raw.path_qs}\n{traceback.format_exc()}")
            return self._json(ApiError(500, "InternalError", repr(exc)).body(), 500)

    @staticmethod
    async def _hang(raw: aiohttp.web.BaseRequest, seconds: float) -> None:
        """Hold the request, then cut the connection without an answer (a client without a
        timeout waits all that time)."""
        await asyncio.sleep(seconds)
        if raw.transport is not None:
            raw.transport.abort()
        raise ConnectionResetError("cut by an injected fault")

    @staticmethod
    def _json(payload: Any, status: int = 200) -> aiohttp.web.Response:
        return aiohttp.web.Response(body=json.dumps(payload).encode(), status=status, content_type="application/json")

    async def _route(self, raw: aiohttp.web.BaseRequest, body: bytes) -> aiohttp.web.StreamResponse:
        parts = [p for p in raw.path.split("/") if p]
        method, query = raw.method, raw.query
        if method == "GET" and (
            not parts or parts in (["version"], ["api"], ["apis"]) or (parts[0] == "apis" and len(parts) == 2)
        ):
            return self._json(self._discovery(parts, raw))
        if method == "GET" and parts and parts[0] in ("healthz", "livez", "readyz"):
            return aiohttp.web.Response(text="ok")
        if len(parts) >= 2 and parts[0] == "api":
            group, version, rest = "", parts[1], parts[2:]
        elif len(parts) >= 3 and parts[0] == "apis":
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            raise NotFound("the server could not find the requested resource")
        if not rest:
            if method != "GET":
                raise ApiError(405, "MethodNotAllowed", "the server does not allow this method")
            return self._json(self._resource_list(group, version))
        namespace = None
        if (
            rest[0] == "namespaces"
            and len(rest) >= 3
            and not (group == "" and len(rest) == 3 and rest[2] in ("status", "finalize"))
        ):
            namespace, rest = rest[1], rest[2:]
        if len(rest) > 3:
            raise NotFound("the server could not find the requested resource")
        key: Key = (group, version, rest[0])
        name = rest[1] if len(rest) > 1 else None
        sub = rest[2] if len(rest) > 2 else None
        info = self.info(key)
        if sub is not None and sub not in info.subresources:
            raise NotFound("the server could not find the requested resource")
        dry_run = query.get("dryRun") == "All"
        data = None
        if body:
            try:
                data = json.loads(body)
            except ValueError:
                raise ApiError(415, "UnsupportedMediaType", "only JSON bodies are emulated")
        labels, fields = query.get("labelSelector"), query.get("fieldSelector")
        if method == "GET" and _flag(query.get("watch")):
            if name is not None:
                self._scope(key, namespace, writing=True)
            return await self._watch(raw, key, namespace, name, labels, fields)
        if method == "GET":
            if name is None:
                return self._json(self.op_list(key, namespace, labels, fields))
            return self._json(self.op_get(key, namespace, name))
        if method == "POST" and name is None:
            return self._json(self.op_create(key, namespace, data, dry_run), 201)
        if method == "PATCH" and name is not None:
            ctype = raw.headers.get("Content-Type", "")
            return self._json(self.op_patch(key, namespace, name, data, ctype, sub, dry_run))
        if method == "PUT" and name is not None:
            return self._json(self.op_replace(key, namespace, name, data, sub, dry_run))
        if method == "DELETE" and name is not None and sub is None:
            return self._json(self.op_delete(key, namespace, name, data, dry_run))
        if method == "DELETE" and name is None:
            return self._json(self.op_delete_collection(key, namespace, labels, fields))
        raise ApiError(405, "MethodNotAllowed", "the server does not allow this method")

    # -- discovery ------------------------------------------------------------------------

    def _group_versions(self) -> dict[str, list[str]]:
        groups: dict[str, set[str]] = collections.defaultdict(set)
        for group, version, _ in self.keys():
            groups[group].add(version)
        return {g: sorted(vs, key=version_priority) for g, vs in groups.items()}

    def _api_group(self, group: str, versions: list[str]) -> dict[str, Any]:
        gvs = [{"groupVersion": f"{group}/{v}", "version": v} for v in versions]
        return {"name": group, "versions": gvs, "preferredVersion": gvs[0]}

    def _discovery(self, parts: list[str], raw: aiohttp.web.BaseRequest) -> dict[str, Any]:
        groups = self._group_versions()
        if not parts:
            paths = ["/api", "/api/v1", "/apis", "/version"] + [
                p for g, vs in groups.items() if g for p in [f"/apis/{g}", *(f"/apis/{g}/{v}" for v in vs)]
            ]
            return {"paths": sorted(paths)}
        if parts == ["version"]:
            return {"major": "1", "minor": "32", "gitVersion": "v1.32.0-kmock", "platform": "linux/amd64"}
        if parts == ["api"]:
            return {
                "kind": "APIVersions",
                "versions": ["v1"],
                "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": raw.host}],
            }
        if parts == ["apis"]:
            return {
                "kind": "APIGroupList",
                "apiVersion": "v1",
                "groups": [self._api_group(g, vs) for g, vs in sorted(groups.items()) if g],
            }
        if parts[1] not in groups or not parts[1]:
            raise NotFound("the server could not find the requested resource")
        return {"kind": "APIGroup", "apiVersion": "v1", **self._api_group(parts[1], groups[parts[1]])}

    def _resource_list(self, group: str, version: str) -> dict[str, Any]:
        keys = [k for k in self.keys() if k[:2] == (group, version)]
        if not keys and group:
            raise NotFound("the server could not find the requested resource")
        resources = []
        for key in sorted(keys):
            info = self.info(key)
            resources.append(
                {
                    "name": key[2],
                    "singularName": info.singular,
                    "namespaced": info.namespaced,
                    "kind": info.kind,
                    "verbs": sorted(info.verbs),
                    **({"shortNames": sorted(info.shortnames)} if info.shortnames else {}),
                    **({"categories": sorted(info.categories)} if info.categories else {}),
                }
            )
            resources.extend(
                {
                    "name": f"{key[2]}/{sub}",
                    "singularName": "",
                    "namespaced": info.namespaced,
                    "kind": info.kind,
                    "verbs": list(SUBRESOURCE_VERBS),
                }
                for sub in sorted(info.subresources)
            )
        return {
            "kind": "APIResourceList",
            "apiVersion": "v1",
            "groupVersion": gv(group, version),
            "resources": resources,
        }

    # -- watches --------------------------------------------------------------------------

    async def close_watches(self) -> None:
        """End every watch stream (before the server stops: aiohttp waits for handlers)."""
        self.closing = True
        for table in self.tables.values():
            for waiter in table.watchers:
                waiter.set()

    def _events_since(self, table: Table, version: str | None) -> int:
        """The history index after ``version``; -1 if that part of history is gone."""
        since = int(version)  # type: ignore[arg-type]
        if since < table.compacted:
            return -1
        return table.base + bisect.bisect_right(table.events, since, key=lambda e: e[0])

    async def _watch(
        self,
        raw: aiohttp.web.BaseRequest,
        key: Key,
        namespace: str | None,
        name: str | None,
        labels: str | None,
        fields: str | None,
    ) -> aiohttp.web.StreamResponse:
        namespace = self._scope(key, namespace, writing=False)
        match = self.matching(key, namespace, labels, fields, name)
        table, info, query = self.table(key), self.info(key), raw.query
        version = query.get("resourceVersion") or None
        initial = _flag(query.get("sendInitialEvents"))
        bookmarks = _flag(query.get("allowWatchBookmarks"))
        timeout = float(query.get("timeoutSeconds") or 0) or None
        # The snapshot and the history position are taken without yielding to the loop.
        replay: list[tuple[str, dict[str, Any]]] = []
        if version in (None, "0") or initial:
            replay = [
                ("ADDED", table.objects[k]) for k in sorted(table.objects, key=object_order) if match(table.objects[k])
            ]
            cursor = table.base + len(table.events)
        else:
            try:
                cursor = self._events_since(table, version)
            except ValueError:
                raise ApiError(400, "BadRequest", f"invalid resourceVersion: {version!r}")
        snapshot_rv = self.rv
        waiter = asyncio.Event()
        table.watchers.add(waiter)
        response = aiohttp.web.StreamResponse(headers={"Content-Type": "application/json"})
        try:
            await response.prepare(raw)

            async def send(kind: str, obj: Mapping[str, Any]) -> None:
                await response.write(json.dumps({"type": kind, "object": obj}).encode() + b"\n")

            def bookmark(rv: int, end_of_initial: bool = False) -> dict[str, Any]:
                meta: dict[str, Any] = {"resourceVersion": str(rv)}
                if end_of_initial:
                    meta["annotations"] = {"k8s.io/initial-events-end": "true"}
                return {"kind": info.kind, "apiVersion": gv(key[0], key[1]), "metadata": meta}

            for kind, obj in replay:
                await send(kind, obj)
            if initial:
                await send("BOOKMARK", bookmark(snapshot_rv, end_of_initial=True))
            deadline = time.monotonic() + timeout if timeout else None
            while not self.closing:
                waiter.clear()
                if cursor < table.base:
                    await send("ERROR", ApiError(410, "Expired", "too old resource version").body())
                    break
                batch = table.events[cursor - table.base :]
                cursor += len(batch)
                for event in batch:
                    translated = self._translate(event, match)
                    if translated is not None:
                        await send(*translated)
                if batch:
                    continue
                wait = self.bookmark_interval if bookmarks else None
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    wait = left if wait is None else min(wait, left)
                try:
                    await asyncio.wait_for(waiter.wait(), wait)
                except TimeoutError:
                    if bookmarks and (deadline is None or time.monotonic() < deadline):
                        await send("BOOKMARK", bookmark(self.rv))
            await response.write_eof()
        except ConnectionResetError:
            pass
        finally:
            table.watchers.discard(waiter)
        return response

    @staticmethod
    def _translate(
        event: Event,
        match: Callable[[dict], bool],
    ) -> tuple[str, dict[str, Any]] | None:
        """What a watcher with this filter sees: objects entering or leaving a selector are
        ADDED or DELETED for it, as on a real server."""
        _, kind, obj, old = event
        now = match(obj)
        if kind in ("ADDED", "DELETED"):
            return (kind, obj) if now else None
        before = old is not None and match(old)
        if now:
            return ("MODIFIED" if before else "ADDED", obj)
        return ("DELETED", obj) if before else None
