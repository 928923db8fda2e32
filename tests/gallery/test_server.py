"""The gallery is safe to expose: against a real server, the simulated cluster and S3 with a
finished tiny job. Keys outside the job's prefix, ``..``, another namespace and every
non-GET method are refused; no answer carries an S3 credential; every answer has the
security headers; it binds 127.0.0.1 unless told otherwise."""

from __future__ import annotations

import http.client
import json
import urllib.parse

import pytest

from dreambooth.cli import build_parser
from tests.gallery.conftest import NAMESPACE, STEPS


def request(world, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    url = urllib.parse.urlsplit(world.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    conn.request(method, path)  # the path is sent as written: no client-side normalization
    response = conn.getresponse()
    body = response.read()
    conn.close()
    return response.status, dict(response.getheaders()), body


JOB = f"/jobs/{NAMESPACE}/toy-cat"


@pytest.mark.parametrize(
    "path",
    [
        f"{JOB}/files/../../other/toy-cat/samples/step-2.png",
        f"{JOB}/files/samples/../../../other/toy-cat/result.json",
        f"{JOB}/files/samples/..%2f..%2fresult.json",
        f"{JOB}/files/%2e%2e/%2e%2e/models/tiny/model_index.json",
        f"{JOB}/files/checkpoints/checkpoint-4/optimizer.pt",
        f"{JOB}/files/checkpoints/checkpoint-4/manifest.json",
        f"{JOB}/files/model/model_index.json",
        f"{JOB}/files//etc/passwd",
        "/jobs/other/toy-cat/files/samples/step-2.png",
        "/jobs/other/toy-cat",
        "/jobs/kube-system/anything/live",
        "/static/../../pyproject.toml",
    ],
)
def test_keys_outside_the_job_traversal_and_other_namespaces_are_refused(world, path):
    status, _, body = request(world, path)
    assert status == 404, (path, status, body[:200])
    assert b"PNG" not in body[:8] and b"model_index" not in body


def test_the_same_keys_inside_the_job_are_served(world):
    status, headers, body = request(world, f"{JOB}/files/samples/step-{STEPS}.png")
    assert status == 200 and body[:8] == b"\x89PNG\r\n\x1a\n" and headers["Content-Type"] == "image/png"


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
@pytest.mark.parametrize("path", ["/", JOB, f"{JOB}/files/result.json", f"{JOB}/live", "/nowhere"])
def test_there_is_no_write_endpoint(world, method, path):
    status, headers, _ = request(world, path, method)
    assert status == 405 and headers["Allow"] == "GET, HEAD"


def test_no_answer_carries_an_s3_credential_and_all_have_the_security_headers(world):
    paths = [
        "/",
        "/live",
        "/?namespace=ml&phase=Succeeded",
        JOB,
        f"{JOB}/live",
        "/jobs/ml/toy-cat-live",
        f"{JOB}/files/history.jsonl",
        f"{JOB}/files/result.json",
        f"{JOB}/files/samples/progression.png",
        "/jobs/other/toy-cat",
        f"{JOB}/files/../x",
        "/static/gallery.js",
        "/static/gallery.css",
        "/nowhere",
    ]
    secrets = [world.s3.secret_key.encode(), world.s3.access_key.encode()]
    for path in paths:
        status, headers, body = request(world, path)
        text = body + json.dumps(headers).encode()
        assert not any(s in text for s in secrets), f"{path} carries a credential"
        assert b"X-Amz-" not in text and b"Signature=" not in text, f"{path} carries a presigned URL"
        assert "script-src 'self'" in headers["Content-Security-Policy"], path
        assert "frame-ancestors 'none'" in headers["Content-Security-Policy"], path
        assert headers["X-Content-Type-Options"] == "nosniff", path
        assert status in (200, 404), (path, status)


def test_pages_have_no_inline_script_or_style(world):
    for path in ("/", JOB):
        _, _, body = request(world, path)
        html = body.decode()
        assert html.count("<script") == 1 and '<script src="/static/gallery.js" defer></script>' in html
        assert " style=" not in html and "<style" not in html and " onclick=" not in html


def test_it_binds_localhost_unless_told():
    args = build_parser().parse_args(["gallery", "runs"])
    assert args.host == "127.0.0.1"
    assert build_parser().parse_args(["gallery", "--host", "0.0.0.0"]).host == "0.0.0.0"


def test_the_jobs_page_lists_only_the_shown_namespace(world):
    _, _, body = request(world, "/")
    html = body.decode()
    assert 'href="/jobs/ml/toy-cat"' in html and 'href="/jobs/ml/toy-cat-live"' in html
    assert "/jobs/other/" not in html
