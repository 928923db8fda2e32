"""The storage backends (dreambooth.trainer.storage.s3 and .local) against a real S3
server (weed mini) and a local directory: every behaviour here holds for both. What only
S3 has (credentials, buckets, reachability, retries) is in test_storage_s3.py; how URIs
are opened, in test_storage_uris.py."""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from dreambooth.api.exitcodes import ExitCode
from dreambooth.trainer.errors import (
    DataError,
    NotFoundError,
)
from dreambooth.trainer.storage import (
    LocalStorage,
    ObjectInfo,
    RetryPolicy,
    Storage,
    open_storage,
)
from dreambooth.trainer.storage.base import TMP_MARK
from kubesim.s3server import S3Server
from tests.support.s3fixtures import s3_bucket, s3_server  # noqa: F401

MiB = 1024 * 1024
PART_SIZE = 5 * MiB  # the S3 minimum: a 12 MiB file takes 3 parts
FAST = RetryPolicy(attempts=3, initial_delay_s=0.01, max_delay_s=0.05, connect_timeout_s=1)
TREE = {
    "a.txt": b"alpha\n",
    "empty": b"",
    "sub/b.bin": os.urandom(70_000),
    "sub/deeper/c.json": b'{"c": 1}',
}


@dataclass
class Backend:
    name: str
    storage: Storage
    corrupt: Callable[[str], None]  # flip a byte of a stored key, keeping its recorded sha256
    etag: Callable[[str], str] | None = None  # S3 only: the ETag of a stored key
    #: begin a write of a key and die (S3: an open multipart upload; local: a temporary file)
    leave_unfinished: Callable[[str], None] | None = None
    unfinished: Callable[[], list[str]] | None = None  # the keys with an unfinished write


def _write_tree(root: Path, tree: dict[str, bytes]) -> None:
    for rel, data in tree.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)


def _flip(data: bytes) -> bytes:
    return bytes([data[0] ^ 0xFF]) + data[1:]


@pytest.fixture(params=["s3", "local"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "local":
        storage = open_storage(f"file://{tmp_path}/store/jobs/run-1")

        def corrupt_local(key: str) -> None:
            assert isinstance(storage, LocalStorage)
            try:
                os.getxattr(storage.root / key, "user.dreambooth.sha256")
            except OSError:
                pytest.skip("this filesystem keeps no user xattrs: nothing records the sha256")
            with open(storage.root / key, "r+b") as f:  # in place: the xattr stays stale
                first = f.read(1)
                f.seek(0)
                f.write(_flip(first))

        def leave_local(key: str) -> None:
            path = storage.root / key
            path.parent.mkdir(parents=True, exist_ok=True)
            path.with_name(f".{path.name}{TMP_MARK}dead0001").write_bytes(b"half")

        def unfinished_local() -> list[str]:
            found = storage.root.rglob(f"*{TMP_MARK}*")
            return sorted(str(p.parent.relative_to(storage.root) / p.name[1:].split(TMP_MARK)[0]) for p in found)

        return Backend("local", storage, corrupt_local, leave_unfinished=leave_local, unfinished=unfinished_local)

    server: S3Server = request.getfixturevalue("s3_server")
    settings, bucket = request.getfixturevalue("s3_bucket")
    storage = open_storage(f"s3://{bucket}/jobs/run-1", settings, retry=FAST, part_size=PART_SIZE)
    client = server.client()

    def corrupt_s3(key: str) -> None:
        name = f"jobs/run-1/{key}"
        stale = client.stat_object(bucket, name).metadata["x-amz-meta-sha256"]
        response = client.get_object(bucket, name)
        data = _flip(response.read())
        response.close()
        response.release_conn()
        client.put_object(bucket, name, io.BytesIO(data), len(data), metadata={"sha256": stale})

    def etag(key: str) -> str:
        return client.stat_object(bucket, f"jobs/run-1/{key}").etag or ""

    def leave_s3(key: str) -> None:
        client._create_multipart_upload(bucket, f"jobs/run-1/{key}", {})

    def unfinished_s3() -> list[str]:
        found = client._list_multipart_uploads(bucket, prefix="jobs/run-1/")
        return sorted(u.object_name.removeprefix("jobs/run-1/") for u in found.uploads)

    return Backend("s3", storage, corrupt_s3, etag, leave_s3, unfinished_s3)


def test_round_trip_nested_prefix(backend: Backend, tmp_path: Path) -> None:
    storage = backend.storage
    _write_tree(tmp_path / "src", TREE)

    keys = storage.upload_dir(tmp_path / "src", "data/instance")

    assert keys == sorted(f"data/instance/{rel}" for rel in TREE)
    for rel, data in TREE.items():
        assert storage.read_bytes(f"data/instance/{rel}") == data
        assert storage.exists(f"data/instance/{rel}")
    assert not storage.exists("data/instance/missing")
    assert storage.uri("data/instance/a.txt").endswith("/jobs/run-1/data/instance/a.txt")
    assert storage.uri("x").startswith(f"{backend.name.replace('local', 'file')}://")


def test_multipart_upload_of_a_large_file(backend: Backend, tmp_path: Path) -> None:
    big = tmp_path / "model.safetensors"
    big.write_bytes(os.urandom(12 * MiB))
    digest = hashlib.sha256(big.read_bytes()).hexdigest()

    backend.storage.upload_file(big, "checkpoints/step-10/model.safetensors")
    out = backend.storage.download("checkpoints/step-10/model.safetensors", tmp_path / "back" / "model.safetensors")

    assert hashlib.sha256(out.read_bytes()).hexdigest() == digest
    if backend.etag:  # a multipart upload's ETag ends in -<number of parts>
        assert backend.etag("checkpoints/step-10/model.safetensors").endswith("-3")


def test_listing_is_recursive_sorted_and_prefix_is_a_directory(backend: Backend) -> None:
    storage = backend.storage
    for key in ["b/2", "a/x/1", "a/0", "ab/not-under-a", "top"]:
        storage.write_bytes(key, key.encode())

    assert storage.list() == [ObjectInfo(k, len(k)) for k in ["a/0", "a/x/1", "ab/not-under-a", "b/2", "top"]]
    assert [o.key for o in storage.list("a")] == ["a/0", "a/x/1"]
    assert [o.key for o in storage.list("/a/")] == ["a/0", "a/x/1"]
    assert storage.list("nothing-here") == []


def test_download_prefix_recreates_the_tree(backend: Backend, tmp_path: Path) -> None:
    _write_tree(tmp_path / "src", TREE)
    backend.storage.upload_dir(tmp_path / "src", "instance")
    backend.storage.write_bytes("other/z", b"not part of it")

    paths = backend.storage.download_prefix("instance", tmp_path / "dst")

    assert sorted(paths) == sorted(tmp_path / "dst" / rel for rel in TREE)
    got = {
        p.relative_to(tmp_path / "dst").as_posix(): p.read_bytes() for p in (tmp_path / "dst").rglob("*") if p.is_file()
    }
    assert got == TREE  # no stray temporary files either


def test_download_of_an_empty_prefix_is_not_found(backend: Backend, tmp_path: Path) -> None:
    backend.storage.write_bytes("somewhere/else", b"x")
    with pytest.raises(NotFoundError, match=r"nothing found under .*/jobs/run-1/instance/"):
        backend.storage.download_prefix("instance", tmp_path / "dst")


def test_corrupted_object_is_detected(backend: Backend, tmp_path: Path) -> None:
    storage = backend.storage
    storage.write_bytes("instance/img.png", os.urandom(4096))
    backend.corrupt("instance/img.png")

    with pytest.raises(DataError, match=r"sha256 .* does not match the recorded") as info:
        storage.download_prefix("instance", tmp_path / "dst")
    assert info.value.exit_code == ExitCode.BAD_DATA
    assert storage.uri("instance/img.png") in str(info.value)
    assert not list((tmp_path / "dst").rglob("*.png*"))  # nothing half-written left behind
    with pytest.raises(DataError):
        storage.read_bytes("instance/img.png")


def test_a_digest_the_caller_knows_is_recorded_and_downloads_check_the_one_expected(
    backend: Backend, tmp_path: Path
) -> None:
    storage, data = backend.storage, os.urandom(50_000)
    (tmp_path / "state.pt").write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    storage.upload_file(tmp_path / "state.pt", "ckpt/state.pt", sha256=digest)  # not hashed again
    storage.download("ckpt/state.pt", tmp_path / "back.pt", sha256=digest)
    assert (tmp_path / "back.pt").read_bytes() == data
    with pytest.raises(DataError, match="does not match"):  # e.g. a manifest that says otherwise
        storage.download("ckpt/state.pt", tmp_path / "other.pt", sha256="0" * 64)
    assert not (tmp_path / "other.pt").exists()


def test_delete_prefix(backend: Backend) -> None:
    storage = backend.storage
    for key in ["ckpt/1/a", "ckpt/1/b", "ckpt/2/a", "ckptx/keep", "keep"]:
        storage.write_bytes(key, b"x")

    assert storage.delete_prefix("ckpt/1") == 2
    assert [o.key for o in storage.list()] == ["ckpt/2/a", "ckptx/keep", "keep"]
    assert storage.delete_prefix("ckpt") == 1
    assert storage.delete_prefix("ckpt") == 0
    assert storage.delete_prefix() == 2
    assert storage.list() == []


def test_unfinished_writes_a_dead_writer_left_are_discarded_under_a_prefix(backend: Backend) -> None:
    storage = backend.storage
    for key in ["ckpt/1/optimizer.pt", "ckpt/2/optimizer.pt", "model/unet.bin"]:
        backend.leave_unfinished(key)
    storage.write_bytes("ckpt/2/state.json", b"{}")
    assert backend.unfinished() == ["ckpt/1/optimizer.pt", "ckpt/2/optimizer.pt", "model/unet.bin"]
    assert [o.key for o in storage.list()] == ["ckpt/2/state.json"]  # listed nowhere else

    assert storage.discard_unfinished("ckpt/1") == 1
    assert backend.unfinished() == ["ckpt/2/optimizer.pt", "model/unet.bin"]
    storage.delete_prefix("ckpt")  # deleting a prefix takes its unfinished writes too
    assert backend.unfinished() == ["model/unet.bin"]
    assert storage.discard_unfinished() == 1 and backend.unfinished() == []
    assert storage.discard_unfinished() == 0


def test_missing_object_is_not_found(backend: Backend, tmp_path: Path) -> None:
    backend.storage.write_bytes("present", b"x")
    with pytest.raises(NotFoundError, match="jobs/run-1/absent"):
        backend.storage.read_bytes("absent")
    with pytest.raises(NotFoundError):
        backend.storage.download("absent", tmp_path / "absent")


# --- local only ---------------------------------------------------------------------------


def test_local_missing_directory_is_not_found(tmp_path: Path) -> None:
    storage = open_storage(f"file://{tmp_path}/nope")
    for read in (lambda: storage.download_prefix("", tmp_path / "dst"), lambda: storage.read_bytes("k")):
        with pytest.raises(NotFoundError, match=f"directory {tmp_path}/nope does not exist"):
            read()
    assert storage.list() == []  # like an empty S3 prefix: a new output directory
    assert storage.delete_prefix() == 0
    storage.write_bytes("created/on/write", b"x")  # writing creates the directory
    assert storage.read_bytes("created/on/write") == b"x"
