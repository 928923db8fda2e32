"""The only module that talks to the Kubernetes API (asynchronously, kubernetes_asyncio).

Handlers never block kopf's event loop: every call here is a coroutine. Objects go in and
come out as plain camelCase dicts, as the pure builders and the phase machine use them.
"""

from __future__ import annotations

import logging
import secrets
import urllib.request
from datetime import UTC, datetime
from typing import Any

import aiohttp
from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.exceptions import ApiException

from dreambooth.api.job import GROUP, PLURAL, VERSION
from dreambooth.api.sweep import PLURAL as SWEEPS

log = logging.getLogger(__name__)


class _JsonApiClient(client.ApiClient):
    """The operator sends plain JSON values (dicts from the pure builders), never the
    client's model classes: its deep walk converting those is skipped for dicts."""

    def sanitize_for_serialization(self, obj: Any) -> Any:
        return obj if isinstance(obj, dict) else super().sanitize_for_serialization(obj)


class Kube:
    """A small facade over the API groups the operator uses (see the chart's RBAC)."""

    def __init__(self, api: client.ApiClient, timeout_seconds: float | None = None) -> None:
        self.api = api
        #: every request's bound, connect to last byte (kubernetes_asyncio's default: none)
        self.timeout = aiohttp.ClientTimeout(total=timeout_seconds) if timeout_seconds else None
        self.core = client.CoreV1Api(api)
        self.batch = client.BatchV1Api(api)
        self.custom = client.CustomObjectsApi(api)

    @classmethod
    async def connect(cls, timeout_seconds: float | None = None) -> Kube:
        """In a pod: the service account; elsewhere: $KUBECONFIG or ~/.kube/config. Each
        request gives up after ``timeout_seconds`` (None: never)."""
        try:
            config.load_incluster_config()
            api = _JsonApiClient()
        except config.ConfigException:
            configuration = client.Configuration()
            await config.load_kube_config(client_configuration=configuration)
            api = _JsonApiClient(configuration)
        if not urllib.request.getproxies():
            # kubernetes_asyncio's session trusts the environment, so aiohttp looks up
            # proxies and ~/.netrc in a worker thread before every request: ~1 ms of CPU
            # per request, a quarter of the operator's work per new job. With no proxy
            # variables set there is nothing to find (API credentials never come from netrc).
            api.rest_client.pool_manager._trust_env = False
        return cls(api, timeout_seconds)

    async def close(self) -> None:
        await self.api.close()

    async def _raw(self, call: Any, *args: Any, read: bool = True, **kwargs: Any) -> dict[str, Any] | None:
        """Call an API method and return the JSON body as a dict (``read=False``: None): the
        client's own model classes cost milliseconds per object to build, which 1,000 jobs
        feel. Unread, the client checks no status: an error response raises ApiException
        here, as it would there."""
        response = await call(*args, _preload_content=False, _request_timeout=self.timeout, **kwargs)
        try:
            if not 200 <= response.status <= 299:
                err = ApiException(status=response.status, reason=response.reason)
                err.body = await response.text()
                raise err
            if not read:
                await response.read()  # unparsed, but read: an unread body closes the connection
                return None
            return await response.json()
        finally:
            response.release()

    # --- children -------------------------------------------------------------------

    async def ensure(self, obj: dict[str, Any]) -> bool:
        """Create ``obj`` unless it exists (names are deterministic). True: created; False:
        it already existed (it is never changed: a Job's template is immutable, and Kueue may
        have edited its scheduling fields). The server's copy is not read back: it is
        ``obj`` plus server fields, and parsing it costs more than the rest of the call."""
        ns, kind = obj["metadata"]["namespace"], obj["kind"]
        create = {
            "ConfigMap": self.core.create_namespaced_config_map,
            "Service": self.core.create_namespaced_service,
            "Job": self.batch.create_namespaced_job,
        }[kind]
        try:
            await self._raw(create, ns, obj, read=False)
        except ApiException as err:
            if err.status == 409:
                return False
            raise
        log.log(logging.INFO if kind == "Job" else logging.DEBUG, "created %s %s/%s", kind, ns, obj["metadata"]["name"])
        return True

    async def job(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return await self._raw(self.batch.read_namespaced_job, name, namespace)
        except ApiException as err:
            if err.status == 404:
                return None
            raise

    async def pods(self, namespace: str, labels: dict[str, str]) -> list[dict[str, Any]]:
        return await self._list(self.core.list_namespaced_pod, namespace, labels)

    async def jobs(self, namespace: str, labels: dict[str, str]) -> list[dict[str, Any]]:
        return await self._list(self.batch.list_namespaced_job, namespace, labels)

    async def _list(self, call: Any, namespace: str, labels: dict[str, str]) -> list[dict[str, Any]]:
        selector = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
        return (await self._raw(call, namespace, label_selector=selector))["items"]

    async def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        """Replace the DreamBoothJob's status (a merge patch on the status subresource;
        lists such as conditions are replaced whole, nulls clear fields)."""
        await self._raw(
            self.custom.patch_namespaced_custom_object_status,
            GROUP,
            VERSION,
            namespace,
            PLURAL,
            name,
            {"status": status},
            _content_type="application/merge-patch+json",
            read=False,
        )

    async def patch_sweep_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        """Replace a DreamBoothSweep's status (a merge patch, as :meth:`patch_status`)."""
        await self._raw(
            self.custom.patch_namespaced_custom_object_status,
            GROUP,
            VERSION,
            namespace,
            SWEEPS,
            name,
            {"status": status},
            _content_type="application/merge-patch+json",
            read=False,
        )

    # --- a sweep's runs ------------------------------------------------------------------

    async def dreambooth_jobs(self, namespace: str, labels: dict[str, str]) -> list[dict[str, Any]]:
        selector = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
        return (
            await self._raw(
                self.custom.list_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL, label_selector=selector
            )
        )["items"]

    async def create_dreambooth_job(self, obj: dict[str, Any]) -> bool:
        """Create a sweep's run unless it exists (True: created)."""
        try:
            await self._raw(
                self.custom.create_namespaced_custom_object,
                GROUP,
                VERSION,
                obj["metadata"]["namespace"],
                PLURAL,
                obj,
                read=False,
            )
        except ApiException as err:
            if err.status == 409:
                return False
            raise
        log.info("created DreamBoothJob %s/%s", obj["metadata"]["namespace"], obj["metadata"]["name"])
        return True

    async def suspend_dreambooth_job(self, namespace: str, name: str, suspend: bool) -> None:
        await self._raw(
            self.custom.patch_namespaced_custom_object,
            GROUP,
            VERSION,
            namespace,
            PLURAL,
            name,
            {"spec": {"runPolicy": {"suspend": suspend}}},
            _content_type="application/merge-patch+json",
            read=False,
        )

    async def post_event(self, obj: dict[str, Any], type: str, reason: str, message: str) -> None:
        """A core/v1 Event about ``obj`` (what ``kubectl describe`` shows). Best effort: an
        event that cannot be posted is logged, never fatal."""
        meta = obj["metadata"]
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": f"{meta['name']}.{secrets.token_hex(8)}", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": obj["apiVersion"],
                "kind": obj["kind"],
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta.get("uid"),
            },
            "type": type,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": "dreambooth-operator"},
            "reportingComponent": "dreambooth-operator",
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            await self._raw(self.core.create_namespaced_event, meta["namespace"], event, read=False)
        except ApiException as err:
            log.warning("could not post event %s on %s/%s: %s", reason, meta["namespace"], meta["name"], err.reason)

    async def delete_job(self, namespace: str, name: str, uid: str) -> None:
        """Delete the trainer Job ``uid`` (a newer one of that name stays: 409) and its pods,
        in the background: batch/v1's default would orphan them. Gone already: fine."""
        options = {
            "apiVersion": "v1",
            "kind": "DeleteOptions",
            "propagationPolicy": "Background",
            "preconditions": {"uid": uid},
        }
        try:
            await self._raw(self.batch.delete_namespaced_job, name, namespace, body=options, read=False)
        except ApiException as err:
            if err.status not in (404, 409):
                raise

    async def suspend_job(self, namespace: str, name: str, suspend: bool) -> None:
        await self._raw(self.batch.patch_namespaced_job, name, namespace, {"spec": {"suspend": suspend}}, read=False)

    async def delete_dreambooth_job(self, namespace: str, name: str) -> None:
        try:
            await self._raw(
                self.custom.delete_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL, name, read=False
            )
        except ApiException as err:
            if err.status != 404:
                raise
