"""What the children of a DreamBoothJob are built from: one :class:`TrainerInputs` (the
validated job, the operator's settings, the restarts so far), the TrainerConfig the pods
read (``pvc://`` URIs rewritten to where their claims are mounted), the claims to mount and
the storage credentials. Pure: no I/O, no clock.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

from dreambooth.api.config import TrainerConfig, build_trainer_config
from dreambooth.api.job import DreamBoothJob
from dreambooth.api.spec import SecretKeyRef
from dreambooth.api.uris import Scheme, parse_uri
from dreambooth.operator.settings import OperatorSettings

PVC_ROOT = "/mnt/pvc"


@dataclass(frozen=True)
class TrainerInputs:
    """Everything the builders read: a validated job (with name, namespace and uid, as the
    API server returns it), the operator's settings, and for a Job created after an earlier
    one: the restarts counted so far and the seconds since the job first started (its
    ``activeDeadlineSeconds`` counts from then)."""

    job: DreamBoothJob
    settings: OperatorSettings
    restarts: int = 0
    elapsed_seconds: int = 0

    def __post_init__(self) -> None:
        meta = self.job.metadata
        missing = [f for f in ("name", "namespace", "uid") if not getattr(meta, f)]
        if missing:
            raise ValueError(
                f"DreamBoothJob metadata lacks {', '.join(missing)}: build children "
                "from the object the API server returned"
            )

    @property
    def name(self) -> str:
        return self.job.metadata.name

    @cached_property
    def resolved(self) -> TrainerConfig:
        """The job's TrainerConfig before pvc:// rewriting (computed once per input)."""
        return build_trainer_config(self.job, self.settings.defaults())


@dataclass(frozen=True)
class ClaimMount:
    claim: str
    read_only: bool
    volume: str

    @property
    def mount_path(self) -> str:
        return f"{PVC_ROOT}/{self.claim}"


# --------------------------------------------------------------------------- config


def local_uri(uri: str) -> str:
    """``pvc://claim/path`` -> ``file:///mnt/pvc/claim/path``; other URIs unchanged."""
    parsed = parse_uri(uri, allowed=set(Scheme))
    if parsed.scheme is Scheme.FILE:
        raise ValueError(f"{uri}: file:// URIs are for local runs, not for a cluster")
    if parsed.scheme is not Scheme.PVC:
        return uri
    # a pvc:// path is literal and a file:// path percent-decoded: keep a '%' a '%'
    return f"file://{PVC_ROOT}/{parsed.authority}/{parsed.path.replace('%', '%25')}"


def _resolved(inputs: TrainerInputs) -> TrainerConfig:
    return inputs.resolved


def _uses(config: TrainerConfig) -> list[tuple[str, bool]]:
    """(URI, written to) for every storage URI the trainer reads or writes."""
    spec = config.spec
    uris = [(spec.base_model.uri, False), (spec.instance.uri, False), (config.output_uri, True)]
    return uris + [(uri, False) for uri in (spec.base_model.vae, spec.prior.uri) if uri]


def claim_mounts(inputs: TrainerInputs) -> list[ClaimMount]:
    """The PersistentVolumeClaims the job names: read-write if written to, else read-only."""
    writable: dict[str, bool] = {}
    for uri, written in _uses(_resolved(inputs)):
        parsed = parse_uri(uri, allowed=set(Scheme))
        if parsed.scheme is Scheme.PVC:
            writable[parsed.authority] = writable.get(parsed.authority, False) or written
    return [
        ClaimMount(claim, read_only=not writable[claim], volume=f"pvc-{i}") for i, claim in enumerate(sorted(writable))
    ]


def trainer_config(inputs: TrainerInputs) -> TrainerConfig:
    """The TrainerConfig the pods read, pvc:// URIs rewritten to their mount paths."""
    config = _resolved(inputs)

    def rewritten(section: Any) -> Any:
        return section.model_copy(update={"uri": local_uri(section.uri)}) if section.uri else section

    def rewritten_spec(spec: Any) -> Any:
        base_model = rewritten(spec.base_model)
        if base_model.vae:
            base_model = base_model.model_copy(update={"vae": local_uri(base_model.vae)})
        return spec.model_copy(
            update={
                "base_model": base_model,
                "instance": rewritten(spec.instance),
                "prior": rewritten(spec.prior),
                "output": rewritten(spec.output),
            }
        )

    return config.model_copy(
        update={
            "spec": rewritten_spec(config.spec),
            "requested": rewritten_spec(config.requested) if config.requested else None,
            "output_uri": local_uri(config.output_uri),
            "class_cache_uri": local_uri(config.class_cache_uri),
        }
    )


def credentials(inputs: TrainerInputs) -> SecretKeyRef | None:
    """The job's Secret, else the operator's default Secret, else none."""
    ref = inputs.job.spec.storage.credentials_secret
    if ref is None and inputs.settings.credentials_secret:
        ref = SecretKeyRef(name=inputs.settings.credentials_secret)
    return ref
