"""The typed models and the generated CRD schema agree on every single-field constraint.

``kubectl apply`` is checked by the CRD schema; ``dreambooth validate``, the operator and
the trainer by the models. If the two drift, a job passes one and fails the other. For
every leaf of the spec schema (scalars, list items, list and map sizes) this file draws
values around and beyond its bounds, enums, lengths and patterns, puts each into a
minimal valid spec, and asserts that the CRD schema (validated by ``OAS30Validator``, the
OpenAPI 3.0 dialect of CRDs) and ``DreamBoothJobSpec`` accept or reject it together.
Cross-field rules are out of scope (``skip_rules``); see test_crd.py for those.

Deliberate limits of the comparison, each for a stated reason:

* Only type-correct values: the models run in pydantic's lax mode (``"5"`` for an integer
  is coerced) while the API server rejects wrong JSON types; nulls are left out too
  (the API server drops a null for a non-nullable field, the models refuse it).
* Characters: ASCII letters, digits, punctuation, space and tab plus a few non-ASCII
  letters. No other whitespace: ``\\s`` means different things in Go's RE2 (the API
  server; ASCII only, no ``\\v``), Python's re (``OAS30Validator``; also ``\\x1c-\\x1f``
  and Unicode spaces) and Rust's regex (pydantic). No newline: Python's ``$`` also
  matches before a final newline, RE2's and Rust's do not.
* NaN and infinities: not representable in JSON, so no manifest can carry them.
* URIs: the CRD's patterns are built from the regex sources ``dreambooth.api.uris`` parses
  with, and the candidates include what issue 13 refuses (``.``/``..`` segments, query
  strings, fragments, revisions that are no branch, tag or commit).
* Two S3 bucket-name rules and one PVC rule cannot be written as an RE2 pattern (no
  look-ahead, no length bound on a part of the URI): buckets with ``..`` or shaped like
  an IPv4 address, and claim names over 253 characters. For those the CRD is knowingly
  more lenient: the test asserts that the models reject them (the operator then marks
  the job InvalidSpec with the models' message) instead of asserting agreement.
"""

from __future__ import annotations

import copy
import math
import re
import string
from dataclasses import dataclass
from typing import Any, get_args, get_origin

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openapi_schema_validator import OAS30Validator
from pydantic import BaseModel, ValidationError

from dreambooth.api import DreamBoothJobSpec, crd
from dreambooth.api.spec import DATA_URI_PATTERN, MODEL_URI_PATTERN

SPEC_SCHEMA = crd.spec_schema()
CRD_VALIDATOR = OAS30Validator(SPEC_SCHEMA)

ALPHABET = string.ascii_letters + string.digits + string.punctuation + " \t" + "éß猫𝒳"

MINIMAL: dict[str, Any] = {
    "baseModel": {"uri": "s3://models/sd15/"},
    "instance": {"uri": "s3://training-data/toy-cat/", "prompt": "a photo of zwx toy cat"},
}
#: values for required fields of objects that a leaf's path has to create
REQUIRED = {
    ("training", "textualInversion", "placeholderToken"): "<zwx>",
    ("training", "textualInversion", "initializerToken"): "cat",
    ("storage", "credentialsSecret", "name"): "minio-credentials",
    ("resources", "env", "[]", "name"): "NCCL_DEBUG",
}
ITEM, VALUE = "[]", "{}"  # path parts for a list item and a map value


# --- walking the schema -------------------------------------------------------------------


@dataclass(frozen=True)
class Leaf:
    path: tuple[str, ...]
    schema: dict[str, Any]
    #: "scalar", or "size" for the number of items of a list / entries of a map
    kind: str = "scalar"

    @property
    def id(self) -> str:
        return ".".join(self.path) + ("#size" if self.kind == "size" else "")

    @property
    def type(self) -> str:
        return self.schema["type"]


def leaves(schema: dict[str, Any], path: tuple[str, ...] = ()) -> list[Leaf]:
    found = []
    for name, prop in schema.get("properties", {}).items():
        here = path + (name,)
        if prop["type"] == "array":
            found.append(Leaf(here, prop, "size"))
            item = prop["items"]
            found += leaves(item, here + (ITEM,)) if item["type"] == "object" else [Leaf(here + (ITEM,), item)]
        elif prop["type"] == "object":
            found += leaves(prop, here)
            if isinstance(prop.get("additionalProperties"), dict):
                found.append(Leaf(here, prop, "size"))
                found.append(Leaf(here + (VALUE,), prop["additionalProperties"]))
        else:
            found.append(Leaf(here, prop))
    return found


LEAVES = leaves(SPEC_SCHEMA)


def place(value: Any, path: tuple[str, ...]) -> dict[str, Any]:
    """A minimal valid spec with ``value`` at ``path`` (creating what the path needs)."""

    def build(schema: dict[str, Any], rest: tuple[str, ...], done: tuple[str, ...], existing):
        if not rest:
            return value
        head, tail = rest[0], rest[1:]
        if head == ITEM:
            return [build(schema["items"], tail, done + (head,), None)]
        if head == VALUE:
            return {"example.com/gpu": build(schema["additionalProperties"], tail, done, None)}
        obj = copy.deepcopy(existing) if existing is not None else {}
        for name in schema.get("required", []):
            obj.setdefault(name, REQUIRED.get(done + (name,)))
        obj[head] = build(schema["properties"][head], tail, done + (head,), obj.get(head))
        return obj

    return build(SPEC_SCHEMA, path, (), MINIMAL)


# --- the two judges -----------------------------------------------------------------------


def crd_accepts(spec: dict[str, Any]) -> bool:
    return CRD_VALIDATOR.is_valid(spec)


def model_accepts(spec: dict[str, Any]) -> bool:
    try:
        DreamBoothJobSpec.model_validate(spec, context={"cluster": True, "skip_rules": True})
    except ValidationError:
        return False
    return True


_IPV4 = re.compile(r"^\d+\.\d+\.\d+\.\d+$")


def known_gap(leaf: Leaf, value: Any) -> str | None:
    """Why the CRD may accept ``value`` where the models reject it (see the module doc)."""
    if not isinstance(value, str) or leaf.schema.get("pattern") not in URI_PATTERNS:
        return None
    scheme, _, rest = value.partition("://")
    authority = rest.partition("/")[0]
    if scheme == "s3" and (".." in authority or _IPV4.match(authority)):
        return "bucket name with '..' or shaped like an IPv4 address"
    if scheme == "pvc" and len(authority) > 253:
        return "PVC name longer than 253 characters"
    return None


def check(leaf: Leaf, value: Any) -> tuple[bool, bool]:
    spec = place(value, leaf.path)
    by_crd, by_model = crd_accepts(spec), model_accepts(spec)
    gap = known_gap(leaf, value)
    if gap:
        assert not by_model, f"{leaf.id}={value!r}: the models should reject a {gap}"
    else:
        assert by_crd == by_model, (
            f"{leaf.id}={value!r}: CRD {'accepts' if by_crd else 'rejects'}, models "
            f"{'accept' if by_model else 'reject'}\n"
            f"CRD: {[e.message for e in CRD_VALIDATOR.iter_errors(spec)][:3]}"
        )
    return by_crd, by_model


# --- values around each constraint -------------------------------------------------------


def _around(*bounds: int) -> list[int]:
    return [b + d for b in bounds for d in (-2, -1, 0, 1, 2)]


def int_candidates(s: dict[str, Any]) -> list[int]:
    lo, hi = s.get("minimum", -(2**31)), s.get("maximum", 2**31)
    values = _around(lo, hi) + [0, -1, (lo + hi) // 2, hi * 2 + 1, lo - 1000]
    if "multipleOf" in s:
        m = s["multipleOf"]
        values += [k * m + d for k in (lo // m, lo // m + 1, hi // m, hi // m + 1) for d in (-1, 0, 1)]
    return sorted(set(values))


def float_candidates(s: dict[str, Any]) -> list[float]:
    lo, hi = float(s.get("minimum", -1e9)), float(s.get("maximum", 1e9))
    values = [0.0, -0.0, (lo + hi) / 2, lo - 1, hi + 1, hi * 10]
    for b in (lo, hi):
        values += [b, math.nextafter(b, -math.inf), math.nextafter(b, math.inf), b - 1e-9, b + 1e-9]
    ints = [int(lo) - 1, int(lo), int(lo) + 1, int(hi) - 1, int(hi), int(hi) + 1]
    return values + ints  # JSON numbers without a fraction arrive as ints


def _filler(pattern: str | None):
    """A way to make a string of any length n that matches ``pattern`` (None if none)."""
    if pattern is None:
        return lambda n: "x" * n
    for prefix, char in [("", "a"), ("", "1"), ("", "x"), ("a/", "b"), ("s3://bucket/", "a")]:
        make = lambda n, p=prefix, c=char: p + c * max(0, n - len(p))
        if all(re.fullmatch(pattern, make(n)) for n in (len(prefix) + 1, len(prefix) + 5, 300)):
            return make
    return None


def length_candidates(s: dict[str, Any]) -> list[str]:
    make = _filler(s.get("pattern"))
    if make is None:
        return []
    lo, hi = s.get("minLength", 0), s.get("maxLength")
    lengths = [0, 1, lo - 1, lo, lo + 1] + ([hi - 1, hi, hi + 1] if hi else [2000])
    return [make(n) for n in sorted({n for n in lengths if n >= 0})]


NEAR_MISSES = {
    # quantities
    "8Gi": ["8 Gi", "8GB", "8gi", "-1", "1e3", ".5", "1.", "0.5", "+1", "1Ki1", "64Mi", "100m"],
    # DNS names
    "minio-credentials": ["Minio", "-minio", "minio-", "mi_nio", "mi..nio", "a", "a.b", "a-.b"],
    # host[:port]
    "minio.minio.svc:9000": [
        "minio:",
        "minio:123456",
        "http://minio",
        "minio:9000/x",
        "MINIO.svc",
        "10.0.0.1:80",
        "minio svc",
        "[::1]:9000",
    ],
    # extended resource names
    "nvidia.com/gpu": [
        "gpu",
        "nvidia.com/",
        "/gpu",
        "Nvidia.com/gpu",
        "amd.com/gpu",
        "nvidia.com/mig-3g.20gb",
        "a/b/c",
        "nvidia.com/gpu_1",
    ],
    # tolerations
    "Equal": ["Exists", "equal", "In", "", "Equal "],
    "NoSchedule": ["PreferNoSchedule", "NoExecute", "noschedule", "Never", "", "NoSchedule "],
    # tokens
    "<zwx>": ["<z wx>", "z\twx", "cat", " ", "", "猫", "a" * 64, "a" * 65],
}

_S3_BUCKETS = [
    "abc",
    "training-data",
    "my.bucket.name",
    "a" * 63,
    "a1-b2.c3",
    "ab",
    "a" * 64,
    "Bucket",
    "my_bucket",
    "-abc",
    "abc-",
    ".abc",
    "abc.",
    "a b",
    "",
    "my..bucket",
    "192.168.0.1",
    "1.2.3.4",
    "1.2.3",
]
_PVC_CLAIMS = [
    "data",
    "a",
    "a.b",
    "a-b.c-d",
    "x" * 253,
    "x" * 254,
    "Data",
    "a_b",
    "-a",
    "a-",
    "a..b",
    "a.-b",
    "a-.b",
    ".a",
    "a.",
    "",
]
_HF_REPOS = [
    "org/name",
    "Org-1/Name_2.x",
    "a/b",
    "name",
    "org/",
    "/name",
    "org/name/x",
    "-org/name",
    "org/.name",
    "org//name",
]
_REVISIONS = [
    "",
    "@main",
    "@refs/pr/1",
    "@v1.0",
    "@a@b",
    "@",
    "@rev with space",
    "@v1..0",
    "@.x",
    "@x.",
    "@-x",
    "@_x",
    "@a//b",
    "@a/",
    "@/a",
    "@main~1",
    "@" + "0" * 40,
]
_PATHS = [
    "",
    "/",
    "/prefix/",
    "/a/b/c.png",
    "/with space",
    "/tab\there",
    "//double",
    "/ünï",
    "/a/../b",
    "/./x",
    "/x/.",
    "/..",
    "/...",
    "/.cache/x",
    "/a..b",
    "/x?versionId=1",
    "/x#frag",
    "/?",
    "/%2e%2e/x",
]
_OTHER_URIS = [
    "file:///data",
    "file://./photos",
    "gs://bucket/x",
    "https://host/x",
    "S3://bucket/x",
    "s3:/bucket/x",
    "s3//bucket",
    "",
    "bucket/x",
    "s3://",
    "pvc://",
    "hf://",
    " s3://bucket/",
]


def uri_candidates() -> list[str]:
    out = [f"s3://{b}{p}" for b in _S3_BUCKETS for p in ("/", "/cat/", "")]
    out += [f"pvc://{c}{p}" for c in _PVC_CLAIMS for p in ("/", "/photos", "")]
    out += [f"hf://{r}{v}" for r in _HF_REPOS for v in _REVISIONS]
    out += [f"s3://bucket{p}" for p in _PATHS] + [f"pvc://claim{p}" for p in _PATHS]
    out += [f"s3://bucket/{'a' * (n - 12)}" for n in (1023, 1024, 1025)]
    return out + _OTHER_URIS


URI_PATTERNS = {DATA_URI_PATTERN, MODEL_URI_PATTERN}


def string_candidates(s: dict[str, Any]) -> list[str]:
    if "enum" in s:
        members = s["enum"]
        others = [m.upper() for m in members] + [m + " " for m in members] + ["", "bogus"]
        return members + [o for o in others if o not in members]
    if s.get("pattern") in URI_PATTERNS:
        return uri_candidates()
    values = length_candidates(s) + ["", " ", "x", "é" * 3, "𝒳"]
    default = s.get("default")
    for key, misses in NEAR_MISSES.items():
        if (default == key) or re.fullmatch(s.get("pattern") or "(?!)", key):
            values += [key, *misses]
    return values


def size_candidates(leaf: Leaf) -> list[Any]:
    s = leaf.schema
    lo = s.get("minItems", s.get("minProperties", 0))
    hi = s.get("maxItems", s.get("maxProperties"))
    sample = valid_sample(items_leaf(leaf))
    counts = sorted({n for n in [0, 1, lo - 1, lo, lo + 1, hi - 1, hi, hi + 1] if n >= 0})
    if s["type"] == "array":
        return [[copy.deepcopy(sample) for _ in range(n)] for n in counts]
    return [{f"example.com/key-{i}": sample for i in range(n)} for n in counts]


def items_leaf(leaf: Leaf) -> Leaf:
    s = leaf.schema
    return (
        Leaf(leaf.path + (ITEM,), s["items"])
        if s["type"] == "array"
        else Leaf(leaf.path + (VALUE,), s["additionalProperties"])
    )


def valid_sample(leaf: Leaf) -> Any:
    if leaf.type == "object":
        return {}
    return next(v for v in candidates(leaf) if model_accepts(place(v, leaf.path)))


def candidates(leaf: Leaf) -> list[Any]:
    if leaf.kind == "size":
        return size_candidates(leaf)
    s = leaf.schema
    return {
        "integer": lambda: int_candidates(s),
        "number": lambda: float_candidates(s),
        "boolean": lambda: [True, False],
        "string": lambda: string_candidates(s),
    }[leaf.type]()


# --- hypothesis strategies ----------------------------------------------------------------


def _mutated(valid: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """Near misses of valid strings: one character inserted, replaced or removed."""

    def edit(args):
        text, pos, char, how = args
        pos = pos % (len(text) + 1)
        if how == "insert":
            return text[:pos] + char + text[pos:]
        if how == "replace" and text:
            return text[:pos] + char + text[pos + 1 :]
        return text[:pos] + text[pos + 1 :]

    return st.tuples(
        valid,
        st.integers(0, 2000),
        st.sampled_from(list(" _/:A.-@#é9")),
        st.sampled_from(["insert", "replace", "delete"]),
    ).map(edit)


def uri_strategy() -> st.SearchStrategy[str]:
    bucket = st.from_regex(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", fullmatch=True)
    claim = st.from_regex(r"[a-z0-9]([-a-z0-9.]{0,30}[a-z0-9])?", fullmatch=True)
    repo = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,10}/[A-Za-z0-9][A-Za-z0-9._-]{0,10}", fullmatch=True)
    path = st.sampled_from(_PATHS) | st.text(ALPHABET, max_size=20).map(lambda t: "/" + t)
    valid = (
        st.tuples(st.just("s3://"), bucket, path).map("".join)
        | st.tuples(st.just("pvc://"), claim, path).map("".join)
        | st.tuples(st.just("hf://"), repo, st.sampled_from(_REVISIONS)).map("".join)
    )
    return valid | _mutated(valid) | st.sampled_from(uri_candidates())


def string_strategy(s: dict[str, Any]) -> st.SearchStrategy[str]:
    if s.get("pattern") in URI_PATTERNS:
        return uri_strategy()
    lo, hi = s.get("minLength", 0), s.get("maxLength", 300)
    text = st.text(ALPHABET, min_size=max(0, lo - 2), max_size=hi + 2)
    if "enum" in s:
        return st.sampled_from(string_candidates(s)) | text
    if "pattern" in s:
        valid = st.from_regex(s["pattern"], fullmatch=True, alphabet=ALPHABET)
        return valid | _mutated(valid) | text | st.sampled_from(string_candidates(s))
    return text | st.sampled_from(string_candidates(s))


def number_strategy(s: dict[str, Any]) -> st.SearchStrategy[float]:
    lo, hi = float(s.get("minimum", -1e9)), float(s.get("maximum", 1e9))
    width = max(1.0, hi - lo)
    return (
        st.floats(lo - width / 10, hi + width / 10, allow_nan=False, allow_infinity=False)
        | st.floats(lo - 1e-6, lo + 1e-6)
        | st.floats(hi - 1e-6, hi + 1e-6)
        | st.integers(math.floor(lo) - 3, math.ceil(hi) + 3)
        | st.sampled_from(float_candidates(s))
    )


def int_strategy(s: dict[str, Any]) -> st.SearchStrategy[int]:
    lo, hi = s.get("minimum", -(2**31)), s.get("maximum", 2**31)
    return (
        st.integers(lo - 5, lo + 5)
        | st.integers(hi - 5, hi + 5)
        | st.integers(lo - 10, hi + 10)
        | st.integers(-(2**63), 2**63)
        | st.sampled_from(int_candidates(s))
    )


def size_strategy(leaf: Leaf) -> st.SearchStrategy[Any]:
    s = leaf.schema
    hi = s.get("maxItems", s.get("maxProperties", 10))
    item_leaf = items_leaf(leaf)
    item = (
        st.just(valid_sample(item_leaf))
        if item_leaf.type == "object"
        else (st.sampled_from([v for v in candidates(item_leaf) if model_accepts(place(v, item_leaf.path))]))
    )
    if s["type"] == "array":
        return st.lists(item, max_size=hi + 3)
    return st.dictionaries(
        st.from_regex(r"[a-z]{1,8}(\.[a-z]{2,4}/[a-z]{1,8})?", fullmatch=True), item, max_size=hi + 3
    )


_STRATEGIES: dict[str, st.SearchStrategy[Any]] = {}


def strategy(leaf: Leaf) -> st.SearchStrategy[Any]:
    if leaf.id not in _STRATEGIES:
        _STRATEGIES[leaf.id] = _strategy(leaf)
    return _STRATEGIES[leaf.id]


def _strategy(leaf: Leaf) -> st.SearchStrategy[Any]:
    if leaf.kind == "size":
        return size_strategy(leaf)
    s = leaf.schema
    return {
        "integer": lambda: int_strategy(s),
        "number": lambda: number_strategy(s),
        "boolean": lambda: st.booleans(),
        "string": lambda: string_strategy(s),
    }[leaf.type]()


# --- the tests -----------------------------------------------------------------------------


def test_the_walk_finds_every_kind_of_leaf():
    ids = {leaf.id for leaf in LEAVES}
    for expected in [
        "preset",
        "training.steps",
        "training.learningRate",
        "training.resolution",
        "training.lora.dropout",
        "training.textualInversion.placeholderToken",
        "validation.prompts#size",
        "validation.prompts.[]",
        "output.formats.[]",
        "resources.tolerations.[].effect",
        "resources.nodeSelector#size",
        "resources.nodeSelector.{}",
        "storage.credentialsSecret.name",
        "instance.uri",
        "baseModel.uri",
        "runPolicy.ttlSecondsAfterFinished",
        "resources.env.[].name",
        "resources.env.[].value",
        "resources.env#size",
        "resources.extraResources.{}",
        "resources.extraResources#size",
    ]:
        assert expected in ids
    assert len(LEAVES) >= 70


def test_every_model_field_is_in_the_crd():
    """A field the models know but the CRD lacks would be pruned by the API server."""

    def is_model(a) -> bool:
        return isinstance(a, type) and issubclass(a, BaseModel)

    def model_paths(model, prefix=()):
        for name, f in model.model_fields.items():
            here = prefix + (f.alias or name,)
            ann = f.annotation
            options = [a for a in get_args(ann) if a is not type(None)] or [ann]
            if get_origin(ann) is list and is_model(get_args(ann)[0]):
                yield from model_paths(get_args(ann)[0], here + (ITEM,))
            elif len(options) == 1 and is_model(options[0]):
                yield from model_paths(options[0], here)
            else:
                yield here

    crd_paths = {leaf.path for leaf in LEAVES} | {leaf.path[:-1] for leaf in LEAVES if leaf.path[-1] in (ITEM, VALUE)}
    missing = [".".join(p) for p in model_paths(DreamBoothJobSpec) if p not in crd_paths]
    assert missing == []


@pytest.mark.parametrize("leaf", LEAVES, ids=lambda leaf: leaf.id)
def test_boundary_values_agree(leaf: Leaf):
    """Every hand-picked value around the leaf's constraints, exhaustively."""
    verdicts = [check(leaf, value) for value in candidates(leaf)]
    assert (True, True) in verdicts, f"{leaf.id}: no candidate is valid; the builder is wrong"
    constrained = set(leaf.schema) & {
        "minimum",
        "maximum",
        "enum",
        "pattern",
        "minLength",
        "maxLength",
        "minItems",
        "maxItems",
        "maxProperties",
        "multipleOf",
    }
    if constrained:
        assert (False, False) in verdicts, f"{leaf.id}: no candidate breaks {constrained}"


@pytest.mark.parametrize("leaf", LEAVES, ids=lambda leaf: leaf.id)
@settings(
    max_examples=100,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
@given(data=st.data())
def test_models_and_crd_accept_the_same_values(leaf: Leaf, data):
    check(leaf, data.draw(strategy(leaf), label=leaf.id))
