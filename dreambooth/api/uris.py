"""Storage URIs a job may name, parsed once, with messages that say what is allowed.

``s3://bucket/prefix``        an S3/MinIO bucket and key prefix
``hf://org/name@revision``    a Hugging Face Hub repository (base models only)
``pvc://claim/path``          a path on a PersistentVolumeClaim (mounted by the operator)
``file:///abs/path``          a local directory: ``dreambooth train`` only, never in a cluster
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum


class Scheme(StrEnum):
    S3 = "s3"
    HF = "hf"
    PVC = "pvc"
    FILE = "file"


#: S3 bucket naming rules (AWS's, which MinIO follows): 3-63 characters, lowercase letters,
#: digits, dots and hyphens, starting and ending with a letter or digit.
BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_IPV4_RE = re.compile(r"^\d+\.\d+\.\d+\.\d+$")
#: a Kubernetes object name (RFC 1123 DNS subdomain), e.g. a PVC name
DNS1123_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_HF_REPO_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")

#: What the API server can check by itself (a cluster job never reads file://).
CLUSTER_URI_PATTERN = r"^(s3|pvc)://[^\s]+$"
CLUSTER_MODEL_URI_PATTERN = r"^(s3|hf|pvc)://[^\s]+$"


class UriError(ValueError):
    """An unusable URI; the message says what is allowed."""


@dataclass(frozen=True)
class Uri:
    scheme: Scheme
    #: bucket (s3), org/name (hf), claim (pvc) or "" (file)
    authority: str
    #: key prefix (s3), sub-path (pvc), absolute or relative path (file); "" for hf
    path: str
    #: hf revision given with ``@rev``
    revision: str | None = None

    def __str__(self) -> str:
        if self.scheme is Scheme.HF:
            return f"hf://{self.authority}" + (f"@{self.revision}" if self.revision else "")
        if self.scheme is Scheme.FILE:
            return f"file://{self.path}"
        return f"{self.scheme}://{self.authority}/{self.path}".rstrip("/") + (
            "/" if self.path.endswith("/") or not self.path else ""
        )

    def join(self, *parts: str) -> str:
        """The URI of a key below this one, always with exactly one ``/`` between parts."""
        base = str(self).rstrip("/")
        rest = "/".join(p.strip("/") for p in parts if p.strip("/"))
        return f"{base}/{rest}" if rest else base + "/"


def check_bucket(bucket: str) -> str:
    if not BUCKET_RE.match(bucket) or ".." in bucket or _IPV4_RE.match(bucket):
        raise UriError(
            f"{bucket!r} is not a valid bucket name: use 3-63 lowercase letters, digits, "
            "dots or hyphens, starting and ending with a letter or digit (e.g. 'training-data')"
        )
    return bucket


def parse_uri(text: str, *, allowed: frozenset[Scheme] | set[Scheme]) -> Uri:
    """Parse ``text``; raise :class:`UriError` naming the schemes that ``allowed`` permits."""
    names = ", ".join(f"{s}://" for s in sorted(allowed))
    scheme, sep, rest = text.partition("://")
    if not sep or scheme not in Scheme.__members__.values():
        raise UriError(f"{text!r} is not a supported URI: use one of {names}")
    kind = Scheme(scheme)
    if kind not in allowed:
        hint = " (file:// is for local runs with `dreambooth train` only)" if kind is Scheme.FILE else ""
        raise UriError(f"{kind}:// cannot be used here{hint}: use one of {names}")
    if any(c.isspace() for c in text):
        raise UriError(f"{text!r} contains whitespace: URIs may not")
    if kind is Scheme.FILE:
        if not rest:
            raise UriError("file:// needs a path, e.g. file:///data/photos or file://./photos")
        return Uri(kind, "", rest)
    authority, _, path = rest.partition("/")
    if kind is Scheme.S3:
        return Uri(kind, check_bucket(authority), path)
    if kind is Scheme.PVC:
        if not DNS1123_RE.match(authority) or len(authority) > 253:
            raise UriError(
                f"{authority!r} is not a valid PersistentVolumeClaim name: use lowercase "
                "letters, digits, '-' and '.' (e.g. pvc://training-data/photos)"
            )
        return Uri(kind, authority, path)
    repo, at, revision = rest.partition("@")
    if not _HF_REPO_RE.match(repo) or (at and not revision):
        raise UriError(
            f"{text!r} is not a Hugging Face repository URI: use hf://org/name or "
            "hf://org/name@revision (e.g. hf://runwayml/stable-diffusion-v1-5@main)"
        )
    return Uri(kind, repo, "", revision or None)
