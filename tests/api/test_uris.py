"""Every URI goes through one parser (dreambooth.api.uris), and the models and the CRD
accept the same ones: a table of URIs accepted (with what they parse to) and refused (with
what the message tells the user to write), each checked against the parser, the typed
models and the generated CRD's schema, whose patterns also compile in RE2 (the API server's
regex engine) and mean there what they mean in Python."""

from __future__ import annotations

from typing import Any

import pytest
import re2
from openapi_schema_validator import OAS30Validator

from dreambooth.api import SpecError, crd, validate_spec
from dreambooth.api.spec import DATA_URI_PATTERN, MODEL_URI_PATTERN, REVISION_PATTERN
from dreambooth.api.uris import Scheme, Uri, UriError, parse_uri
from tests.support.jobs import DROP, make_job

ALL = frozenset(Scheme)
CRD = OAS30Validator(crd.spec_schema())
COMMIT = "0123456789abcdef0123456789abcdef01234567"

ACCEPTED = [
    ("s3://training-data/cat/", Uri(Scheme.S3, "training-data", "cat/")),
    ("s3://my.bucket-1", Uri(Scheme.S3, "my.bucket-1", "")),
    ("s3://bucket/a//b/", Uri(Scheme.S3, "bucket", "a//b/")),  # the storage drops empty parts
    ("s3://bucket/.cache/class-images/", Uri(Scheme.S3, "bucket", ".cache/class-images/")),
    ("s3://bucket/.../x", Uri(Scheme.S3, "bucket", ".../x")),  # three dots: just a name
    ("s3://bucket/a..b/v1.0./", Uri(Scheme.S3, "bucket", "a..b/v1.0./")),
    ("s3://bucket/a@b/k=v;x/%2e%2e", Uri(Scheme.S3, "bucket", "a@b/k=v;x/%2e%2e")),  # keys are literal
    ("s3://bucket/ünï/猫.png", Uri(Scheme.S3, "bucket", "ünï/猫.png")),
    ("pvc://training-data/photos", Uri(Scheme.PVC, "training-data", "photos")),
    ("pvc://a.b-c/x/", Uri(Scheme.PVC, "a.b-c", "x/")),
    ("hf://runwayml/stable-diffusion-v1-5", Uri(Scheme.HF, "runwayml/stable-diffusion-v1-5", "")),
    ("hf://org/sd15@main", Uri(Scheme.HF, "org/sd15", "", "main")),
    ("hf://org/sd15@v1.0", Uri(Scheme.HF, "org/sd15", "", "v1.0")),
    ("hf://org/sd15@refs/pr/1", Uri(Scheme.HF, "org/sd15", "", "refs/pr/1")),
    (f"hf://org/sd15@{COMMIT}", Uri(Scheme.HF, "org/sd15", "", COMMIT)),
    ("hf://org/sd15@gptq-4bit_32g.actorder_True", Uri(Scheme.HF, "org/sd15", "", "gptq-4bit_32g.actorder_True")),
    ("file:///data/photos", Uri(Scheme.FILE, "", "/data/photos")),
    ("file://./photos", Uri(Scheme.FILE, "", "./photos")),
    ("file://photos/cat", Uri(Scheme.FILE, "", "photos/cat")),
    ("file://localhost/data", Uri(Scheme.FILE, "", "/data")),  # RFC 8089
    ("file:///home/Jos%C3%A9/my%20photos", Uri(Scheme.FILE, "", "/home/José/my photos")),
    ("file:///", Uri(Scheme.FILE, "", "/")),
]

DOTS = "must not contain '.' or '..' segments: use {} without them"
QUERY = "must not have a query string or fragment ('?' or '#'): use {} without them"
REVISION = "is not a branch, tag or commit: use a branch or tag name"
LOCAL = "use an absolute path (file:///data/photos) or one below the current directory"
CREDENTIALS = "cannot carry credentials (before '@'): put them in the Secret named in spec.storage"

REFUSED = [
    ("s3://bucket/a/../b", DOTS.format("s3://bucket/prefix")),
    ("s3://bucket/./a", DOTS.format("s3://bucket/prefix")),
    ("s3://bucket/a/.", DOTS.format("s3://bucket/prefix")),
    ("s3://bucket/..", DOTS.format("s3://bucket/prefix")),
    ("pvc://claim/../other-claim/x", DOTS.format("pvc://claim/path")),
    ("pvc://claim/a/./b/", DOTS.format("pvc://claim/path")),
    ("s3://bucket/x?versionId=1", QUERY.format("s3://bucket/prefix")),
    ("s3://bucket/x#frag", QUERY.format("s3://bucket/prefix")),
    ("s3://bucket?x", QUERY.format("s3://bucket/prefix")),
    ("pvc://claim/x#y", QUERY.format("pvc://claim/path")),
    ("hf://org/sd15?revision=main", QUERY.format("hf://org/name@revision")),
    ("hf://org/sd15#main", QUERY.format("hf://org/name@revision")),
    ("file:///data/x?y", QUERY.format("file:///path")),
    ("file:///data/../etc", LOCAL),
    ("file://../photos", LOCAL),
    ("file://./a/./b", LOCAL),
    ("file:///data/%2e%2e/etc", LOCAL),  # file:// paths are decoded, then checked
    ("hf://org/sd15@v1..0", REVISION),
    ("hf://org/sd15@.hidden", REVISION),
    ("hf://org/sd15@main.", REVISION),
    ("hf://org/sd15@-rf", REVISION),
    ("hf://org/sd15@a//b", REVISION),
    ("hf://org/sd15@a/", REVISION),
    ("hf://org/sd15@/a", REVISION),
    ("hf://org/sd15@main~1", REVISION),
    ("hf://org/sd15@HEAD^", REVISION),
    ("hf://org/sd15@a@b", REVISION),
    ("hf://org/sd15@a:b", REVISION),
    ("hf://org/sd15@rev*", REVISION),
    ("hf://org/sd15@", "use hf://org/name or hf://org/name@revision"),
    ("hf://sd15", "use hf://org/name or hf://org/name@revision"),
    ("s3://AKIA:topsecret@bucket/x", CREDENTIALS),
    ("s3://topsecret@bucket/x", CREDENTIALS),
    ("hf://user:topsecret@org/name", CREDENTIALS),
    ("https://user:topsecret@host/x", CREDENTIALS),
    ("s3://Bad_Bucket/x", "'Bad_Bucket' is not a valid bucket name: use 3-63 lowercase"),
    ("s3://ab/x", "'ab' is not a valid bucket name"),
    ("gs://bucket/x", "'gs://bucket/x' is not a supported URI: use one of file://, hf://"),
    ("/data/x", "is not a supported URI"),
    ("s3://bucket/my cat/", "contains whitespace"),
    ("file://", "file:// needs a path"),
    # rules no RE2 pattern can say: the models refuse these, the CRD lets them through
    ("s3://192.168.0.1/x", "'192.168.0.1' is not a valid bucket name"),
    ("s3://my..bucket/x", "'my..bucket' is not a valid bucket name"),
    ("pvc://" + "a" * 254 + "/x", "is not a valid PersistentVolumeClaim name"),
]
MODELS_ONLY = {"s3://192.168.0.1/x", "s3://my..bucket/x", "pvc://" + "a" * 254 + "/x"}


def spec_with_model(uri: str, revision: str | None = None) -> dict[str, Any]:
    base: dict[str, Any] = {"uri": uri} | ({"revision": revision} if revision is not None else {})
    return make_job(baseModel=base)["spec"]


def model_issue(spec: dict[str, Any], *, cluster: bool, path: str) -> str | None:
    """The models' message at ``path`` (None: the spec is valid)."""
    try:
        validate_spec(spec, cluster=cluster)
    except SpecError as err:
        by_path = {i.path: i.message for i in err.issues}
        assert path in by_path, str(err)
        return by_path[path]
    return None


def test_the_tables_are_big_enough_and_without_repeats():
    uris = [u for u, _ in ACCEPTED] + [u for u, _ in REFUSED]
    assert len(uris) == len(set(uris)) >= 60


@pytest.mark.parametrize(("text", "expected"), ACCEPTED, ids=[u for u, _ in ACCEPTED])
def test_accepted(text: str, expected: Uri):
    uri = parse_uri(text, allowed=ALL)
    assert uri == expected
    assert parse_uri(str(uri), allowed=ALL) == uri  # str() is a canonical form
    if uri.scheme is Scheme.FILE:  # outside a cluster only
        assert model_issue(spec_with_model(text), cluster=False, path="spec.baseModel.uri") is None
        assert not CRD.is_valid(spec_with_model(text))
    else:
        assert model_issue(spec_with_model(text), cluster=True, path="spec.baseModel.uri") is None
        assert CRD.is_valid(spec_with_model(text))


@pytest.mark.parametrize(("text", "says"), REFUSED, ids=[u[:60] for u, _ in REFUSED])
def test_refused(text: str, says: str):
    with pytest.raises(UriError) as info:
        parse_uri(text, allowed=ALL)
    message = str(info.value)
    assert says in message
    assert "topsecret" not in message
    cluster = not text.startswith("file:")
    in_models = model_issue(spec_with_model(text), cluster=cluster, path="spec.baseModel.uri")
    assert in_models is not None and "topsecret" not in in_models
    if cluster and not text.startswith(("gs:", "https:", "/")):
        assert says in in_models
    assert CRD.is_valid(spec_with_model(text)) is (text in MODELS_ONLY)


def test_messages_say_what_to_write_in_words_and_quote_little():
    for text, _ in REFUSED:
        with pytest.raises(UriError) as info:
            parse_uri(text, allowed=ALL)
        assert "[a-z" not in str(info.value) and "pattern" not in str(info.value)
    with pytest.raises(UriError) as info:
        parse_uri("gs://" + "x" * 5000, allowed=ALL)
    assert len(str(info.value)) < 300


@pytest.mark.parametrize("revision", ["main", "v1.0", "refs/pr/1", COMMIT, "fp16", "release_2.1-rc"])
def test_a_revision_field_takes_a_branch_tag_or_commit(revision: str):
    spec = spec_with_model("hf://org/sd15", revision)
    assert model_issue(spec, cluster=True, path="spec.baseModel.revision") is None
    assert CRD.is_valid(spec)


@pytest.mark.parametrize("revision", ["../main", "-rf", "main~1", "a b", "", "v1..0", "x" * 129])
def test_a_revision_field_refuses_what_is_not_one(revision: str):
    spec = spec_with_model("hf://org/sd15", revision)
    message = model_issue(spec, cluster=True, path="spec.baseModel.revision")
    assert message is not None and "pattern" not in message
    assert len(revision) > 128 or REVISION in message
    assert not CRD.is_valid(spec)


def test_the_crd_patterns_mean_the_same_in_re2():
    """The API server evaluates the CRD's patterns with RE2 (Go's regexp): each compiles
    there and gives every URI of the tables the verdict Python's re gives."""
    import re

    samples = [u for u, _ in ACCEPTED + REFUSED]
    for pattern in (DATA_URI_PATTERN, MODEL_URI_PATTERN, REVISION_PATTERN):
        compiled = re2.compile(pattern)
        for text in samples + [u.partition("@")[2] for u in samples]:
            assert bool(compiled.search(text)) is bool(re.search(pattern, text)), (pattern, text)


def test_schemes_a_place_does_not_take_are_named():
    with pytest.raises(UriError, match=r"pvc:// cannot be used here: use one of file://, s3://"):
        parse_uri("pvc://claim/x", allowed={Scheme.S3, Scheme.FILE})
    with pytest.raises(UriError, match="file:// is for local runs"):
        parse_uri("file:///x", allowed={Scheme.S3})


def test_a_trainer_configs_uris_go_through_the_parser():
    """The output and class-cache prefixes the trainer writes to are URIs like the spec's."""
    from pydantic import ValidationError

    from dreambooth.api import build_trainer_config, validate_job
    from dreambooth.api.config import Defaults, TrainerConfig

    doc = make_job()
    wire = build_trainer_config(validate_job(doc), Defaults(output_root="s3://outputs")).wire()
    assert TrainerConfig.model_validate(wire).class_cache_uri == "s3://outputs/.cache/class-images/"
    for field, bad, says in [
        ("outputUri", "s3://outputs/../x/", "'.' or '..' segments"),
        ("classCacheUri", "hf://org/cache", "hf:// cannot be used here"),
        ("outputUri", "s3://outputs/x/?v=1", "query string"),
    ]:
        with pytest.raises(ValidationError, match=says):
            TrainerConfig.model_validate({**wire, field: bad})


def test_dreambooth_train_makes_relative_file_uris_absolute(tmp_path):
    from dreambooth.api import validate_job
    from dreambooth.local import absolute_file_uris

    doc = make_job(
        metadata={"namespace": DROP},
        baseModel={"uri": "file://./models/sd15"},
        instance={"uri": "file://photos/toy-cat/"},
        output={"uri": "file:///runs/toy-cat/"},
    )
    fixed = absolute_file_uris(validate_job(doc), tmp_path).spec
    assert fixed.base_model.uri == (tmp_path / "models" / "sd15").as_uri()
    assert fixed.instance.uri == (tmp_path / "photos" / "toy-cat").as_uri() + "/"
    assert fixed.output.uri == "file:///runs/toy-cat/"
