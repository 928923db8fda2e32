"""The layers docs/ARCHITECTURE.md describes are enforced, not only described: import-linter
(`.importlinter`) on the package, and no import cycle inside it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).parent / "lint-imports"


def lint(where: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LINT), "--config", str(where / ".importlinter"), "--no-cache"],
        cwd=where,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


def test_the_package_keeps_its_layers():
    done = lint(ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "5 kept, 0 broken" in done.stdout


FORBIDDEN = {  # a module added to the package -> the contract it breaks
    "api/leak.py": ("import torch\n", "The API layer imports neither torch nor kopf"),
    "operator/leak.py": ("from dreambooth.trainer import run\n", "The operator (its image has no torch)"),
    "trainer/leak.py": (
        "from dreambooth.operator import status\n",
        "operator, trainer and gallery on it and independent",
    ),
    "api/kube.py": ("import kubernetes_asyncio\n", "Only dreambooth.operator.kube (and the gallery's"),
    "gallery/leak.py": ("import torch\n", "The gallery (read only, in the operator image)"),
    "gallery/views2.py": ("from dreambooth.trainer import storage\n", "operator, trainer and gallery on it"),
    "gallery/pages/kube.py": ("import kubernetes_asyncio\n", "Only dreambooth.operator.kube (and the gallery's"),
}


@pytest.mark.parametrize("module", FORBIDDEN)
def test_a_forbidden_import_breaks_the_lint(module, tmp_path):
    shutil.copytree(ROOT / "dreambooth", tmp_path / "dreambooth", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / ".importlinter", tmp_path)
    source, contract = FORBIDDEN[module]
    (tmp_path / "dreambooth" / module).write_text(source)
    done = lint(tmp_path)
    assert done.returncode == 1, done.stdout
    text = " ".join(done.stdout.split())  # contract names wrap in the report
    after = text[text.index(contract) + len(contract) :]
    verdicts = [w for w in after.split() if w in ("KEPT", "BROKEN")]
    assert verdicts and verdicts[0] == "BROKEN", text


def test_no_import_cycle_inside_the_package():
    graph = grimp.build_graph("dreambooth")
    cycles = [
        (a, b)
        for a in sorted(graph.modules)
        for b in sorted(graph.find_modules_directly_imported_by(a))
        if b.startswith("dreambooth") and graph.chain_exists(importer=b, imported=a)
    ]
    assert not cycles, cycles
