"""kubesim is a package apart: the product neither imports nor ships it, it never imports the
test tree, and all of it but the DreamBooth cluster and demo is independent of DreamBooth."""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

import setuptools

ROOT = Path(__file__).resolve().parents[2]
#: the modules that run this project's operator and example on the simulated cluster
DREAMBOOTH_AWARE = {"kubesim.cluster", "kubesim.demo"}


def imports(folder: Path) -> dict[str, set[str]]:
    """module -> the top-level names of everything it imports (lazy imports included)."""
    out: dict[str, set[str]] = {}
    for path in sorted(folder.rglob("*.py")):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module)
        out[module] = names
    return out


def top(names: set[str]) -> set[str]:
    return {name.split(".")[0] for name in names}


def test_the_scan_sees_imports():
    found = imports(ROOT / "kubesim")
    assert "dreambooth" in top(found["kubesim.cluster"])  # lazy or not, it is seen
    assert "kubesim.emulator" in found["kubesim.kube"]


def test_kubesim_never_imports_the_test_tree():
    offenders = {m: sorted(n) for m, n in imports(ROOT / "kubesim").items() if "tests" in top(n)}
    assert offenders == {}


def test_only_the_dreambooth_cluster_and_demo_import_dreambooth():
    offenders = {
        m for m, n in imports(ROOT / "kubesim").items() if "dreambooth" in top(n) and m not in DREAMBOOTH_AWARE
    }
    assert offenders == set()


def test_the_product_imports_neither_kubesim_nor_tests():
    offenders = {
        m: sorted(top(n) & {"kubesim", "tests"})
        for m, n in imports(ROOT / "dreambooth").items()
        if top(n) & {"kubesim", "tests"}
    }
    assert offenders == {}


def test_the_wheel_and_the_images_leave_kubesim_out():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    find = config["tool"]["setuptools"]["packages"]["find"]
    packages = setuptools.find_packages(str(ROOT), include=find["include"], exclude=find.get("exclude", ()))
    assert "dreambooth" in packages
    assert not [p for p in packages if p.split(".")[0] in ("kubesim", "tests")], packages
    copied = re.findall(r"^COPY\s+(.+?)\s+\S+$", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    assert copied and not [c for c in copied if "kubesim" in c or c.startswith(".")], copied
