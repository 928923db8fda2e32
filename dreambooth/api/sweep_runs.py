"""A sweep's runs as DreamBoothJobs, and what its comparison is made from (pure).

The runs are DreamBoothJobs named ``<sweep>-<number>``, owned by the sweep (the garbage
collector deletes them with it), labelled with the sweep's name, writing below the sweep's
prefix (``runs/<job>/``), so they share the bucket's class-image cache.

The comparison (:class:`CompareConfig`): the runs' prefixes and values, the steps and
schedulers of its rows, the prompts (its columns). The operator hands it to a
small Job running the trainer image (``python -m dreambooth.trainer.compare``), and
``dreambooth sweep`` to the same code in-process; both write ``compare.png`` (rows: runs x
steps x schedulers, columns: prompts) and ``compare.json`` (every figure) to the sweep's
prefix.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from dreambooth.api.config import Defaults, output_uri_for
from dreambooth.api.evaluation import Figures
from dreambooth.api.job import API_VERSION, KIND, DreamBoothJob
from dreambooth.api.resolve import effective_spec
from dreambooth.api.spec import ApiModel
from dreambooth.api.sweep import KIND as SWEEP_KIND
from dreambooth.api.sweep import DreamBoothSweep, DreamBoothSweepSpec, Plan, Run, child_spec

#: on every run: the sweep it belongs to, and its number in the plan
SWEEP_LABEL = "dreambooth.io/sweep"
RUN_LABEL = "dreambooth.io/sweep-run"
RUNS = "runs/"
COMPARE_PNG = "compare.png"
COMPARE_JSON = "compare.json"
#: the environment variable holding the CompareConfig (JSON) of a compare pod
CONFIG_ENV = "DREAMBOOTH_COMPARE_CONFIG"


def run_name(sweep: str, number: int) -> str:
    return f"{sweep}-{number}"


def sweep_output_uri(sweep: DreamBoothSweep, defaults: Defaults) -> str:
    """The sweep's own prefix: the template's output.uri, else ``<root>/<namespace>/<sweep>/``."""
    as_job = DreamBoothJob(api_version=API_VERSION, kind=KIND, metadata=sweep.metadata, spec=sweep.spec.template)
    return output_uri_for(as_job, defaults)


def run_output_uri(sweep_out: str, name: str) -> str:
    return f"{sweep_out}{RUNS}{name}/"


def child_job(sweep: DreamBoothSweep, run: Run, the_plan: Plan, sweep_out: str) -> dict[str, Any]:
    """The DreamBoothJob of ``run``: owned by the sweep, labelled, below the sweep's prefix."""
    meta = sweep.metadata
    name = run_name(meta.name, run.number)
    spec = child_spec(sweep.spec, run, the_plan)
    spec.setdefault("output", {})["uri"] = run_output_uri(sweep_out, name)
    metadata: dict[str, Any] = {
        "name": name,
        "labels": {**meta.labels, SWEEP_LABEL: meta.name, RUN_LABEL: str(run.number)},
    }
    if meta.namespace:
        metadata["namespace"] = meta.namespace
    if meta.uid:
        metadata["ownerReferences"] = [
            {
                "apiVersion": API_VERSION,
                "kind": SWEEP_KIND,
                "name": meta.name,
                "uid": meta.uid,
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
    return {"apiVersion": API_VERSION, "kind": KIND, "metadata": metadata, "spec": spec}


class CompareRun(ApiModel):
    name: str = Field(description="The run's job name.")
    label: str = Field(description="The run's values in a few words, e.g. learningRate=5e-06.")
    values: dict[str, Any] = Field(default_factory=dict, description="The run's training-axis values.")
    output: str = Field(description="The run's output prefix.")


class CompareConfig(ApiModel):
    api_version: Literal["dreambooth.io/v1alpha1"] = "dreambooth.io/v1alpha1"
    kind: Literal["CompareConfig"] = "CompareConfig"
    sweep: str
    output: str = Field(description="The sweep's prefix: compare.png and compare.json go here.")
    runs: list[CompareRun]
    steps: list[int]
    schedulers: list[str]
    prompts: list[str]
    resolution: int


def compare_config(sweep: DreamBoothSweep, the_plan: Plan, output: str) -> CompareConfig:
    """The comparison of ``sweep`` whose prefix is ``output``."""
    spec: DreamBoothSweepSpec = sweep.spec
    eff = effective_spec(spec.template)
    names = [run_name(sweep.metadata.name, r.number) for r in the_plan.runs]
    runs = [
        CompareRun(name=n, label=r.label(), values=dict(r.values), output=run_output_uri(output, n))
        for n, r in zip(names, the_plan.runs, strict=True)
    ]
    return CompareConfig(
        sweep=sweep.metadata.name,
        output=output,
        runs=runs,
        steps=list(the_plan.steps),
        schedulers=list(the_plan.schedulers),
        prompts=list(eff.validation.prompts),
        resolution=eff.training.resolution,
    )


_FIGURE_NAMES = {f.alias or n for n, f in Figures.model_fields.items()} | set(Figures.model_fields)
#: what a container's termination message holds at most (Kubernetes: 4096 bytes)
TERMINATION_MAX = 4096


class RowFigures(ApiModel):
    """One evaluated row of the comparison: a run's main-scheduler round at a step."""

    run: str
    figures: Figures


class CompareSummary(ApiModel):
    """The comparison pod's termination message: the figures of every evaluated row the
    message can hold (``complete``: all of them; compare.json always has every one)."""

    rows: list[RowFigures] = Field(default_factory=list)
    complete: bool = True

    def dumps(self) -> str:
        """At most :data:`TERMINATION_MAX` bytes: the first rows that fit."""
        summary = self
        text = summary.model_dump_json(by_alias=True, exclude_none=True)
        while len(text.encode()) > TERMINATION_MAX and summary.rows:
            keep = max(0, len(summary.rows) * TERMINATION_MAX // len(text.encode()) - 1)
            summary = CompareSummary(rows=summary.rows[:keep], complete=False)
            text = summary.model_dump_json(by_alias=True, exclude_none=True)
        return text


def summary_of(compare_json: dict[str, Any]) -> CompareSummary:
    """The evaluated rows of compare.json, compactly (figures only, no per-prompt detail)."""
    rows = []
    for row in compare_json["rows"]:
        record = row.get("evaluation")
        if record:
            figures = Figures.model_validate({k: v for k, v in record.items() if k in _FIGURE_NAMES})
            rows.append(RowFigures(run=row["run"], figures=figures))
    return CompareSummary(rows=rows)
