"""The only module that talks to the Kubernetes API (asynchronously, kubernetes_asyncio).

Handlers never block kopf's event loop: every call here is a coroutine. Objects go in and
come out as plain camelCase dicts, as the pure builders and the phase machine use them.
"""

from __future__ import annotations

import logging
from typing import Any

from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.exceptions import ApiException

from dreambooth.api.job import GROUP, PLURAL, VERSION

log = logging.getLogger(__name__)


class Kube:
    """A small facade over the API groups the operator uses (see the chart's RBAC)."""

    def __init__(self, api: client.ApiClient) -> None:
        self.api = api
        self.core = client.CoreV1Api(api)
        self.batch = client.BatchV1Api(api)
        self.custom = client.CustomObjectsApi(api)

    @classmethod
    async def connect(cls) -> Kube:
        """In a pod: the service account; elsewhere: $KUBECONFIG or ~/.kube/config."""
        try:
            config.load_incluster_config()
            api = client.ApiClient()
        except config.ConfigException:
            configuration = client.Configuration()
            await config.load_kube_config(client_configuration=configuration)
            api = client.ApiClient(configuration)
        return cls(api)

    async def close(self) -> None:
        await self.api.close()

    def _plain(self, obj: Any) -> dict[str, Any]:
        return self.api.sanitize_for_serialization(obj)

    # --- children -------------------------------------------------------------------

    async def ensure(self, obj: dict[str, Any]) -> bool:
        """Create ``obj`` unless it exists (names are deterministic); True if created."""
        ns, kind = obj["metadata"]["namespace"], obj["kind"]
        create = {
            "ConfigMap": self.core.create_namespaced_config_map,
            "Service": self.core.create_namespaced_service,
            "Job": self.batch.create_namespaced_job,
        }[kind]
        try:
            await create(ns, obj)
        except ApiException as err:
            if err.status == 409:
                return False
            raise
        log.info("created %s %s/%s", kind, ns, obj["metadata"]["name"])
        return True

    async def job(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self._plain(await self.batch.read_namespaced_job(name, namespace))
        except ApiException as err:
            if err.status == 404:
                return None
            raise

    async def pods(self, namespace: str, labels: dict[str, str]) -> list[dict[str, Any]]:
        selector = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
        found = await self.core.list_namespaced_pod(namespace, label_selector=selector)
        items = [self._plain(p) for p in found.items]
        # label selectors are filtered here too: not every API (e.g. a test emulator) does
        return [p for p in items if all((p["metadata"].get("labels") or {}).get(k) == v for k, v in labels.items())]

    async def suspend_job(self, namespace: str, name: str, suspend: bool) -> None:
        await self.batch.patch_namespaced_job(name, namespace, {"spec": {"suspend": suspend}})

    async def delete_job(self, namespace: str, name: str) -> None:
        """Delete a trainer Job and its pods (foreground: the pods go first)."""
        try:
            await self.batch.delete_namespaced_job(name, namespace, propagation_policy="Background")
        except ApiException as err:
            if err.status != 404:
                raise

    async def delete_dreambooth_job(self, namespace: str, name: str) -> None:
        try:
            await self.custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        except ApiException as err:
            if err.status != 404:
                raise
