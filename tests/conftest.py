"""Test-wide settings. CPU torch on small machines is 50-200x slower with more than one
OpenMP thread, and no model hub is reachable: both are fixed before anything imports torch."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path

import pytest

from kubesim.kube import KubectlMissing
from tests.support.s3fixtures import s3_bucket, s3_server  # noqa: F401


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny Stable-Diffusion-1.5-shaped model with random weights (built once)."""
    from dreambooth.trainer.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-sd", resolution=64)


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory) -> Path:
    """A tiny SDXL-shaped model with random weights (built once)."""
    from dreambooth.trainer.tiny import build_tiny_sdxl

    return build_tiny_sdxl(tmp_path_factory.mktemp("models") / "tiny-sdxl", resolution=64)


@pytest.fixture(scope="session")
def tiny_sd3_dir(tmp_path_factory) -> Path:
    """A tiny SD3-shaped model with random weights (three text encoders, T5 included; built once)."""
    from dreambooth.trainer.tiny_sd3 import build_tiny_sd3

    return build_tiny_sd3(tmp_path_factory.mktemp("models") / "tiny-sd3")


@pytest.fixture(scope="session")
def toy_cat_dir(tmp_path_factory) -> Path:
    """Four synthetic instance photos of one toy cat."""
    from dreambooth.demo import draw_toy_cats

    folder = tmp_path_factory.mktemp("photos") / "toy-cat"
    draw_toy_cats(folder)
    return folder


@pytest.hookimpl(wrapper=True)
def pytest_pyfunc_call(pyfuncitem):
    """A test that runs kubectl on the simulated cluster is skipped where it is missing."""
    try:
        return (yield)
    except KubectlMissing as exc:
        pytest.skip(str(exc))
