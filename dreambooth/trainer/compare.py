"""compare.png and compare.json of a sweep, from what its runs uploaded.

    python -m dreambooth.trainer.compare      (the config in $DREAMBOOTH_COMPARE_CONFIG)

compare.png is the blog's figure: one row per (run, step, scheduler), labelled with the
run's values, one column per prompt (the first image of that prompt in the row's sample
grid); a run that drew no grid for a row (it failed) gets a grey row saying so.
compare.json holds every row with its values, the evaluation of its step (the run's main
scheduler; evaluation.jsonl) and whether the run succeeded (result.json).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from PIL import Image

from dreambooth.api import layout
from dreambooth.api.sweep_runs import (
    COMPARE_JSON,
    COMPARE_PNG,
    CONFIG_ENV,
    CompareConfig,
    CompareRun,
    summary_of,
)
from dreambooth.trainer.sampling import first_images, grid
from dreambooth.trainer.storage import Storage, open_storage

log = logging.getLogger(__name__)
TERMINATION_LOG = "/dev/termination-log"


def _evaluations(store: Storage) -> dict[int, dict[str, Any]]:
    if not store.exists(layout.EVALUATION):
        return {}
    lines = store.read_bytes(layout.EVALUATION).decode().splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    return {r["step"]: r for r in records if not r.get("base")}


def _cells(store: Storage, key: str, config: CompareConfig, workdir: Path) -> list[Image.Image] | None:
    if not store.exists(key):
        return None
    path = workdir / key.replace("/", "_")
    store.download(key, path)
    with Image.open(path) as image:
        return first_images(image.convert("RGB"), len(config.prompts), config.resolution)


def _run_rows(run: CompareRun, config: CompareConfig, workdir: Path):
    store = open_storage(run.output)
    evaluations = _evaluations(store)
    succeeded = store.exists(layout.RESULT)
    for step in config.steps:
        for k, scheduler in enumerate(config.schedulers):
            key = layout.sample_grid(step, None if k == 0 else scheduler)
            cells = _cells(store, key, config, workdir)
            record = {
                "run": run.name,
                "values": run.values,
                "step": step,
                "scheduler": scheduler,
                "succeeded": succeeded,
                "samples": store.uri(key) if cells else None,
                "evaluation": evaluations.get(step) if k == 0 else None,
            }
            label = f"{run.label}, step {step}, {scheduler}" + ("" if cells else " (no samples)")
            yield record, label, cells


def compare(config: CompareConfig, workdir: Path) -> dict[str, Any]:
    """Write compare.png and compare.json to the sweep's prefix; return compare.json's content."""
    workdir.mkdir(parents=True, exist_ok=True)
    size = config.resolution
    records, labels, rows = [], [], []
    for run in config.runs:
        for record, label, cells in _run_rows(run, config, workdir):
            records.append(record)
            labels.append(label)
            rows.append(cells or [Image.new("RGB", (size, size), "lightgrey") for _ in config.prompts])
    out = open_storage(config.output)
    png = workdir / COMPARE_PNG
    grid(rows, labels, title="columns: " + " | ".join(config.prompts)).save(png)
    out.upload_file(png, COMPARE_PNG)
    doc = {
        "sweep": config.sweep,
        "prompts": config.prompts,
        "steps": config.steps,
        "schedulers": config.schedulers,
        "rows": records,
    }
    out.write_bytes(COMPARE_JSON, json.dumps(doc, indent=1).encode())
    log.info("wrote %s and %s (%d rows)", out.uri(COMPARE_PNG), out.uri(COMPARE_JSON), len(records))
    return doc


def main() -> int:
    """The compare pod: the figures of each evaluated row also go to the termination message,
    which the operator copies into the sweep's status rows (it reads no S3)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = CompareConfig.model_validate_json(os.environ[CONFIG_ENV])
    doc = compare(config, Path(os.environ.get("DREAMBOOTH_WORKDIR", "/tmp/dreambooth")) / "compare")
    termination = Path(os.environ.get("DREAMBOOTH_TERMINATION_LOG", TERMINATION_LOG))
    try:
        termination.write_text(summary_of(doc).dumps())
    except OSError as err:  # outside a pod: no termination log to write
        log.info("no termination message written (%s)", err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
