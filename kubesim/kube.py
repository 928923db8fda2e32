"""A running Kubernetes API emulator and :class:`Kube`, its sync handle.

:func:`running_kube` starts :class:`~kubesim.emulator.KubeEmulator` on 127.0.0.1 (a free
port) in a background thread, writes a kubeconfig and yields a :class:`Kube`. Clients
connect over HTTP unmodified: kopf (in-process with ``kopf.testing.KopfRunner`` or
``kopf run`` as a subprocess with ``kube.env``), the ``kubernetes`` and
``kubernetes_asyncio`` clients, kubectl (``kube.kubectl(...)``).

The ``kubernetes`` packages read ``$KUBECONFIG`` once, when imported: :func:`clients_use`
sets it and patches their ``KUBE_CONFIG_DEFAULT_LOCATION`` (undone afterwards), so
``load_kube_config()`` (and kopf's default login, which calls it) finds the emulator
whatever the import order. kopf's own ``login_with_kubeconfig`` reads the variable itself.

The sync API (``create``, ``get``, ``list``, ``patch``, ``patch_status``, ``delete``,
``wait_for``) calls the emulator's verbs on its loop directly, not over HTTP: same
semantics and watch events, but it is not in ``kube.requests``, which records only what
clients sent (so assertions about the operator's requests see only the operator's).

Controllers do not exist here: :mod:`kubesim.controllers` has explicit stand-ins (a Job
controller, a kubelet, a garbage collector).

No pytest here: the test suites wrap :func:`running_kube` and :func:`clients_use` in their
``kube`` fixtures (tests/support/kube.py, kubesim/tests/conftest.py) and turn
:class:`KubectlMissing` into a skip.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import importlib
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import kmock

from kubesim.api import ApiError, Decl, NotFound, labels_to_selector
from kubesim.emulator import JSON_PATCH, MERGE, Fault, FaultShare, KubeEmulator, RecordedRequest

__all__ = [
    "ApiError",
    "FaultShare",
    "Kube",
    "KubectlMissing",
    "NotFound",
    "clients_use",
    "kopf_registry",
    "running_kube",
]


class KubectlMissing(FileNotFoundError):
    """kubectl is not on ``PATH`` (the test suites skip the test that needed it)."""


T = TypeVar("T")


class _ServerThread:
    """The emulator and its ``kmock.Server`` on an event loop of their own."""

    def __init__(self, emulator: KubeEmulator):
        self.emulator = emulator
        self.loop = asyncio.new_event_loop()
        self.url = ""
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="kube-emulator", daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._serve())
        except BaseException as exc:  # noqa: BLE001  (start() raises it)
            self._failure = exc
            self._ready.set()
        finally:
            self.loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        async with kmock.Server(self.emulator, host="127.0.0.1") as server:
            self.url = str(server.url).rstrip("/")
            self._ready.set()
            await self._stop.wait()
            await self.emulator.close_watches()

    def start(self) -> None:
        self._thread.start()
        self._ready.wait(30)
        if self._failure is not None or not self.url:
            raise RuntimeError("the Kubernetes emulator did not start") from self._failure

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        async def on_loop() -> T:
            return fn(*args, **kwargs)

        return asyncio.run_coroutine_threadsafe(on_loop(), self.loop).result(30)

    def stop(self) -> None:
        if self._stop is not None and self._thread.is_alive():
            self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)


def kubeconfig_text(url: str, namespace: str = "default") -> str:
    return (
        "apiVersion: v1\nkind: Config\n"
        f"clusters:\n- name: emulator\n  cluster:\n    server: {url}\n"
        "users:\n- name: tester\n  user:\n    token: emulator-token\n"
        "contexts:\n- name: emulator\n  context:\n    cluster: emulator\n    user: tester\n"
        f"    namespace: {namespace}\n"
        "current-context: emulator\n"
    )


class Kube:
    """A running emulator: connection details, a sync API, recorded requests."""

    def __init__(self, server: _ServerThread, workdir: Path):
        self._server = server
        self.emulator: KubeEmulator = server.emulator
        self.url: str = server.url
        self.workdir = workdir
        self.kubeconfig = workdir / "kubeconfig"
        self.kubeconfig.write_text(kubeconfig_text(self.url))
        self.home = workdir / "home"  # kubectl's cache and config go here
        self.home.mkdir(exist_ok=True)
        #: the environment for subprocesses (``kopf run``, kubectl)
        self.env = {**os.environ, "KUBECONFIG": str(self.kubeconfig), "HOME": str(self.home)}
        self._changed = threading.Condition()
        self._revision = 0
        self.emulator.listeners.append(self._on_change)

    def _on_change(self, revision: int) -> None:  # on the server loop
        with self._changed:
            self._revision = revision
            self._changed.notify_all()

    def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return copy.deepcopy(self._server.call(fn, *args, **kwargs))

    def resource(self, kind: str, api_version: str | None = None) -> tuple[str, str, str]:
        """(group, version, plural) for a kind, plural, short name or ``plural.group``."""
        return self._server.call(self.emulator.resolve, kind, api_version)

    # -- the sync API ---------------------------------------------------------------------

    def create(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        """Create ``obj`` (``apiVersion`` and ``kind`` pick the resource; the namespace
        defaults to ``default``). Returns the stored object."""
        key = self.resource(obj["kind"], obj.get("apiVersion"))
        namespace = None
        if self._server.call(self.emulator.info, key).namespaced:
            namespace = (obj.get("metadata") or {}).get("namespace") or "default"
        return self._call(self.emulator.op_create, key, namespace, obj)

    def get(self, kind: str, namespace: str | None, name: str) -> dict[str, Any]:
        """The object, or :class:`NotFound` (a ``LookupError``) if there is none."""
        return self._call(self.emulator.op_get, self.resource(kind), namespace, name)

    def find(self, kind: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        """The object, or None."""
        try:
            return self.get(kind, namespace, name)
        except NotFound:
            return None

    def list(
        self,
        kind: str,
        namespace: str | None = None,
        labels: Mapping[str, str] | str | None = None,
        fields: str | None = None,
    ) -> list[dict[str, Any]]:
        """Objects of a kind (all namespaces if ``namespace`` is None), filtered by a label
        selector (a dict means equality on each key, a str is a selector as in kubectl)."""
        listed = self._call(self.emulator.op_list, self.resource(kind), namespace, labels_to_selector(labels), fields)
        return listed["items"]

    def patch(
        self, kind: str, namespace: str | None, name: str, patch: Mapping[str, Any] | list[dict[str, Any]]
    ) -> dict[str, Any]:
        """Patch the object (never its status): a dict is a JSON merge patch, a list is a
        JSON patch."""
        ctype = JSON_PATCH if isinstance(patch, list) else MERGE
        return self._call(self.emulator.op_patch, self.resource(kind), namespace, name, patch, ctype)

    def patch_status(
        self, kind: str, namespace: str | None, name: str, patch: Mapping[str, Any] | list[dict[str, Any]]
    ) -> dict[str, Any]:
        """Patch through the ``status`` subresource: ``{"status": {...}}`` or a JSON patch."""
        ctype = JSON_PATCH if isinstance(patch, list) else MERGE
        return self._call(self.emulator.op_patch, self.resource(kind), namespace, name, patch, ctype, "status")

    def delete(
        self, kind: str, namespace: str | None, name: str, missing_ok: bool = False, propagation: str | None = None
    ) -> dict[str, Any] | None:
        """Delete (with finalizers: mark for deletion). Owned objects stay until
        :meth:`~kubesim.controllers.GarbageCollector.collect`; ``propagation``
        (``Background``, ``Orphan``): the API's default unless given (batch/v1 Jobs orphan
        their pods, as ``kubectl delete`` does not)."""
        options = {"propagationPolicy": propagation} if propagation else None
        try:
            return self._call(self.emulator.op_delete, self.resource(kind), namespace, name, options)
        except NotFound:
            if missing_ok:
                return None
            raise

    def delete_all(self, kind: str, namespace: str | None = None) -> int:
        """Delete every object of a kind in one request's worth of work, as ``kubectl delete
        <kind> --all`` (a DELETE of the collection) does; returns how many were deleted.
        Owned objects stay until the garbage collector runs."""
        listed = self._server.call(self.emulator.op_delete_collection, self.resource(kind), namespace)
        return len(listed["items"])

    def events(self, involved: Mapping[str, Any] | None = None, namespace: str | None = None) -> list[dict[str, Any]]:
        """core/v1 Events (kopf posts these), optionally only those about ``involved``."""
        uid = (involved or {}).get("metadata", {}).get("uid")
        return [
            e
            for e in self.list("v1/events", namespace)
            if uid is None or (e.get("involvedObject") or {}).get("uid") == uid
        ]

    def wait_for(self, predicate: Callable[[], T], timeout: float = 10.0, what: str | None = None) -> T:
        """Call ``predicate`` after changes (at most every 10 ms, at least every 50 ms)
        until its result is truthy, and return it. A ``LookupError`` (e.g.
        :class:`NotFound`) counts as false. Blocks the calling thread: from async tests
        use ``asyncio.to_thread``."""
        deadline = time.monotonic() + timeout
        failure: BaseException | None = None
        while True:
            with self._changed:
                seen = self._revision
            try:
                result = predicate()
            except LookupError as exc:
                result, failure = None, exc  # type: ignore[assignment]
            if result:
                return result
            left = deadline - time.monotonic()
            if left <= 0:
                detail = f" (last: {failure!r})" if failure else f" (last result: {result!r})"
                raise TimeoutError(
                    f"{what or getattr(predicate, '__name__', 'predicate')} not true within {timeout}s{detail}"
                )
            with self._changed:
                self._changed.wait_for(lambda seen=seen: self._revision != seen, min(left, 0.05))
            time.sleep(min(left, 0.01))  # a burst of changes is one evaluation, not hundreds

    # -- requests and faults --------------------------------------------------------------

    @property
    def requests(self) -> list[RecordedRequest]:
        """``(method, path)`` of the HTTP requests so far (paths without the query)."""
        return self._server.call(list, self.emulator.request_log)  # copied on its loop

    def clear_requests(self) -> None:
        self._server.call(self.emulator.request_log.clear)

    def on_change(
        self, hook: Callable[[tuple[str, str, str], str, dict[str, Any], dict[str, Any] | None], None]
    ) -> Callable[[], None]:
        """Call ``hook(resource, event type, new object, old object)`` after every change,
        on the emulator's loop (keep it quick; it must not call back into the emulator).
        Returns the function that removes it."""
        self._server.call(self.emulator.change_hooks.append, hook)
        return lambda: self._server.call(self.emulator.change_hooks.remove, hook)

    def fail_next(
        self,
        method: str,
        path: str,
        status: int = 500,
        times: int = 1,
        reason: str = "InternalError",
        message: str = "injected by the test",
        hang_s: float = 0.0,
    ) -> None:
        """Make the next ``times`` HTTP requests with ``method`` and ``path`` in their path
        fail with ``status`` (the sync API is not affected); with ``hang_s``, held that long
        and then cut without an answer instead."""
        fault = Fault(method, path, status, times, reason, message, hang_s)
        self._server.call(self.emulator.faults.append, fault)

    def fault_share(self, share: FaultShare | None) -> None:
        """From now on, faults on a random share of the HTTP requests (None: none)."""
        self._server.call(setattr, self.emulator, "fault_share", share)

    # -- kubectl --------------------------------------------------------------------------

    def kubectl_argv(self, *args: str) -> list[str]:
        binary = shutil.which("kubectl")
        if binary is None:
            raise KubectlMissing("kubectl is not on PATH")
        return [binary, "--kubeconfig", str(self.kubeconfig), "--cache-dir", str(self.home / "kube-cache"), *args]

    def kubectl(
        self, *args: str, input: str | None = None, timeout: float = 60, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run kubectl against the emulator (:class:`KubectlMissing` where it is missing)."""
        done = subprocess.run(
            self.kubectl_argv(*args),
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env,
            check=False,
        )
        if check and done.returncode:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
        return done


@contextlib.contextmanager
def clients_use(kubeconfig: Path) -> Iterator[None]:
    """Point ``$KUBECONFIG`` and the ``kubernetes`` packages' import-time default location
    at ``kubeconfig`` for the duration; restored afterwards."""
    previous = os.environ.get("KUBECONFIG")
    patched: list[tuple[Any, str]] = []
    os.environ["KUBECONFIG"] = str(kubeconfig)
    try:
        for name in ("kubernetes.config.kube_config", "kubernetes_asyncio.config.kube_config"):
            try:
                module = importlib.import_module(name)
            except ImportError:
                continue
            patched.append((module, module.KUBE_CONFIG_DEFAULT_LOCATION))
            module.KUBE_CONFIG_DEFAULT_LOCATION = str(kubeconfig)
        yield
    finally:
        for module, old in patched:
            module.KUBE_CONFIG_DEFAULT_LOCATION = old
        if previous is None:
            os.environ.pop("KUBECONFIG", None)
        else:
            os.environ["KUBECONFIG"] = previous


@contextlib.contextmanager
def running_kube(
    workdir: Path, resources: Iterable[Decl] = (), crds: Iterable[Mapping[str, Any]] = ()
) -> Iterator[Kube]:
    """A fresh emulator with a ``default`` Namespace; it does not touch ``$KUBECONFIG``
    (pass ``kube.kubeconfig`` or ``kube.env`` along, or use :func:`clients_use`).

    ``resources``: more resources to serve, declared without a schema (any object is
    accepted); ``crds``: CustomResourceDefinition objects, created through the API as
    ``kubectl apply -f crds/`` would, so that their schemas' defaults and CEL rules hold."""
    server = _ServerThread(KubeEmulator())
    server.start()
    try:
        for decl in resources:
            server.call(server.emulator.declare, decl)
        handle = Kube(server, workdir)
        handle.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "default"}})
        for crd in crds:
            handle.create(crd)
        yield handle
    finally:
        server.stop()
    if server.emulator.internal_errors:
        raise AssertionError(
            "the Kubernetes emulator failed on requests:\n" + "\n".join(server.emulator.internal_errors)
        )


def kopf_registry() -> Any:
    """A fresh kopf registry with kopf's default logins, for ``KopfRunner(registry=...)``.

    Without one, every operator file run in-process adds its handlers to kopf's global
    default registry, and the handlers of earlier tests run again in later ones. (A plain
    ``kopf.OperatorRegistry()`` has no login handlers; this is kopf 1.45's smart one.)
    """
    from kopf._core.intents.registries import SmartOperatorRegistry

    return SmartOperatorRegistry()
