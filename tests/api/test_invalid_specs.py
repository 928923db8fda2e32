"""Invalid jobs are rejected with the field to fix and what is allowed there.

Each case is one small change to a minimal valid job; the table names the field path the
user sees and a piece of the message that tells them what to write instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from dreambooth.api import SpecError, validate_job, validate_spec
from tests.support.jobs import DROP, with_paths


@dataclass(frozen=True)
class Case:
    id: str
    changes: dict[str, Any]
    path: str
    says: str
    extra: dict[str, Any] = field(default_factory=dict)


LORA = {"spec.training.method": "lora"}
TTE = {"spec.training.trainTextEncoder": True}
TI = {"spec.training.textualInversion": {"placeholderToken": "<zwx>", "initializerToken": "cat"}}

SINGLE_FIELD = [
    Case("steps-zero", {"spec.training.steps": 0}, "spec.training.steps", "greater than or equal to 1 (got 0)"),
    Case("steps-too-many", {"spec.training.steps": 1_000_001}, "spec.training.steps", "less than or equal to 1000000"),
    Case("lr-negative", {"spec.training.learningRate": -1e-6}, "spec.training.learningRate", "greater than 0"),
    Case("lr-zero", {"spec.training.learningRate": 0}, "spec.training.learningRate", "greater than 0"),
    Case("lr-huge", {"spec.training.learningRate": 0.5}, "spec.training.learningRate", "less than or equal to 0.01"),
    Case(
        "resolution-not-multiple-of-8",
        {"spec.training.resolution": 513},
        "spec.training.resolution",
        "multiple of 8 (got 513)",
    ),
    Case(
        "resolution-too-small",
        {"spec.training.resolution": 32},
        "spec.training.resolution",
        "greater than or equal to 64",
    ),
    # types are checked as strictly as the API server's schema does: YAML quotes matter
    Case("steps-quoted", {"spec.training.steps": "400"}, "spec.training.steps", "valid integer (got '400')"),
    Case(
        "lr-quoted", {"spec.training.learningRate": "1e-6"}, "spec.training.learningRate", "valid number (got '1e-6')"
    ),
    Case(
        "flag-quoted",
        {"spec.training.trainTextEncoder": "true"},
        "spec.training.trainTextEncoder",
        "valid boolean (got 'true')",
    ),
    Case(
        "unknown-preset",
        {"spec.preset": "portrait"},
        "spec.preset",
        "'object', 'face', 'style' or 'custom' (got 'portrait')",
    ),
    Case(
        "typo-learningrate",
        {"spec.training.learningrate": 1e-6},
        "spec.training.learningrate",
        "allowed here: steps, learningRate, ",
    ),
    Case(
        "typo-spec-field",
        {"spec.baseModal": {"uri": "s3://models/sd15/"}},
        "spec.baseModal",
        "allowed here: preset, baseModel, instance, prior, training",
    ),
    Case(
        "typo-in-list-item",
        {"spec.resources.tolerations": [{"efect": "NoSchedule"}]},
        "spec.resources.tolerations[0].efect",
        "allowed here: key, operator, value, effect",
    ),
    Case("unknown-method", {"spec.training.method": "dora"}, "spec.training.method", "'full' or 'lora'"),
    Case(
        "unknown-precision",
        {"spec.training.mixedPrecision": "fp8"},
        "spec.training.mixedPrecision",
        "'no', 'fp16' or 'bf16'",
    ),
    Case("unknown-optimizer", {"spec.training.optimizer": "sgd"}, "spec.training.optimizer", "'adamw' or 'adamw8bit'"),
    Case(
        "unknown-sampler",
        {"spec.validation.scheduler": "heun"},
        "spec.validation.scheduler",
        "'ddim', 'pndm', 'lms', 'dpm', 'euler' or 'flow_euler'",
    ),
    Case(
        "unknown-format",
        {"spec.output.formats": ["ckpt"]},
        "spec.output.formats[0]",
        "'diffusers', 'safetensors', 'lora' or 'lora-kohya'",
    ),
    Case("no-formats", {"spec.output.formats": []}, "spec.output.formats", "at least 1 item"),
    Case(
        "bucket-uppercase",
        {"spec.instance.uri": "s3://Training-Data/cat/"},
        "spec.instance.uri",
        "'Training-Data' is not a valid bucket name: use 3-63 lowercase",
    ),
    Case(
        "bucket-too-short",
        {"spec.instance.uri": "s3://ab/cat/"},
        "spec.instance.uri",
        "'ab' is not a valid bucket name",
    ),
    Case(
        "bucket-underscore",
        {"spec.output.uri": "s3://my_outputs/"},
        "spec.output.uri",
        "letters, digits, dots or hyphens",
    ),
    Case(
        "bucket-ipv4",
        {"spec.baseModel.uri": "s3://192.168.0.1/sd15/"},
        "spec.baseModel.uri",
        "'192.168.0.1' is not a valid bucket name",
    ),
    Case(
        "bucket-double-dot",
        {"spec.instance.uri": "s3://my..bucket/cat/"},
        "spec.instance.uri",
        "not a valid bucket name",
    ),
    Case(
        "scheme-gs",
        {"spec.instance.uri": "gs://bucket/cat/"},
        "spec.instance.uri",
        "is not a supported URI: use one of pvc://, s3://",
    ),
    Case(
        "scheme-https-model",
        {"spec.baseModel.uri": "https://huggingface.co/org/sd"},
        "spec.baseModel.uri",
        "use one of hf://, pvc://, s3://",
    ),
    Case("no-scheme", {"spec.instance.uri": "training-data/cat"}, "spec.instance.uri", "use one of pvc://, s3://"),
    Case(
        "hf-for-images",
        {"spec.instance.uri": "hf://org/photos"},
        "spec.instance.uri",
        "hf:// cannot be used here: use one of pvc://, s3://",
    ),
    Case(
        "file-in-cluster",
        {"spec.instance.uri": "file:///data/cat"},
        "spec.instance.uri",
        "file:// is for local runs with `dreambooth train` only",
    ),
    Case(
        "file-output-in-cluster", {"spec.output.uri": "file:///runs"}, "spec.output.uri", "file:// cannot be used here"
    ),
    Case(
        "hf-without-org",
        {"spec.baseModel.uri": "hf://stable-diffusion"},
        "spec.baseModel.uri",
        "use hf://org/name or hf://org/name@revision",
    ),
    Case(
        "hf-empty-revision",
        {"spec.baseModel.uri": "hf://org/sd15@"},
        "spec.baseModel.uri",
        "use hf://org/name or hf://org/name@revision",
    ),
    Case(
        "pvc-bad-claim",
        {"spec.instance.uri": "pvc://Data_Claim/cat"},
        "spec.instance.uri",
        "not a valid PersistentVolumeClaim name",
    ),
    Case(
        "uri-with-space",
        {"spec.instance.uri": "s3://training-data/my cat/"},
        "spec.instance.uri",
        "contains whitespace",
    ),
    Case(
        "uri-parent-segment",
        {"spec.instance.uri": "s3://training-data/cat/../dog/"},
        "spec.instance.uri",
        "must not contain '.' or '..' segments: use s3://bucket/prefix",
    ),
    Case(
        "uri-dot-segment",
        {"spec.output.uri": "s3://outputs/./run/"},
        "spec.output.uri",
        "must not contain '.' or '..' segments",
    ),
    Case(
        "pvc-parent-segment",
        {"spec.instance.uri": "pvc://data/../etc/"},
        "spec.instance.uri",
        "use pvc://claim/path without them",
    ),
    Case(
        "model-parent-segment",
        {"spec.baseModel.uri": "s3://models/../secrets/"},
        "spec.baseModel.uri",
        "must not contain '.' or '..' segments",
    ),
    Case(
        "class-images-parent-segment",
        {
            "spec.prior.uri": "pvc://data/cats/../../x",
            "spec.prior.enabled": True,
            "spec.prior.classPrompt": "a photo of a cat",
        },
        "spec.prior.uri",
        "must not contain '.' or '..' segments",
    ),
    Case(
        "uri-query",
        {"spec.instance.uri": "s3://training-data/cat/?versionId=3"},
        "spec.instance.uri",
        "must not have a query string or fragment",
    ),
    Case(
        "uri-fragment",
        {"spec.baseModel.uri": "hf://org/sd15#main"},
        "spec.baseModel.uri",
        "use hf://org/name@revision without them",
    ),
    Case(
        "uri-credentials",
        {"spec.instance.uri": "s3://AKIA:secret@training-data/cat/"},
        "spec.instance.uri",
        "cannot carry credentials",
    ),
    Case(
        "vae-https",
        {"spec.baseModel.vae": "https://huggingface.co/madebyollin/sdxl-vae-fp16-fix"},
        "spec.baseModel.vae",
        "use one of hf://, pvc://, s3://",
    ),
    Case(
        "vae-hf-without-org",
        {"spec.baseModel.vae": "hf://sdxl-vae"},
        "spec.baseModel.vae",
        "use hf://org/name or hf://org/name@revision",
    ),
    Case(
        "vae-parent-segment",
        {"spec.baseModel.vae": "s3://models/../vae/"},
        "spec.baseModel.vae",
        "must not contain '.' or '..' segments",
    ),
    Case(
        "hf-revision-dots",
        {"spec.baseModel.uri": "hf://org/sd15@v1..2"},
        "spec.baseModel.uri",
        "'v1..2' is not a branch, tag or commit",
    ),
    Case(
        "hf-revision-expression",
        {"spec.baseModel.uri": "hf://org/sd15@main~1"},
        "spec.baseModel.uri",
        "is not a branch, tag or commit",
    ),
    Case(
        "revision-field-traversal",
        {"spec.baseModel": {"uri": "hf://org/sd15", "revision": "../main"}},
        "spec.baseModel.revision",
        "is not a branch, tag or commit: use a branch or tag name",
    ),
    Case(
        "revision-field-option",
        {"spec.baseModel": {"uri": "hf://org/sd15", "revision": "-rf"}},
        "spec.baseModel.revision",
        "e.g. main, v1.0 or refs/pr/1",
    ),
    Case(
        "toleration-effect",
        {"spec.resources.tolerations": [{"key": "gpu", "effect": "Never"}]},
        "spec.resources.tolerations[0].effect",
        "use NoSchedule, PreferNoSchedule or NoExecute",
    ),
    Case(
        "toleration-operator",
        {"spec.resources.tolerations": [{"operator": "In"}]},
        "spec.resources.tolerations[0].operator",
        "use Equal or Exists (got 'In')",
    ),
    Case(
        "memory-with-space",
        {"spec.resources.memory": "64 GB"},
        "spec.resources.memory",
        "use a Kubernetes quantity such as 64Gi",
    ),
    Case(
        "cpu-negative",
        {"spec.resources.cpu": "-2"},
        "spec.resources.cpu",
        "use a Kubernetes quantity such as 64Gi, 512Mi or 8",
    ),
    Case(
        "shm-unit",
        {"spec.resources.sharedMemory": "8GB"},
        "spec.resources.sharedMemory",
        "no space, no 'B') (got '8GB')",
    ),
    Case(
        "backoff-negative",
        {"spec.runPolicy.backoffLimit": -1},
        "spec.runPolicy.backoffLimit",
        "greater than or equal to 0",
    ),
    Case(
        "deadline-zero",
        {"spec.runPolicy.activeDeadlineSeconds": 0},
        "spec.runPolicy.activeDeadlineSeconds",
        "greater than or equal to 1",
    ),
    Case(
        "too-many-prompts",
        {"spec.validation.prompts": ["a photo of zwx toy cat"] * 17},
        "spec.validation.prompts",
        "at most 16 items",
    ),
    Case("empty-prompt", {"spec.instance.prompt": ""}, "spec.instance.prompt", "at least 1 character"),
    Case("missing-prompt", {"spec.instance.prompt": DROP}, "spec.instance.prompt", "required"),
    Case("missing-base-model", {"spec.baseModel": DROP}, "spec.baseModel", "required"),
    Case("too-many-gpus", {"spec.resources.gpusPerNode": 17}, "spec.resources.gpusPerNode", "less than or equal to 16"),
    Case("zero-nodes", {"spec.resources.nodes": 0}, "spec.resources.nodes", "greater than or equal to 1"),
    Case(
        "lora-rank-zero",
        {**LORA, "spec.training.lora": {"rank": 0}},
        "spec.training.lora.rank",
        "greater than or equal to 1",
    ),
    Case(
        "lora-dropout-one",
        {**LORA, "spec.training.lora": {"dropout": 1.0}},
        "spec.training.lora.dropout",
        "less than 1",
    ),
    Case("class-images-zero", {"spec.prior.numImages": 0}, "spec.prior.numImages", "greater than or equal to 1"),
    Case(
        "guidance-too-high",
        {"spec.validation.guidanceScale": 51},
        "spec.validation.guidanceScale",
        "less than or equal to 50",
    ),
    Case(
        "endpoint-with-scheme",
        {"spec.storage.endpoint": "http://minio:9000"},
        "spec.storage.endpoint",
        "use host or host:port with a port from 1 to 65535 and no scheme",
    ),
    Case(
        "secret-name",
        {"spec.storage.credentialsSecret": {"name": "Minio_Creds"}},
        "spec.storage.credentialsSecret.name",
        "use a Kubernetes object name: lowercase letters",
    ),
    Case(
        "inline-credentials",
        {"spec.storage.credentialsSecret": {"name": "minio", "secretKey": "hunter2"}},
        "spec.storage.credentialsSecret.secretKey",
        "allowed here: name, accessKeyKey, secretKeyKey",
    ),
    Case(
        "priority-class",
        {"spec.resources.priorityClassName": "High"},
        "spec.resources.priorityClassName",
        "use a Kubernetes object name",
    ),
    Case(
        "node-selector-value",
        {"spec.resources.nodeSelector": {"gpu": "x" * 64}},
        "spec.resources.nodeSelector.gpu",
        "at most 63 characters",
    ),
    Case(
        "ti-token-with-space",
        {"spec.training.textualInversion": {"placeholderToken": "<z wx>", "initializerToken": "cat"}},
        "spec.training.textualInversion.placeholderToken",
        "use one word without spaces",
    ),
    Case(
        "bucket-step-off-8",
        {"spec.training.buckets": {"enabled": True, "step": 60}},
        "spec.training.buckets.step",
        "multiple of 8",
    ),
    Case(
        "bucket-upscale-below-1",
        {"spec.training.buckets": {"enabled": True, "maxUpscale": 0.5}},
        "spec.training.buckets.maxUpscale",
        "greater than or equal to 1",
    ),
    Case(
        "ti-missing-initializer",
        {"spec.training.textualInversion": {"placeholderToken": "<zwx>"}},
        "spec.training.textualInversion.initializerToken",
        "required",
    ),
    Case(
        "env-name-digit",
        {"spec.resources.env": [{"name": "1NCCL", "value": "x"}]},
        "spec.resources.env[0].name",
        "use letters, digits and '_', not starting with a digit",
    ),
    Case(
        "env-value-from-secret",
        {"spec.resources.env": [{"name": "HF_HUB", "valueFrom": {"secretKeyRef": {"name": "s"}}}]},
        "spec.resources.env[0].valueFrom",
        "allowed here: name, value",
    ),
    Case(
        "env-value-number",
        {"spec.resources.env": [{"name": "NCCL_P2P_DISABLE", "value": 1}]},
        "spec.resources.env[0].value",
        "valid string (got 1)",
    ),
    Case(
        "env-too-many",
        {"spec.resources.env": [{"name": f"V{i}"} for i in range(65)]},
        "spec.resources.env",
        "at most 64 items",
    ),
    Case(
        "extra-resource-unquoted",
        {"spec.resources.extraResources": {"rdma/hca": 1}},
        "spec.resources.extraResources.rdma/hca",
        "valid string (got 1)",
    ),
    Case(
        "extra-resource-unit",
        {"spec.resources.extraResources": {"rdma/hca": "1 device"}},
        "spec.resources.extraResources.rdma/hca",
        "use a Kubernetes quantity",
    ),
    Case(
        "metadata-name", {"metadata.name": "Toy_Cat"}, "metadata.name", "use a DNS label: at most 63 lowercase letters"
    ),
    Case("wrong-kind", {"kind": "DreamBoothJobs"}, "kind", "'DreamBoothJob'"),
    Case("wrong-version", {"apiVersion": "dreambooth.io/v1"}, "apiVersion", "'dreambooth.io/v1alpha1'"),
]

CROSS_FIELD = [
    Case(
        "prior-without-class-prompt",
        {"spec.preset": "custom", "spec.prior.enabled": True},
        "spec.prior.classPrompt",
        "required when prior preservation is enabled",
    ),
    Case(
        "class-images-without-prior",
        {"spec.prior.uri": "s3://training-data/cats/"},
        "spec.prior.uri",
        "only used when prior.enabled is true",
    ),
    Case(
        "class-images-prior-switched-off",
        {"spec.preset": "face", "spec.prior.enabled": False, "spec.prior.uri": "s3://training-data/people/"},
        "spec.prior.uri",
        "only used when prior.enabled is true",
    ),
    Case(
        "text-encoder-steps-over-steps",
        {**TTE, "spec.training.steps": 100, "spec.training.textEncoderSteps": 101},
        "spec.training.textEncoderSteps",
        "at most training.steps (100), got 101",
    ),
    Case(
        "text-encoder-steps-over-preset-steps",
        {"spec.preset": "face", "spec.training.textEncoderSteps": 1300},
        "spec.training.textEncoderSteps",
        "at most training.steps (1200), got 1300",
    ),
    Case(
        "text-encoder-steps-without-text-encoder",
        {"spec.training.textEncoderSteps": 50},
        "spec.training.textEncoderSteps",
        "only applies when training.trainTextEncoder is true",
    ),
    Case(
        "text-encoder-lr-without-text-encoder",
        {"spec.preset": "object", "spec.training.textEncoderLearningRate": 1e-6},
        "spec.training.textEncoderLearningRate",
        "only applies when training.trainTextEncoder",
    ),
    Case(
        "lora-settings-with-full",
        {"spec.training.lora": {"rank": 8}},
        "spec.training.lora",
        "LoRA settings need training.method: lora",
    ),
    Case(
        "lora-with-text-encoder",
        {**LORA, **TTE},
        "spec.training.trainTextEncoder",
        "training.lora.textEncoder: true instead",
    ),
    Case(
        "ema-with-lora",
        {**LORA, "spec.training.ema": True},
        "spec.training.ema",
        "only supported with training.method: full",
    ),
    Case(
        "ti-with-lora",
        {**LORA, **TI, "spec.instance.prompt": "a photo of <zwx> toy cat"},
        "spec.training.textualInversion",
        "needs training.method: full",
    ),
    Case(
        "batch-over-gpus",
        {"spec.training.batchSize": 3, "spec.resources.gpusPerNode": 2},
        "spec.training.batchSize",
        "use a multiple of 2, e.g. 4",
    ),
    Case(
        "batch-over-accumulation",
        {"spec.training.batchSize": 4, "spec.training.gradientAccumulationSteps": 3},
        "spec.training.batchSize",
        "use a multiple of 3, e.g. 6",
    ),
    Case(
        "batch-over-nodes-gpus-accumulation",
        {
            "spec.training.batchSize": 8,
            "spec.resources.nodes": 2,
            "spec.resources.gpusPerNode": 4,
            "spec.training.gradientAccumulationSteps": 2,
        },
        "spec.training.batchSize",
        "use a multiple of 16, e.g. 16",
    ),
    Case(
        "preset-batch-over-gpus",
        {"spec.preset": "face", "spec.resources.gpusPerNode": 4},
        "spec.training.batchSize",
        "2 images cannot be split evenly over 4 process(es)",
    ),
    Case(
        "fp16-on-cpu",
        {"spec.training.mixedPrecision": "fp16", "spec.resources.gpusPerNode": 0},
        "spec.training.mixedPrecision",
        "fp16 needs GPUs",
    ),
    Case(
        "lora-format-with-full",
        {"spec.output.formats": ["diffusers", "lora"]},
        "spec.output.formats",
        "lora needs training.method: lora",
    ),
    Case(
        "kohya-format-with-full",
        {"spec.output.formats": ["diffusers", "lora-kohya"]},
        "spec.output.formats",
        "lora-kohya needs training.method: lora (a full fine-tune has no adapters",
    ),
    Case(
        "both-lora-formats-with-full",
        {"spec.training.method": "full", "spec.output.formats": ["lora", "lora-kohya"]},
        "spec.output.formats",
        "lora, lora-kohya need training.method: lora",
    ),
    Case(
        "diffusers-format-with-lora",
        {**LORA, "spec.output.formats": ["diffusers"]},
        "spec.output.formats",
        "diffusers need training.method: full; a LoRA run exports lora and/or lora-kohya",
    ),
    Case(
        "format-twice",
        {"spec.output.formats": ["diffusers", "diffusers"]},
        "spec.output.formats",
        "lists a format twice",
    ),
    Case(
        "ti-token-not-in-prompt",
        TI,
        "spec.training.textualInversion.placeholderToken",
        "'<zwx>' must appear as a word in instance.prompt ('a photo of zwx toy cat')",
    ),
    Case(
        "revision-with-s3",
        {"spec.baseModel.revision": "main"},
        "spec.baseModel.revision",
        "only applies to hf:// models",
    ),
    Case(
        "revision-twice",
        {"spec.baseModel": {"uri": "hf://org/sd15@v1", "revision": "main"}},
        "spec.baseModel.revision",
        "given twice",
    ),
    Case(
        "warmup-equals-steps",
        {"spec.training.steps": 100, "spec.training.lrWarmupSteps": 100},
        "spec.training.lrWarmupSteps",
        "must be less than training.steps (100), got 100",
    ),
    Case(
        "validation-every-over-steps",
        {"spec.training.steps": 100, "spec.validation.everySteps": 150},
        "spec.validation.everySteps",
        "must be at most training.steps (100), got 150",
    ),
    Case(
        "env-operator-variable",
        {"spec.resources.env": [{"name": "HOME", "value": "/root"}]},
        "spec.resources.env[0].name",
        "HOME is reserved, set by the operator in every trainer pod",
    ),
    Case(
        "env-operator-prefix",
        {"spec.resources.env": [{"name": "NCCL_DEBUG", "value": "INFO"}, {"name": "DREAMBOOTH_CONFIG", "value": "/x"}]},
        "spec.resources.env[1].name",
        "DREAMBOOTH_* variables are reserved",
    ),
    Case(
        "env-s3-settings",
        {"spec.resources.env": [{"name": "AWS_REGION", "value": "eu-west-1"}]},
        "spec.resources.env[0].name",
        "come from spec.storage (endpoint, region, credentialsSecret): set them there",
    ),
    Case(
        "env-credential",
        {"spec.resources.env": [{"name": "HF_TOKEN", "value": "hf_abc"}]},
        "spec.resources.env[0].name",
        "HF_TOKEN looks like a credential",
    ),
    Case(
        "env-launcher-variable",
        {"spec.resources.env": [{"name": "WORLD_SIZE", "value": "8"}]},
        "spec.resources.env[0].name",
        "set by accelerate/torchrun for each training process",
    ),
    Case(
        "env-gpu-visibility",
        {"spec.resources.env": [{"name": "NVIDIA_VISIBLE_DEVICES", "value": "all"}]},
        "spec.resources.env[0].name",
        "could expose GPUs the pod was not given",
    ),
    Case(
        "env-twice",
        {"spec.resources.env": [{"name": "NCCL_DEBUG", "value": "INFO"}, {"name": "NCCL_DEBUG", "value": "WARN"}]},
        "spec.resources.env[1].name",
        "NCCL_DEBUG is listed twice: keep one",
    ),
    Case(
        "extra-resource-cpu",
        {"spec.resources.extraResources": {"cpu": "8"}},
        "spec.resources.extraResources.cpu",
        "cpu has its own field: use resources.cpu",
    ),
    Case(
        "extra-resource-memory",
        {"spec.resources.extraResources": {"memory": "64Gi"}},
        "spec.resources.extraResources.memory",
        "use resources.memory",
    ),
    Case(
        "extra-resource-gpu",
        {"spec.resources.extraResources": {"nvidia.com/gpu": "2"}},
        "spec.resources.extraResources.nvidia.com/gpu",
        "the job's GPU: request it with resources.gpusPerNode",
    ),
    Case(
        "extra-resource-other-gpu-name",
        {"spec.resources.gpu": {"resourceName": "amd.com/gpu"}, "spec.resources.extraResources": {"amd.com/gpu": "1"}},
        "spec.resources.extraResources.amd.com/gpu",
        "the job's GPU",
    ),
    Case(
        "extra-resource-not-extended",
        {"spec.resources.extraResources": {"ephemeral-storage": "1"}},
        "spec.resources.extraResources.ephemeral-storage",
        "not an extended resource name: use <domain>/<name>",
    ),
    Case(
        "extra-resource-kubernetes-domain",
        {"spec.resources.extraResources": {"kubernetes.io/batch": "1"}},
        "spec.resources.extraResources.kubernetes.io/batch",
        "not an extended resource name",
    ),
    Case(
        "extra-resource-fraction",
        {"spec.resources.extraResources": {"rdma/hca": "500m"}},
        "spec.resources.extraResources.rdma/hca",
        "devices are counted in whole numbers",
    ),
    Case(
        "hugepages-without-memory",
        {"spec.resources.extraResources": {"hugepages-2Mi": "1Gi"}},
        "spec.resources.extraResources",
        "set resources.memory (or resources.cpu)",
    ),
    Case(
        "mig-two-slices",
        {
            "spec.resources.gpu": {"resourceName": "nvidia.com/mig-3g.20gb"},
            "spec.resources.gpusPerNode": 2,
            "spec.training.batchSize": 2,
        },
        "spec.resources.gpusPerNode",
        "nvidia.com/mig-3g.20gb is a MIG slice, one CUDA device per process, and NCCL does not "
        "run between MIG slices of one pod: use gpusPerNode: 1",
    ),
    Case(
        "bucket-sides-with-buckets-off",
        {"spec.training.buckets": {"minSide": 256}},
        "spec.training.buckets.minSide",
        "only applies when training.buckets.enabled is true",
    ),
    Case(
        "bucket-side-off-the-step",
        {"spec.training.buckets": {"enabled": True, "maxSide": 1000}},
        "spec.training.buckets.maxSide",
        "multiple of training.buckets.step (64), got 1000: e.g. 960",
    ),
    Case(
        "bucket-min-over-max",
        {"spec.training.buckets": {"enabled": True, "minSide": 512, "maxSide": 256, "step": 64}},
        "spec.training.buckets.minSide",
        "at most training.buckets.maxSide (256), got 512",
    ),
    Case(
        "bucket-max-under-resolution",
        {"spec.training.buckets": {"enabled": True, "maxSide": 448}},
        "spec.training.buckets.maxSide",
        "at least training.resolution (512)",
    ),
    Case(
        "bucket-min-over-resolution",
        {"spec.training.resolution": 256, "spec.training.buckets": {"enabled": True, "minSide": 320}},
        "spec.training.buckets.minSide",
        "at most training.resolution (256), got 320",
    ),
    Case(
        "bucket-step-not-dividing-resolution",
        {"spec.training.resolution": 520, "spec.training.buckets": {"enabled": True, "step": 64}},
        "spec.training.buckets.step",
        "must divide training.resolution (520)",
    ),
    Case(
        "bucket-side-under-the-family-minimum",
        {
            "spec.baseModel.family": "sdxl",
            "spec.training.resolution": 64,
            "spec.training.buckets": {"minSide": 16, "step": 16},
        },
        "spec.training.buckets.minSide",
        "Stable Diffusion XL takes bucket sides of 32 pixels or more, got 16",
    ),
    Case(
        "export-best-without-evaluation",
        {"spec.output.export": "best"},
        "spec.output.export",
        "best needs evaluation.enabled: true",
    ),
    Case(
        "evaluation-without-samples",
        {"spec.evaluation.enabled": True, "spec.validation.enabled": False},
        "spec.evaluation.enabled",
        "needs validation.enabled: true",
    ),
    Case(
        "evaluator-revision-not-hub",
        {"spec.evaluation.model": {"uri": "s3://models/clip/", "revision": "main"}},
        "spec.evaluation.model.revision",
        "only applies to an hf:// evaluation.model.uri",
    ),
    Case(
        "evaluation-threshold-above-one",
        {"spec.evaluation.thresholds.memorization": 1.5},
        "spec.evaluation.thresholds.memorization",
        "less than or equal to 1",
    ),
    Case(
        "checkpoint-every-over-preset-steps",
        {"spec.preset": "object", "spec.checkpointing.everySteps": 500},
        "spec.checkpointing.everySteps",
        "must be at most training.steps (400), got 500",
    ),
]

CASES = SINGLE_FIELD + CROSS_FIELD


def test_the_table_is_big_enough_and_ids_are_unique():
    assert len(CASES) >= 40 + 20
    assert len({c.id for c in CASES}) == len(CASES)


def test_the_minimal_job_is_valid(minimal_job):
    validate_job(minimal_job, cluster=True)


@pytest.mark.parametrize(
    "changes",
    [
        {
            "spec.resources.env": [
                {"name": "NCCL_SOCKET_IFNAME", "value": "eth0"},
                {"name": "NCCL_IB_HCA", "value": "mlx5_0,mlx5_1"},
                {"name": "NCCL_DEBUG", "value": "INFO"},
                {"name": "NCCL_P2P_DISABLE", "value": "1"},
                {"name": "TORCH_NCCL_BLOCKING_WAIT"},
                {"name": "OMP_NUM_THREADS", "value": "8"},
                {"name": "HF_HUB_OFFLINE", "value": "1"},
            ]
        },
        {"spec.resources.extraResources": {"rdma/rdma_shared_device_a": "1", "nvidia.com/hostdev": "8"}},
        {"spec.resources.extraResources": {"hugepages-2Mi": "1Gi"}, "spec.resources.memory": "64Gi"},
        {"spec.resources.extraResources": {"hugepages-1Gi": "0", "rdma/hca": "0"}},
        {"spec.resources.gpu": {"resourceName": "nvidia.com/mig-3g.20gb"}, "spec.resources.gpusPerNode": 1},
        {
            "spec.resources.gpu": {"resourceName": "nvidia.com/mig-1g.10gb"},
            "spec.resources.nodes": 2,
            "spec.training.batchSize": 2,
        },
    ],
    ids=[
        "nccl-env",
        "rdma-devices",
        "hugepages-with-memory",
        "zero-drops-a-default",
        "mig-one-slice",
        "mig-one-slice-per-node",
    ],
)
def test_what_real_gpu_clusters_need_is_accepted(changes, minimal_job):
    validate_job(with_paths(minimal_job, changes), cluster=True)


def rejected(doc: dict[str, Any], *, cluster: bool = True) -> SpecError:
    with pytest.raises(SpecError) as info:
        validate_job(doc, cluster=cluster)
    return info.value


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_invalid_job_names_the_field_and_what_is_allowed(case: Case, minimal_job):
    err = rejected(with_paths(minimal_job, case.changes))
    by_path = {issue.path: issue.message for issue in err.issues}
    assert case.path in by_path, f"expected an issue at {case.path}, got {err}"
    assert case.says in by_path[case.path], f"{case.path}: {by_path[case.path]!r}"
    assert f"{case.path}: {by_path[case.path]}" in str(err)


@pytest.mark.parametrize("case", [c for c in CASES if c.path.startswith("spec.")], ids=lambda c: c.id)
def test_validate_spec_reports_the_same_paths(case: Case, minimal_job):
    """The operator and trainer validate a bare spec; the paths must read the same."""
    spec = with_paths(minimal_job, case.changes)["spec"]
    with pytest.raises(SpecError) as info:
        validate_spec(spec, cluster=True)
    assert case.path in [issue.path for issue in info.value.issues], str(info.value)


@pytest.mark.parametrize(
    "changes",
    [
        {"spec.instance.uri": "file:///data/cat"},
        {"spec.output.uri": "file://./runs"},
        {"spec.baseModel.uri": "file:///models/sd15"},
    ],
)
def test_file_uris_are_fine_outside_a_cluster(changes, minimal_job):
    doc = with_paths(minimal_job, changes)
    validate_job(doc, cluster=False)
    rejected(doc, cluster=True)


def test_every_single_field_problem_is_reported_at_once(minimal_job):
    doc = with_paths(
        minimal_job,
        {
            "spec.preset": "portrait",
            "spec.training.steps": 0,
            "spec.training.learningrate": 1e-6,
            "spec.instance.uri": "gs://bucket/cat/",
            "spec.resources.tolerations": [{"effect": "Never"}],
            "spec.runPolicy.backoffLimit": -1,
        },
    )
    err = rejected(doc)
    assert {i.path for i in err.issues} == {
        "spec.preset",
        "spec.training.steps",
        "spec.training.learningrate",
        "spec.instance.uri",
        "spec.resources.tolerations[0].effect",
        "spec.runPolicy.backoffLimit",
    }


def test_every_cross_field_problem_is_reported_at_once(minimal_job):
    doc = with_paths(
        minimal_job,
        {
            **LORA,
            "spec.training.steps": 100,
            "spec.training.ema": True,
            "spec.training.batchSize": 3,
            "spec.training.mixedPrecision": "fp16",
            "spec.resources.gpusPerNode": 0,
            "spec.resources.nodes": 2,
            "spec.output.formats": ["safetensors"],
            "spec.checkpointing.everySteps": 200,
            "spec.prior.enabled": True,
        },
    )
    err = rejected(doc)
    assert sorted(i.path for i in err.issues) == sorted(
        [
            "spec.prior.classPrompt",
            "spec.training.ema",
            "spec.checkpointing.everySteps",
            "spec.training.batchSize",
            "spec.training.mixedPrecision",
            "spec.output.formats",
        ]
    )


def test_error_text_reads_well(minimal_job):
    doc = with_paths(minimal_job, {"spec.training.steps": 0, "spec.instance.uri": "gs://bucket/cat/"})
    lines = str(rejected(doc)).splitlines()
    assert lines[0] == "invalid DreamBoothJob (2 problem(s)):"
    assert lines[1:] == [
        "  - spec.instance.uri: 'gs://bucket/cat/' is not a supported URI: use one of pvc://, s3://",
        "  - spec.training.steps: Input should be greater than or equal to 1 (got 0)",
    ]


def test_a_document_that_is_not_a_mapping_is_explained():
    with pytest.raises(SpecError) as info:
        validate_job(["not", "a", "job"], cluster=True)
    assert str(info.value).startswith("invalid DreamBoothJob (1 problem(s)):")
    assert "must be a mapping with apiVersion, kind, metadata and spec" in str(info.value)
