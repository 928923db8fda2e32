"""The gallery's aiohttp app: GET only, security headers on every answer, outputs proxied.

Routes: ``/`` (jobs), ``/live`` (the jobs table's rows, for polling), ``/jobs/<ns>/<name>``,
``…/live`` (the parts of a job page that change), ``…/files/<key>`` (one output, streamed
from storage after :func:`~dreambooth.gallery.keys.served_key` accepted the key),
``/static/<file>``, ``/healthz``. Any other method than GET (and HEAD) is 405: there is no
write endpoint. The browser never gets a storage credential or URL: images come from here.
"""

from __future__ import annotations

import logging
from importlib import resources

from aiohttp import web

from dreambooth.api import layout
from dreambooth.api.history import parse
from dreambooth.gallery.keys import KeyRefused, content_type, served_key
from dreambooth.gallery.kube import Forbidden
from dreambooth.gallery.objects import Missing, Unavailable
from dreambooth.gallery.outputs import outputs_of
from dreambooth.gallery.pages.job import JobData, job_page, live_parts
from dreambooth.gallery.pages.jobs import jobs_page, rows_html
from dreambooth.gallery.sources import NotShown, Source
from dreambooth.gallery.templates import esc, render
from dreambooth.gallery.views import Filter, job_rows

log = logging.getLogger("dreambooth.gallery")

#: what pages may load and do: their own script and style files, images from here, polling
#: here; nothing inline, no frames, no plugins, no form posts elsewhere
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Resource-Policy": "same-origin",
}
STATIC = {"gallery.js": "text/javascript", "gallery.css": "text/css", "favicon.svg": "image/svg+xml"}
READ_METHODS = frozenset({"GET", "HEAD"})

SOURCE = web.AppKey("source", Source)
WHERE = web.AppKey("where", str)


@web.middleware
async def guard(request: web.Request, handler):
    """405 for every method but GET/HEAD (before routing: no handler ever sees one), the
    security headers on every answer, errors as short pages without internals."""
    if request.method not in READ_METHODS:
        response: web.StreamResponse = web.Response(status=405, text="read only\n", headers={"Allow": "GET, HEAD"})
    else:
        try:
            response = await handler(request)
        except web.HTTPException as err:
            response = web.Response(status=err.status, text=err.text or err.reason, content_type="text/plain")
        except NotShown as err:
            response = _error_page(request, 404, str(err))
        except Forbidden as err:
            response = _error_page(request, 403, str(err))
        except Exception:
            log.exception("answering %s", request.path)
            response = _error_page(request, 500, "the gallery failed to answer; its log has the cause")
    if not response.prepared:
        response.headers.update(HEADERS)
    return response


def _error_page(request: web.Request, status: int, message: str) -> web.Response:
    body = f'<h1>{status}</h1><p class="notice">{esc(message)}</p><p><a href="/">all jobs</a></p>'
    html = render("base.html", title=str(status), page="error", live="", where=request.app[WHERE], html={"body": body})
    return web.Response(status=status, text=html, content_type="text/html")


def _filter(request: web.Request) -> Filter:
    return Filter(namespace=request.query.get("namespace", "")[:253], phase=request.query.get("phase", "")[:64])


async def _rows(request: web.Request):
    source = request.app[SOURCE]
    objects = await source.jobs()
    only = _filter(request)
    rows = job_rows(objects, only)
    namespaces = list(source.namespaces) or sorted({r.namespace for r in job_rows(objects)})
    return rows, namespaces, only


async def jobs(request: web.Request) -> web.Response:
    rows, namespaces, only = await _rows(request)
    html = jobs_page(rows, namespaces, only, request.app[WHERE])
    return web.Response(text=html, content_type="text/html", headers={"Cache-Control": "no-store"})


async def jobs_live(request: web.Request) -> web.Response:
    rows, _, _ = await _rows(request)
    return web.json_response({"rows": rows_html(rows), "count": str(len(rows))}, headers={"Cache-Control": "no-store"})


async def job_data(request: web.Request) -> JobData:
    source = request.app[SOURCE]
    namespace, name = request.match_info["namespace"], request.match_info["name"]
    obj = await source.job(namespace, name)
    if obj is None:
        raise NotShown(f"no DreamBoothJob {namespace}/{name}")
    try:
        store = source.store(obj)
        keys = await store.keys()
        history = parse(await store.read(layout.HISTORY) or b"") if layout.HISTORY in keys else []
        evaluation = await store.read(layout.EVALUATION) if layout.EVALUATION in keys else None
        return JobData(obj, outputs_of(keys, evaluation), history, store.uri)
    except Unavailable as err:
        return JobData(obj, None, [], "", unavailable=str(err))


async def job(request: web.Request) -> web.Response:
    html = job_page(await job_data(request), request.app[WHERE])
    return web.Response(text=html, content_type="text/html", headers={"Cache-Control": "no-store"})


async def job_live(request: web.Request) -> web.Response:
    return web.json_response(live_parts(await job_data(request)), headers={"Cache-Control": "no-store"})


async def job_file(request: web.Request) -> web.StreamResponse:
    source = request.app[SOURCE]
    namespace, name = request.match_info["namespace"], request.match_info["name"]
    try:
        key = served_key(request.match_info["key"])
    except KeyRefused as err:
        raise web.HTTPNotFound(text=f"{err}\n") from None
    obj = await source.job(namespace, name)
    if obj is None:
        raise NotShown(f"no DreamBoothJob {namespace}/{name}")
    try:
        size, chunks = await source.store(obj).stream(key)
    except Missing:
        raise web.HTTPNotFound(text="no such output\n") from None
    except Unavailable as err:
        raise web.HTTPServiceUnavailable(text=f"{err}\n") from None
    cache = "private, max-age=300" if key.endswith(".png") else "no-store"
    response = web.StreamResponse(headers={"Content-Type": content_type(key), "Cache-Control": cache, **HEADERS})
    if size:
        response.content_length = size
    if key.endswith(".safetensors"):
        response.headers["Content-Disposition"] = f'attachment; filename="{key.rsplit("/", 1)[-1]}"'
    await response.prepare(request)
    async for data in chunks:
        await response.write(data)
    await response.write_eof()
    return response


async def static(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if name not in STATIC:
        raise web.HTTPNotFound(text="no such file\n")
    text = resources.files("dreambooth.gallery").joinpath("static", name).read_text()
    return web.Response(text=text, content_type=STATIC[name], headers={"Cache-Control": "max-age=60"})


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


def make_app(source: Source, where: str) -> web.Application:
    app = web.Application(middlewares=[guard], client_max_size=1024)
    app[SOURCE], app[WHERE] = source, where
    app.router.add_get("/", jobs)
    app.router.add_get("/live", jobs_live)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/static/{name}", static)
    app.router.add_get("/jobs/{namespace}/{name}", job)
    app.router.add_get("/jobs/{namespace}/{name}/live", job_live)
    app.router.add_get("/jobs/{namespace}/{name}/files/{key:.+}", job_file)

    async def close(app: web.Application) -> None:
        await source.close()

    app.on_cleanup.append(close)
    return app
