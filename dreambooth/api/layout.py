"""Where a job's outputs live: the one storage layout that the trainer writes and the
operator (and anything else that shows a run) reads.

Keys are relative to the job's output prefix (default ``s3://<bucket>/<namespace>/<name>/``)::

    checkpoints/checkpoint-<step>/   trainable weights, optimizer, schedule, RNG; manifest.json last
    samples/step-<step>.png          a sample grid: rows = prompts, columns = images
    samples/step-<step>-<sched>.png  the same round drawn with validation.compareSchedulers' <sched>
    samples/progression.png          rows = sampled steps, columns = prompts
    model/                           the diffusers folder
    model.safetensors                one file in the original layout (A1111, ComfyUI)
    lora/                            LoRA adapters: pytorch_lora_weights.safetensors (diffusers)
    lora/<name>_kohya.safetensors    the same adapters in the kohya/WebUI format (A1111, ComfyUI)
    evaluation.jsonl, history.jsonl  per-checkpoint evaluation, per-step loss and learning rate
    result.json                      written last: the run is complete

Generated class images are shared by every job of a bucket (or claim):
``<scheme>://<bucket>/.cache/class-images/<key>/`` (:func:`class_cache_uri`).
"""

from __future__ import annotations

import re

from dreambooth.api.uris import Scheme, parse_uri

MODEL = "model/"
SINGLE_FILE = "model.safetensors"
LORA = "lora/"
SAMPLES = "samples/"
PROGRESSION = SAMPLES + "progression.png"
CHECKPOINTS = "checkpoints/"
#: in a checkpoint folder (and a class-image set): written last, it marks the folder complete
MANIFEST = "manifest.json"
EVALUATION = "evaluation.jsonl"
HISTORY = "history.jsonl"
RESULT = "result.json"
CLASS_CACHE = ".cache/class-images/"

_CHECKPOINT = re.compile(r"^checkpoints/checkpoint-(\d+)/")
_SAMPLE = re.compile(r"^samples/step-(\d+)\.png$")


def lora_kohya(name: str) -> str:
    """``lora/<name>_kohya.safetensors``: named after the job, as WebUI lists LoRAs by file name."""
    return f"{LORA}{name}_kohya.safetensors"


#: the final model's key by output format, in the order the first one asked for names it
FINAL_MODEL = {"diffusers": MODEL, "lora": LORA, "safetensors": SINGLE_FILE, "lora-kohya": LORA}


def final_model(formats) -> str:
    """The key that holds the last step's weights: the first of model/, lora/,
    model.safetensors that ``formats`` (output format names) ask for."""
    asked = {str(f) for f in formats} or {"diffusers"}
    return next(key for fmt, key in FINAL_MODEL.items() if fmt in asked)


def checkpoint(step: int) -> str:
    """``checkpoints/checkpoint-<step>/``"""
    return f"{CHECKPOINTS}checkpoint-{step}/"


def sample_grid(step: int, scheduler: str | None = None) -> str:
    """``samples/step-<step>.png``; ``samples/step-<step>-<scheduler>.png`` for a scheduler
    of ``validation.compareSchedulers`` (the same round drawn with another scheduler)."""
    return f"{SAMPLES}step-{step}.png" if scheduler is None else f"{SAMPLES}step-{step}-{scheduler}.png"


def checkpoint_step(key: str) -> tuple[int, str] | None:
    """``(step, the rest of the key)`` for a key inside a checkpoint folder, else None."""
    found = _CHECKPOINT.match(key)
    return (int(found.group(1)), key[found.end() :]) if found else None


def sample_grid_step(key: str) -> int | None:
    """The step of a sample grid's key, else None (the progression grid is not one)."""
    found = _SAMPLE.match(key)
    return int(found.group(1)) if found else None


def class_cache_uri(output_uri: str) -> str:
    """Where generated class images are cached: at the root of the output's bucket or
    claim, shared by every job writing there; for a local folder, next to it."""
    uri = parse_uri(output_uri, allowed=set(Scheme))
    if uri.scheme in (Scheme.S3, Scheme.PVC):
        return f"{uri.scheme}://{uri.authority}/{CLASS_CACHE}"
    parent = output_uri.rstrip("/").rsplit("/", 1)[0]
    return f"{parent}/{CLASS_CACHE}"
