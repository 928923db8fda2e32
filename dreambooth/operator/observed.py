"""What one poll cycle saw of a namespace: every trainer Job and trainer pod, listed once.

Reading each job's Job and pods separately costs two requests per job every poll interval
(2,000 requests per 10 s for 1,000 jobs); one list of Jobs and one of pods per namespace
serve every job in it. Grouping is pure; :mod:`dreambooth.operator.kube` does the listing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from dreambooth.operator import naming


def _labels(obj: Mapping[str, Any]) -> Mapping[str, str]:
    return (obj.get("metadata") or {}).get("labels") or {}


@dataclass(frozen=True)
class NamespaceView:
    """Trainer Jobs by name and trainer pods by their DreamBoothJob's name."""

    jobs: dict[str, dict[str, Any]] = field(default_factory=dict)
    pods: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    @classmethod
    def of(cls, jobs: Iterable[dict[str, Any]], pods: Iterable[dict[str, Any]]) -> NamespaceView:
        by_name = {job["metadata"]["name"]: job for job in jobs}
        by_owner: dict[str, list[dict[str, Any]]] = {}
        for pod in pods:
            owner = _labels(pod).get(naming.JOB_NAME_LABEL)
            if owner:
                by_owner.setdefault(owner, []).append(pod)
        return cls(by_name, by_owner)

    def trainer_job(self, job_name: str) -> dict[str, Any] | None:
        """The batch Job of DreamBoothJob ``job_name`` (None: it does not exist)."""
        return self.jobs.get(naming.trainer_name(job_name))

    def trainer_pods(self, job_name: str) -> list[dict[str, Any]]:
        return self.pods.get(job_name, [])
