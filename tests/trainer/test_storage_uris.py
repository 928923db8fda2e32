"""How the trainer's storage opens a URI: parsed by the API's one parser
(dreambooth.api.uris), then handed to the backend its scheme names. The trainer accepts
exactly the URIs the API accepts, plus one rule of its own: a file:// path is absolute
(``dreambooth train`` resolves file://./relative ones before the trainer starts)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dreambooth.api.exitcodes import ExitCode
from dreambooth.api.uris import Scheme, parse_uri
from dreambooth.trainer.errors import ConfigError
from dreambooth.trainer.storage import LocalStorage, S3Settings, S3Storage, open_storage
from tests.api.test_uris import ACCEPTED, REFUSED

SETTINGS = S3Settings("127.0.0.1:9", secure=False)  # nothing is called: opening only


def opened(uri: str):
    storage = open_storage(uri, SETTINGS)
    if isinstance(storage, S3Storage):
        return "s3", storage.bucket, storage.prefix
    assert isinstance(storage, LocalStorage)
    return "file", str(storage.root), ""


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("s3://bucket/a/b", ("s3", "bucket", "a/b/")),
        ("s3://my.bucket-1", ("s3", "my.bucket-1", "")),
        ("s3://bucket/a//b/", ("s3", "bucket", "a/b/")),
        ("file:///data/x/", ("file", "/data/x", "")),
        ("file://localhost/data", ("file", "/data", "")),
        ("file:///data/my%20photos", ("file", "/data/my photos", "")),  # as Path.as_uri writes it
    ],
)
def test_open_storage_dispatches_on_the_scheme(uri: str, expected: tuple[str, str, str]) -> None:
    assert opened(uri) == expected
    assert opened(parse_uri(uri, allowed={Scheme.S3, Scheme.FILE})) == expected  # or parsed


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("gs://bucket/x", "'gs://bucket/x' is not a supported URI: use one of file://, s3://"),
        ("/data/x", "is not a supported URI"),
        ("s3://Bad_Bucket/x", "'Bad_Bucket' is not a valid bucket name"),
        ("s3://ab/x", "'ab' is not a valid bucket name"),
        ("file://data/x", "must be absolute"),
        ("s3://bucket/a/../b", r"must not contain '\.' or '\.\.' segments"),
        ("s3://bucket/x?versionId=1", "must not have a query string"),
        ("pvc://claim/x", "pvc:// cannot be used here: use one of file://, s3://"),
        ("hf://org/sd15", "hf:// cannot be used here"),
    ],
)
def test_open_storage_refuses(uri: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        open_storage(uri, SETTINGS)
    assert info.value.exit_code == ExitCode.INVALID_CONFIG


def test_open_storage_never_echoes_credentials() -> None:
    with pytest.raises(ConfigError) as info:
        open_storage("s3://AKIA:topsecret@bucket/x", SETTINGS)
    assert "topsecret" not in str(info.value) and "credentialsSecret" in str(info.value)


def test_a_parsed_uri_of_another_scheme_is_refused() -> None:
    for text in ("pvc://claim/x", "hf://org/sd15"):
        with pytest.raises(ConfigError, match="cannot be opened as storage: use s3:// or file://"):
            open_storage(parse_uri(text, allowed=set(Scheme)), SETTINGS)


@pytest.mark.parametrize("uri", [u for u, _ in REFUSED], ids=[u[:60] for u, _ in REFUSED])
def test_what_the_api_refuses_the_storage_refuses(uri: str) -> None:
    """Once the trainer kept its own parser and took IPv4-shaped buckets and (for file://)
    query strings the API refused; now both say the same, with the API's words."""
    with pytest.raises(ConfigError):
        open_storage(uri, SETTINGS)


@pytest.mark.parametrize(("uri", "parsed"), [(u, p) for u, p in ACCEPTED if p.scheme in (Scheme.S3, Scheme.FILE)])
def test_what_the_api_accepts_the_storage_opens(uri: str, parsed) -> None:
    if parsed.scheme is Scheme.S3 or parsed.path.startswith("/"):
        assert opened(uri)[1] in (parsed.authority, parsed.path.rstrip("/") or "/")
    else:  # relative: `dreambooth train` resolves it first
        with pytest.raises(ConfigError, match="must be absolute"):
            open_storage(uri, SETTINGS)


def test_a_local_root_is_normalised(tmp_path: Path) -> None:
    storage = open_storage(f"file://{tmp_path}//store/")
    assert isinstance(storage, LocalStorage) and storage.root == tmp_path / "store"
