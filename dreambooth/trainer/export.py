"""Export the trained model: a diffusers folder and/or one .safetensors file, to storage.

``model/``             loads with ``StableDiffusionPipeline.from_pretrained`` (safetensors; its
                       scheduler is the validation sampler, DDIM by default)
``model.safetensors``  the original Stable Diffusion checkpoint layout (AUTOMATIC1111,
                       ComfyUI, ``StableDiffusionPipeline.from_single_file``)
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from dreambooth.api import layout
from dreambooth.api.spec import OutputFormat
from dreambooth.trainer.families import Family
from dreambooth.trainer.storage import Storage

log = logging.getLogger(__name__)


def export(family: Family, pipeline, formats: list[OutputFormat], storage: Storage, workdir: Path) -> dict[str, str]:
    """Write ``pipeline`` in every format asked for; returns {format: uri}."""
    out: dict[str, str] = {}
    if OutputFormat.DIFFUSERS in formats:
        folder = workdir / "model"
        shutil.rmtree(folder, ignore_errors=True)
        pipeline.save_pretrained(folder, safe_serialization=True)
        storage.delete_prefix(layout.MODEL)
        storage.upload_dir(folder, layout.MODEL)
        out[OutputFormat.DIFFUSERS] = storage.uri(layout.MODEL)
    if OutputFormat.SAFETENSORS in formats:
        path = workdir / layout.SINGLE_FILE
        family.save_single_file(pipeline, path)
        storage.upload_file(path, layout.SINGLE_FILE)
        out[OutputFormat.SAFETENSORS] = storage.uri(layout.SINGLE_FILE)
    if OutputFormat.LORA in formats:
        folder = workdir / "lora"
        shutil.rmtree(folder, ignore_errors=True)
        family.save_lora(pipeline, folder)
        storage.delete_prefix(layout.LORA)
        storage.upload_dir(folder, layout.LORA)
        out[OutputFormat.LORA] = storage.uri(layout.LORA)
    for fmt, uri in out.items():
        log.info("exported %s to %s", fmt, uri)
    return out
