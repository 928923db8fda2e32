"""The examples of the newer model families end to end on the simulated cluster:
examples/sdxl-lora-object.yaml and examples/sd35-lora-object.yaml applied as a user would,
the real operator and trainer, a tiny random model of the family in the example's S3 place
(the SDXL example's fp16-fix VAE: the tiny model's own), small resolution and steps as the
toy-cat scenarios use. Each job succeeds, says which family it trained, and its LoRA loads
into the family's diffusers pipeline and changes what it draws."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from dreambooth.trainer.storage import open_storage
from kubesim.cluster import LocalCluster, example_manifest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

STEPS = 30
#: the CPU's numbers: fp32, one image per step without accumulation (the examples' 4
#: accumulation steps would need 4 images per step), few steps
SMALL = {
    "training": {"steps": STEPS, "mixedPrecision": "no", "gradientAccumulationSteps": 1},
    "checkpointing": {"everySteps": 15},
    "validation": {"everySteps": 15},
}


@dataclass(frozen=True)
class Example:
    family: str
    example: str
    model_fixture: str  # the tiny model of the family (a conftest fixture)
    base_model: dict[str, str]  # the example's spec.baseModel, as written
    pipeline: str  # the diffusers pipeline its LoRA loads into
    logs: tuple[str, ...] = ()  # what the trainer says about this example's model
    load: dict[str, Any] = field(default_factory=dict)  # from_pretrained's arguments for the example's settings
    exports: tuple[str, ...] = ()  # what else the example asks to be written


EXAMPLES = {
    "sdxl": Example(
        "sdxl",
        "sdxl-lora-object",
        "tiny_sdxl_dir",
        {"uri": "s3://models/sdxl-base/", "family": "sdxl", "vae": "s3://models/sdxl-vae-fp16-fix/"},
        "StableDiffusionXLPipeline",
        logs=("the VAE is s3://models/sdxl-vae-fp16-fix/'s (spec.baseModel.vae)",),
    ),
    # t5: drop, as the example says for GPUs under 40 GB: the pipeline is loaded without T5
    "sd3": Example(
        "sd3",
        "sd35-lora-object",
        "tiny_sd3_dir",
        {"uri": "s3://models/sd35-medium/", "family": "sd3"},
        "StableDiffusion3Pipeline",
        load={"text_encoder_3": None, "tokenizer_3": None},
        exports=("lora/toy-cat-sd35_kohya.safetensors",),
    ),  # ComfyUI's file
}


@pytest.fixture(scope="module", params=sorted(EXAMPLES))
def run(request, tmp_path_factory, s3_server, toy_cat_dir) -> Any:
    example = EXAMPLES[request.param]
    model_dir: Path = request.getfixturevalue(example.model_fixture)
    with LocalCluster(tmp_path_factory.mktemp(example.family), s3_server) as cluster:
        cluster.upload_example_inputs(model_dir, toy_cat_dir, model_uri=example.base_model["uri"])
        if "vae" in example.base_model:
            vae = open_storage(example.base_model["vae"], cluster.settings)
            if not vae.list():
                vae.upload_dir(model_dir / "vae")
        manifest = example_manifest(example.example, cluster.s3_endpoint, **SMALL)
        assert manifest["spec"]["baseModel"] == example.base_model  # the example's own
        cluster.apply(manifest)
        cluster.wait_phase(manifest["metadata"]["name"], "Succeeded", timeout=240)
        yield example, model_dir, cluster, manifest["metadata"]["name"]


def test_the_example_succeeds_as_a_job_of_its_family(run):
    example, _, cluster, name = run
    status = cluster.status(name)
    assert status["phase"] == "Succeeded", cluster.explain(name)
    assert status["family"] == example.family and status["progress"]["summary"] == f"{STEPS}/{STEPS}"
    logs = cluster.logs(name)
    assert f"model family {example.family}" in logs  # what the trainer found in the folder
    for line in example.logs:
        assert line in logs
    keys = cluster.keys(name)
    assert {
        "lora/pytorch_lora_weights.safetensors",
        "result.json",
        "samples/progression.png",
        f"samples/step-{STEPS}.png",
        *example.exports,
    } <= keys, sorted(keys)
    assert "model/model_index.json" not in keys  # a LoRA job exports the adapter only
    assert status["outputs"]["lora"] == cluster.output(name).uri("lora/"), status["outputs"]


def test_its_lora_loads_into_the_family_pipeline_and_changes_what_it_draws(run, tmp_path):
    import diffusers
    import numpy as np
    import torch

    example, model_dir, cluster, name = run
    cluster.output(name).download_prefix("lora/", tmp_path / "lora")
    pipe = getattr(diffusers, example.pipeline).from_pretrained(model_dir, **example.load)
    pipe.set_progress_bar_config(disable=True)

    def draw() -> Any:
        return np.asarray(
            pipe(
                "a photo of zwx toy cat",
                num_inference_steps=2,
                height=64,
                width=64,
                generator=torch.Generator().manual_seed(0),
            ).images[0],
            dtype=np.int16,
        )

    before = draw()
    pipe.load_lora_weights(tmp_path / "lora")
    after = draw()
    assert after.shape == (64, 64, 3) and np.abs(after - before).max() > 0
