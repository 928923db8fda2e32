"""The operator's API client (dreambooth/operator/kube.py) against the emulator."""

from __future__ import annotations

import pytest

from dreambooth.operator.kube import Kube
from tests.support.kube import kube  # noqa: F401


@pytest.mark.asyncio
@pytest.mark.parametrize(("proxy_env", "trusts_env"), [({}, False), ({"HTTPS_PROXY": "http://proxy:3128"}, True)])
async def test_the_environment_is_consulted_per_request_only_when_it_names_a_proxy(
    kube,  # noqa: F811
    monkeypatch,
    proxy_env,
    trusts_env,
):
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
            probe = {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": "probe", "namespace": "default"},
                "data": {},
            }
            assert await client.ensure(probe) is True
            assert kube.get("configmaps", "default", "probe")
            assert await client.ensure(probe) is False  # it exists
    finally:
        await client.close()


@pytest.mark.asyncio
async def test_error_responses_raise_and_a_missing_job_is_none(kube):  # noqa: F811
    """The client reads raw JSON (no model classes), so it checks the status itself."""
    from kubernetes_asyncio.client.exceptions import ApiException

    client = await Kube.connect()
    try:
        assert await client.job("default", "nope-trainer") is None
        kube.fail_next("GET", "/namespaces/default/pods", status=500)
        with pytest.raises(ApiException) as err:
            await client.pods("default", {"app": "x"})
        assert err.value.status == 500 and "injected by the test" in err.value.body
        assert await client.pods("default", {"app": "x"}) == []
        kube.fail_next("POST", "/namespaces/default/configmaps", status=403, reason="Forbidden")
        with pytest.raises(ApiException) as err:
            await client.ensure(
                {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cm", "namespace": "default"}}
            )
        assert err.value.status == 403
    finally:
        await client.close()
