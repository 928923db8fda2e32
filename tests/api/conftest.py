"""What the API tests share: the minimal valid job (and its spec) that the tables of
test_crd.py and test_invalid_specs.py change one field of (tests/support/jobs.py)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.support.jobs import make_job


@pytest.fixture
def minimal_job() -> dict[str, Any]:
    return make_job()


@pytest.fixture
def minimal_spec() -> dict[str, Any]:
    return make_job()["spec"]
