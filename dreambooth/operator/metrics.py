"""The operator's own Prometheus metrics (``dreambooth_operator_*``), served on
``DREAMBOOTH_METRICS_PORT`` (default 8080) next to kopf's health endpoint."""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from dreambooth.api.status import Phase

JOBS = "dreambooth_operator_jobs"
RECONCILE_SECONDS = "dreambooth_operator_reconcile_seconds"
ERRORS = "dreambooth_operator_errors"
#: exported with prometheus_client's ``_total`` suffix
TRANSITIONS = "dreambooth_operator_job_phase_transitions"


class PhaseCollector(Collector):
    """``dreambooth_operator_jobs{phase}``: DreamBoothJobs by phase, from the last status the
    operator wrote for each (every phase is always exported, zero included)."""

    def __init__(self) -> None:
        self.phases: dict[tuple[str, str], Phase] = {}

    def set(self, namespace: str, name: str, phase: Phase) -> None:
        self.phases[(namespace, name)] = phase

    def forget(self, namespace: str, name: str) -> None:
        self.phases.pop((namespace, name), None)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        counts = Tally(self.phases.values())
        family = GaugeMetricFamily(JOBS, "DreamBoothJobs by phase.", labels=["phase"])
        for phase in Phase:
            family.add_metric([phase.value], counts.get(phase, 0))
        yield family


class OperatorMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.jobs = PhaseCollector()
        self.registry.register(self.jobs)
        self.reconcile_seconds = Histogram(
            RECONCILE_SECONDS,
            "Time to reconcile one DreamBoothJob (create or observe).",
            ["handler"],
            registry=self.registry,
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, float("inf")),
        )
        self.errors = Counter(ERRORS, "Handler errors (retried by kopf).", ["handler"], registry=self.registry)
        self.transitions = Counter(
            TRANSITIONS,
            "DreamBoothJobs that entered each phase (counted when the operator writes it).",
            ["phase"],
            registry=self.registry,
        )
        for phase in Phase:  # every series exists from the start: increase() sees the first one
            self.transitions.labels(phase.value)

    def entered(self, previous: Phase | None, phase: Phase) -> None:
        """Count a job's phase change (a job seen again in the phase it had is not one)."""
        if previous is not phase:
            self.transitions.labels(phase.value).inc()

    def serve(self, port: int) -> None:
        start_http_server(port, registry=self.registry)
