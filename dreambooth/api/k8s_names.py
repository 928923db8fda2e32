"""The Kubernetes object rules that the API server applies to what a job puts into the pods
the operator creates, as regex sources and as words.

One place for the grammars: the models validate with them (:mod:`dreambooth.api.spec`,
:mod:`dreambooth.api.job`), the CRD's patterns are the same strings
(:mod:`dreambooth.api.crd`), and :data:`WORDS` says for each pattern what to write, so no
message quotes a regex. The sources follow k8s.io/apimachinery's validation
(``IsQualifiedName``, ``IsValidLabelValue``, ``IsDNS1123Label``/``Subdomain``,
``IsConfigMapKey``, ``IsValidPortNum``), resource.Quantity, and the distribution
project's image reference grammar. They are written for RE2 (the API server) and Python's
``re`` alike: no look-around, no back-references, no ``\\w``/``\\s`` (their meaning differs).
"""

from __future__ import annotations

import re

from dreambooth.api.uris import DNS1123

#: RFC 1123 DNS label: a namespace, a Service, a pod's hostname (at most 63 characters)
DNS_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
DNS_LABEL_MAX = 63
#: RFC 1123 DNS subdomain: most object names (Secrets, PriorityClasses), label-key prefixes
DNS_SUBDOMAIN = DNS1123
DNS_SUBDOMAIN_MAX = 253
#: a label value (also a nodeSelector value, a toleration value): empty, or at most 63
#: letters, digits, '-', '_' and '.', starting and ending with a letter or digit
LABEL_VALUE = r"(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?"
LABEL_VALUE_MAX = 63
#: a qualified name: a label or annotation key, a nodeSelector key, a taint key;
#: ``[prefix/]name``, the prefix a DNS subdomain (at most 253), the name like a label value
#: but not empty
_QUALIFIED_PART = r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
QUALIFIED_NAME = rf"({DNS_SUBDOMAIN}/)?{_QUALIFIED_PART}"
QUALIFIED_NAME_MAX = DNS_SUBDOMAIN_MAX + 1 + 63
#: a Secret or ConfigMap key: letters, digits, '-', '_', '.'; not '.', '..' or '..'-prefixed
SECRET_KEY = r"\.?[-_A-Za-z0-9][-._A-Za-z0-9]*"
SECRET_KEY_MAX = 253
#: a TCP port: 1-65535
PORT = r"([1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])"
#: host[:port] of a service: DNS names (any case) or IPv4 addresses
_HOST_PART = r"[A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?"
ENDPOINT = rf"{_HOST_PART}(\.{_HOST_PART})*(:{PORT})?"
#: a resource.Quantity as pods take them: a plain number and an optional SI or binary suffix
QUANTITY = r"[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?"

# --- image references (github.com/distribution/reference's grammar) ----------------------
_DOMAIN_PART = r"([A-Za-z0-9]|[A-Za-z0-9][-A-Za-z0-9]*[A-Za-z0-9])"
_DOMAIN = rf"({_DOMAIN_PART}(\.{_DOMAIN_PART})*|\[[0-9A-Fa-f:]+\])(:[0-9]+)?"
_PATH_PART = r"[a-z0-9]+(([_.]|__|-+)[a-z0-9]+)*"
_TAG = r"[A-Za-z0-9_][-A-Za-z0-9_.]{0,127}"
_DIGEST = r"[A-Za-z][A-Za-z0-9]*([-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}"
#: ``[registry[:port]/]path[:tag][@digest]``, e.g. ghcr.io/org/trainer:1.2 or
#: registry:5000/trainer@sha256:<64 hex digits>; never a command line
IMAGE = rf"({_DOMAIN}/)?{_PATH_PART}(/{_PATH_PART})*(:{_TAG})?(@{_DIGEST})?"
IMAGE_MAX = 512

# --- prompts -------------------------------------------------------------------------------
#: C0 and C1 control characters (newlines and tabs included) and DEL
_CONTROL = "\\x00-\\x1f\\x7f-\\x9f"
#: Unicode spaces: a prompt of only these is blank
_SPACES = " \u00a0\u1680\u2000-\u200b\u2028\u2029\u202f\u205f\u3000\ufeff"
#: at least one visible character, no control characters
PROMPT = f"[^{_CONTROL}]*[^{_CONTROL}{_SPACES}][^{_CONTROL}]*"
#: the same without the visible character (a negative prompt may be empty)
TEXT = f"[^{_CONTROL}]*"


def anchored(source: str) -> str:
    """A CRD ``pattern`` (the API server searches, so it is anchored)."""
    return f"^{source}$"


#: What each pattern means, in words, for messages (pydantic's would quote the regex).
WORDS: dict[str, str] = {
    anchored(DNS_LABEL): "use a DNS label: at most 63 lowercase letters, digits and '-', "
    "starting and ending with a letter or digit (e.g. team-a)",
    anchored(DNS_SUBDOMAIN): "use a Kubernetes object name: lowercase letters, digits, '-' and "
    "'.', starting and ending with a letter or digit (e.g. minio-credentials)",
    anchored(LABEL_VALUE): "use a label value: at most 63 letters, digits, '-', '_' and '.', "
    "starting and ending with a letter or digit, or empty",
    anchored(QUALIFIED_NAME): "use a label key: name or prefix/name, the name at most 63 "
    "letters, digits, '-', '_' and '.' starting and ending with a letter or digit, the prefix "
    "a DNS name (e.g. nvidia.com/gpu.product)",
    anchored(SECRET_KEY): "use a Secret key: letters, digits, '-', '_' and '.', not '.' or '..' "
    "and not starting with '..' (e.g. AWS_SECRET_ACCESS_KEY)",
    anchored(ENDPOINT): "use host or host:port with a port from 1 to 65535 and no scheme (e.g. minio.minio.svc:9000)",
    anchored(QUANTITY): "use a Kubernetes quantity such as 64Gi, 512Mi or 8 (a number, then "
    "optionally one of m, k, M, G, T, P, E, Ki, Mi, Gi, Ti, Pi, Ei; no space, no 'B')",
    anchored(IMAGE): "use an image reference such as ghcr.io/org/trainer:1.2 or "
    "registry:5000/trainer@sha256:<digest>: [registry[:port]/]lowercase-path[:tag][@digest], "
    "no spaces or shell syntax",
    anchored(PROMPT): "write words: a prompt must not be blank and must not contain control "
    "characters (newlines, tabs, escape codes)",
    anchored(TEXT): "must not contain control characters (newlines, tabs, escape codes)",
}

_QUALIFIED_RE = re.compile(QUALIFIED_NAME)
_LABEL_VALUE_RE = re.compile(LABEL_VALUE)


def words(pattern: str) -> str | None:
    """What ``pattern`` (a CRD/model pattern) asks for, in words; None if not known."""
    return WORDS.get(pattern)


def qualified_name_problem(key: str) -> str | None:
    """Why ``key`` is no label key / nodeSelector key (``IsQualifiedName``); None: it is one."""
    prefix, slash, _name = key.rpartition("/")
    if len(prefix) > DNS_SUBDOMAIN_MAX or not _QUALIFIED_RE.fullmatch(key) or (slash and not prefix):
        return "is not a label key: " + WORDS[anchored(QUALIFIED_NAME)].removeprefix("use a label key: ")
    return None


def label_value_problem(value: str) -> str | None:
    if len(value) > LABEL_VALUE_MAX or not _LABEL_VALUE_RE.fullmatch(value):
        return "is not a label value: " + WORDS[anchored(LABEL_VALUE)].removeprefix("use a label value: ")
    return None


def optional(source: str) -> str:
    """``source`` or the empty string."""
    return f"({source})?"


def say(pattern: str, text: str) -> str:
    """Register what ``pattern`` (anchored) asks for, for fields whose pattern is defined
    elsewhere; returns the pattern."""
    WORDS[pattern] = text
    return pattern


say(anchored(optional(QUALIFIED_NAME)), WORDS[anchored(QUALIFIED_NAME)] + ", or empty")
