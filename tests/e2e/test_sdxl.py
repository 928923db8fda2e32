"""examples/sdxl-lora-object.yaml end to end on the simulated cluster: applied as a user
would, the real operator and trainer, a tiny random SDXL-shaped model in the example's S3
place (s3://models/sdxl-base/, its VAE as the example's fp16-fix VAE), small resolution and steps as the toy-cat scenarios use. The
job succeeds, says it trained an SDXL model, and its LoRA loads into diffusers' SDXL
pipeline."""

from __future__ import annotations

from typing import Any

import pytest

from dreambooth.trainer.storage import open_storage
from kubesim.cluster import LocalCluster, example_manifest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

EXAMPLE = "sdxl-lora-object"
MODEL_URI = "s3://models/sdxl-base/"  # where the example reads its base model
VAE_URI = "s3://models/sdxl-vae-fp16-fix/"  # and the VAE it swaps in (here: the tiny model's own)
STEPS = 30
#: the CPU's numbers: fp32, one image per step without accumulation (the example's 4
#: accumulation steps would need 4 images per step), few steps
SMALL = {"training": {"steps": STEPS, "mixedPrecision": "no", "gradientAccumulationSteps": 1},
         "checkpointing": {"everySteps": 15}, "validation": {"everySteps": 15}}


@pytest.fixture(scope="module")
def run(tmp_path_factory, s3_server, tiny_sdxl_dir, toy_cat_dir) -> Any:
    with LocalCluster(tmp_path_factory.mktemp("sdxl"), s3_server) as cluster:
        cluster.upload_example_inputs(tiny_sdxl_dir, toy_cat_dir, model_uri=MODEL_URI)
        vae = open_storage(VAE_URI, cluster.settings)
        if not vae.list():
            vae.upload_dir(tiny_sdxl_dir / "vae")
        manifest = example_manifest(EXAMPLE, cluster.s3_endpoint, **SMALL)
        assert manifest["spec"]["baseModel"] == {"uri": MODEL_URI, "family": "sdxl", "vae": VAE_URI}  # the example's
        cluster.apply(manifest)
        cluster.wait_phase(manifest["metadata"]["name"], "Succeeded", timeout=240)
        yield cluster, manifest["metadata"]["name"]


def test_the_sdxl_example_succeeds_as_an_sdxl_job(run):
    cluster, name = run
    status = cluster.status(name)
    assert status["phase"] == "Succeeded", cluster.explain(name)
    assert status["family"] == "sdxl" and status["progress"]["summary"] == f"{STEPS}/{STEPS}"
    assert "model family sdxl" in cluster.logs(name)  # what the trainer found in the folder
    assert f"the VAE is {VAE_URI}'s (spec.baseModel.vae)" in cluster.logs(name)
    keys = cluster.keys(name)
    assert {"lora/pytorch_lora_weights.safetensors", "result.json", "samples/progression.png",
            f"samples/step-{STEPS}.png"} <= keys, sorted(keys)
    assert "model/model_index.json" not in keys  # a LoRA job exports the adapter only
    assert status["outputs"]["lora"] == cluster.output(name).uri("lora/"), status["outputs"]


def test_its_lora_loads_into_the_sdxl_pipeline_and_changes_what_it_draws(run, tiny_sdxl_dir, tmp_path):
    import numpy as np
    import torch
    from diffusers import StableDiffusionXLPipeline

    cluster, name = run
    cluster.output(name).download_prefix("lora/", tmp_path / "lora")
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    pipe.set_progress_bar_config(disable=True)

    def draw() -> Any:
        return np.asarray(pipe("a photo of zwx toy cat", num_inference_steps=2, height=64, width=64,
                               generator=torch.Generator().manual_seed(0)).images[0], dtype=np.int16)

    before = draw()
    pipe.load_lora_weights(tmp_path / "lora")
    after = draw()
    assert after.shape == (64, 64, 3) and np.abs(after - before).max() > 0
