"""The Dockerfile's two images, checked without a Docker engine (none runs here or in CI):
the pins it installs from, the files it reads (and that .dockerignore lets through), its
users, writable paths, ports and entry points, against the project's own code and pins.
The trainer builds on slim Python, not a CUDA image: torch's CUDA wheel brings the CUDA
runtime, cuDNN, cuBLAS and NCCL as nvidia-* pip packages, so the libraries ship once.
What only a build can show (that the CUDA wheels resolve, that the image starts, that the
build's own find(1) check of CUDA libraries passes) is not checked here: see docs/deploy.md."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import shlex
import tomllib
from dataclasses import dataclass, field

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

from dreambooth.operator import naming, podtemplate, trainerinputs
from dreambooth.operator.settings import OperatorSettings
from tests.chart.support import ROOT, objects

DOCKERFILE = ROOT / "Dockerfile"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
#: what must never be in the operator image
HEAVY = {
    "torch",
    "diffusers",
    "transformers",
    "accelerate",
    "bitsandbytes",
    "peft",
    "safetensors",
    "triton",
    "torchvision",
}
#: what a second copy of the CUDA libraries looks like in an image: a CUDA base image, or an
#: OS package of the CUDA runtime, cuDNN, cuBLAS or NCCL
CUDA_BASE = re.compile(r"(?i)(^|/)(nvidia/cuda|cuda)[:/-]|nvcr\.io/nvidia/(cuda|pytorch)")
CUDA_PACKAGE = re.compile(r"(?i)^(cuda|libcudnn|cudnn|libnccl|libcublas|libcudart|nvidia-cuda|libnvidia-compute)")


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, op: str) -> list[str]:
        return [arg for o, arg in self.instructions if o == op]

    def env(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for arg in self.all("ENV"):
            for token in shlex.split(arg):
                key, _, value = token.partition("=")
                out[key] = value
        return out


def parse_dockerfile(text: str) -> tuple[dict[str, str], dict[str, Stage]]:
    """(global ARG defaults, stages by name) of a Dockerfile."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")))
    args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for line in text.splitlines():
        if not line.strip():
            continue
        op, _, arg = line.strip().partition(" ")
        op, arg = op.upper(), arg.strip()
        if op == "FROM":
            match = re.fullmatch(r"(\S+)\s+AS\s+(\S+)", arg, re.IGNORECASE)
            assert match, f"every stage is named: FROM {arg}"
            current = stages[match.group(2)] = Stage(match.group(2), match.group(1))
        elif current is None:
            assert op == "ARG", f"{op} before the first FROM"
            name, _, default = arg.partition("=")
            args[name] = default
        else:
            current.instructions.append((op, arg))
    return args, stages


ARGS, STAGES = parse_dockerfile(DOCKERFILE.read_text())


def base_image(stage: Stage) -> str:
    return re.sub(r"\$\{(\w+)\}", lambda m: ARGS[m.group(1)], stage.base)


def shell_commands(run: str) -> list[list[str]]:
    """The simple commands of a RUN line (split at ``&&``, ``||``, ``;``, ``|``, quotes kept)."""
    lexer = shlex.shlex(run, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    for token in lexer:
        if token in ("&&", "||", ";", "|", "(", ")", "!"):
            commands.append([])
        else:
            commands[-1].append(token)
    return [c for c in commands if c]


def pip_installs(stage: Stage) -> list[list[str]]:
    """The argument lists of every `pip install` in the stage's RUN instructions."""
    return [words[2:] for run in stage.all("RUN") for words in shell_commands(run) if words[:2] == ["pip", "install"]]


def bind_mounts(stage: Stage) -> dict[str, str]:
    """target -> source of `RUN --mount=type=bind,source=...` from the build context."""
    mounts = {}
    for run in stage.all("RUN"):
        for spec in re.findall(r"--mount=(\S+)", run):
            opts = dict(kv.split("=", 1) for kv in spec.split(","))
            if opts.get("type") == "bind" and "from" not in opts:
                mounts[opts["target"]] = opts["source"]
    return mounts


def constraints() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            pins[canonicalize_name(req.name)] = str(req.specifier)
    return pins


# --------------------------------------------------------------------------- stages


def test_two_targets_from_the_expected_bases():
    assert {"operator", "trainer"} <= set(STAGES)
    for stage in ("operator", "trainer"):
        assert re.fullmatch(r"python:3\.\d+-slim(-\w+)?", base_image(STAGES[stage])), stage
    assert base_image(STAGES["trainer"]) == base_image(STAGES["operator"])  # one Python, as in CI


def _python_of(stage: str) -> str:
    return re.match(r"python:(3\.\d+)", base_image(STAGES[stage])).group(1)


def apt_installs(stage: Stage) -> list[str]:
    """The packages of every `apt-get install` in the stage."""
    return [
        w
        for run in stage.all("RUN")
        for words in shell_commands(run)
        if words[:2] == ["apt-get", "install"]
        for w in words[2:]
        if not w.startswith("-")
    ]


@pytest.mark.parametrize("stage", ["operator", "trainer"])
def test_image_python_is_one_the_project_supports(stage):
    assert Version(_python_of(stage)) in SpecifierSet(PYPROJECT["project"]["requires-python"])


def test_the_cuda_libraries_ship_once_with_torch():
    """No CUDA base image and no OS package of CUDA, cuDNN, cuBLAS or NCCL: the CUDA torch
    wheel's nvidia-* packages are the only copy, and the build fails if it finds another."""
    for stage in STAGES.values():
        assert not CUDA_BASE.search(base_image(stage)), f"{stage.name}: {base_image(stage)}"
    assert not [a for a in ARGS.values() if CUDA_BASE.search(a)], ARGS
    for stage in ("operator", "trainer"):
        assert not [p for p in apt_installs(STAGES[stage]) if CUDA_PACKAGE.match(p)], stage
        assert not [w for words in pip_installs(STAGES[stage]) for w in words if w.startswith("nvidia-")]
    run = " ".join(STAGES["trainer"].all("RUN"))
    guard = re.search(r"test -z \"\$\(find / -xdev -path /opt/venv -prune -o (.*?) -print\)\"", run)
    assert guard, "the trainer build must fail when a CUDA library exists outside the venv"
    for library in ("libcudart.so*", "libcudnn*.so*", "libcublas*.so*", "libnccl.so*"):
        assert f"-name '{library}'" in guard.group(1), library
    assert "test -n \"$(find /opt/venv -name 'libcudart.so*'" in run  # and the wheel's copy is there
    assert STAGES["trainer"].env()["VIRTUAL_ENV"] == "/opt/venv"


def test_the_trainer_takes_from_the_os_only_what_the_wheels_lack():
    """rdma-core's verbs library for NCCL over InfiniBand/RoCE; no recommends; the driver
    comes from the node, so the image asks the NVIDIA toolkit for compute but chooses no GPUs."""
    assert sorted(apt_installs(STAGES["trainer"])) == ["ibverbs-providers", "libibverbs1"]
    run = " ".join(STAGES["trainer"].all("RUN"))
    assert "--no-install-recommends" in run and "rm -rf /var/lib/apt/lists/*" in run
    env = STAGES["trainer"].env()
    assert "compute" in env["NVIDIA_DRIVER_CAPABILITIES"].split(",")
    assert "NVIDIA_VISIBLE_DEVICES" not in env  # the device plugin's, from the GPU request


def test_the_driver_the_cuda_wheel_needs_is_documented():
    """docs/deploy.md names the wheel's CUDA version and the driver versions it runs on."""
    tag = re.search(r"/whl/cu(\d+)(\d)$", ARGS["TORCH_INDEX_URL"])
    cuda = f"{tag.group(1)}.{tag.group(2)}"
    deploy = (ROOT / "docs" / "deploy.md").read_text()
    drivers = re.split(r"\n#{2,3} ", deploy[deploy.index("### Drivers") :])[0]
    assert f"cu{tag.group(1)}{tag.group(2)}" in drivers and f"CUDA {cuda}" in drivers
    assert re.search(r">= ?\d{3}\.\d+", drivers), "a minimum driver version"
    assert "docs.nvidia.com" in drivers, "the source of the driver table"


# --------------------------------------------------------------------------- pins


@pytest.mark.parametrize("stage", ["operator", "trainer"])
def test_every_pip_install_uses_the_projects_pins(stage):
    s = STAGES[stage]
    installs = pip_installs(s)
    assert installs
    mounts = bind_mounts(s)
    for words in installs:
        flags = [w for w in words if w.startswith("-")]
        constraint = words[words.index("--constraint") + 1] if "--constraint" in words else None
        assert constraint is not None, f"pip install without --constraint: {words}"
        assert mounts.get(constraint) == "constraints.txt", f"{constraint} is not constraints.txt"
        assert not [w for w in words if re.search(r"[=<>~!]=|[<>]", w)], f"versions come from constraints.txt: {words}"
        assert "--upgrade" not in flags and "-U" not in flags and "--no-deps" not in flags


def test_installed_extras_are_operator_and_trainer():
    def extras(stage: str) -> set[str]:
        return {
            extra
            for words in pip_installs(STAGES[stage])
            for w in words
            if (m := re.search(r"\.whl\)?\[([\w,]+)\]$", w))
            for extra in m.group(1).split(",")
        }

    # the gallery is served from the operator's image (no torch either)
    assert extras("operator") == {"operator", "gallery"}
    assert extras("trainer") == {"trainer"}


def test_trainer_torch_is_the_pinned_version_as_a_cuda_build():
    """constraints.txt pins torch without a local label, so the CUDA wheel of the same
    version (e.g. 2.13.0+cu128) satisfies the very pin the CPU wheel does (PEP 440)."""
    pin = constraints()["torch"]
    assert re.fullmatch(r"==\d+\.\d+\.\d+", pin), f"torch pin {pin!r} must be exact, without +cpu"
    tag = re.search(r"/whl/(cu\d+)$", ARGS["TORCH_INDEX_URL"]).group(1)
    assert SpecifierSet(pin).contains(f"{pin[2:]}+{tag}")
    assert not SpecifierSet(pin).contains(f"{Version(pin[2:]).major}.{Version(pin[2:]).minor + 1}.0+{tag}")
    (first, *_) = pip_installs(STAGES["trainer"])
    assert first[-1] == "torch" and "--index-url" in first  # torch first, from PyTorch's index
    run = " ".join(STAGES["trainer"].all("RUN"))
    assert "torch.version.cuda" in run  # the build fails on a CPU torch


#: pip freeze (`make lock`) never lists these, so constraints.txt cannot pin them; torch
#: requires setuptools>=77.0.3, so the trainer image gets the newest setuptools
PIP_FREEZE_OMITS = {"setuptools", "pip", "wheel", "distribute"}


def _closure(requirements: list[str], python: str) -> set[str]:
    """Every distribution ``requirements`` pull in on Python ``python`` (markers evaluated for
    it), read from the metadata of what is installed here."""
    env = {**default_environment(), "python_version": python, "python_full_version": f"{python}.0"}
    seen: set[str] = set()
    todo = [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        if req.marker and not req.marker.evaluate({**env, "extra": ""}):
            continue
        name = canonicalize_name(req.name)
        if name in seen:
            continue
        seen.add(name)
        try:
            dist = importlib.metadata.distribution(req.name)
        except importlib.metadata.PackageNotFoundError:
            pytest.fail(f"{req.name} (needed on Python {python}) is not installed here to read its requirements")
        for sub in dist.requires or []:
            sub_req = Requirement(sub)
            if sub_req.marker is None or any(
                sub_req.marker.evaluate({**env, "extra": e}) for e in (req.extras or {""})
            ):
                todo.append(Requirement(str(sub_req).split(";")[0]))
    return seen


def test_operator_install_set_has_no_torch_and_is_fully_pinned():
    project = PYPROJECT["project"]
    wanted = project["dependencies"] + project["optional-dependencies"]["operator"]
    closure = _closure(wanted, _python_of("operator"))
    assert {"kopf", "kubernetes-asyncio", "pydantic", "prometheus-client"} <= closure
    assert not closure & HEAVY and not [n for n in closure if n.startswith("nvidia-")], closure & HEAVY
    unpinned = closure - set(constraints()) - PIP_FREEZE_OMITS
    assert not unpinned, f"in the operator image but not in constraints.txt: {unpinned}"


def test_trainer_install_set_is_fully_pinned():
    project = PYPROJECT["project"]
    closure = _closure(project["dependencies"] + project["optional-dependencies"]["trainer"], _python_of("trainer"))
    assert {"torch", "diffusers", "transformers", "accelerate", "bitsandbytes", "peft"} <= closure
    # the CUDA wheel's own nvidia-*/triton dependencies come with it from PyTorch's index
    unpinned = {
        n for n in closure - set(constraints()) - PIP_FREEZE_OMITS if not n.startswith("nvidia-") and n != "triton"
    }
    assert not unpinned, f"in the trainer image but not in constraints.txt: {unpinned}"


# --------------------------------------------------------------------------- files


def _glob_regex(pattern: str) -> re.Pattern:
    out, i = "", 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
            continue
        if pattern.startswith("**", i):
            out, i = out + ".*", i + 2
            continue
        out += {"*": "[^/]*", "?": "[^/]"}.get(c, re.escape(c) if c not in "[]" else c)
        i += 1
    return re.compile(out + r"\Z")


def dockerignore_excludes(path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents wins."""
    parts = path.split("/")
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    excluded = False
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate, pattern = line.startswith("!"), os.path.normpath(line.lstrip("!"))
        if any(_glob_regex(pattern).match(c) for c in candidates):
            excluded = not negate
    return excluded


def _context_sources(stage: Stage) -> list[str]:
    out = list(bind_mounts(stage).values())
    for copy in stage.all("COPY"):
        words = [w for w in shlex.split(copy) if not w.startswith("--")]
        if "--from=" not in copy:
            out += words[:-1]
    return out


@pytest.mark.parametrize("stage", list(STAGES))
def test_files_the_build_reads_exist_and_are_in_the_context(stage):
    for source in _context_sources(STAGES[stage]):
        assert (ROOT / source).exists(), f"{stage}: {source} does not exist"
        assert not dockerignore_excludes(source), f"{stage}: .dockerignore leaves out {source}"
    for spec in re.findall(r"from=(\w+)", " ".join(STAGES[stage].all("RUN") + STAGES[stage].all("COPY"))):
        assert list(STAGES).index(spec) < list(STAGES).index(stage), f"{stage} reads a later stage {spec}"


def test_dockerignore_keeps_the_package_and_leaves_out_the_rest():
    package = [
        str(p.relative_to(ROOT))
        for p in (ROOT / "dreambooth").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    ]
    assert package and not [p for p in package if dockerignore_excludes(p)]
    for kept in ("pyproject.toml", "README.md", "constraints.txt", "dreambooth/py.typed"):
        assert not dockerignore_excludes(kept), kept
    for left_out in (
        ".venv/bin/python",
        ".git/HEAD",
        "tests/conftest.py",
        "charts/dreambooth-operator/Chart.yaml",
        "runs/demo/output/model.safetensors",
        "dreambooth/__pycache__/cli.cpython-311.pyc",
    ):
        assert dockerignore_excludes(left_out), left_out


def test_wheel_build_reads_what_setuptools_needs():
    """pyproject's readme is in the build; package data is below dreambooth/."""
    sources = _context_sources(STAGES["wheel"])
    assert PYPROJECT["project"]["readme"] in sources and "pyproject.toml" in sources and "dreambooth" in sources


# --------------------------------------------------------------------------- users, paths, entry points


@pytest.mark.parametrize("stage", ["operator", "trainer"])
def test_images_run_as_the_numeric_non_root_user_the_pods_use(stage):
    users = STAGES[stage].all("USER")
    assert users and users[-1] == f"{podtemplate.RUN_AS}:{podtemplate.RUN_AS}"
    (deployment,) = [o for o in objects() if o["kind"] == "Deployment"]
    assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == podtemplate.RUN_AS


def test_operator_entrypoint_is_the_console_script():
    assert STAGES["operator"].all("ENTRYPOINT") == ['["dreambooth-operator"]']
    target = PYPROJECT["project"]["scripts"]["dreambooth-operator"]
    module, _, func = target.partition(":")
    assert importlib.util.find_spec(module) is not None and func == "main"
    assert STAGES["operator"].env()["HOME"] == "/tmp"  # the chart mounts an emptyDir there
    settings = OperatorSettings()
    assert STAGES["operator"].all("EXPOSE") == [f"{settings.metrics_port} {settings.health_port}"]


def test_trainer_entrypoint_is_what_the_operator_runs():
    import json

    entrypoint = json.loads(STAGES["trainer"].all("ENTRYPOINT")[0])
    assert entrypoint == ["python", "-m", podtemplate.TRAINER_MODULE]
    assert importlib.util.find_spec(f"{podtemplate.TRAINER_MODULE}.__main__") is not None
    env = STAGES["trainer"].env()
    assert env["PATH"].startswith(env["VIRTUAL_ENV"] + "/bin:")  # python and accelerate from the venv
    assert STAGES["trainer"].all("EXPOSE") == [f"{OperatorSettings().trainer_metrics_port} {naming.RENDEZVOUS_PORT}"]


def test_trainer_caches_are_where_the_pods_mount_writable_volumes():
    env = STAGES["trainer"].env()
    pod_env = {e["name"]: e["value"] for e in podtemplate._env(_any_inputs()) if "value" in e}
    for var in ("HOME", "XDG_CACHE_HOME", "HF_HOME", "DREAMBOOTH_WORKDIR"):
        assert env[var] == pod_env[var], var
    writable = {podtemplate.CACHE_DIR, "/tmp"}
    for var in ("HOME", "XDG_CACHE_HOME", "HF_HOME", "TRITON_CACHE_DIR", "MPLCONFIGDIR", "DREAMBOOTH_WORKDIR"):
        assert any(env[var] == w or env[var].startswith(w + "/") for w in writable), var
    run = " ".join(STAGES["trainer"].all("RUN"))
    assert f"chown -R {podtemplate.RUN_AS}:{podtemplate.RUN_AS} {podtemplate.CACHE_DIR} {podtemplate.WORKDIR}" in run
    assert STAGES["trainer"].all("VOLUME") == [f'["{podtemplate.CACHE_DIR}", "/tmp"]']


def _any_inputs() -> trainerinputs.TrainerInputs:
    import yaml

    from dreambooth.api import validate_job

    doc = yaml.safe_load((ROOT / "examples" / "toy-cat.yaml").read_text())
    doc["metadata"].update(namespace="team-a", uid="3f0e5a8c-7d1b-4c2e-9a6f-0b1c2d3e4f50")
    return trainerinputs.TrainerInputs(validate_job(doc, cluster=True), OperatorSettings())
