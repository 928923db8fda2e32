"""Job files a person hands to the ``dreambooth`` command: read as kubectl reads them,
with every problem a :class:`UsageError` that names the file and what to fix."""

from __future__ import annotations

import sys
from pathlib import Path

from dreambooth.api import (
    API_VERSION,
    KIND,
    Defaults,
    DreamBoothJob,
    SpecError,
    manifest,
    validate_job,
)
from dreambooth.api.manifest import Document, ManifestError


class UsageError(Exception):
    """A problem with the command line or an input file; printed without a traceback."""


def load_documents(path: Path) -> list[Document]:
    """Every document of a manifest file, read as kubectl reads it (dreambooth/api/manifest.py)."""
    try:
        return manifest.read(path)
    except ManifestError as err:
        raise UsageError(str(err)) from None


def job_documents(path: Path, also: tuple[str, ...] = ()) -> list[Document]:
    """The DreamBoothJobs (and the ``also`` kinds, e.g. DreamBoothSweep) of ``path``; every
    other document is named on stderr, not skipped silently; a document without ``kind`` is
    an error."""
    jobs = []
    for doc in load_documents(path):
        if doc.kind == KIND or doc.kind in also:
            jobs.append(doc)
        elif doc.kind is None:
            raise UsageError(f"{doc.where}: no kind: add kind: {KIND} and apiVersion: {API_VERSION}")
        else:
            print(f"{doc.where}: {doc.kind} {doc.name} is not a {KIND}: not checked", file=sys.stderr)
    return jobs


def load_job(path: Path, *, cluster: bool = False) -> DreamBoothJob:
    """The one DreamBoothJob in ``path``."""
    jobs = job_documents(path)
    if len(jobs) != 1:
        found = ", ".join(f"{d.where} ({d.name})" for d in jobs) or "none"
        raise UsageError(f"{path} must hold exactly one {KIND}; found {len(jobs)}: {found}")
    try:
        return validate_job(jobs[0].data, cluster=cluster)
    except SpecError as err:
        raise UsageError(f"{jobs[0].where}: {err}") from None


def local_defaults(output_root: str | None) -> Defaults:
    root = output_root or (Path.cwd() / "runs").as_uri()
    return Defaults(output_root=root)
