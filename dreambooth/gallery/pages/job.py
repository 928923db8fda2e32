"""The job page: status and conditions in words, the loss curve, evaluation figures, the
sample grids of every checkpoint (a slider and the arrow keys step through them), the
progression grid and the exports."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import quote

from dreambooth.api import layout
from dreambooth.api.history import Point
from dreambooth.gallery.curve import loss_curve
from dreambooth.gallery.outputs import Outputs, figure_names
from dreambooth.gallery.pages.jobs import job_href
from dreambooth.gallery.templates import esc, render
from dreambooth.gallery.views import condition_lines, facts


@dataclass
class JobData:
    """Everything the page shows, read by the server."""

    obj: dict[str, Any]
    outputs: Outputs | None
    history: list[Point]
    output_uri: str
    #: why the outputs cannot be shown (no secret in it), if they cannot
    unavailable: str = ""

    @property
    def namespace(self) -> str:
        return self.obj["metadata"].get("namespace", "default")

    @property
    def name(self) -> str:
        return self.obj["metadata"]["name"]

    def file_href(self, key: str) -> str:
        return f"{job_href(self.namespace, self.name)}/files/{quote(key)}"


def status_html(data: JobData, now: datetime | None = None) -> str:
    f = facts(data.obj, now)
    lines = []
    for c in condition_lines(data.obj.get("status") or {}):
        state = {True: "holds", False: "not"}.get(c.holds, "unknown")
        message = f' <span class="muted">{esc(c.message)}</span>' if c.message else ""
        lines.append(f'<li class="cond cond-{state}"><b>{esc(c.type)}</b> {esc(c.sentence)}{message}</li>')
    notice = f'<p class="notice">Outputs not shown: {esc(data.unavailable)}</p>' if data.unavailable else ""
    evaluation = (data.obj.get("status") or {}).get("evaluation")
    if isinstance(evaluation, dict) and evaluation:
        items = "".join(
            f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in evaluation.items() if isinstance(v, str | int | float)
        )
        notice += f'<dl class="evaluation-status">{items}</dl>'
    shown = [
        ("loss", f.loss),
        ("learning rate", f.lr),
        ("ETA", f.eta),
        ("family", f.family),
        ("age", f.age),
        ("restarts", str(f.restarts)),
    ]
    dl = "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in shown if v)
    return render(
        "job_status.html",
        phase=f.phase,
        percent=f"{f.percent:g}",
        summary=f.summary,
        html={
            "conditions": "".join(lines) or '<li class="muted">no conditions yet</li>',
            "notice": notice,
            "facts": dl,
        },
    )


def evaluation_html(outputs: Outputs | None) -> str:
    if outputs is None or not outputs.evaluation:
        return ""
    names = figure_names(outputs)
    head = "".join(f"<th>{esc(n)}</th>" for n in names)
    rows = "".join(
        f"<tr><td>{s.step}</td>"
        + "".join(f'<td class="num">{s.figures[n]:.4g}</td>' if n in s.figures else "<td></td>" for n in names)
        + "</tr>"
        for s in outputs.steps
        if s.figures
    )
    return (
        f'<section class="panel" id="evaluation"><h2>Evaluation by checkpoint</h2>'
        f'<table class="figures"><thead><tr><th>step</th>{head}</tr></thead><tbody>{rows}</tbody></table></section>'
    )


def checkpoints_html(data: JobData) -> str:
    steps = [s for s in (data.outputs.steps if data.outputs else []) if s.grid]
    if not steps:
        return '<h2>Samples by checkpoint</h2><p class="muted">no sample grids yet</p>'
    figures = []
    last = len(steps) - 1
    for i, s in enumerate(steps):
        figs = ", ".join(f"{k} {v:.4g}" for k, v in s.figures.items())
        figures.append(
            render(
                "grid.html",
                hidden="" if i == last else " hidden",
                index=i,
                step=s.step,
                src=data.file_href(s.grid),
                kept=" (checkpoint kept)" if s.checkpoint else "",
                html={"figures": f'<p class="muted">{esc(figs)}</p>' if figs else ""},
            )
        )
    return render(
        "checkpoints.html",
        count=len(steps),
        steps=",".join(str(s.step) for s in steps),
        last=last,
        last_step=steps[-1].step,
        html={"figures": "".join(figures)},
    )


def progression_html(data: JobData) -> str:
    if not (data.outputs and data.outputs.progression):
        return ""
    return (
        f'<section class="panel"><h2>Progression</h2><img class="progression" '
        f'src="{data.file_href(layout.PROGRESSION)}" alt="progression grid: rows are steps, columns prompts">'
        "</section>"
    )


def exports_html(data: JobData) -> str:
    if not (data.outputs and data.outputs.exports):
        return '<p class="muted">no exports yet (they are written at the end of the run)</p>'
    items = []
    for key in data.outputs.exports:
        uri = esc(data.output_uri + key)
        if key == layout.SINGLE_FILE:
            items.append(f'<li><a href="{data.file_href(key)}" download>{esc(key)}</a> <code>{uri}</code></li>')
        else:
            items.append(f"<li>{esc(key)} <code>{uri}</code></li>")
    return f'<ul class="exports">{"".join(items)}</ul>'


def live_parts(data: JobData, now: datetime | None = None) -> dict[str, str]:
    """What the page's script replaces while the job runs."""
    steps = [s.step for s in (data.outputs.steps if data.outputs else []) if s.grid]
    return {
        "status": status_html(data, now),
        "curve": loss_curve(data.history),
        "steps": ",".join(map(str, steps)),
        "checkpoints": checkpoints_html(data),
        "phase": (data.obj.get("status") or {}).get("phase") or "",
    }


def job_page(data: JobData, where: str, now: datetime | None = None) -> str:
    body = render(
        "job.html",
        namespace=data.namespace,
        name=data.name,
        html={
            "status": status_html(data, now),
            "curve": loss_curve(data.history),
            "evaluation": evaluation_html(data.outputs),
            "checkpoints": checkpoints_html(data),
            "progression": progression_html(data),
            "exports": exports_html(data),
        },
    )
    live = f"{job_href(data.namespace, data.name)}/live"
    return render(
        "base.html", title=f"{data.namespace}/{data.name}", page="job", live=live, where=where, html={"body": body}
    )
