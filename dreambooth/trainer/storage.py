"""The trainer's storage: ``s3://bucket/prefix`` through the minio SDK, ``file:///path`` on disk.

Both backends implement :class:`Storage`. Keys are ``/``-separated and relative to the root
that the URI names. Uploads record the content's sha256 (S3 user metadata
``x-amz-meta-sha256``; on local files a ``user.dreambooth.sha256`` extended attribute where the
filesystem supports one), and downloads verify the size and, when recorded, the sha256.

Failures surface as :class:`~dreambooth.trainer.errors.TrainerError` subclasses whose messages
say what is wrong and what to do, and never contain credentials. Transient S3 failures
(connection errors, timeouts, 5xx, corrupt transfers) are retried with exponential backoff.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import re
import shutil
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, TypeVar
from urllib.parse import unquote, urlsplit

import certifi
import urllib3
from minio import Minio
from minio.deleteobjects import DeleteObject
from minio.error import InvalidResponseError, S3Error, ServerError

from dreambooth.trainer.errors import (
    ConfigError,
    DataError,
    NotFoundError,
    StorageAuthError,
    StorageUnavailableError,
    TrainerError,
)

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")

SHA256_META = "sha256"  # S3 user metadata key: sent and returned as x-amz-meta-sha256
# Multipart part size (the S3 minimum is 5 MiB; 10,000 parts make a 160 GB object at most).
# An upload holds about 4 parts in memory (minio uploads 3 in parallel), times the workers.
DEFAULT_PART_SIZE = 16 * 1024 * 1024
DEFAULT_WORKERS = 8
SECRET_HINT = "check the Secret named in spec.storage.credentialsSecret"
_XATTR = "user.dreambooth.sha256"
_TMP_MARK = ".dbpart-"  # marks unfinished local writes; never listed
_CHUNK = 1024 * 1024
_AUTH_CODES = frozenset(
    {"SignatureDoesNotMatch", "InvalidAccessKeyId", "AccessDenied", "InvalidToken",
     "ExpiredToken", "TokenRefreshRequired", "AllAccessDisabled", "AccountProblem"}
)
_TRANSIENT_CODES = frozenset(
    {"InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout", "OperationAborted"}
)
_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


@dataclass(frozen=True, order=True)
class ObjectInfo:
    key: str  # relative to the storage root
    size: int


@dataclass(frozen=True)
class S3Settings:
    """Where and as whom to reach S3. Credentials stay out of ``repr``."""

    endpoint: str  # host[:port]
    secure: bool = True
    region: str = "us-east-1"
    access_key: str | None = field(default=None, repr=False)
    secret_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)

    @classmethod
    def from_env(
        cls, endpoint: str | None = None, secure: bool | None = None, region: str | None = None
    ) -> S3Settings:
        """Arguments first, then the environment the operator fills from the job's Secret.

        ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` (``http://minio:9000``; default AWS),
        ``AWS_REGION`` / ``AWS_DEFAULT_REGION``, ``AWS_ACCESS_KEY_ID``,
        ``AWS_SECRET_ACCESS_KEY`` and optional ``AWS_SESSION_TOKEN``. An ``http://`` endpoint
        URL means ``secure=False`` unless ``secure`` says otherwise.
        """
        env = os.environ
        url = endpoint or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
        parts = urlsplit(url if url and "://" in url else f"//{url or 's3.amazonaws.com'}")
        access_key = env.get("AWS_ACCESS_KEY_ID") or None
        secret_key = env.get("AWS_SECRET_ACCESS_KEY") or None
        if bool(access_key) != bool(secret_key):
            raise ConfigError(
                "only one of AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY is set: "
                f"{SECRET_HINT} and give it both keys"
            )
        return cls(
            endpoint=parts.netloc,
            secure=parts.scheme != "http" if secure is None else secure,
            region=region or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1",
            access_key=access_key,
            secret_key=secret_key,
            session_token=env.get("AWS_SESSION_TOKEN") or None,
        )


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try S3 before reporting it unavailable."""

    attempts: int = 5
    initial_delay_s: float = 0.5
    max_delay_s: float = 8.0
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 120.0


def parse_uri(uri: str) -> tuple[str, str, str]:
    """Split a storage URI into ``(scheme, bucket or root directory, prefix)``.

    ``s3://bucket/a/b`` gives ``("s3", "bucket", "a/b/")``; ``file:///data/x`` gives
    ``("file", "/data/x", "")``. Anything else raises :class:`ConfigError`.
    """
    parts = urlsplit(uri)
    shown = uri.replace(parts.netloc, parts.netloc.rpartition("@")[2]) if parts.netloc else uri
    if "@" in parts.netloc:
        raise ConfigError(f"storage URI {shown!r} carries credentials: {SECRET_HINT} instead")
    if parts.query or parts.fragment:
        raise ConfigError(f"storage URI {shown!r} must not have a query or fragment")
    if parts.scheme == "s3":
        bucket = parts.netloc
        if not _BUCKET_RE.fullmatch(bucket) or ".." in bucket:
            raise ConfigError(
                f"invalid bucket name {bucket!r} in {shown!r}: use 3-63 lowercase letters, "
                "digits, '.' or '-', starting and ending with a letter or digit"
            )
        return "s3", bucket, _norm_prefix(parts.path)
    if parts.scheme == "file":
        path = unquote(parts.path)
        if parts.netloc not in ("", "localhost") or not path.startswith("/"):
            raise ConfigError(f"file URI {shown!r} must be absolute: file:///absolute/path")
        _norm_prefix(path)  # rejects '..'
        return "file", os.path.normpath(path), ""
    raise ConfigError(
        f"unsupported storage URI {shown!r}: use s3://bucket/prefix or file:///absolute/path"
    )


def _norm_prefix(prefix: str) -> str:
    """``'/a/b'`` -> ``'a/b/'``; ``''`` stays ``''``. Rejects ``.`` and ``..`` segments."""
    segments = [s for s in prefix.split("/") if s]
    if any(s in (".", "..") for s in segments):
        raise ConfigError(f"storage path {prefix!r} must not contain '.' or '..' segments")
    return "".join(s + "/" for s in segments)


def _check_key(key: str) -> str:
    norm = _norm_prefix(key)[:-1]
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
        """Delete everything under ``prefix``; return how many objects were deleted."""

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
        with _atomic_write(Path(local_path)) as out:
            self._read_into(key, out, sha256)
        return Path(local_path)

    def download_prefix(self, prefix: str, local_dir: Path) -> list[Path]:
        """Recreate the tree under ``prefix`` in ``local_dir`` (parallel, verified)."""
        prefix = _norm_prefix(prefix)
        objects = self.list(prefix)
        if not objects:
            self._require_root()
            raise NotFoundError(
                f"nothing found under {self.uri(prefix)}: check the path in the job spec "
                "and that the data was uploaded there"
            )
        jobs = [(o.key, Path(local_dir, o.key[len(prefix):])) for o in objects]
        return parallel(lambda job: self.download(*job), jobs, self.workers)

    def _require_root(self) -> None:
        """Raise NotFoundError if the root itself is missing (S3 cannot tell: no-op)."""
        return

    def upload_dir(self, local_dir: Path, prefix: str = "") -> list[str]:
        """Upload every file under ``local_dir`` to ``prefix``; return the keys."""
        local_dir = Path(local_dir)
        if not local_dir.is_dir():
            raise NotFoundError(f"local directory {local_dir} does not exist")
        prefix = _norm_prefix(prefix)
        files = sorted(p for p in local_dir.rglob("*") if p.is_file() and _TMP_MARK not in p.name)
        jobs = [(p, prefix + p.relative_to(local_dir).as_posix()) for p in files]
        parallel(lambda job: self.upload_file(*job), jobs, self.workers)
        return [key for _, key in jobs]


class S3Storage(Storage):
    """Objects under ``s3://bucket/prefix``."""

    def __init__(
        self,
        settings: S3Settings,
        bucket: str,
        prefix: str = "",
        *,
        retry: RetryPolicy | None = None,
        part_size: int = DEFAULT_PART_SIZE,
        workers: int = DEFAULT_WORKERS,
    ) -> None:
        if part_size < 5 * 1024 * 1024:
            raise ValueError("part_size must be at least 5 MiB (the S3 minimum)")
        self.settings, self.bucket, self.prefix = settings, bucket, _norm_prefix(prefix)
        self.retry, self.part_size, self.workers = retry or RetryPolicy(), part_size, workers
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(
                connect=self.retry.connect_timeout_s, read=self.retry.read_timeout_s
            ),
            maxsize=max(10, workers * 4),
            retries=False,  # we retry whole operations (a GET can fail mid-body)
            cert_reqs="CERT_REQUIRED",
            ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
        )
        self._client = Minio(
            settings.endpoint,
            access_key=settings.access_key,
            secret_key=settings.secret_key,
            session_token=settings.session_token,
            secure=settings.secure,
            region=settings.region,
            http_client=http,
        )

    def __repr__(self) -> str:
        return f"S3Storage({self.uri()!r}, endpoint={self.settings.endpoint!r})"

    def uri(self, key: str = "") -> str:
        return f"s3://{self.bucket}/{self.prefix}{key}"

    def _name(self, key: str) -> str:
        return self.prefix + _check_key(key)

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        start = self.prefix + _norm_prefix(prefix)

        def fetch() -> list[ObjectInfo]:
            found = self._client.list_objects(self.bucket, prefix=start, recursive=True)
            return [
                ObjectInfo(o.object_name[len(self.prefix):], o.size or 0)
                for o in found
                if o.object_name and not o.object_name.endswith("/")
            ]

        return sorted(self._call(f"LIST {self.uri(prefix)}", fetch))

    def exists(self, key: str) -> bool:
        def stat() -> bool:
            try:
                self._client.stat_object(self.bucket, self._name(key))
            except S3Error as exc:
                if exc.code == "NoSuchKey":
                    return False
                raise
            return True

        return self._call(f"HEAD {self.uri(key)}", stat)

    def _read_into(self, key: str, out: BinaryIO, sha256: str | None = None) -> None:
        self._call(f"GET {self.uri(key)}", lambda: self._fetch(key, out, sha256))

    def _fetch(self, key: str, out: BinaryIO, sha256: str | None) -> None:
        """One GET attempt: restart ``out``, stream into it, verify."""
        out.seek(0)
        out.truncate()
        response = self._client.get_object(self.bucket, self._name(key))
        try:
            size, digest = _copy(response.stream(_CHUNK), out)
            length = response.headers.get("Content-Length")
            _verify(size, digest, int(length) if length else None,
                    response.headers.get(f"x-amz-meta-{SHA256_META}"), sha256)
        finally:
            response.close()
            response.release_conn()

    def write_bytes(self, key: str, data: bytes) -> None:
        meta = {SHA256_META: hashlib.sha256(data).hexdigest()}
        self._call(f"PUT {self.uri(key)}", lambda: self._client.put_object(
            self.bucket, self._name(key), io.BytesIO(data), len(data), metadata=meta,
            part_size=self.part_size))

    def upload_file(self, local_path: Path, key: str, *, sha256: str | None = None) -> None:
        local_path = Path(local_path)
        if not local_path.is_file():
            raise NotFoundError(f"local file {local_path} does not exist")
        # Over http the SDK hashes every part once more (sha256, for SigV4); over https it
        # sends UNSIGNED-PAYLOAD and an MD5 of every part instead (minio 7.2 _build_headers).
        meta = {SHA256_META: sha256 or _sha256_file(local_path)}
        self._call(f"PUT {self.uri(key)}", lambda: self._client.fput_object(
            self.bucket, self._name(key), str(local_path), metadata=meta,
            part_size=self.part_size))

    def delete_prefix(self, prefix: str = "") -> int:
        names = [self.prefix + o.key for o in self.list(prefix)]

        def remove() -> None:
            errors = list(self._client.remove_objects(self.bucket, map(DeleteObject, names)))
            if errors:
                code, what = errors[0].code, f"DELETE s3://{self.bucket}/{errors[0].name}"
                if code in _AUTH_CODES:
                    raise self._auth_error(code, what)
                raise TrainerError(f"{what} failed ({code}); {len(errors)} objects not deleted")

        if names:
            self._call(f"DELETE {self.uri(prefix)}", remove)
        return len(names)

    def _call(self, what: str, operation: Callable[[], T]) -> T:
        """Run ``operation``, retrying transient failures; map failures to TrainerErrors."""
        delay = self.retry.initial_delay_s
        for attempt in range(1, self.retry.attempts + 1):
            try:
                return operation()
            except Exception as exc:
                problem = self._transient_problem(exc, what)
                if problem is None:
                    raise
                if attempt == self.retry.attempts:
                    raise self._give_up(exc, what, attempt, problem) from exc
                log.warning("%s failed (%s), attempt %d/%d; retrying in %.2f s",
                            what, problem, attempt, self.retry.attempts, delay)
                time.sleep(delay)
                delay = min(delay * 2, self.retry.max_delay_s)
        raise AssertionError("unreachable")

    def _transient_problem(self, exc: Exception, what: str) -> str | None:
        """A description if ``exc`` is worth retrying; raises a TrainerError if it is final.

        ``None`` means "not a storage failure" (a bug, a TrainerError): re-raise as is.
        """
        status = 0
        if isinstance(exc, S3Error):
            status = exc.response.status if exc.response is not None else 0
            if exc.code in _AUTH_CODES:
                raise self._auth_error(exc.code, what) from exc
            if exc.code == "NoSuchBucket":
                raise NotFoundError(
                    f"bucket {self.bucket!r} does not exist at {self.settings.endpoint}: "
                    "create it or fix the bucket name in the storage URI"
                ) from exc
            if exc.code == "NoSuchKey":
                raise NotFoundError(f"{what}: no such object; check the path in the job spec") \
                    from exc
            if exc.code in _TRANSIENT_CODES or status >= 500 or status == 429:
                return exc.code
            raise TrainerError(
                f"storage at {self.settings.endpoint} refused {what} ({exc.code})"
            ) from exc
        if isinstance(exc, ServerError):
            status = exc.status_code
        elif isinstance(exc, InvalidResponseError):
            status = getattr(exc, "_code", 0)  # minio keeps the HTTP status private here
        elif isinstance(exc, (_CorruptError, urllib3.exceptions.HTTPError, ConnectionError)):
            return f"{type(exc).__name__}: {exc}"
        else:
            return None
        if status in (401, 403):
            raise self._auth_error(f"HTTP {status}", what) from exc
        return f"HTTP {status}"

    def _auth_error(self, code: str, what: str) -> StorageAuthError:
        return StorageAuthError(
            f"storage at {self.settings.endpoint} rejected the credentials ({code}) for "
            f"{what}: {SECRET_HINT}: its AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY must "
            f"be valid there and allowed to use bucket {self.bucket!r}"
        )

    def _give_up(self, exc: Exception, what: str, attempts: int, problem: str) -> TrainerError:
        if isinstance(exc, _CorruptError):
            return DataError(
                f"{what}: {exc} on each of {attempts} attempts: the stored object is corrupt; "
                "upload it again"
            )
        return StorageUnavailableError(
            f"storage at {self.settings.endpoint} is unavailable: {what} failed {attempts} "
            f"times, last with {problem}; check the endpoint in spec.storage and that the "
            "cluster can reach it"
        )


class LocalStorage(Storage):
    """Files under a local directory (``file:///path``): a volume or a local run."""

    def __init__(self, root: Path, *, workers: int = DEFAULT_WORKERS) -> None:
        self.root, self.workers = Path(root), workers

    def __repr__(self) -> str:
        return f"LocalStorage({self.uri()!r})"

    def uri(self, key: str = "") -> str:
        return f"file://{self.root.as_posix().rstrip('/')}/{key}"

    def _path(self, key: str) -> Path:
        return self.root / _check_key(key)

    def _require_root(self) -> None:
        if not self.root.is_dir():
            raise NotFoundError(
                f"directory {self.root} does not exist: check the file:// URI in the job spec "
                "and that its volume is mounted"
            )

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        # A missing root lists as empty, like an S3 prefix: a new job's output directory
        # appears on first write. Reading from it raises NotFoundError.
        base = self.root / _norm_prefix(prefix)
        found = (p for p in base.rglob("*") if p.is_file() and _TMP_MARK not in p.name)
        return sorted(ObjectInfo(p.relative_to(self.root).as_posix(), p.stat().st_size)
                      for p in found)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def _read_into(self, key: str, out: BinaryIO, sha256: str | None = None) -> None:
        path = self._path(key)
        if not path.is_file():
            self._require_root()
            raise NotFoundError(f"{self.uri(key)} does not exist")
        with open(path, "rb") as source:
            expected = os.fstat(source.fileno()).st_size
            recorded = _get_xattr(source.fileno())
            size, digest = _copy(iter(lambda: source.read(_CHUNK), b""), out)
        try:
            _verify(size, digest, expected, recorded, sha256)
        except _CorruptError as exc:
            raise DataError(f"{self.uri(key)}: {exc}: the file is corrupt; write it again") \
                from None

    def write_bytes(self, key: str, data: bytes) -> None:
        self._write(key, [data])

    def upload_file(self, local_path: Path, key: str, *, sha256: str | None = None) -> None:
        if not Path(local_path).is_file():
            raise NotFoundError(f"local file {local_path} does not exist")
        with open(local_path, "rb") as source:
            self._write(key, iter(lambda: source.read(_CHUNK), b""), sha256)

    def _write(self, key: str, chunks: Iterable[bytes], sha256: str | None = None) -> None:
        with _atomic_write(self._path(key)) as out:
            _, digest = _copy(chunks, out)  # the copy hashes anyway: check what we were told
            if sha256 and digest != sha256:
                raise DataError(f"{self.uri(key)}: the file changed while it was stored (sha256 "
                                f"{digest}, expected {sha256}); nothing was written")
            _set_xattr(out.fileno(), digest)

    def delete_prefix(self, prefix: str = "") -> int:
        count = len(self.list(prefix))
        prefix = _norm_prefix(prefix)
        if not self.root.is_dir():
            return 0
        targets = [self.root / prefix] if prefix else list(self.root.iterdir())
        for target in targets:
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.exists() or target.is_symlink():
                target.unlink()
        return count


def open_storage(
    uri: str,
    s3: S3Settings | None = None,
    *,
    retry: RetryPolicy | None = None,
    part_size: int = DEFAULT_PART_SIZE,
    workers: int = DEFAULT_WORKERS,
) -> Storage:
    """The storage rooted at ``uri``; S3 settings default to :meth:`S3Settings.from_env`."""
    scheme, location, prefix = parse_uri(uri)
    if scheme == "file":
        return LocalStorage(Path(location), workers=workers)
    return S3Storage(s3 or S3Settings.from_env(), location, prefix, retry=retry,
                     part_size=part_size, workers=workers)


class _CorruptError(Exception):
    """A transfer whose size or sha256 does not match what was recorded."""


def _verify(size: int, digest: str, expected_size: int | None, recorded: str | None,
            wanted: str | None = None) -> None:
    if expected_size is not None and size != expected_size:
        raise _CorruptError(f"got {size} bytes, expected {expected_size}")
    for known in (recorded, wanted):
        if known and digest != known.strip().lower():
            raise _CorruptError(f"sha256 {digest} does not match the recorded {known}")


def _copy(chunks: Iterable[bytes], out: BinaryIO) -> tuple[int, str]:
    """Write ``chunks`` to ``out``; return the size and sha256 hex digest."""
    sha, size = hashlib.sha256(), 0
    for chunk in chunks:
        out.write(chunk)
        sha.update(chunk)
        size += len(chunk)
    return size, sha.hexdigest()


def _sha256_file(path: Path) -> str:
    with open(path, "rb") as source:
        return hashlib.file_digest(source, "sha256").hexdigest()


@contextmanager
def _atomic_write(path: Path) -> Iterator[BinaryIO]:
    """Write to a hidden temporary file beside ``path``; rename it into place on success."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}{_TMP_MARK}{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _set_xattr(fd: int, digest: str) -> None:
    with contextlib.suppress(AttributeError, OSError):  # no xattrs on this platform or fs
        os.setxattr(fd, _XATTR, digest.encode())


def _get_xattr(fd: int) -> str | None:
    try:
        return os.getxattr(fd, _XATTR).decode()
    except (AttributeError, OSError):
        return None


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
