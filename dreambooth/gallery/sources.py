"""Where the gallery finds jobs: the cluster (DreamBoothJobs through :mod:`.kube`) or a
folder of local runs (``dreambooth gallery runs/``), and how it reaches each one's outputs.

Both give job objects shaped like the API's JSON, so the pages have one input. A local
run's object is made up from its files: the spec from the ``trainer-config.json`` that
``dreambooth train``/``demo`` leave in their work folder, the phase from ``result.json``.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from dreambooth.api import layout
from dreambooth.api.config import Defaults, output_uri_for
from dreambooth.api.history import parse
from dreambooth.api.job import KIND, SpecError, validate_job
from dreambooth.gallery.objects import S3Access, Store, Unavailable, open_store

LOCAL_NAMESPACE = "local"
#: a local run whose history changed this recently is shown as training
LIVE_SECONDS = 120


class NotShown(Exception):
    """A namespace or job this gallery does not show (or may not read)."""


def _stamp(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Source:
    """Jobs and their outputs. ``namespaces``: the only ones shown (empty: all)."""

    namespaces: tuple[str, ...] = ()

    def check_namespace(self, namespace: str) -> None:
        if self.namespaces and namespace not in self.namespaces:
            raise NotShown(f"namespace {namespace!r} is not one this gallery shows")

    async def jobs(self) -> list[dict[str, Any]]:
        raise NotImplementedError

    async def job(self, namespace: str, name: str) -> dict[str, Any] | None:
        raise NotImplementedError

    def store(self, obj: dict[str, Any]) -> Store:
        raise NotImplementedError

    async def close(self) -> None:
        return None


class KubeSource(Source):
    """DreamBoothJobs from the API; a list is cached for ``ttl`` seconds (1,000 jobs, many
    browsers polling: one list call a second at most)."""

    def __init__(
        self, kube, *, namespaces: tuple[str, ...], s3: S3Access | None, defaults: Defaults, ttl: float = 1.0
    ) -> None:
        super().__init__(namespaces)
        self.kube, self.s3, self.defaults, self.ttl = kube, s3, defaults, ttl
        self._cache: tuple[float, list[dict[str, Any]]] | None = None
        self._lock = asyncio.Lock()

    async def jobs(self) -> list[dict[str, Any]]:
        async with self._lock:
            if self._cache and time.monotonic() - self._cache[0] < self.ttl:
                return self._cache[1]
            if self.namespaces:
                found = [o for ns in self.namespaces for o in await self.kube.list_jobs(ns)]
            else:
                found = await self.kube.list_jobs(None)
            self._cache = (time.monotonic(), found)
            return found

    async def job(self, namespace: str, name: str) -> dict[str, Any] | None:
        self.check_namespace(namespace)
        return await self.kube.get_job(namespace, name)

    def store(self, obj: dict[str, Any]) -> Store:
        try:
            job = validate_job({k: v for k, v in obj.items() if k != "status"})
        except SpecError as err:
            raise Unavailable(f"its spec is invalid: {err}") from None
        endpoint = job.spec.storage.endpoint
        if endpoint and self.s3 is not None and endpoint != self.s3.endpoint:
            raise Unavailable(f"its outputs are on {endpoint}, not on this gallery's S3 endpoint")
        return open_store(output_uri_for(job, self.defaults), self.s3)

    async def close(self) -> None:
        await self.kube.close()


def _is_output(folder: Path) -> bool:
    return any((folder / name).exists() for name in (layout.RESULT, layout.HISTORY, layout.SAMPLES, layout.CHECKPOINTS))


class LocalSource(Source):
    """The outputs under ``root`` (``dreambooth train``'s ``runs/``): every folder there
    (three levels deep at most) that holds a history, samples, checkpoints or a result."""

    def __init__(self, root: Path) -> None:
        super().__init__((LOCAL_NAMESPACE,))
        self.root = root.resolve()

    def _scan(self) -> dict[str, dict[str, Any]]:
        configs: dict[str, dict] = {}
        for path in self.root.glob("**/trainer-config.json"):
            try:
                config = json.loads(path.read_text())
                configs[str(Path(config["output_uri"].removeprefix("file://")).resolve())] = config
            except (OSError, ValueError, KeyError, TypeError):
                continue
        found: dict[str, dict[str, Any]] = {}
        for depth in ("*", "*/*", "*/*/*"):
            for folder in sorted(self.root.glob(depth)):
                if (
                    folder.is_dir()
                    and _is_output(folder)
                    and not any(p.name.startswith(".") for p in folder.relative_to(self.root).parents if p.name)
                    and not folder.name.startswith(".")
                    and not _inside_found(folder, found)
                ):
                    obj = self._object(folder, configs.get(str(folder.resolve())))
                    found[obj["metadata"]["name"]] = obj
        return found

    def _object(self, folder: Path, config: dict | None) -> dict[str, Any]:
        parts = folder.relative_to(self.root).parts
        parts = parts[:-1] if len(parts) > 1 and parts[-1] == "output" else parts  # the demo's <root>/output
        name = ".".join(parts)
        spec = dict((config or {}).get("spec") or {})
        spec["output"] = {**(spec.get("output") or {}), "uri": folder.resolve().as_uri() + "/"}
        total = _total_steps(spec)
        history = folder / layout.HISTORY
        points = parse(history.read_bytes()) if history.is_file() else []
        step = points[-1].step if points else 0
        result = folder / layout.RESULT
        if result.is_file():
            phase, step = "Succeeded", int(json.loads(result.read_text()).get("step", step) or step)
            total = total or step
        elif history.is_file() and time.time() - history.stat().st_mtime < LIVE_SECONDS:
            phase = "Training"
        else:
            phase = "Stopped" if points else "Pending"
        percent = round(min(100.0, 100.0 * step / total), 1) if total else 0.0
        progress: dict[str, Any] = {
            "step": step,
            "totalSteps": total,
            "percent": percent,
            "summary": f"{step}/{total}" if total else str(step),
        }
        if points:
            progress.update(loss=points[-1].loss, learningRate=points[-1].lr)
            if phase == "Training" and len(points) > 1 and total:
                rate = (points[-1].step - points[0].step) / max(1e-6, points[-1].time - points[0].time)
                progress["etaSeconds"] = int((total - step) / rate) if rate > 0 else None
        created = min((p.stat().st_mtime for p in folder.iterdir()), default=time.time())
        return {
            "apiVersion": "dreambooth.io/v1alpha1",
            "kind": KIND,
            "metadata": {"namespace": LOCAL_NAMESPACE, "name": name, "creationTimestamp": _stamp(created)},
            "spec": spec,
            "status": {
                "phase": phase,
                "progress": progress,
                "family": (spec.get("baseModel") or {}).get("family") or "sd",
            },
        }

    async def jobs(self) -> list[dict[str, Any]]:
        return list((await asyncio.to_thread(self._scan)).values())

    async def job(self, namespace: str, name: str) -> dict[str, Any] | None:
        self.check_namespace(namespace)
        return (await asyncio.to_thread(self._scan)).get(name)

    def store(self, obj: dict[str, Any]) -> Store:
        return open_store(obj["spec"]["output"]["uri"], None, local_root=self.root)


def _inside_found(folder: Path, found: dict[str, dict[str, Any]]) -> bool:
    """A folder inside an output already found (e.g. its samples/) is part of that one."""
    return any(folder.resolve().as_uri().startswith(o["spec"]["output"]["uri"]) for o in found.values())


def _total_steps(spec: dict[str, Any]) -> int:
    training = spec.get("training") or {}
    ti = training.get("textualInversion") or {}
    return int(training.get("steps") or 0) + int(ti.get("steps") or 0)
