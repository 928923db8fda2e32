"""A DreamBoothSweep's runs and status, from the sweep and its child DreamBoothJobs. Pure.

The runs are built by :func:`dreambooth.api.sweep_runs.child_job`. At most ``maxParallel``
runs are unfinished at once: the next ones are created as earlier ones finish (a failed
run is finished too: the others go on).
``spec.suspend`` is mirrored onto every unfinished run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dreambooth.api import evaluation as judged
from dreambooth.api import layout, validate_job
from dreambooth.api.config import Defaults
from dreambooth.api.job import API_VERSION
from dreambooth.api.resolve import effective_spec
from dreambooth.api.status import DreamBoothJobStatus, Phase
from dreambooth.api.sweep import KIND as SWEEP_KIND
from dreambooth.api.sweep import DreamBoothSweep, Plan, Row, Run, plan
from dreambooth.api.sweep_runs import (
    COMPARE_JSON,
    COMPARE_PNG,
    CONFIG_ENV,
    SWEEP_LABEL,
    CompareSummary,
    child_job,
    compare_config,
    run_name,
    run_output_uri,
    sweep_output_uri,
)
from dreambooth.api.sweep_status import DreamBoothSweepStatus, SweepPhase, SweepRow
from dreambooth.operator import naming, podtemplate, trainerinputs
from dreambooth.operator.settings import OperatorSettings


def _status_of(child: Mapping[str, Any] | None) -> DreamBoothJobStatus | None:
    raw = (child or {}).get("status")
    try:
        return DreamBoothJobStatus.model_validate(raw) if raw else None
    except ValueError:
        return None


def _finished(child: Mapping[str, Any]) -> bool:
    status = _status_of(child)
    return status is not None and status.phase.finished


@dataclass(frozen=True)
class Actions:
    """What the operator does for a sweep now: jobs to create, (name, suspend) to patch."""

    create: list[dict[str, Any]]
    suspend: list[tuple[str, bool]]


def actions(sweep: DreamBoothSweep, children: Mapping[str, Mapping[str, Any]], defaults: Defaults) -> Actions:
    """``children``: the sweep's DreamBoothJobs by name. New runs in plan order, while fewer
    than maxParallel are unfinished (none while suspended); suspend mirrored onto the rest."""
    the_plan = plan(sweep.spec)
    out = sweep_output_uri(sweep, defaults)
    unfinished = sum(1 for c in children.values() if not _finished(c))
    create = []
    if not sweep.spec.suspend:
        for run in the_plan.runs:
            if unfinished >= sweep.spec.max_parallel:
                break
            if run_name(sweep.metadata.name, run.number) not in children:
                create.append(child_job(sweep, run, the_plan, out))
                unfinished += 1
    suspend = [
        (name, sweep.spec.suspend)
        for name, child in sorted(children.items())
        if not _finished(child)
        and bool(((child.get("spec") or {}).get("runPolicy") or {}).get("suspend")) != sweep.spec.suspend
    ]
    return Actions(create, suspend)


def _values(run: Run) -> dict[str, str]:
    return {field: str(value).lower() if isinstance(value, bool) else str(value) for field, value in run.values}


def _failure(status: DreamBoothJobStatus) -> str:
    failed = next((c for c in status.conditions if c.type == "Failed" and c.status == "True"), None)
    return f"{failed.reason}: {failed.message}"[:1024] if failed else ""


def _row(
    sweep: DreamBoothSweep,
    the_plan: Plan,
    row: Row,
    child: Mapping[str, Any] | None,
    out: str,
    judged_rows: Mapping[tuple[str, int], judged.Figures],
) -> SweepRow:
    run = the_plan.runs[row.run - 1]
    name = run_name(sweep.metadata.name, row.run)
    status = _status_of(child)
    main = row.scheduler == the_plan.schedulers[0]
    cells: dict[str, Any] = {"run": name, "values": _values(run), "step": row.step, "scheduler": row.scheduler}
    if child is None:
        return SweepRow(**cells)
    cells["phase"] = status.phase.value if status else Phase.PENDING.value
    if status is None:
        return SweepRow(**cells)
    if status.progress is not None and status.phase.finished:
        cells["final_loss"] = status.progress.loss
    figures = status.evaluation
    if main and (name, row.step) in judged_rows:  # the comparison's: every step
        cells["evaluation"] = judged_rows[(name, row.step)]
    elif main and figures is not None and figures.step == row.step:  # the run's latest round
        cells["evaluation"] = judged.Figures.model_validate(
            figures.model_dump(include=set(judged.Figures.model_fields))
        )
    if status.phase is Phase.SUCCEEDED or (status.progress and status.progress.step >= row.step):
        cells["samples"] = run_output_uri(out, name) + layout.sample_grid(row.step, None if main else row.scheduler)
    if status.outputs is not None:
        cells["best_checkpoint"] = status.outputs.best_checkpoint
    if status.phase is Phase.FAILED:
        cells["message"] = _failure(status)
    return SweepRow(**cells)


def best_run(
    sweep: DreamBoothSweep,
    children: Mapping[str, Mapping[str, Any]],
    judged_rows: Mapping[tuple[str, int], judged.Figures] | None = None,
) -> tuple[str, int] | None:
    """The (run, step) whose round ranks first by dreambooth.api.evaluation's score (rounds
    with an overfitting sign last) among the succeeded runs: over every step's round once
    the comparison reported them, else over each run's latest round."""
    thresholds = effective_spec(sweep.spec.template).evaluation.thresholds
    succeeded = {n for n, c in children.items() if (s := _status_of(c)) is not None and s.phase is Phase.SUCCEEDED}
    if judged_rows:
        rows = [(run, figures) for (run, _), figures in sorted(judged_rows.items()) if run in succeeded]
        records = [
            judged.Record(**f.model_dump(), checkpoint=run, signs=judged.overfitting_signs(f, thresholds))
            for run, f in rows
        ]
        chosen = judged.best(records)
        return next(((run, f.step) for (run, f), r in zip(rows, records, strict=True) if r is chosen), None)
    candidates = []
    for name, child in sorted(children.items()):
        status = _status_of(child)
        if status is None or status.evaluation is None or status.phase is not Phase.SUCCEEDED:
            continue
        figures = judged.Figures.model_validate(status.evaluation.model_dump(include=set(judged.Figures.model_fields)))
        best = status.evaluation.best_checkpoint
        record = judged.Record(
            **figures.model_dump(),
            checkpoint=best.uri if best else name,
            signs=judged.overfitting_signs(figures, thresholds),
        )
        candidates.append((record, name, best.step if best else figures.step))
    chosen = judged.best([c[0] for c in candidates])
    return next(((n, s) for r, n, s in candidates if r is chosen), None) if chosen else None


def sweep_status(
    sweep: DreamBoothSweep,
    children: Mapping[str, Mapping[str, Any]],
    defaults: Defaults,
    *,
    compared: bool = False,
    summary: CompareSummary | None = None,
) -> DreamBoothSweepStatus:
    """The sweep's status: one row per (run, step, scheduler), the counts, the best run.
    ``compared``: compare.png and compare.json are written (the end of the sweep);
    ``summary``: the figures of every evaluated row, from the comparison pod."""
    the_plan = plan(sweep.spec)
    out = sweep_output_uri(sweep, defaults)
    by_number = {n: children.get(run_name(sweep.metadata.name, n)) for n in range(1, len(the_plan.runs) + 1)}
    judged_rows = {(r.run, r.figures.step): r.figures for r in (summary.rows if summary else ())}
    rows = [_row(sweep, the_plan, row, by_number[row.run], out, judged_rows) for row in the_plan.rows]
    phases = [s.phase for c in by_number.values() if c is not None and (s := _status_of(c)) is not None]
    succeeded, failed = phases.count(Phase.SUCCEEDED), phases.count(Phase.FAILED)
    total, created = len(the_plan.runs), sum(c is not None for c in by_number.values())
    done = succeeded + failed == total
    if sweep.spec.suspend and not done:
        phase, message = SweepPhase.SUSPENDED, "spec.suspend: every unfinished run is suspended"
    elif done and not succeeded:
        phase, message = SweepPhase.FAILED, "every run failed: see the rows' messages"
    elif done:
        phase = SweepPhase.SUCCEEDED if compared else SweepPhase.COMPARING
        message = f"{failed} of {total} runs failed" if failed else ""
        if summary is not None and not summary.complete:
            message = (message + "; " if message else "") + "some rows' figures are only in compare.json"
    elif created:
        phase, message = SweepPhase.RUNNING, ""
    else:
        phase, message = SweepPhase.PENDING, "creating the runs"
    best = best_run(sweep, children, judged_rows)
    return DreamBoothSweepStatus(
        phase=phase,
        runs_total=total,
        runs_created=created,
        runs_succeeded=succeeded,
        runs_failed=failed,
        summary=f"{succeeded + failed}/{total}",
        best_run=best[0] if best else None,
        best_step=best[1] if best else None,
        rows=rows,
        compare=out + COMPARE_PNG if compared else None,
        compare_json=out + COMPARE_JSON if compared else None,
        message=message,
        observed_generation=sweep.metadata.generation,
    )


def children_of(sweep_name: str, jobs: Sequence[Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    """The sweep's runs among a namespace's DreamBoothJobs (by label)."""
    return {
        j["metadata"]["name"]: j
        for j in jobs
        if ((j.get("metadata") or {}).get("labels") or {}).get(SWEEP_LABEL) == sweep_name
    }


# --- the comparison Job ----------------------------------------------------------------------

#: the compare pod's environment taken from a run's trainer pod: S3 and the image's folders
_COMPARE_ENV = (
    "HOME",
    "XDG_CACHE_HOME",
    "HF_HOME",
    "PYTHONUNBUFFERED",
    "PYTHONDONTWRITEBYTECODE",
    "DREAMBOOTH_WORKDIR",
)
COMPARE_CONTAINER = "compare"


def compare_job_name(sweep: str) -> str:
    return f"{sweep}-compare"


def compare_job(sweep: DreamBoothSweep, settings: OperatorSettings) -> dict[str, Any]:
    """The batch Job writing compare.png and compare.json: one CPU pod of the trainer image
    (``python -m dreambooth.trainer.compare``; the operator's image has no PIL) with the S3
    endpoint, credentials and claims of the sweep's runs, owned by the sweep."""
    the_plan = plan(sweep.spec)
    out = sweep_output_uri(sweep, settings.defaults())
    body = child_job(sweep, the_plan.runs[0], the_plan, out)
    body["metadata"]["uid"] = sweep.metadata.uid  # only its pod's settings are used, not its references
    first = validate_job(body, cluster=True)
    inputs = trainerinputs.TrainerInputs(first, settings)
    trainer_pod = podtemplate.pod_template(inputs)["spec"]
    (trainer,) = trainer_pod["containers"]
    config = compare_config(sweep, the_plan, out)
    config = config.model_copy(
        update={
            "output": trainerinputs.local_uri(config.output),
            "runs": [r.model_copy(update={"output": trainerinputs.local_uri(r.output)}) for r in config.runs],
        }
    )
    env = [e for e in trainer["env"] if e["name"].startswith("AWS_") or e["name"] in _COMPARE_ENV]
    env.append({"name": CONFIG_ENV, "value": config.model_dump_json(by_alias=True).replace("$", "$$")})
    keep = {"tmp", "cache"} | {c.volume for c in trainerinputs.claim_mounts(inputs)}
    container = {
        "name": COMPARE_CONTAINER,
        "image": trainer["image"],
        "command": ["python", "-m", "dreambooth.trainer.compare"],
        "env": env,
        "volumeMounts": [m for m in trainer["volumeMounts"] if m["name"] in keep],
        "securityContext": trainer["securityContext"],
        # the figures of every evaluated row, for the status (sweep_runs.CompareSummary)
        "terminationMessagePath": podtemplate.TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    pod = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": trainer_pod["securityContext"],
        "containers": [container],
        "volumes": [v for v in trainer_pod["volumes"] if v["name"] in keep],
    }
    meta = sweep.metadata
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": compare_job_name(meta.name),
            "namespace": meta.namespace,
            "labels": {SWEEP_LABEL: meta.name, naming.MANAGED_BY_LABEL: naming.MANAGER},
            "ownerReferences": [
                {
                    "apiVersion": API_VERSION,
                    "kind": SWEEP_KIND,
                    "name": meta.name,
                    "uid": meta.uid,
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        # Indexed with one completion, as the trainer's Jobs: one pod, retried twice
        "spec": {
            "completionMode": "Indexed",
            "completions": 1,
            "parallelism": 1,
            "backoffLimit": 2,
            "template": {"metadata": {"labels": {SWEEP_LABEL: meta.name}}, "spec": pod},
        },
    }


def compare_outcome(job: Mapping[str, Any] | None) -> bool | None:
    """True: the comparison Job completed; False: it failed; None: not (yet) finished."""
    for condition in ((job or {}).get("status") or {}).get("conditions") or ():
        if condition.get("status") == "True" and condition.get("type") in ("Complete", "Failed"):
            return condition["type"] == "Complete"
    return None


def compare_summary(pods: Sequence[Mapping[str, Any]]) -> CompareSummary | None:
    """The figures the comparison pod that succeeded left in its termination message."""
    for pod in pods:
        if (pod.get("status") or {}).get("phase") != "Succeeded":
            continue
        for cs in (pod.get("status") or {}).get("containerStatuses") or ():
            message = (((cs.get("state") or {}).get("terminated")) or {}).get("message")
            if cs.get("name") == COMPARE_CONTAINER and message:
                try:
                    return CompareSummary.model_validate_json(message)
                except ValueError:
                    return None
    return None
