"""Checkpoints in storage: written atomically, found after a crash, pruned to ``keep``.

A checkpoint is the folder ``checkpoints/checkpoint-<step>/`` of the job's output prefix.
Its ``manifest.json`` (sizes and sha256 of every other file) is written *last*: a folder
without a valid manifest is debris of an interrupted upload and never counts. At start the
trainer resumes from the newest complete checkpoint by itself.

Each file is read once to hash it; that digest goes into the manifest and into the upload
(which records it with the object), and the files of a checkpoint upload in parallel, each
one hashed just before it goes, so hashing one file overlaps uploading another.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from dreambooth.api import layout
from dreambooth.trainer.errors import DataError
from dreambooth.trainer.storage import Storage, parallel

log = logging.getLogger(__name__)


@dataclass(frozen=True, order=True)
class Checkpoint:
    step: int
    prefix: str  # e.g. "checkpoints/checkpoint-200/"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save(storage: Storage, folder: Path, step: int, *, keep: int, protect: int | None = None) -> Checkpoint:
    """Upload ``folder`` as the checkpoint of ``step`` (files in parallel, each read once to
    hash it), the manifest last, then prune (never the checkpoint of step ``protect``)."""
    checkpoint = Checkpoint(step, layout.checkpoint(step))
    storage.delete_prefix(checkpoint.prefix)  # debris of an earlier, interrupted attempt
    names = sorted(
        p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != layout.MANIFEST
    )

    def put(name: str) -> dict:
        path = folder / name
        meta = {"size": path.stat().st_size, "sha256": _sha256(path)}
        storage.upload_file(path, checkpoint.prefix + name, sha256=meta["sha256"])
        return meta

    manifest = {"step": step, "files": dict(zip(names, parallel(put, names, storage.workers), strict=True))}
    storage.write_bytes(checkpoint.prefix + layout.MANIFEST, json.dumps(manifest, indent=1).encode())
    prune(storage, keep=keep, protect=protect)
    return checkpoint


def _groups(storage: Storage) -> dict[int, dict[str, int]]:
    """Object sizes by relative name, grouped by checkpoint step."""
    groups: dict[int, dict[str, int]] = {}
    for obj in storage.list(layout.CHECKPOINTS):
        found = layout.checkpoint_step(obj.key)
        if found:
            step, name = found
            groups.setdefault(step, {})[name] = obj.size
    return groups


def _manifest(storage: Storage, step: int, present: dict[str, int]) -> dict | None:
    """The checkpoint's manifest if it is complete: every listed file there, sizes right."""
    if layout.MANIFEST not in present:
        return None
    try:
        manifest = json.loads(storage.read_bytes(layout.checkpoint(step) + layout.MANIFEST))
        files = manifest["files"]
        complete = manifest["step"] == step and all(present.get(name) == meta["size"] for name, meta in files.items())
    except (ValueError, KeyError, TypeError):
        return None
    return manifest if complete else None


def complete(storage: Storage) -> list[Checkpoint]:
    """Complete checkpoints, oldest first."""
    return sorted(
        Checkpoint(step, layout.checkpoint(step))
        for step, present in _groups(storage).items()
        if _manifest(storage, step, present) is not None
    )


def prune(storage: Storage, *, keep: int, protect: int | None = None) -> list[int]:
    """Delete all but the newest ``keep`` complete checkpoints (and ``protect``'s, the best
    evaluated one), and incomplete debris."""
    groups = _groups(storage)
    good = sorted(s for s, present in groups.items() if _manifest(storage, s, present) is not None)
    kept = set(good[-keep:]) | ({protect} & set(good))
    doomed = [s for s in groups if s not in kept]
    for step in doomed:
        storage.delete_prefix(layout.checkpoint(step))
    if doomed:
        log.info("pruned checkpoints at steps %s", sorted(doomed))
    # a checkpoint cut off mid-upload may have left only an open multipart upload (listed
    # nowhere above); no checkpoint is being written now (one upload at a time, this is it)
    storage.discard_unfinished(layout.CHECKPOINTS)
    return sorted(doomed)


def download(storage: Storage, checkpoint: Checkpoint, dest: Path) -> Path:
    """Fetch ``checkpoint`` into ``dest/checkpoint-<step>/``, every file verified against its
    manifest as it streams in (a :class:`DataError` if one does not)."""
    folder = dest / f"checkpoint-{checkpoint.step}"
    shutil.rmtree(folder, ignore_errors=True)
    files = json.loads(storage.read_bytes(checkpoint.prefix + layout.MANIFEST))["files"]

    def fetch(item: tuple[str, dict]) -> None:
        name, meta = item
        storage.download(checkpoint.prefix + name, folder / name, sha256=meta["sha256"])

    parallel(fetch, sorted(files.items()), storage.workers)
    return folder


def download_latest(storage: Storage, dest: Path) -> tuple[Checkpoint, Path] | None:
    """Fetch the newest complete checkpoint whose files verify; ``None`` if there is none."""
    for checkpoint in reversed(complete(storage)):
        try:
            folder = download(storage, checkpoint, dest)
        except DataError as err:
            log.warning("checkpoint at step %d is corrupt (%s); trying an older one", checkpoint.step, err)
            continue
        return checkpoint, folder
    return None
