"""``s3://bucket/prefix`` through the minio SDK: retries, error mapping, sha256 metadata.

Uploads record the content's sha256 as S3 user metadata (``x-amz-meta-sha256``). Failures
surface as :class:`~dreambooth.trainer.errors.TrainerError` subclasses whose messages say
what is wrong and what to do, and never contain credentials. Transient failures
(connection errors, timeouts, 5xx, corrupt transfers) are retried with exponential backoff.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, TypeVar
from urllib.parse import urlsplit

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
from dreambooth.trainer.storage.base import (
    CHUNK,
    DEFAULT_WORKERS,
    CorruptError,
    ObjectInfo,
    Storage,
    check_key,
    copy_chunks,
    norm_prefix,
    sha256_file,
    verify,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

SHA256_META = "sha256"  # S3 user metadata key: sent and returned as x-amz-meta-sha256
# Multipart part size (the S3 minimum is 5 MiB; 10,000 parts make a 160 GB object at most).
# An upload holds about 4 parts in memory (minio uploads 3 in parallel), times the workers.
DEFAULT_PART_SIZE = 16 * 1024 * 1024
SECRET_HINT = "check the Secret named in spec.storage.credentialsSecret"
_AUTH_CODES = frozenset(
    {
        "SignatureDoesNotMatch",
        "InvalidAccessKeyId",
        "AccessDenied",
        "InvalidToken",
        "ExpiredToken",
        "TokenRefreshRequired",
        "AllAccessDisabled",
        "AccountProblem",
    }
)
_TRANSIENT_CODES = frozenset({"InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout", "OperationAborted"})


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
    def from_env(cls, endpoint: str | None = None, secure: bool | None = None, region: str | None = None) -> S3Settings:
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
                f"only one of AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY is set: {SECRET_HINT} and give it both keys"
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
        self.settings, self.bucket, self.prefix = settings, bucket, norm_prefix(prefix)
        self.retry, self.part_size, self.workers = retry or RetryPolicy(), part_size, workers
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=self.retry.connect_timeout_s, read=self.retry.read_timeout_s),
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
        return self.prefix + check_key(key)

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        start = self.prefix + norm_prefix(prefix)

        def fetch() -> list[ObjectInfo]:
            found = self._client.list_objects(self.bucket, prefix=start, recursive=True)
            return [
                ObjectInfo(o.object_name[len(self.prefix) :], o.size or 0)
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
            size, digest = copy_chunks(response.stream(CHUNK), out)
            length = response.headers.get("Content-Length")
            verify(
                size, digest, int(length) if length else None, response.headers.get(f"x-amz-meta-{SHA256_META}"), sha256
            )
        finally:
            response.close()
            response.release_conn()

    def write_bytes(self, key: str, data: bytes) -> None:
        meta = {SHA256_META: hashlib.sha256(data).hexdigest()}
        self._call(
            f"PUT {self.uri(key)}",
            lambda: self._client.put_object(
                self.bucket, self._name(key), io.BytesIO(data), len(data), metadata=meta, part_size=self.part_size
            ),
        )

    def upload_file(self, local_path: Path, key: str, *, sha256: str | None = None) -> None:
        local_path = Path(local_path)
        if not local_path.is_file():
            raise NotFoundError(f"local file {local_path} does not exist")
        # Over http the SDK hashes every part once more (sha256, for SigV4); over https it
        # sends UNSIGNED-PAYLOAD and an MD5 of every part instead (minio 7.2 _build_headers).
        meta = {SHA256_META: sha256 or sha256_file(local_path)}
        if local_path.stat().st_size > self.part_size:  # a multipart upload: drop a dead one's parts
            self._abort_uploads(self._name(key), exact=True)
        self._call(
            f"PUT {self.uri(key)}",
            lambda: self._client.fput_object(
                self.bucket, self._name(key), str(local_path), metadata=meta, part_size=self.part_size
            ),
        )

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
        self.discard_unfinished(prefix)
        return len(names)

    def discard_unfinished(self, prefix: str = "") -> int:
        return self._abort_uploads(self.prefix + norm_prefix(prefix))

    def _abort_uploads(self, name: str, *, exact: bool = False) -> int:
        """Abort the open multipart uploads of object ``name`` (``exact``) or under it.

        minio-py has no public call for these two S3 APIs (ListMultipartUploads,
        AbortMultipartUpload); its private ones are used, pinned by the lockfile."""

        def abort() -> int:
            count = 0
            for _ in range(100):  # 1,000 a listing; what is aborted leaves the next one
                found = self._client._list_multipart_uploads(self.bucket, prefix=name, max_uploads=1000)
                doomed = [u for u in found.uploads if not exact or u.object_name == name]
                for upload in doomed:
                    self._client._abort_multipart_upload(self.bucket, upload.object_name, upload.upload_id)
                count += len(doomed)
                if not doomed or not found.is_truncated:
                    break
            if count:
                log.info("aborted %d unfinished multipart upload(s) under s3://%s/%s", count, self.bucket, name)
            return count

        return self._call(f"ABORT unfinished uploads of s3://{self.bucket}/{name}", abort)

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
                log.warning(
                    "%s failed (%s), attempt %d/%d; retrying in %.2f s",
                    what,
                    problem,
                    attempt,
                    self.retry.attempts,
                    delay,
                )
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
                raise NotFoundError(f"{what}: no such object; check the path in the job spec") from exc
            if exc.code in _TRANSIENT_CODES or status >= 500 or status == 429:
                return exc.code
            raise TrainerError(f"storage at {self.settings.endpoint} refused {what} ({exc.code})") from exc
        if isinstance(exc, ServerError):
            status = exc.status_code
        elif isinstance(exc, InvalidResponseError):
            status = getattr(exc, "_code", 0)  # minio keeps the HTTP status private here
        elif isinstance(exc, (CorruptError, urllib3.exceptions.HTTPError, ConnectionError)):
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
        if isinstance(exc, CorruptError):
            return DataError(
                f"{what}: {exc} on each of {attempts} attempts: the stored object is corrupt; upload it again"
            )
        return StorageUnavailableError(
            f"storage at {self.settings.endpoint} is unavailable: {what} failed {attempts} "
            f"times, last with {problem}; check the endpoint in spec.storage and that the "
            "cluster can reach it"
        )
