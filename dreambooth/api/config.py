"""TrainerConfig: what the trainer runs, derived from a DreamBoothJob by one pure function.

The operator renders it as JSON into a ConfigMap; ``dreambooth train job.yaml`` builds it
locally. It holds the *effective* spec (preset applied, every default filled), so the
trainer never needs to know about presets, plus where things go. It never holds secrets:
S3 credentials reach the trainer only as environment variables from a Secret.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import AfterValidator, Field

from dreambooth.api import layout
from dreambooth.api.job import API_VERSION, DreamBoothJob, FieldIssue, SpecError
from dreambooth.api.presets import ModelFamily
from dreambooth.api.resolve import effective_spec
from dreambooth.api.rules import violations
from dreambooth.api.spec import ApiModel, DreamBoothJobSpec
from dreambooth.api.uris import Scheme, parse_uri

DEFAULT_METRICS_PORT = 9090


#: where a job's outputs go: S3, a PVC (rewritten to file:// for the pods) or a local folder
STORAGE_SCHEMES = frozenset({Scheme.S3, Scheme.PVC, Scheme.FILE})


def _storage_uri(value: str) -> str:
    parse_uri(value, allowed=STORAGE_SCHEMES)  # a UriError is a ValueError: pydantic reports it
    return value


StorageUri = Annotated[str, AfterValidator(_storage_uri)]


class JobRef(ApiModel):
    namespace: str = Field("default", description="Namespace of the DreamBoothJob.")
    name: str = Field(description="Name of the DreamBoothJob.")
    uid: str | None = Field(None, description="UID of the DreamBoothJob.")


class StorageEndpoint(ApiModel):
    endpoint: str | None = Field(None, description="host[:port] of the S3 API.")
    secure: bool = Field(True, description="Use TLS.")
    region: str = Field("us-east-1", description="S3 region.")


class TrainerConfig(ApiModel):
    api_version: Literal["dreambooth.io/v1alpha1"] = API_VERSION
    kind: Literal["TrainerConfig"] = "TrainerConfig"
    job: JobRef
    spec: DreamBoothJobSpec = Field(description="The effective spec: preset applied, defaults filled.")
    requested: DreamBoothJobSpec | None = Field(
        None,
        description="The job's spec as written, when its baseModel.family is auto: the trainer "
        "applies the presets again for the family it finds in the model (spec assumes SD 1.x/2.x).",
    )
    output_uri: StorageUri = Field(description="Prefix of this job's checkpoints, samples and model.")
    class_cache_uri: StorageUri = Field(description="Prefix under which generated class images are cached.")
    storage: StorageEndpoint = Field(default_factory=StorageEndpoint)
    metrics_port: int = Field(DEFAULT_METRICS_PORT, ge=0, le=65535, description="0: no metrics server.")


@dataclass(frozen=True)
class Defaults:
    """What the operator (or the local CLI) supplies where the spec is silent."""

    #: outputs go to ``<output_root>/<namespace>/<name>/`` unless spec.output.uri is set
    output_root: str
    s3_endpoint: str | None = None
    s3_secure: bool = True
    metrics_port: int = DEFAULT_METRICS_PORT


def output_uri_for(job: DreamBoothJob, defaults: Defaults) -> str:
    if job.spec.output.uri:
        return job.spec.output.uri.rstrip("/") + "/"
    namespace = job.metadata.namespace or "default"
    return f"{defaults.output_root.rstrip('/')}/{namespace}/{job.metadata.name}/"


def build_trainer_config(job: DreamBoothJob, defaults: Defaults) -> TrainerConfig:
    """The TrainerConfig for ``job``. Pure: same job and defaults, same config."""
    spec = effective_spec(job.spec)
    output_uri = output_uri_for(job, defaults)
    storage = StorageEndpoint(
        endpoint=spec.storage.endpoint or defaults.s3_endpoint,
        secure=defaults.s3_secure if spec.storage.secure is None else spec.storage.secure,
        region=spec.storage.region,
    )
    return TrainerConfig(
        requested=job.spec if job.spec.base_model.family is ModelFamily.AUTO else None,
        job=JobRef(
            namespace=job.metadata.namespace or "default",
            name=job.metadata.name,
            uid=job.metadata.uid,
        ),
        spec=spec,
        output_uri=output_uri,
        class_cache_uri=layout.class_cache_uri(output_uri),
        storage=storage,
        metrics_port=defaults.metrics_port,
    )


def for_family(config: TrainerConfig, family: ModelFamily) -> TrainerConfig:
    """``config`` once the trainer has found the model's ``family``: a job with
    ``baseModel.family: auto`` gets that family's presets and rules (a spec it cannot take
    raises :class:`SpecError`, naming the fields); other jobs, and auto jobs whose model is
    the SD 1.x/2.x the operator assumed, are unchanged."""
    if config.requested is None or family is ModelFamily.SD:
        return config
    base = config.requested.base_model.model_copy(update={"family": family})
    requested = config.requested.model_copy(update={"base_model": base})
    found = violations(requested)
    if found:
        raise SpecError([FieldIssue(f"spec.{v.path}", v.message) for v in found])
    return config.model_copy(update={"spec": effective_spec(requested), "requested": None})
