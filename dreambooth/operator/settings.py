"""The operator's settings, read once from ``DREAMBOOTH_*`` environment variables.

Every variable has a default; a bad value stops the operator at start with a message that
names the variable and says what is allowed (all problems at once).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from dreambooth.api.config import Defaults
from dreambooth.api.pod import env_name_problem, is_hugepages, resource_name_problem
from dreambooth.api.uris import DNS1123_RE, Scheme, UriError, parse_uri
from dreambooth.operator.naming import RENDEZVOUS_PORT

PREFIX = "DREAMBOOTH_"
_ENDPOINT_RE = re.compile(r"^[A-Za-z0-9.-]+(:[0-9]{1,5})?$")
_LABEL_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


class SettingsError(ValueError):
    """One or more ``DREAMBOOTH_*`` variables hold unusable values."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"invalid operator settings ({len(problems)} problem(s)):\n{lines}")


@dataclass(frozen=True)
class OperatorSettings:
    """Field ``x`` is read from ``DREAMBOOTH_X`` (e.g. ``DREAMBOOTH_TRAINER_IMAGE``)."""

    #: trainer image for jobs that do not name one (spec.resources.image)
    trainer_image: str = "ghcr.io/dreambooth-operator/trainer:0.1.0"
    #: job outputs go to ``<output_root>/<namespace>/<name>/`` unless spec.output.uri is set
    output_root: str = "s3://dreambooth"
    #: host[:port] of the S3 API for jobs that do not name one; None: AWS S3
    s3_endpoint: str | None = None
    s3_secure: bool = True
    #: Secret (in each job's namespace) with S3 keys for jobs that name none; None: no keys
    credentials_secret: str | None = None
    #: namespaces to watch; empty: all
    namespaces: tuple[str, ...] = ()
    poll_interval_seconds: int = 10
    #: the longest one API request may take (a list, a create, a status write); without a
    #: bound, a request on a dead connection would hold its job's sync for ever
    api_timeout_seconds: int = 30
    #: no training progress for this long marks a job stalled
    stall_timeout_seconds: int = 900
    trainer_metrics_port: int = 9090
    #: the operator's own /metrics
    metrics_port: int = 8080
    #: the operator's liveness endpoint (/healthz)
    health_port: int = 8081
    #: the trainer checkpoints on SIGTERM, which takes time
    termination_grace_seconds: int = 300
    #: (name, literal value) of every trainer container, e.g. NCCL settings; a job's
    #: spec.resources.env wins per name. JSON: [{"name": "NCCL_DEBUG", "value": "INFO"}]
    trainer_env: tuple[tuple[str, str], ...] = ()
    #: (extended resource, whole number) every trainer pod requests (requests = limits); a
    #: job's spec.resources.extraResources wins per name. JSON: {"rdma/hca": 1}
    trainer_extra_resources: tuple[tuple[str, str], ...] = ()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> OperatorSettings:
        """Settings from ``environ`` (default: ``os.environ``); unset or empty: the default."""
        env = os.environ if environ is None else environ
        problems: list[str] = []
        values: dict[str, Any] = {}

        for field, parse, empty_means_none in _PARSERS:
            var = PREFIX + field.upper()
            raw = env.get(var, "").strip()
            if not raw and not empty_means_none:
                continue  # unset: the default
            try:
                values[field] = parse(raw)
            except ValueError as err:
                problems.append(f"{var}={raw!r}: {err}")
        if values.get("trainer_metrics_port") == RENDEZVOUS_PORT:
            problems.append(
                f"{PREFIX}TRAINER_METRICS_PORT={RENDEZVOUS_PORT}: the trainer's rendezvous uses that port; pick another"
            )
        ports = (values.get("metrics_port", cls.metrics_port), values.get("health_port", cls.health_port))
        if ports[0] == ports[1]:
            problems.append(
                f"{PREFIX}METRICS_PORT and {PREFIX}HEALTH_PORT are both {ports[0]}: "
                "the operator serves them separately; use two ports"
            )
        if problems:
            raise SettingsError(problems)
        return cls(**values)

    def defaults(self) -> Defaults:
        """What :func:`dreambooth.api.config.build_trainer_config` fills in for a job."""
        return Defaults(
            output_root=self.output_root,
            s3_endpoint=self.s3_endpoint,
            s3_secure=self.s3_secure,
            metrics_port=self.trainer_metrics_port,
        )


def _image(raw: str) -> str:
    if any(c.isspace() for c in raw):
        raise ValueError("an image reference has no spaces, e.g. ghcr.io/org/trainer:0.1.0")
    return raw


def _output_root(raw: str) -> str:
    try:
        parse_uri(raw, allowed={Scheme.S3, Scheme.PVC})
    except UriError as err:
        raise ValueError(f"{err} (e.g. s3://dreambooth)") from None
    return raw.rstrip("/")


def _endpoint(raw: str) -> str | None:
    if not raw:
        return None
    if "://" in raw:
        raise ValueError("give host[:port] without a scheme (TLS is DREAMBOOTH_S3_SECURE), e.g. minio.minio.svc:9000")
    if not _ENDPOINT_RE.match(raw) or len(raw) > 253:
        raise ValueError("use host[:port], e.g. minio.minio.svc:9000")
    return raw


def _boolean(raw: str) -> bool:
    if raw.lower() in _TRUE:
        return True
    if raw.lower() in _FALSE:
        return False
    raise ValueError("use true or false")


def _secret_name(raw: str) -> str | None:
    if not raw:
        return None
    if len(raw) > 253 or not DNS1123_RE.match(raw):
        raise ValueError("not a Secret name: lowercase letters, digits, '-' and '.'")
    return raw


def _namespaces(raw: str) -> tuple[str, ...]:
    names = [n.strip() for n in raw.split(",") if n.strip()]
    bad = [n for n in names if len(n) > 63 or not _LABEL_RE.match(n)]
    if bad:
        raise ValueError(
            f"not namespace names: {', '.join(bad)} (use a comma-separated list, "
            "e.g. team-a,team-b; empty: all namespaces)"
        )
    return tuple(sorted(set(names)))


def _json(raw: str, example: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        raise ValueError(f"not JSON: use e.g. {example} (the chart writes it from its values)") from None


_ENV_EXAMPLE = '[{"name": "NCCL_SOCKET_IFNAME", "value": "eth0"}]'
_RESOURCES_EXAMPLE = '{"rdma/rdma_shared_device_a": 1}'


def _trainer_env(raw: str) -> tuple[tuple[str, str], ...]:
    """A JSON list of {name, value} with literal string values (trainer.env)."""
    if not raw:
        return ()
    data = _json(raw, _ENV_EXAMPLE)
    if not isinstance(data, list) or not all(
        isinstance(v, dict)
        and set(v) <= {"name", "value"}
        and isinstance(v.get("name"), str)
        and isinstance(v.get("value", ""), str)
        for v in data
    ):
        raise ValueError(f"use a list of {{name, value}} with string values, e.g. {_ENV_EXAMPLE}")
    problems, seen = [], set()
    for var in data:
        problem = env_name_problem(var["name"])
        if problem is None and var["name"] in seen:
            problem = f"{var['name']} is listed twice: keep one"
        if problem:
            problems.append(problem)
        seen.add(var["name"])
    if problems:
        raise ValueError("; ".join(problems))
    return tuple((v["name"], v.get("value", "")) for v in data)


def _trainer_extra_resources(raw: str) -> tuple[tuple[str, str], ...]:
    """A JSON object of extended resource name -> whole number (trainer.extraResources)."""
    if not raw:
        return ()
    data = _json(raw, _RESOURCES_EXAMPLE)
    if not isinstance(data, dict):  # a ValueError: from_env reports it as the variable's problem
        raise ValueError(f"use an object of resource name -> number, e.g. {_RESOURCES_EXAMPLE}")  # noqa: TRY004
    problems, out = [], []
    for name, amount in data.items():
        problem = resource_name_problem(name, gpu_resource=None)
        if problem is None and is_hugepages(name):
            problem = (
                f"{name}: hugepages need a job's memory request, so set them per job "
                "(spec.resources.extraResources with spec.resources.memory)"
            )
        text = str(amount) if isinstance(amount, int) and not isinstance(amount, bool) else amount
        if problem is None and not (isinstance(text, str) and text.isdigit()):
            problem = f"{name}: {amount!r} is not a whole number of devices, e.g. 1"
        if problem:
            problems.append(problem)
        else:
            out.append((name, text))
    if problems:
        raise ValueError("; ".join(problems))
    return tuple(sorted(out))


def _int_between(low: int, high: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise ValueError(f"use a whole number from {low} to {high}") from None
        if not low <= value <= high:
            raise ValueError(f"use a whole number from {low} to {high}")
        return value

    return parse


#: (field, parser, whether an empty value means "none" rather than "the default")
_PARSERS: tuple[tuple[str, Callable[[str], Any], bool], ...] = (
    ("trainer_image", _image, False),
    ("output_root", _output_root, False),
    ("s3_endpoint", _endpoint, True),
    ("s3_secure", _boolean, False),
    ("credentials_secret", _secret_name, True),
    ("namespaces", _namespaces, True),
    ("poll_interval_seconds", _int_between(1, 3600), False),
    ("api_timeout_seconds", _int_between(1, 600), False),
    ("stall_timeout_seconds", _int_between(10, 7 * 24 * 3600), False),
    ("trainer_metrics_port", _int_between(1, 65535), False),
    ("metrics_port", _int_between(1, 65535), False),
    ("health_port", _int_between(1, 65535), False),
    ("termination_grace_seconds", _int_between(0, 24 * 3600), False),
    ("trainer_env", _trainer_env, True),
    ("trainer_extra_resources", _trainer_extra_resources, True),
)
