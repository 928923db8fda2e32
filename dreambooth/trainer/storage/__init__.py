"""The trainer's storage: one :class:`Storage` interface, one module per backend.

``s3://bucket/prefix`` (:mod:`.s3`, the minio SDK) and ``file:///path`` (:mod:`.local`, a
directory on disk). :func:`open_storage` takes a URI that :func:`dreambooth.api.uris.parse_uri`
parsed (or the text, which it parses with that one parser) and dispatches on its scheme.
``hf://`` models are fetched by :mod:`dreambooth.trainer.models`; ``pvc://`` never reaches
the trainer (the operator mounts the claim and rewrites the URI to ``file://``).
"""

from __future__ import annotations

import os
from pathlib import Path

from dreambooth.api.uris import Scheme, Uri, UriError, parse_uri, shown
from dreambooth.trainer.errors import ConfigError
from dreambooth.trainer.storage.base import DEFAULT_WORKERS, ObjectInfo, Storage, parallel
from dreambooth.trainer.storage.local import LocalStorage
from dreambooth.trainer.storage.s3 import (
    DEFAULT_PART_SIZE,
    SECRET_HINT,
    RetryPolicy,
    S3Settings,
    S3Storage,
)

__all__ = [
    "DEFAULT_PART_SIZE",
    "DEFAULT_WORKERS",
    "SECRET_HINT",
    "LocalStorage",
    "ObjectInfo",
    "RetryPolicy",
    "S3Settings",
    "S3Storage",
    "Storage",
    "open_storage",
    "parallel",
    "storage_uri",
]

#: what the trainer's storage opens
SCHEMES = frozenset({Scheme.S3, Scheme.FILE})


def storage_uri(uri: Uri | str, schemes: frozenset[Scheme] = SCHEMES) -> Uri:
    """``uri`` parsed by the API's parser; a :class:`ConfigError` (exit code 10) if unusable."""
    if isinstance(uri, Uri):
        return uri
    try:
        return parse_uri(uri, allowed=schemes)
    except UriError as err:
        raise ConfigError(f"storage URI: {err}") from None


def open_storage(
    uri: Uri | str,
    s3: S3Settings | None = None,
    *,
    retry: RetryPolicy | None = None,
    part_size: int = DEFAULT_PART_SIZE,
    workers: int = DEFAULT_WORKERS,
) -> Storage:
    """The storage rooted at ``uri``; S3 settings default to :meth:`S3Settings.from_env`."""
    parsed = storage_uri(uri)
    if parsed.scheme is Scheme.FILE:
        if not os.path.isabs(parsed.path):
            raise ConfigError(
                f"file URI {shown(str(parsed))} must be absolute: file:///absolute/path "
                "(`dreambooth train` resolves file://./relative paths before the trainer starts)"
            )
        return LocalStorage(Path(os.path.normpath(parsed.path)), workers=workers)
    if parsed.scheme is Scheme.S3:
        return S3Storage(
            s3 or S3Settings.from_env(),
            parsed.authority,
            parsed.path,
            retry=retry,
            part_size=part_size,
            workers=workers,
        )
    raise ConfigError(f"{parsed.scheme}:// cannot be opened as storage: use s3:// or file://")
