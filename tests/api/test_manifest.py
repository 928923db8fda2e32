"""Manifest files read as kubectl reads them: numbers, booleans and keys as go-yaml resolves
them, duplicates refused, encodings and bombs stopped with a message naming the file and
line; ``dreambooth validate`` never shows a traceback."""

from __future__ import annotations

import time

import pytest

from dreambooth.api import manifest
from dreambooth.api.exitcodes import ExitCode
from dreambooth.api.manifest import ManifestError
from dreambooth.cli import main

JOB = """\
apiVersion: dreambooth.io/v1alpha1
kind: DreamBoothJob
metadata: {name: toy-cat}
spec:
  preset: object
  baseModel: {uri: s3://models/sd15/}
  instance: {uri: s3://data/toy-cat/, prompt: a photo of zwx toy cat}
"""


def with_spec(extra: str) -> str:
    return JOB + "".join(f"  {line}\n" for line in extra.splitlines())


def laughs(levels: int = 9) -> str:
    lines = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels)]
    return JOB + "\n".join(lines) + "\n"


#: the file's bytes -> what the error message must say (the file and, where known, the line)
REFUSED: dict[str, tuple[bytes, str]] = {
    "duplicate key": (JOB.encode() + b"spec: {}\n", "line 8: duplicate key 'spec'"),
    "duplicate nested key": (with_spec("training: {steps: 1, steps: 2}").encode(), "duplicate key 'steps'"),
    "UTF-16": ("\ufeff".encode("utf-16-le") + JOB.encode("utf-16-le"), "UTF-16-encoded: save it as UTF-8"),
    "UTF-16 BE": (b"\xfe\xff" + JOB.encode("utf-16-be"), "UTF-16-encoded"),
    "latin-1": (JOB.replace("toy cat}", "toy caf\xe9}").encode("latin-1"), "line 7: not UTF-8 (byte 0xe9)"),
    "NUL byte": (JOB.encode() + b"x: \x00\n", "U+0000, a control character"),
    "billion laughs": (laughs().encode(), "more than 100000 values once its aliases are expanded"),
    "deep nesting": ((JOB + "x: " + "[" * 5000 + "]" * 5000 + "\n").encode(), "nested deeper than 64 levels"),
    "recursive alias": ((JOB + "x: &x [*x]\n").encode(), "nested deeper than 64 levels"),
    "huge integer": (
        with_spec("training: {steps: 123456789012345678901234567890}").encode(),
        "does not fit in 64 bits",
    ),
    "unknown tag": (with_spec("training: {steps: !env STEPS}").encode(), "tag !env is not allowed"),
    "python tag": (
        with_spec("x: !!python/object/apply:os.system [echo hi]").encode(),
        "tag:yaml.org,2002:python/object/apply:os.system is not allowed",
    ),
    "wrong !!int": (with_spec("training: {steps: !!int twelve}").encode(), "'twelve' is not a valid !!int"),
    "top-level list": (b"- a: 1\n- b: 2\n", "a YAML list at the top"),
    "a scalar document": (b"just words\n", "str 'just words' is not an object"),
    "not YAML": (b"a: [1, 2\n", "not valid YAML"),
    "tab indentation": (b"a:\n\tb: 1\n", "not valid YAML"),
    "a list as a key": (b"? [a, b]\n: 1\n", "a mapping key must be a plain value"),
    "empty file": (b"", "holds no YAML document"),
    "only comments": (b"# nothing\n---\n", "holds no YAML document"),
    "too big": (b"a: " + b"x" * (manifest.MAX_FILE_BYTES + 1) + b"\n", "a manifest the API server takes is at most"),
    "a huge value": (b"a: " + b"x" * (manifest.MAX_SCALAR_CHARS + 1) + b"\n", "characters (at most"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_a_hostile_or_broken_file_is_refused_with_a_message(case, tmp_path):
    raw, expected = REFUSED[case]
    path = tmp_path / "job.yaml"
    path.write_bytes(raw)
    started = time.monotonic()
    with pytest.raises(ManifestError) as err:
        manifest.read(path)
    assert str(path) in str(err.value) and expected in str(err.value), str(err.value)
    assert time.monotonic() - started < 5, "bounds are checked before anything is expanded"


READ_AS_KUBECTL = {  # YAML text -> the value kubectl sends
    "2e-6": 2e-6,
    "1.0e-4": 1e-4,
    ".5": 0.5,
    "4e2": 400,
    "1_000": 1000,
    "0x1F": 31,
    "0o17": 15,
    "017": 15,
    "08": 8,
    "+1": 1,
    "-3": -3,
    "1e400": "1e400",
    "no": False,
    "Yes": True,
    "off": False,
    "y": True,
    "~": None,
    "null": None,
    "'2e-6'": "2e-6",
    '"no"': "no",
    "!!str 5": "5",
    "!!float 1": 1,
    "2001-12-14": "2001-12-14",
    "1:30": "1:30",
    ".inf": float("inf"),
    "abc": "abc",
}


@pytest.mark.parametrize("text", READ_AS_KUBECTL)
def test_scalars_mean_what_kubectl_sends(text):
    [doc] = manifest.loads(f"v: {text}\n")
    assert doc.data["v"] == READ_AS_KUBECTL[text] and type(doc.data["v"]) is type(READ_AS_KUBECTL[text])


def test_merge_keys_lists_and_other_kinds(tmp_path, capsys):
    text = "\ufeff" + JOB.replace("spec:\n", "spec:\n  <<: *defaults\n").replace(
        "kind: DreamBoothJob\n", "kind: DreamBoothJob\nx-defaults: &defaults {training: {learningRate: 2e-6}}\n"
    )
    [doc] = manifest.loads(text)
    assert doc.data["spec"]["training"] == {"learningRate": 2e-6}
    listed = manifest.loads("apiVersion: v1\nkind: List\nitems:\n- {kind: A}\n- {kind: B}\n", "f.yaml")
    assert [(d.where, d.kind) for d in listed] == [("f.yaml, item 1", "A"), ("f.yaml, item 2", "B")]


CLI_REFUSED = {  # the file -> what `dreambooth validate` says on stderr
    "a duplicate key": (JOB + "metadata: {name: other}\n", "duplicate key 'metadata'"),
    "no apiVersion": (JOB.replace("apiVersion: dreambooth.io/v1alpha1\n", ""), "apiVersion: required"),
    "another apiVersion": (JOB.replace("v1alpha1", "v1"), "apiVersion: Input should be 'dreambooth.io/v1alpha1'"),
    "no kind": (JOB.replace("kind: DreamBoothJob\n", ""), "no kind: add kind: DreamBoothJob"),
    "only a Secret": ("apiVersion: v1\nkind: Secret\nmetadata: {name: s}\n", "holds no DreamBoothJob"),
    "yes for a string": (
        with_spec("training: {mixedPrecision: no}"),
        "YAML reads an unquoted no/off/false as a boolean; quote the value",
    ),
    "a huge wrong value": (with_spec(f"training: {{method: {'x' * 5000}}}"), "... (5002 characters)"),
}


@pytest.mark.parametrize("case", CLI_REFUSED)
def test_validate_names_the_problem_without_a_traceback(case, tmp_path, capsys):
    text, expected = CLI_REFUSED[case]
    path = tmp_path / "job.yaml"
    path.write_text(text)
    assert main(["validate", str(path)]) == ExitCode.INVALID_CONFIG
    out, err = capsys.readouterr()
    assert expected in err and "Traceback" not in out + err, err
    assert len(err) < 4000


def test_kubectl_numbers_validate_and_other_documents_are_named(tmp_path, capsys):
    path = tmp_path / "job.yaml"
    path.write_text(
        "apiVersion: v1\nkind: Secret\nmetadata: {name: minio}\n---\n"
        + with_spec("training: {learningRate: 2e-6, steps: 4e2}")
    )
    assert main(["validate", str(path)]) == ExitCode.OK
    out, err = capsys.readouterr()
    assert f"{path}, document 2: DreamBoothJob toy-cat: valid" in out
    assert f"{path}, document 1: Secret minio is not a DreamBoothJob: not checked" in err
    assert main(["render", str(path)]) == ExitCode.OK
    assert '"learningRate": 2e-06' in capsys.readouterr().out


def test_snake_case_names_are_unknown_fields_as_in_the_crd(tmp_path, capsys):
    """The models used to accept learning_rate next to learningRate and call a spec valid
    that kubectl apply refuses (or, with validation off, ran it with the preset's value)."""
    path = tmp_path / "job.yaml"
    path.write_text(with_spec("training: {learning_rate: 1e-6}").replace("baseModel:", "base_model:"))
    assert main(["validate", str(path)]) == ExitCode.INVALID_CONFIG
    err = capsys.readouterr().err
    assert "spec.training.learning_rate: unknown field: the CRD's names are camelCase, use learningRate" in err
    assert "spec.base_model: unknown field: the CRD's names are camelCase, use baseModel" in err
