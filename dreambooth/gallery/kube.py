"""The gallery's read-only Kubernetes client: lists and gets DreamBoothJobs, nothing else
(the chart's gallery Role grants get/list/watch of them and nothing more)."""

from __future__ import annotations

import urllib.request
from typing import Any

from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.exceptions import ApiException

from dreambooth.api.job import GROUP, PLURAL, VERSION


class Forbidden(Exception):
    """The gallery's ServiceAccount may not read there."""


class KubeReader:
    def __init__(self, api: client.ApiClient) -> None:
        self.api = api
        self.custom = client.CustomObjectsApi(api)

    @classmethod
    async def connect(cls) -> KubeReader:
        """In a pod: the service account; elsewhere: $KUBECONFIG or ~/.kube/config."""
        try:
            config.load_incluster_config()
            api = client.ApiClient()
        except config.ConfigException:
            configuration = client.Configuration()
            await config.load_kube_config(client_configuration=configuration)
            api = client.ApiClient(configuration)
        if not urllib.request.getproxies():  # see operator/kube.py: no proxy lookup per request
            api.rest_client.pool_manager._trust_env = False
        return cls(api)

    async def close(self) -> None:
        await self.api.close()

    async def _json(self, call: Any, *args: Any) -> dict[str, Any] | None:
        response = await call(*args, _preload_content=False)
        try:
            if response.status == 404:
                return None
            if response.status in (401, 403):
                raise Forbidden(f"the gallery may not read that ({response.status})")
            if not 200 <= response.status <= 299:
                raise ApiException(status=response.status, reason=response.reason)
            return await response.json()
        finally:
            response.release()

    async def list_jobs(self, namespace: str | None) -> list[dict[str, Any]]:
        """DreamBoothJobs of ``namespace`` (None: all namespaces)."""
        if namespace is None:
            body = await self._json(self.custom.list_cluster_custom_object, GROUP, VERSION, PLURAL)
        else:
            body = await self._json(self.custom.list_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL)
        return list((body or {}).get("items") or [])

    async def get_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        return await self._json(self.custom.get_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL, name)
