"""What every storage backend is: :class:`Storage`, and the helpers the backends share.

Keys are ``/``-separated and relative to the root that the storage's URI names. Uploads
record the content's sha256 and downloads verify the size and, when recorded (or when the
caller knows it, ``sha256=``), the sha256: a mismatch is :class:`CorruptError` inside a
backend and a :class:`~dreambooth.trainer.errors.DataError` outside.
"""

from __future__ import annotations

import hashlib
import io
import os
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TypeVar

from dreambooth.trainer.errors import ConfigError, NotFoundError

T = TypeVar("T")
R = TypeVar("R")

DEFAULT_WORKERS = 8
TMP_MARK = ".dbpart-"  # marks unfinished local writes; never listed
CHUNK = 1024 * 1024


@dataclass(frozen=True, order=True)
class ObjectInfo:
    key: str  # relative to the storage root
    size: int


def norm_prefix(prefix: str) -> str:
    """``'/a/b'`` -> ``'a/b/'``; ``''`` stays ``''``. Rejects ``.`` and ``..`` segments."""
    segments = [s for s in prefix.split("/") if s]
    if any(s in (".", "..") for s in segments):
        raise ConfigError(f"storage path {prefix!r} must not contain '.' or '..' segments")
    return "".join(s + "/" for s in segments)


def check_key(key: str) -> str:
    norm = norm_prefix(key)[:-1]
    if not norm:
        raise ConfigError(f"empty storage key {key!r}")
    return norm


class Storage(ABC):
    """Objects under one root (an S3 bucket prefix or a local directory)."""

    workers: int = DEFAULT_WORKERS

    @abstractmethod
    def uri(self, key: str = "") -> str:
        """The full ``s3://`` or ``file://`` URI of ``key``."""

    @abstractmethod
    def list(self, prefix: str = "") -> list[ObjectInfo]:
        """All objects under ``prefix`` (a directory-like prefix), recursively, sorted."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def write_bytes(self, key: str, data: bytes) -> None: ...

    @abstractmethod
    def upload_file(self, local_path: Path, key: str, *, sha256: str | None = None) -> None:
        """Store a local file under ``key``, recording its sha256 (``sha256``, when the
        caller already knows it, saves reading the file once more to hash it)."""

    @abstractmethod
    def delete_prefix(self, prefix: str = "") -> int:
        """Delete everything under ``prefix`` (unfinished writes too); return how many
        objects were deleted."""

    @abstractmethod
    def discard_unfinished(self, prefix: str = "") -> int:
        """Drop writes under ``prefix`` that a killed or cut-off writer left unfinished (S3:
        open multipart uploads, which cost storage and are listed nowhere else; local:
        temporary files); return how many. Only for prefixes no one is writing now."""

    @abstractmethod
    def _read_into(self, key: str, out: BinaryIO, sha256: str | None = None) -> None:
        """Write the content of ``key`` to ``out``, verifying size and recorded sha256
        (and ``sha256``, the digest the caller expects, e.g. from a manifest)."""

    def read_bytes(self, key: str) -> bytes:
        buffer = io.BytesIO()
        self._read_into(key, buffer)
        return buffer.getvalue()

    def download(self, key: str, local_path: Path, *, sha256: str | None = None) -> Path:
        """Copy ``key`` to ``local_path`` atomically (nothing appears there on failure),
        verified while it streams in (also against ``sha256`` if given)."""
        with atomic_write(Path(local_path)) as out:
            self._read_into(key, out, sha256)
        return Path(local_path)

    def download_prefix(self, prefix: str, local_dir: Path) -> list[Path]:
        """Recreate the tree under ``prefix`` in ``local_dir`` (parallel, verified)."""
        prefix = norm_prefix(prefix)
        objects = self.list(prefix)
        if not objects:
            self._require_root()
            raise NotFoundError(
                f"nothing found under {self.uri(prefix)}: check the path in the job spec "
                "and that the data was uploaded there"
            )
        jobs = [(o.key, Path(local_dir, o.key[len(prefix) :])) for o in objects]
        return parallel(lambda job: self.download(*job), jobs, self.workers)

    def _require_root(self) -> None:
        """Raise NotFoundError if the root itself is missing (S3 cannot tell: no-op)."""
        return

    def upload_dir(self, local_dir: Path, prefix: str = "") -> list[str]:
        """Upload every file under ``local_dir`` to ``prefix``; return the keys."""
        local_dir = Path(local_dir)
        if not local_dir.is_dir():
            raise NotFoundError(f"local directory {local_dir} does not exist")
        prefix = norm_prefix(prefix)
        files = sorted(p for p in local_dir.rglob("*") if p.is_file() and TMP_MARK not in p.name)
        jobs = [(p, prefix + p.relative_to(local_dir).as_posix()) for p in files]
        parallel(lambda job: self.upload_file(*job), jobs, self.workers)
        return [key for _, key in jobs]


class CorruptError(Exception):
    """A transfer whose size or sha256 does not match what was recorded."""


def verify(size: int, digest: str, expected_size: int | None, recorded: str | None, wanted: str | None = None) -> None:
    if expected_size is not None and size != expected_size:
        raise CorruptError(f"got {size} bytes, expected {expected_size}")
    for known in (recorded, wanted):
        if known and digest != known.strip().lower():
            raise CorruptError(f"sha256 {digest} does not match the recorded {known}")


def copy_chunks(chunks: Iterable[bytes], out: BinaryIO) -> tuple[int, str]:
    """Write ``chunks`` to ``out``; return the size and sha256 hex digest."""
    sha, size = hashlib.sha256(), 0
    for chunk in chunks:
        out.write(chunk)
        sha.update(chunk)
        size += len(chunk)
    return size, sha.hexdigest()


def sha256_file(path: Path) -> str:
    with open(path, "rb") as source:
        return hashlib.file_digest(source, "sha256").hexdigest()


@contextmanager
def atomic_write(path: Path) -> Iterator[BinaryIO]:
    """Write to a hidden temporary file beside ``path``; rename it into place on success."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}{TMP_MARK}{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def parallel(fn: Callable[[T], R], items: Sequence[T], workers: int) -> list[R]:
    """``[fn(i) for i in items]`` on a thread pool; the first failure cancels the rest."""
    if workers <= 1 or len(items) <= 1:
        return [fn(item) for item in items]
    with ThreadPoolExecutor(max_workers=min(workers, len(items))) as pool:
        futures = [pool.submit(fn, item) for item in items]
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        for future in futures:
            future.cancel()
        for future in done:
            if (error := future.exception()) is not None:
                raise error
        return [future.result() for future in futures]
