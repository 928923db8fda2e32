"""The S3 backend (dreambooth.trainer.storage.s3) where only S3 has something to say:
credentials, buckets, reachability, retries of server errors, and its settings."""

from __future__ import annotations

import http.server
import socket
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import ClassVar

import pytest

from dreambooth.api.exitcodes import ExitCode
from dreambooth.trainer.errors import (
    ConfigError,
    NotFoundError,
    StorageAuthError,
    StorageUnavailableError,
)
from dreambooth.trainer.storage import RetryPolicy, S3Settings, Storage, open_storage
from tests.support.s3fixtures import s3_bucket, s3_server  # noqa: F401

FAST = RetryPolicy(attempts=3, initial_delay_s=0.01, max_delay_s=0.05, connect_timeout_s=1)


def _s3(settings: S3Settings, bucket: str, **changes: object) -> Storage:
    return open_storage(f"s3://{bucket}/p", S3Settings(**{**vars(settings), **changes}), retry=FAST)


def test_wrong_secret_is_an_auth_error_without_the_secret(
    s3_bucket: tuple[S3Settings, str],  # noqa: F811
) -> None:
    settings, bucket = s3_bucket
    wrong = "wrong-" + "s" * 30
    storage = _s3(settings, bucket, secret_key=wrong)

    for operation in (
        storage.list,
        lambda: storage.read_bytes("k"),
        lambda: storage.write_bytes("k", b"x"),
        lambda: storage.exists("k"),
    ):
        with pytest.raises(StorageAuthError) as info:
            operation()
        message = str(info.value)
        assert "rejected the credentials" in message
        assert "spec.storage.credentialsSecret" in message
        assert settings.endpoint in message
        chain = [info.value, info.value.__cause__, info.value.__context__]
        for text in (message, *map(str, chain), *map(repr, chain)):
            assert wrong not in text and settings.secret_key not in text  # type: ignore[operator]
        assert info.value.exit_code == ExitCode.STORAGE_AUTH
    assert wrong not in repr(storage) and wrong not in repr(replace(settings, secret_key=wrong))


def test_unknown_access_key_is_an_auth_error(s3_bucket: tuple[S3Settings, str]) -> None:  # noqa: F811
    settings, bucket = s3_bucket
    with pytest.raises(StorageAuthError, match="InvalidAccessKeyId"):
        _s3(settings, bucket, access_key="nobody").list()


def test_missing_bucket_is_not_found(s3_bucket: tuple[S3Settings, str], tmp_path: Path) -> None:  # noqa: F811
    settings, _ = s3_bucket
    storage = _s3(settings, "no-such-bucket-here")
    for operation in (
        storage.list,
        lambda: storage.download_prefix("", tmp_path),
        lambda: storage.write_bytes("k", b"x"),
    ):
        with pytest.raises(NotFoundError, match="bucket 'no-such-bucket-here' does not exist"):
            operation()


def test_unreachable_endpoint_is_unavailable_quickly(s3_bucket: tuple[S3Settings, str]) -> None:  # noqa: F811
    settings, bucket = s3_bucket
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens
        sock.bind(("127.0.0.1", 0))
        endpoint = f"127.0.0.1:{sock.getsockname()[1]}"
    storage = _s3(settings, bucket, endpoint=endpoint)

    started = time.monotonic()
    with pytest.raises(StorageUnavailableError) as info:
        storage.list()
    assert time.monotonic() - started < 5
    assert f"storage at {endpoint} is unavailable" in str(info.value)
    assert "failed 3 times" in str(info.value)
    assert info.value.exit_code == ExitCode.STORAGE_UNAVAILABLE


class _FlakyS3(http.server.BaseHTTPRequestHandler):
    """Answers 503 SlowDown ``failures`` times, then an empty object listing."""

    failures = 0
    requests: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        type(self).requests.append(self.path)
        failing = len(self.requests) <= self.failures
        body = (
            b"<Error><Code>SlowDown</Code><Message>slow down</Message></Error>"
            if failing
            else b"<ListBucketResult><Name>b</Name><IsTruncated>false</IsTruncated></ListBucketResult>"
        )
        self.send_response(503 if failing else 200)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.parametrize(("failures", "recovers"), [(2, True), (99, False)])
def test_server_errors_are_retried(failures: int, recovers: bool) -> None:
    handler = type("Handler", (_FlakyS3,), {"failures": failures, "requests": []})
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        endpoint = f"127.0.0.1:{server.server_address[1]}"
        storage = open_storage("s3://bucket/p", S3Settings(endpoint, secure=False), retry=FAST)
        try:
            if recovers:
                assert storage.list() == []
            else:
                with pytest.raises(StorageUnavailableError, match="failed 3 times, last with Slow"):
                    storage.list()
        finally:
            server.shutdown()
    assert len(handler.requests) == 3


def test_settings_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://minio.storage:9000")
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret")
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)

    settings = S3Settings.from_env()

    assert settings == S3Settings("minio.storage:9000", False, "eu-west-1", "AKIAEXAMPLE", "very-secret")
    assert "very-secret" not in repr(settings)
    assert S3Settings.from_env(endpoint="s3.example.com", secure=True).secure
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(ConfigError, match="only one of AWS_ACCESS_KEY_ID"):
        S3Settings.from_env()
