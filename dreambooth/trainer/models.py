"""Base models from the Hugging Face Hub. (Checking and loading a model folder is the
family's: dreambooth/trainer/families.)"""

from __future__ import annotations

import logging
from pathlib import Path

from dreambooth.trainer.errors import (
    NotFoundError,
    StorageAuthError,
    StorageUnavailableError,
)

log = logging.getLogger(__name__)

#: what we download from a hub repository (no .bin duplicates, no fp16/ema variants)
HUB_PATTERNS = [
    "model_index.json",
    "*/config.json",
    "*/*.json",
    "*/*.txt",
    "*/*.model",
    "*/diffusion_pytorch_model.safetensors",
    "*/model.safetensors",
]


def fetch_from_hub(repo: str, revision: str | None, cache_dir: Path, patterns: list[str] | None = None) -> Path:
    """Download (or reuse from the cache) a hub repository's diffusers folder (``patterns``:
    other files, e.g. a CLIP model's)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return Path(
            snapshot_download(repo, revision=revision, cache_dir=cache_dir, allow_patterns=patterns or HUB_PATTERNS)
        )
    except GatedRepoError:
        raise StorageAuthError(
            f"hf://{repo} is gated: accept its license on huggingface.co and give the trainer an "
            "HF_TOKEN, or copy the model to S3 and use an s3:// URI"
        ) from None
    except (RepositoryNotFoundError, RevisionNotFoundError):
        raise NotFoundError(
            f"hf://{repo}@{revision or 'main'} does not exist on the Hugging Face Hub (or is "
            "private: give the trainer an HF_TOKEN)"
        ) from None
    except LocalEntryNotFoundError:
        raise StorageUnavailableError(
            f"the Hugging Face Hub cannot be reached for hf://{repo} and it is not in the cache: "
            "allow the trainer pods to reach huggingface.co, or copy the model to S3 "
            "(StableDiffusionPipeline.save_pretrained) and set baseModel.uri to that s3:// prefix"
        ) from None
