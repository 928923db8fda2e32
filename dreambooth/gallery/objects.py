"""Reading a job's outputs, read only: S3 (the minio SDK, in worker threads) or a folder.

A :class:`Store` is opened for one job's output prefix and serves keys *relative* to it,
each checked by :func:`dreambooth.gallery.keys.served_key` (or, for listing and the page's
own reads, one of the layout's fixed names) before it reaches storage: a request can name
neither another prefix nor another bucket. S3 credentials stay in this process; only the
endpoint the gallery was configured with is ever used, never one a job's spec names.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from dreambooth.api.uris import Scheme, UriError, parse_uri

CHUNK = 256 * 1024


class Unavailable(Exception):
    """The job's outputs cannot be read here; the message says why (no secret in it)."""


class Missing(Exception):
    """No such object."""


@dataclass(frozen=True, repr=False)
class S3Access:
    """The gallery's own S3 endpoint and (read-only) credentials."""

    endpoint: str
    access_key: str
    secret_key: str
    secure: bool = True
    region: str = "us-east-1"

    def __repr__(self) -> str:  # never the keys, in any log or traceback
        return f"S3Access(endpoint={self.endpoint!r}, secure={self.secure})"

    @classmethod
    def from_env(cls, endpoint: str | None, secure: bool, credentials_dir: Path | None = None) -> S3Access | None:
        """From ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, or files of those names in
        ``credentials_dir`` (a Secret mounted read only); None without an endpoint."""
        if not endpoint:
            return None

        def read(name: str) -> str:
            if credentials_dir is not None and (credentials_dir / name).is_file():
                return (credentials_dir / name).read_text().strip()
            return os.environ.get(name, "")

        return cls(endpoint, read("AWS_ACCESS_KEY_ID"), read("AWS_SECRET_ACCESS_KEY"), secure)


class Store:
    """One job's output prefix."""

    uri: str

    async def keys(self) -> list[str]:
        raise NotImplementedError

    async def read(self, key: str, limit: int = 16 << 20) -> bytes | None:
        """The object, or None if missing; at most ``limit`` bytes (larger: Unavailable)."""
        raise NotImplementedError

    async def stream(self, key: str) -> tuple[int, AsyncIterator[bytes]]:
        """``(size, chunks)``; :class:`Missing` if there is no such object."""
        raise NotImplementedError


class FileStore(Store):
    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.uri = self.root.as_uri() + "/"

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root):  # a symlink out of the folder
            raise Missing(key)
        return path

    async def keys(self) -> list[str]:
        def walk() -> list[str]:
            if not self.root.is_dir():
                return []
            return sorted(p.relative_to(self.root).as_posix() for p in self.root.rglob("*") if p.is_file())

        return await asyncio.to_thread(walk)

    async def read(self, key: str, limit: int = 16 << 20) -> bytes | None:
        path = self._path(key)
        try:
            if path.stat().st_size > limit:
                raise Unavailable(f"{key} is larger than {limit} bytes")
            return await asyncio.to_thread(path.read_bytes)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None

    async def stream(self, key: str) -> tuple[int, AsyncIterator[bytes]]:
        path = self._path(key)
        if not path.is_file():
            raise Missing(key)

        async def chunks() -> AsyncIterator[bytes]:
            with path.open("rb") as f:
                while data := await asyncio.to_thread(f.read, CHUNK):
                    yield data

        return path.stat().st_size, chunks()


class S3Store(Store):
    def __init__(self, access: S3Access, bucket: str, prefix: str) -> None:
        from minio import Minio

        self.bucket, self.prefix = bucket, prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.uri = f"s3://{bucket}/{self.prefix}"
        self._client = Minio(
            access.endpoint,
            access_key=access.access_key,
            secret_key=access.secret_key,
            secure=access.secure,
            region=access.region,
        )

    def _error(self, err: Exception) -> Exception:
        from minio.error import S3Error

        if isinstance(err, S3Error) and err.code in ("NoSuchKey", "NoSuchBucket"):
            return Missing(err.code)
        if isinstance(err, S3Error):
            return Unavailable(f"S3 refused to read {self.uri}: {err.code}")
        return Unavailable(f"S3 is unavailable for {self.uri}: {type(err).__name__}")

    async def keys(self) -> list[str]:
        def walk() -> list[str]:
            return sorted(
                o.object_name[len(self.prefix) :]
                for o in self._client.list_objects(self.bucket, prefix=self.prefix, recursive=True)
            )

        try:
            return await asyncio.to_thread(walk)
        except Exception as err:  # noqa: BLE001  (mapped to a message without secrets)
            mapped = self._error(err)
            if isinstance(mapped, Missing):
                return []
            raise mapped from None

    async def read(self, key: str, limit: int = 16 << 20) -> bytes | None:
        def get() -> bytes:
            response = self._client.get_object(self.bucket, self.prefix + key)
            try:
                if int(response.headers.get("content-length", 0)) > limit:
                    raise Unavailable(f"{key} is larger than {limit} bytes")
                return response.read()
            finally:
                response.close()
                response.release_conn()

        try:
            return await asyncio.to_thread(get)
        except Unavailable:
            raise
        except Exception as err:  # noqa: BLE001
            mapped = self._error(err)
            if isinstance(mapped, Missing):
                return None
            raise mapped from None

    async def stream(self, key: str) -> tuple[int, AsyncIterator[bytes]]:
        try:
            response = await asyncio.to_thread(self._client.get_object, self.bucket, self.prefix + key)
        except Exception as err:  # noqa: BLE001
            raise self._error(err) from None

        async def chunks() -> AsyncIterator[bytes]:
            try:
                while data := await asyncio.to_thread(response.read, CHUNK):
                    yield data
            finally:
                response.close()
                response.release_conn()

        return int(response.headers.get("content-length", 0)), chunks()


def open_store(output_uri: str, s3: S3Access | None, *, local_root: Path | None = None) -> Store:
    """The store of a job's output URI. ``s3://`` needs the gallery's S3 access; ``file://``
    only when the gallery serves local runs, and only inside ``local_root``."""
    try:
        uri = parse_uri(output_uri, allowed={Scheme.S3, Scheme.FILE})
    except UriError as err:
        raise Unavailable(f"outputs at an unreadable URI: {err}") from None
    if uri.scheme is Scheme.S3:
        if s3 is None:
            raise Unavailable("this gallery has no S3 endpoint configured (--s3-endpoint)")
        return S3Store(s3, uri.authority, uri.path)
    if local_root is None:
        raise Unavailable("file:// outputs are shown only by a gallery of local runs")
    root = Path(uri.path).resolve()
    if not root.is_relative_to(local_root.resolve()):
        raise Unavailable(f"{root} is outside {local_root}")
    return FileStore(root)
