"""The proxy that makes a server slow or unreachable (kubesim/faultproxy.py): against the
real S3 server and its SDK, and a TCP echo server."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import uuid
from collections.abc import Iterator

import pytest
from minio import Minio

from kubesim.faultproxy import FaultProxy


@pytest.fixture
def echo() -> Iterator[str]:
    """A TCP echo server on 127.0.0.1: ``host:port``."""
    server = socket.create_server(("127.0.0.1", 0))

    def serve(conn: socket.socket) -> None:
        with conn, contextlib.suppress(ConnectionResetError):  # the proxy cuts with a reset
            while data := conn.recv(4096):
                conn.sendall(data)

    def accept() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    yield f"127.0.0.1:{server.getsockname()[1]}"
    server.close()


def connect(endpoint: str) -> socket.socket:
    host, _, port = endpoint.rpartition(":")
    return socket.create_connection((host, int(port)), timeout=2)


def test_s3_works_through_the_proxy_and_a_limit_slows_uploads(s3_server, tmp_path):
    bucket = f"test-{uuid.uuid4().hex[:16]}"
    s3_server.client().make_bucket(bucket)
    data = bytes(range(256)) * 2048  # 512 KiB
    (tmp_path / "blob").write_bytes(data)
    with FaultProxy(s3_server.endpoint) as proxy:
        proxy.limit(upload=1024 * 1024)
        client = Minio(
            proxy.endpoint,
            access_key=s3_server.access_key,
            secret_key=s3_server.secret_key,
            secure=False,
            region="us-east-1",
        )
        started = time.monotonic()
        client.fput_object(bucket, "blob", str(tmp_path / "blob"))
        took = time.monotonic() - started
        got = client.get_object(bucket, "blob")
        try:
            assert got.read() == data  # SigV4 signatures pass unchanged
        finally:
            got.close()
            got.release_conn()
    assert took >= 0.45, f"512 KiB at 1 MiB/s took {took:.2f} s"
    assert proxy.sent >= len(data) and proxy.received >= len(data)


def test_an_outage_cuts_open_connections_and_refuses_new_ones_until_restored(echo):
    with FaultProxy(echo) as proxy:
        before = connect(proxy.endpoint)
        before.sendall(b"ping")
        assert before.recv(4) == b"ping"
        proxy.outage()
        with pytest.raises(OSError):  # reset, or the connection is simply gone
            before.sendall(b"ping")
            if not before.recv(4):
                raise ConnectionResetError
        with pytest.raises(OSError):
            during = connect(proxy.endpoint)
            during.sendall(b"ping")
            if not during.recv(4):
                raise ConnectionResetError
        proxy.restore()
        after = connect(proxy.endpoint)
        after.sendall(b"pong")
        assert after.recv(4) == b"pong"


def test_a_stall_holds_the_bytes_until_restored(echo):
    with FaultProxy(echo) as proxy:
        conn = connect(proxy.endpoint)
        with proxy.down("stall"):
            conn.sendall(b"late")
            conn.settimeout(0.3)
            with pytest.raises(TimeoutError):
                conn.recv(4)
        conn.settimeout(2)
        assert conn.recv(4) == b"late"
