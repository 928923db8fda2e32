"""Fixtures the trainer tests share: a tiny SD 1.5 model of their module's own and its
pipeline (built once per module), and one torch thread for the modules that ask for it."""

from __future__ import annotations

import pytest


@pytest.fixture
def one_thread():
    """One torch thread for the test (``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny random SD-1.5-shaped model folder, built for the module that asks (its tests
    may look at every file; the session's ``tiny_model_dir`` is shared by the runs)."""
    from dreambooth.trainer.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def pipeline(model):
    """``model`` loaded as a ``StableDiffusionPipeline``."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(model)
