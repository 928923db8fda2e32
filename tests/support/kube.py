"""The ``kube`` fixture: a fresh simulated Kubernetes API (:mod:`kubesim.kube`) per test.

It serves DreamBoothJobs as declared by the CRD's names, without the CRD object, so without
its schema: any spec is stored as sent, as by an API server that runs no validation (the
operator's own checks are what these tests see). A test that wants the API server's
defaults and CEL rules creates the CRD object (``kube.create(crd.crd())``).

Import it into a test module (``from tests.support.kube import kube  # noqa: F401``, or
``from tests.support import kube as kube_harness`` and ``kube = kube_harness.kube`` to keep
ruff's F811 quiet) or into a conftest.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from dreambooth.api import crd
from kubesim.api import decls_from_crd
from kubesim.kube import Kube, clients_use, running_kube

#: DreamBoothJobs, served as the CRD declares them (names, scope, status subresource)
DREAMBOOTH_JOBS = tuple(decls_from_crd(crd.crd()))


@pytest.fixture
def kube(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kube]:
    """A fresh emulator for one test, with ``$KUBECONFIG`` pointing at it."""
    with (
        running_kube(tmp_path_factory.mktemp("kube"), resources=DREAMBOOTH_JOBS) as handle,
        clients_use(handle.kubeconfig),
    ):
        yield handle
