"""The jobs page: every job the viewer may see, filterable by namespace and phase."""

from __future__ import annotations

from datetime import datetime
from urllib.parse import quote

from dreambooth.gallery.templates import esc, render
from dreambooth.gallery.views import PHASES, Filter, JobRow, age, duration, loss_text


def job_href(namespace: str, name: str) -> str:
    return f"/jobs/{quote(namespace, safe='')}/{quote(name, safe='')}"


def row_html(row: JobRow, now: datetime | None = None) -> str:
    return render(
        "job_row.html",
        key=row.key,
        href=job_href(row.namespace, row.name),
        namespace=row.namespace,
        name=row.name,
        phase=row.phase,
        percent=f"{row.percent:g}",
        summary=row.summary,
        loss=loss_text(row.loss),
        eta=duration(row.eta_seconds),
        family=row.family,
        age=age(row.created, now),
    )


def rows_html(rows: list[JobRow], now: datetime | None = None) -> str:
    if not rows:
        return '<tr><td colspan="7" class="muted">no jobs</td></tr>'
    return "".join(row_html(r, now) for r in rows)


def _options(values: list[str], chosen: str, everything: str) -> str:
    out = [f'<option value=""{" selected" if not chosen else ""}>{esc(everything)}</option>']
    out += [f'<option value="{esc(v)}"{" selected" if v == chosen else ""}>{esc(v)}</option>' for v in values]
    return "".join(out)


def jobs_page(rows: list[JobRow], namespaces: list[str], only: Filter, where: str, now: datetime | None = None) -> str:
    phases = list(PHASES) + sorted({r.phase for r in rows} - set(PHASES))
    body = render(
        "jobs.html",
        count=f"{len(rows)}",
        html={
            "namespace_options": _options(sorted(set(namespaces)), only.namespace, "all namespaces"),
            "phase_options": _options(phases, only.phase, "all phases"),
            "rows": rows_html(rows, now),
        },
    )
    return render("base.html", title="Jobs", page="jobs", live="/live", where=where, html={"body": body})
