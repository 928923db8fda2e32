"""What a container runtime would set up for a pod's container, done on one machine without
containers: :func:`prepare` turns a pod into a :class:`Container` (argv, environment,
working directory, volume folders) for :class:`~kubesim.kubelet.ProcessKubelet`.

* **Volumes** become folders under ``<pod folder>/volumes/<name>/``: a ConfigMap or Secret
  volume holds its keys as files, an emptyDir is empty. Other volume types (e.g. a
  PersistentVolumeClaim) cannot be mounted: ``FailedMount``. ``/dev/shm`` stays the host's.
* **Paths**: there is no mount namespace, so every container path under a mount (and the
  ``terminationMessagePath``) is rewritten to the host folder wherever the container names
  it: in environment values, in the command and args, in the working directory
  (``DREAMBOOTH_CONFIG=/etc/dreambooth/config.json`` -> ``.../volumes/config/config.json``).
* **Environment**: the trainer image's (:data:`IMAGE_ENV`), then ``envFrom`` and ``env``
  (``$(VAR)`` expanded; ``secretKeyRef``, ``configMapKeyRef`` and ``fieldRef`` resolved
  from the API). A missing Secret, ConfigMap or key is :class:`ContainerConfigError` with
  a real kubelet's message (``secret "x" not found``). Then what this machine needs
  (:data:`HOST_ENV`: one OpenMP thread, no model hub, no GPU), ``PATH`` with this
  virtualenv's ``bin`` first (``python``, ``accelerate``), ``TMPDIR`` = the pod's ``/tmp``,
  and ``DREAMBOOTH_TERMINATION_LOG`` = the termination-message file (which a kubelet would
  bind-mount at ``/dev/termination-log``; the trainer reads the variable).
* **Network** (see :class:`Network`): a ``<hostname>.<subdomain>`` name of a pod in the
  command (a headless Service's DNS record) becomes that pod's IP; a container port named
  ``rendezvous`` becomes a free host port shared by the pods of one Job, since all pods
  share the host's network namespace.
* ``python`` as the command is this interpreter.
"""

from __future__ import annotations

import base64
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubesim.kube import Kube

#: what the trainer image's Dockerfile sets (ENV, WORKDIR), before the pod's own env
IMAGE_ENV: dict[str, str] = {
    "PYTHONUNBUFFERED": "1",
    "PYTHONDONTWRITEBYTECODE": "1",
    "HOME": "/var/cache/dreambooth",
    "XDG_CACHE_HOME": "/var/cache/dreambooth/.cache",
    "HF_HOME": "/var/cache/dreambooth/huggingface",
    "TRITON_CACHE_DIR": "/var/cache/dreambooth/.cache/triton",
    "MPLCONFIGDIR": "/tmp/matplotlib",
    "DREAMBOOTH_WORKDIR": "/tmp/dreambooth",
}
IMAGE_WORKDIR = "/tmp/dreambooth"
#: what this machine needs on top (CPU torch, no model hub, no GPU)
HOST_ENV: dict[str, str] = {
    "OMP_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
    "CUDA_VISIBLE_DEVICES": "",
    "TOKENIZERS_PARALLELISM": "false",
    "LANG": "C.UTF-8",
}
#: mounts left to the host: /dev/shm is shared memory for torch, not a folder we pass on
HOST_MOUNTS = ("/dev/shm",)
#: container ports that all pods of a Job share through one free host port
REMAPPED_PORT_NAMES = ("rendezvous",)
DEFAULT_TERMINATION_PATH = "/dev/termination-log"
_VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")
_FIELD_KEY = re.compile(r"^metadata\.(labels|annotations)\['([^']+)'\]$")


class ContainerConfigError(Exception):
    """The container cannot be started yet (the kubelet retries): the waiting ``reason``
    and ``message`` a kubelet reports."""

    def __init__(self, reason: str, message: str = ""):
        super().__init__(message or reason)
        self.reason, self.message = reason, message


@dataclass
class Container:
    """A container ready to run as a process."""

    argv: list[str]
    env: dict[str, str]
    workdir: Path
    termination_path: Path
    fallback_to_logs: bool
    grace_seconds: float
    #: volume folder -> {file name: content}, written by :meth:`materialise`
    files: dict[Path, dict[str, str]] = field(default_factory=dict)

    def materialise(self) -> None:
        for folder, files in self.files.items():
            folder.mkdir(parents=True, exist_ok=True)
            for name, text in files.items():
                (folder / name).parent.mkdir(parents=True, exist_ok=True)
                (folder / name).write_text(text)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.termination_path.parent.mkdir(parents=True, exist_ok=True)
        self.termination_path.write_text("")  # a kubelet mounts an empty file


@dataclass
class Network:
    """The cluster network as far as processes on one host can have it.

    ``resolve(namespace, hostname, subdomain)``: the pod IP behind a headless Service's
    DNS record, or None while that pod has none (the pod naming it then waits).
    ``host_port(job_uid, port_name)``: the host port standing for a shared container port."""

    resolve: Callable[[str, str, str], str | None]
    host_port: Callable[[str, str], int]


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion: defined variables are replaced, ``$$`` is ``$``,
    undefined references stay as they are."""

    def repl(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        return env.get(match.group(1), match.group(0))

    return _VAR_REF.sub(repl, text)


def secret_data(secret: Mapping[str, Any]) -> dict[str, str]:
    data = {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}
    return {**data, **(secret.get("stringData") or {})}


def host_path(value: str, mounts: Mapping[str, str]) -> str:
    """A container path as the host path it is mounted from (else unchanged)."""
    for mount in sorted(mounts, key=len, reverse=True):
        base = mount.rstrip("/")
        if value in (mount, base) or value.startswith(base + "/"):
            return mounts[mount] + value[len(base) :]
    return value


def rewrite(texts: list[str], replacements: list[tuple[str, str]]) -> list[str]:
    """Apply regex -> text ``replacements`` in one pass: a replacement's result is never
    rewritten again (a mapped path holds this machine's /tmp, not the pod's)."""
    if not replacements:
        return list(texts)
    combined = re.compile("|".join(f"(?P<r{i}>{pattern})" for i, (pattern, _) in enumerate(replacements)))

    def value(match: re.Match[str]) -> str:
        name = next(k for k, v in match.groupdict().items() if v is not None)
        return replacements[int(name[1:])][1]

    return [combined.sub(value, text) for text in texts]


def _path_pattern(path: str) -> str:
    """``path`` as a whole path (or a path's prefix) inside a longer text."""
    return r"(?<![\w./-])" + re.escape(path.rstrip("/")) + r"(?=[/\s'\";:|&)]|$)"


class _Setup:
    def __init__(
        self,
        kube: Kube,
        pod: Mapping[str, Any],
        folder: Path,
        ip: str,
        network: Network,
        extra_env: Mapping[str, str],
        host_ip: str,
    ):
        self.kube, self.pod, self.folder, self.ip = kube, pod, folder, ip
        self.network, self.extra_env, self.host_ip = network, extra_env, host_ip
        self.ns = pod["metadata"]["namespace"]
        self.container = pod["spec"]["containers"][0]

    def secret(self, name: str) -> dict[str, str]:
        found = self.kube.find("Secret", self.ns, name)
        if found is None:
            raise ContainerConfigError("CreateContainerConfigError", f'secret "{name}" not found')
        return secret_data(found)

    def config_map(self, name: str, volume: str | None = None) -> dict[str, str]:
        found = self.kube.find("ConfigMap", self.ns, name)
        if found is None:
            if volume is not None:  # a volume that cannot be mounted: the pod waits
                raise ContainerConfigError(
                    "ContainerCreating",
                    (f'MountVolume.SetUp failed for volume "{volume}" : configmap "{name}" not found'),
                )
            raise ContainerConfigError("CreateContainerConfigError", f'configmap "{name}" not found')
        return dict(found.get("data") or {})

    def volumes(self) -> tuple[dict[str, str], dict[Path, dict[str, str]]]:
        """(container path -> host path, host folder -> files to write)."""
        folders: dict[str, Path] = {}
        files: dict[Path, dict[str, str]] = {}
        for volume in self.pod["spec"].get("volumes") or ():
            where = self.folder / "volumes" / volume["name"]
            if "configMap" in volume:
                ref = volume["configMap"]
                try:
                    data = self.config_map(ref["name"], volume["name"])
                except ContainerConfigError:
                    if not ref.get("optional"):
                        raise
                    data = {}
                items = ref.get("items") or [{"key": k, "path": k} for k in data]
                files[where] = {item["path"]: data.get(item["key"], "") for item in items}
            elif "secret" in volume:
                files[where] = self.secret(volume["secret"]["secretName"])
            elif "emptyDir" in volume:
                files[where] = {}
            else:
                raise ContainerConfigError(
                    "ContainerCreating",
                    (
                        f'MountVolume.SetUp failed for volume "{volume["name"]}" : the process '
                        "kubelet mounts only configMap, secret and emptyDir volumes"
                    ),
                )
            folders[volume["name"]] = where
        mounts: dict[str, str] = {}
        for mount in self.container.get("volumeMounts") or ():
            if mount["mountPath"] not in HOST_MOUNTS:
                mounts[mount["mountPath"]] = str(folders[mount["name"]] / mount.get("subPath", ""))
        termination = self.container.get("terminationMessagePath") or DEFAULT_TERMINATION_PATH
        mounts[termination] = str(self.folder / "termination-log")
        return mounts, files

    def field_ref(self, path: str) -> str:
        meta, spec = self.pod["metadata"], self.pod["spec"]
        if match := _FIELD_KEY.match(path):
            return str((meta.get(match.group(1)) or {}).get(match.group(2), ""))
        simple = {
            "metadata.name": meta["name"],
            "metadata.namespace": meta["namespace"],
            "metadata.uid": meta["uid"],
            "spec.nodeName": spec.get("nodeName", "local"),
            "spec.serviceAccountName": spec.get("serviceAccountName", "default"),
            "status.podIP": self.ip,
            "status.podIPs": self.ip,
            "status.hostIP": self.host_ip,
        }
        if path not in simple:
            raise ContainerConfigError("CreateContainerConfigError", f"unsupported fieldRef {path!r} (process kubelet)")
        return simple[path]

    def value_from(self, ref: Mapping[str, Any]) -> str | None:
        """The value of a ``valueFrom`` (None: an optional reference that is missing)."""
        if "fieldRef" in ref:
            return self.field_ref(ref["fieldRef"]["fieldPath"])
        for kind, what in (("secretKeyRef", "Secret"), ("configMapKeyRef", "ConfigMap")):
            if kind not in ref:
                continue
            key_ref = ref[kind]
            try:
                data = self.secret(key_ref["name"]) if what == "Secret" else self.config_map(key_ref["name"])
            except ContainerConfigError:
                if key_ref.get("optional"):
                    return None
                raise
            if key_ref["key"] not in data:
                if key_ref.get("optional"):
                    return None
                raise ContainerConfigError(
                    "CreateContainerConfigError",
                    (f"couldn't find key {key_ref['key']} in {what} {self.ns}/{key_ref['name']}"),
                )
            return data[key_ref["key"]]
        raise ContainerConfigError("CreateContainerConfigError", "unsupported valueFrom (process kubelet)")

    def environment(self, mounts: Mapping[str, str]) -> dict[str, str]:
        env: dict[str, str] = dict(IMAGE_ENV)
        env["HOSTNAME"] = self.pod["spec"].get("hostname") or self.pod["metadata"]["name"]
        for source in self.container.get("envFrom") or ():
            data = (
                self.secret(source["secretRef"]["name"])
                if "secretRef" in source
                else self.config_map(source["configMapRef"]["name"])
            )
            env.update({source.get("prefix", "") + k: v for k, v in data.items()})
        for var in self.container.get("env") or ():
            if "valueFrom" in var:
                value = self.value_from(var["valueFrom"])
                if value is not None:
                    env[var["name"]] = value
            else:
                env[var["name"]] = expand(var.get("value", ""), env)
        env = {k: host_path(v, mounts) if v.startswith("/") else v for k, v in env.items()}
        env.update(HOST_ENV)
        env["PATH"] = ":".join([str(Path(sys.executable).parent), "/usr/local/bin", "/usr/bin", "/bin"])
        if "/tmp" in mounts:
            env["TMPDIR"] = mounts["/tmp"]
        env["DREAMBOOTH_TERMINATION_LOG"] = str(self.folder / "termination-log")
        env.update(self.extra_env)
        return env

    def command(self, env: Mapping[str, str], mounts: Mapping[str, str]) -> list[str]:
        c = self.container
        argv = [expand(a, env) for a in [*c["command"], *(c.get("args") or ())]]
        replacements = [
            (_path_pattern(path), mounts[path].rstrip("/")) for path in sorted(mounts, key=len, reverse=True)
        ]
        replacements += self.dns(" ".join(argv)) + self.ports()
        argv = rewrite(argv, replacements)
        # the image's python is this venv's; set after rewriting the pod's mount paths, which
        # must not touch this machine's paths (the venv may well live below /tmp)
        if argv[0] in ("python", "python3"):
            argv[0] = sys.executable
        return argv

    def dns(self, text: str) -> list[tuple[str, str]]:
        """``<hostname>.<subdomain>[.<ns>.svc[.cluster.local]]`` -> pod IPs (the pod's own
        name is its own IP)."""
        spec, meta = self.pod["spec"], self.pod["metadata"]
        own = (spec.get("hostname") or meta["name"], spec.get("subdomain"))
        subdomains = {p["spec"].get("subdomain") for p in self.kube.list("Pod", self.ns)} - {None}
        found = []
        for sub in sorted(subdomains, key=len, reverse=True):
            name = re.compile(
                r"\b([a-z0-9]([-a-z0-9]*[a-z0-9])?)\."
                + re.escape(sub)
                + r"(\."
                + re.escape(self.ns)
                + r"(\.svc(\.cluster\.local)?)?)?\b"
            )
            for match in name.finditer(text):
                host = match.group(1)
                ip = self.ip if (host, sub) == own else self.network.resolve(self.ns, host, sub)
                if ip is None:
                    raise ContainerConfigError("ContainerCreating")  # waits for that pod
                found.append((re.escape(match.group(0)) + r"\b", ip))
        return found

    def ports(self) -> list[tuple[str, str]]:
        job_uid = next(
            (o["uid"] for o in self.pod["metadata"].get("ownerReferences") or () if o.get("kind") == "Job"),
            self.pod["metadata"]["uid"],
        )
        return [
            (
                r"(?<![\w.-])" + str(port["containerPort"]) + r"(?![\w.])",
                str(self.network.host_port(job_uid, port["name"])),
            )
            for port in self.container.get("ports") or ()
            if port.get("name") in REMAPPED_PORT_NAMES
        ]


def prepare(
    kube: Kube,
    pod: Mapping[str, Any],
    folder: Path,
    ip: str,
    network: Network,
    *,
    extra_env: Mapping[str, str] | None = None,
    host_ip: str = "127.0.0.1",
    max_grace: float = 60.0,
) -> Container:
    """The pod's (single) container as a :class:`Container`; nothing is written yet.
    Raises :class:`ContainerConfigError` when it cannot start (yet)."""
    spec = pod["spec"]
    containers = spec.get("containers") or []
    if len(containers) != 1 or spec.get("initContainers"):
        raise ContainerConfigError(
            "Unsupported", "the process kubelet runs pods with one container and no init containers"
        )
    if not containers[0].get("command"):
        raise ContainerConfigError(
            "Unsupported", "the process kubelet needs an explicit command (it has no images to read an entrypoint from)"
        )
    setup = _Setup(kube, pod, folder, ip, network, extra_env or {}, host_ip)
    mounts, files = setup.volumes()
    env = setup.environment(mounts)
    return Container(
        argv=setup.command(env, mounts),
        env=env,
        workdir=Path(host_path(containers[0].get("workingDir") or IMAGE_WORKDIR, mounts)),
        termination_path=folder / "termination-log",
        fallback_to_logs=containers[0].get("terminationMessagePolicy") == "FallbackToLogsOnError",
        grace_seconds=min(float(spec.get("terminationGracePeriodSeconds", 30)), max_grace),
        files=files,
    )
