"""Export the trained model in the formats asked for (``output.formats``), to storage.

``model/``             diffusers: loads with ``<Pipeline>.from_pretrained`` (safetensors; its
                       scheduler is the validation sampler)
``model.safetensors``  the family's original single-file layout (AUTOMATIC1111, ComfyUI,
                       ``<Pipeline>.from_single_file``)
``lora/``              LoRA: ``pytorch_lora_weights.safetensors`` (diffusers' ``load_lora_weights``)
``lora/<job>_kohya.safetensors``  the same adapters in the kohya/WebUI format
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


def export(
    family: Family, pipeline, formats: list[OutputFormat], storage: Storage, workdir: Path, name: str
) -> dict[str, str]:
    """Write ``pipeline`` (of the job ``name``) in every format asked for; returns {format: uri}."""
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
    if OutputFormat.LORA_KOHYA in formats:  # after lora/ was replaced
        key = layout.lora_kohya(name)
        path = workdir / key.rsplit("/", 1)[-1]
        family.save_lora_kohya(pipeline, path)
        storage.upload_file(path, key)
        out[OutputFormat.LORA_KOHYA] = storage.uri(key)
    for fmt, uri in out.items():
        log.info("exported %s to %s", fmt, uri)
    return out
