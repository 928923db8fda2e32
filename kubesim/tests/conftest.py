"""Fixtures of kubesim's own tests: a fresh emulator per test, and one S3 server."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from kubesim.api import Decl
from kubesim.kube import Kube, KubectlMissing, clients_use, running_kube
from kubesim.tests.fixtures import s3_server  # noqa: F401

#: The custom resource these tests use, declared without a CRD object (no schema: any spec
#: is stored as sent). test_crds.py installs real CRD objects.
DBJ_DECL = Decl(
    "dreambooth.io", "v1alpha1", "dreamboothjobs", "DreamBoothJob", True, ("dbj",), ("status",), ("all", "dreambooth")
)


@pytest.fixture
def kube(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kube]:
    """A fresh emulator for one test, with ``$KUBECONFIG`` pointing at it."""
    with running_kube(tmp_path_factory.mktemp("kube"), resources=[DBJ_DECL]) as handle, clients_use(handle.kubeconfig):
        yield handle


@pytest.hookimpl(wrapper=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function):
    """A test that runs kubectl is skipped where kubectl is not installed."""
    try:
        return (yield)
    except KubectlMissing as exc:
        pytest.skip(str(exc))
