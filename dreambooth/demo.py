"""The embedded default job that ``dreambooth demo`` (README's first command) runs."""

from __future__ import annotations

from typing import Any


def demo_job_document(root: str = "file://./runs/demo") -> dict[str, Any]:
    return {
        "apiVersion": "dreambooth.io/v1alpha1",
        "kind": "DreamBoothJob",
        "metadata": {"name": "demo"},
        "spec": {
            "preset": "object",
            "baseModel": {"uri": f"{root}/base-model"},
            "instance": {"uri": f"{root}/instance", "prompt": "a photo of zwx toy cat"},
            "training": {"steps": 40, "batchSize": 1, "resolution": 64, "learningRate": 1e-4},
            "validation": {"inferenceSteps": 10, "imagesPerPrompt": 2},
            "checkpointing": {"everySteps": 10, "keep": 2},
            "output": {"uri": f"{root}/output"},
            "resources": {"gpusPerNode": 0},
        },
    }
