"""A TCP proxy on 127.0.0.1 that makes a real server slow or unreachable, for tests.

Put it in front of any TCP service (the test S3 server, say) and point the client at
:attr:`FaultProxy.endpoint`; bytes pass through unchanged (HTTP, SigV4 signatures and all),
so the client and the server are both the real ones::

    with FaultProxy(server.endpoint) as proxy:
        proxy.limit(upload=500_000)   # client -> server bytes per second, all connections together
        proxy.outage()                # new connections are cut at once, open ones too
        proxy.restore()               # back to normal (the limits stay)
        proxy.outage("stall")         # connections stay open but nothing moves (timeouts)

A limit is a shared link, like a slow network: chunks from all connections in one
direction queue for it. ``sent``/``received`` count the bytes that went through.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from types import TracebackType
from typing import Literal, Self

CHUNK = 16 * 1024
Mode = Literal["reset", "stall"]


class _Link:
    """One direction's bandwidth: each chunk holds the link for ``len / rate`` seconds."""

    def __init__(self) -> None:
        self.rate: float | None = None
        self.bytes = 0
        self._free_at = 0.0
        self._lock = threading.Lock()

    def take(self, size: int) -> None:
        with self._lock:
            self.bytes += size
            if not self.rate:
                return
            now = time.monotonic()
            start = max(now, self._free_at)
            self._free_at = start + size / self.rate
            delay = self._free_at - now
        time.sleep(delay)


class FaultProxy:
    """Forwards ``127.0.0.1:<port>`` to ``target`` (``"host:port"``) until :meth:`close`."""

    def __init__(self, target: str) -> None:
        host, _, port = target.rpartition(":")
        self.target = (host, int(port))
        self._up, self._down = _Link(), _Link()
        self._mode: Mode | None = None
        self._flowing = threading.Event()
        self._flowing.set()
        self._sockets: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", 0))
        self._closed = False
        self._acceptor = threading.Thread(target=self._accept, name="faultproxy-accept", daemon=True)
        self._acceptor.start()

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self._server.getsockname()[1]}"

    @property
    def sent(self) -> int:
        """Bytes forwarded from clients to the server."""
        return self._up.bytes

    @property
    def received(self) -> int:
        """Bytes forwarded from the server to clients."""
        return self._down.bytes

    def limit(self, *, upload: float | None = None, download: float | None = None) -> None:
        """Bytes per second each way (``None``: as fast as loopback goes)."""
        self._up.rate, self._down.rate = upload, download

    def outage(self, mode: Mode = "reset") -> None:
        """``reset``: open connections are cut and new ones closed at once (a server down, a
        load balancer without backends); ``stall``: nothing moves, connections stay open (a
        network partition: clients see timeouts)."""
        self._mode = mode
        if mode == "stall":
            self._flowing.clear()
        else:
            self._flowing.set()
            self._cut_all()

    def restore(self) -> None:
        self._mode = None
        self._flowing.set()

    @contextlib.contextmanager
    def down(self, mode: Mode = "reset"):
        self.outage(mode)
        try:
            yield self
        finally:
            self.restore()

    def close(self) -> None:
        self._closed = True
        self._flowing.set()
        with contextlib.suppress(OSError):
            self._server.close()
        self._cut_all()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"FaultProxy({self.endpoint} -> {self.target[0]}:{self.target[1]}, mode={self._mode})"

    # --- plumbing ---------------------------------------------------------------------

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            if self._mode == "reset":
                _hard_close(client)
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                _hard_close(client)
                continue
            with self._lock:
                self._sockets |= {client, upstream}
            ended: list[bool] = []  # one entry per direction that ended cleanly
            for src, dst, link in ((client, upstream, self._up), (upstream, client, self._down)):
                threading.Thread(
                    target=self._pump, args=(src, dst, link, ended), daemon=True, name="faultproxy-pump"
                ).start()

    def _pump(self, src: socket.socket, dst: socket.socket, link: _Link, ended: list[bool]) -> None:
        try:
            while True:
                data = src.recv(CHUNK)
                if not data:
                    break
                self._flowing.wait()
                if self._mode == "reset" or self._closed:
                    raise ConnectionAbortedError("cut by the proxy")
                link.take(len(data))
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)  # pass the half-close on
        except OSError:
            self._drop(src, dst)  # one side broke: the other direction ends too
            return
        with self._lock:
            ended.append(True)
            both = len(ended) == 2
        if both:  # the other direction had ended too: the connection is over
            self._drop(src, dst)

    def _drop(self, *socks: socket.socket) -> None:
        with self._lock:
            self._sockets -= set(socks)
        for sock in socks:
            _hard_close(sock)

    def _cut_all(self) -> None:
        with self._lock:
            doomed, self._sockets = self._sockets, set()
        for sock in doomed:
            _hard_close(sock)


def _hard_close(sock: socket.socket) -> None:
    """Close with a TCP reset, as a crashed server or a dropped connection looks."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        # close() alone leaves a socket open while a pump thread is blocked in recv() on it
        # (the kernel holds it for that call): nothing is cut, the client waits for its read
        # timeout. shutdown() wakes that thread; the close then resets.
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()
