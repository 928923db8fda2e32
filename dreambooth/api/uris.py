"""Storage URIs, parsed in one place, with messages that say what is allowed.

``s3://bucket/prefix``        an S3/MinIO bucket and key prefix
``hf://org/name@revision``    a Hugging Face Hub repository (base models only)
``pvc://claim/path``          a path on a PersistentVolumeClaim (mounted by the operator)
``file:///abs/path``          a local directory: ``dreambooth train`` only, never in a cluster;
                              ``file://./rel/path`` is relative to where the command runs

Every URI is parsed here: a job's, a TrainerConfig's, the operator's settings', and the one
the trainer's storage opens. The CRD's patterns are built from the same regex sources
(:func:`uri_pattern`), so ``kubectl apply`` refuses what the models refuse, except for three
rules an RE2 pattern cannot state (see :func:`check_bucket` and :func:`check_claim`).

In every scheme a path is ``/``-separated segments, none of them ``.`` or ``..``, and a URI
has no query string or fragment (``?``, ``#``) and no credentials. ``s3://`` keys and
``pvc://`` paths are literal; ``file://`` paths are percent-decoded (RFC 8089, as
``Path.as_uri()`` writes them), and ``file://localhost/p`` is ``/p``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from urllib.parse import quote, unquote

from dreambooth.api import redact


class Scheme(StrEnum):
    S3 = "s3"
    HF = "hf"
    PVC = "pvc"
    FILE = "file"


# --- regex sources: parse_uri's and, through uri_pattern(), the CRD's -------------------
# Written for RE2 (the API server's engine) as well as Python's re: no look-around, no
# back-references, no length bounds on a part of a URI.

#: S3 bucket naming rules (AWS's, which MinIO follows): 3-63 characters, lowercase letters,
#: digits, dots and hyphens, starting and ending with a letter or digit.
BUCKET = r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]"
#: a Kubernetes object name (RFC 1123 DNS subdomain), e.g. a PVC name
DNS1123 = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"
#: a Hub repository id: org/name
HF_REPO = r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*"
_REF_PART = r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*"
#: a Hub revision: a branch or tag name or a commit hash. Branches and tags are git refs,
#: so git's ref-name rules apply (git check-ref-format: no '..', no part starting or ending
#: with '.', no empty part, no '~^:?*[\\', spaces or '@'; branches never start with '-'),
#: here in ASCII letters, digits, '_', '-', '.' and '/' (e.g. main, v1.0, refs/pr/1); a
#: commit hash is 40 hex digits, which this includes. Not checked: git's ban on a part
#: ending in '.lock' (no such ref can exist, so the Hub answers "revision not found").
REVISION = rf"[A-Za-z0-9_][A-Za-z0-9_-]*(\.[A-Za-z0-9_-]+)*(/{_REF_PART})*"
#: one segment of an s3:// or pvc:// path: no '/', whitespace, '?' or '#', and neither '.'
#: nor '..' (three dots or more are an ordinary name)
SEGMENT = r"(\.*[^/\s?#.][^/\s?#]*|\.\.\.+)"
#: the path after a bucket or claim; empty segments ('a//b') are ignored, as S3 prefixes are
PATH = rf"(/{SEGMENT}?)*"

_SCHEME_PATTERNS = {
    Scheme.S3: rf"s3://{BUCKET}{PATH}",
    Scheme.PVC: rf"pvc://{DNS1123}{PATH}",
    Scheme.HF: rf"hf://{HF_REPO}(@{REVISION})?",
}

BUCKET_RE = re.compile(BUCKET)
DNS1123_RE = re.compile(rf"^{DNS1123}$")
_CLAIM_RE = re.compile(DNS1123)
_HF_REPO_RE = re.compile(HF_REPO)
_REVISION_RE = re.compile(REVISION)
_SEGMENT_RE = re.compile(SEGMENT)
_IPV4_RE = re.compile(r"\d+\.\d+\.\d+\.\d+")

#: how each scheme is written, for messages
EXAMPLES = {
    Scheme.S3: "s3://bucket/prefix",
    Scheme.PVC: "pvc://claim/path",
    Scheme.HF: "hf://org/name@revision",
    Scheme.FILE: "file:///path",
}
_SHOWN_MAX = 120  # a longer value is quoted by its start only


def uri_pattern(*schemes: Scheme) -> str:
    """The CRD pattern for URIs of ``schemes``, from the sources :func:`parse_uri` uses."""
    return "^(" + "|".join(_SCHEME_PATTERNS[s] for s in schemes) + ")$"


class UriError(ValueError):
    """An unusable URI; the message says what is allowed."""


@dataclass(frozen=True)
class Uri:
    scheme: Scheme
    #: bucket (s3), org/name (hf), claim (pvc) or "" (file)
    authority: str
    #: key prefix (s3), sub-path (pvc), decoded absolute or relative path (file); "" for hf
    path: str
    #: hf revision given with ``@rev``
    revision: str | None = None

    def __str__(self) -> str:
        """The URI in its canonical form: ``parse_uri(str(uri))`` gives ``uri`` back."""
        if self.scheme is Scheme.HF:
            return f"hf://{self.authority}" + (f"@{self.revision}" if self.revision else "")
        if self.scheme is Scheme.FILE:
            return "file://" + quote(self.path)
        return f"{self.scheme}://{self.authority}/{self.path}"


def shown(text: str) -> str:
    """``text`` quoted for a message: cut short when long, not shown if it looks like a
    credential (:func:`dreambooth.api.redact.shown`)."""
    return redact.shown(text, _SHOWN_MAX)


def check_bucket(bucket: str) -> str:
    """An S3 bucket name. Two rules are the models' only (no RE2 pattern says them): no
    ``..`` and not shaped like an IPv4 address."""
    if not BUCKET_RE.fullmatch(bucket) or ".." in bucket or _IPV4_RE.fullmatch(bucket):
        raise UriError(
            f"{shown(bucket)} is not a valid bucket name: use 3-63 lowercase letters, digits, "
            "dots or hyphens, starting and ending with a letter or digit (e.g. 'training-data')"
        )
    return bucket


def check_claim(claim: str) -> str:
    """A PersistentVolumeClaim name; its 253-character bound is the models' only."""
    if not _CLAIM_RE.fullmatch(claim) or len(claim) > 253:
        raise UriError(
            f"{shown(claim)} is not a valid PersistentVolumeClaim name: use lowercase "
            "letters, digits, '-' and '.' (e.g. pvc://training-data/photos)"
        )
    return claim


def check_revision(revision: str) -> str:
    """A Hub revision (see :data:`REVISION`)."""
    if not _REVISION_RE.fullmatch(revision):
        raise UriError(
            f"{shown(revision)} is not a branch, tag or commit: use a branch or tag name "
            "(letters, digits, '_', '-' and '.', parts separated by '/', not starting with "
            "'-', no '..', no part starting or ending with '.') or a commit hash, e.g. main, "
            "v1.0 or refs/pr/1"
        )
    return revision


def parse_uri(text: str, *, allowed: frozenset[Scheme] | set[Scheme]) -> Uri:
    """Parse ``text``; raise :class:`UriError` naming the schemes that ``allowed`` permits."""
    names = ", ".join(f"{s}://" for s in sorted(allowed))
    scheme, sep, rest = text.partition("://")
    if sep and _carries_credentials(scheme, rest.partition("/")[0]):
        raise UriError(  # never repeat the URI: what is before '@' is a secret
            "a URI cannot carry credentials (before '@'): put them in the Secret named in "
            "spec.storage.credentialsSecret"
        )
    if not sep or scheme not in Scheme.__members__.values():
        raise UriError(f"{shown(text)} is not a supported URI: use one of {names}")
    kind = Scheme(scheme)
    if kind not in allowed:
        hint = " (file:// is for local runs with `dreambooth train` only)" if kind is Scheme.FILE else ""
        raise UriError(f"{kind}:// cannot be used here{hint}: use one of {names}")
    if any(c.isspace() for c in text):
        raise UriError(f"{shown(text)} contains whitespace: URIs may not")
    if "?" in text or "#" in text:
        raise UriError(
            f"{shown(text)}: a storage URI must not have a query string or fragment ('?' or "
            f"'#'): use {EXAMPLES[kind]} without them"
        )
    if kind is Scheme.FILE:
        return _file_uri(text, rest)
    if kind is Scheme.HF:
        return _hf_uri(text, rest)
    authority, _, path = rest.partition("/")
    if kind is Scheme.S3:
        check_bucket(authority)
    else:
        check_claim(authority)
    _check_segments(text, kind, [s for s in path.split("/") if s])
    return Uri(kind, authority, path)


def _carries_credentials(scheme: str, authority: str) -> bool:
    """``user:key@`` before the host; in hf:// an ``@`` after the org/name is the revision."""
    if scheme == Scheme.HF:
        return ":" in authority.partition("@")[0] and "@" in authority
    return "@" in authority


def _check_segments(text: str, kind: Scheme, segments: list[str]) -> None:
    # whitespace, '?' and '#' are refused before: a segment SEGMENT refuses is '.' or '..'
    if not all(_SEGMENT_RE.fullmatch(s) for s in segments):
        raise UriError(
            f"{shown(text)}: a path must not contain '.' or '..' segments: use {EXAMPLES[kind]} without them"
        )


def _file_uri(text: str, rest: str) -> Uri:
    if rest.startswith("localhost/"):
        rest = rest.removeprefix("localhost")
    path = unquote(rest)
    if not path:
        raise UriError("file:// needs a path, e.g. file:///data/photos or file://./photos")
    segments = path.split("/")
    if segments[0] == ".":  # file://./photos: below the current directory
        segments = segments[1:]
    if any(s in (".", "..") for s in segments):
        raise UriError(
            f"{shown(text)}: a path must not contain '.' or '..' segments: use an absolute "
            "path (file:///data/photos) or one below the current directory (file://./photos)"
        )
    return Uri(Scheme.FILE, "", path)


def _hf_uri(text: str, rest: str) -> Uri:
    repo, at, revision = rest.partition("@")
    if not _HF_REPO_RE.fullmatch(repo) or (at and not revision):
        raise UriError(
            f"{shown(text)} is not a Hugging Face repository URI: use hf://org/name or "
            "hf://org/name@revision (e.g. hf://runwayml/stable-diffusion-v1-5@main)"
        )
    if at:
        try:
            check_revision(revision)
        except UriError as err:
            raise UriError(f"{shown(text)}: {err}") from None
    return Uri(Scheme.HF, repo, "", revision or None)
