"""The operator's API client (dreambooth/operator/kube.py) against the emulator."""

from __future__ import annotations

import pytest

from dreambooth.operator.kube import Kube
from tests.support.kube import kube  # noqa: F401


@pytest.mark.asyncio
@pytest.mark.parametrize(("proxy_env", "trusts_env"), [({}, False), ({"HTTPS_PROXY": "http://proxy:3128"}, True)])
async def test_the_environment_is_consulted_per_request_only_when_it_names_a_proxy(
        kube, monkeypatch, proxy_env, trusts_env):  # noqa: F811
    """aiohttp looks up proxies and ~/.netrc in a thread before every request of a session
    that trusts the environment; without proxy variables that is pure cost."""
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    for name, value in proxy_env.items():
        monkeypatch.setenv(name, value)
    client = await Kube.connect()
    try:
        assert client.api.rest_client.pool_manager.trust_env is trusts_env
        if not trusts_env:  # and it still talks to the API server
            created = await client.ensure({"apiVersion": "v1", "kind": "ConfigMap",
                                           "metadata": {"name": "probe", "namespace": "default"}, "data": {}})
            assert created["metadata"]["name"] == "probe"
            assert kube.get("configmaps", "default", "probe")
    finally:
        await client.close()
