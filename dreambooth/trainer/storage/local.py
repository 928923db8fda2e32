"""``file:///path``: files under a local directory (a mounted volume or a local run).

Writes are atomic (a hidden temporary file renamed into place, never listed); the sha256
is kept in a ``user.dreambooth.sha256`` extended attribute where the filesystem has them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

from dreambooth.trainer.errors import DataError, NotFoundError
from dreambooth.trainer.storage.base import (
    CHUNK,
    DEFAULT_WORKERS,
    TMP_MARK,
    CorruptError,
    ObjectInfo,
    Storage,
    atomic_write,
    check_key,
    copy_chunks,
    norm_prefix,
    verify,
)

XATTR = "user.dreambooth.sha256"


class LocalStorage(Storage):
    """Files under a local directory (``file:///path``): a volume or a local run."""

    def __init__(self, root: Path, *, workers: int = DEFAULT_WORKERS) -> None:
        self.root, self.workers = Path(root), workers

    def __repr__(self) -> str:
        return f"LocalStorage({self.uri()!r})"

    def uri(self, key: str = "") -> str:
        return f"file://{self.root.as_posix().rstrip('/')}/{key}"

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def _require_root(self) -> None:
        if not self.root.is_dir():
            raise NotFoundError(
                f"directory {self.root} does not exist: check the file:// URI in the job spec "
                "and that its volume is mounted"
            )

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        # A missing root lists as empty, like an S3 prefix: a new job's output directory
        # appears on first write. Reading from it raises NotFoundError.
        base = self.root / norm_prefix(prefix)
        found = (p for p in base.rglob("*") if p.is_file() and TMP_MARK not in p.name)
        return sorted(ObjectInfo(p.relative_to(self.root).as_posix(), p.stat().st_size) for p in found)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def _read_into(self, key: str, out: BinaryIO, sha256: str | None = None) -> None:
        path = self._path(key)
        if not path.is_file():
            self._require_root()
            raise NotFoundError(f"{self.uri(key)} does not exist")
        with open(path, "rb") as source:
            expected = os.fstat(source.fileno()).st_size
            recorded = get_xattr(source.fileno())
            size, digest = copy_chunks(iter(lambda: source.read(CHUNK), b""), out)
        try:
            verify(size, digest, expected, recorded, sha256)
        except CorruptError as exc:
            raise DataError(f"{self.uri(key)}: {exc}: the file is corrupt; write it again") from None

    def write_bytes(self, key: str, data: bytes) -> None:
        self._write(key, [data])

    def upload_file(self, local_path: Path, key: str, *, sha256: str | None = None) -> None:
        if not Path(local_path).is_file():
            raise NotFoundError(f"local file {local_path} does not exist")
        with open(local_path, "rb") as source:
            self._write(key, iter(lambda: source.read(CHUNK), b""), sha256)

    def _write(self, key: str, chunks: Iterable[bytes], sha256: str | None = None) -> None:
        with atomic_write(self._path(key)) as out:
            _, digest = copy_chunks(chunks, out)  # the copy hashes anyway: check what we were told
            if sha256 and digest != sha256:
                raise DataError(
                    f"{self.uri(key)}: the file changed while it was stored (sha256 "
                    f"{digest}, expected {sha256}); nothing was written"
                )
            set_xattr(out.fileno(), digest)

    def discard_unfinished(self, prefix: str = "") -> int:
        base = self.root / norm_prefix(prefix)
        doomed = [p for p in base.rglob(f"*{TMP_MARK}*") if p.is_file()] if base.is_dir() else []
        for path in doomed:
            path.unlink(missing_ok=True)
        return len(doomed)

    def delete_prefix(self, prefix: str = "") -> int:
        count = len(self.list(prefix))
        prefix = norm_prefix(prefix)
        if not self.root.is_dir():
            return 0
        targets = [self.root / prefix] if prefix else list(self.root.iterdir())
        for target in targets:
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.exists() or target.is_symlink():
                target.unlink()
        return count


def set_xattr(fd: int, digest: str) -> None:
    with contextlib.suppress(AttributeError, OSError):  # no xattrs on this platform or fs
        os.setxattr(fd, XATTR, digest.encode())


def get_xattr(fd: int) -> str | None:
    try:
        return os.getxattr(fd, XATTR).decode()
    except (AttributeError, OSError):
        return None
