"""baseModel.vae: another VAE (the fp16-fix one users swap in) replaces the model's own, for
every family: it encodes the photos and is the VAE of the exported model. (A folder that is
not a VAE: tests/trainer/test_bad_inputs.py.)"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from dreambooth.trainer.metrics import TrainerMetrics
from dreambooth.trainer.run import run
from dreambooth.trainer.tiny import build_tiny_vae
from tests.support.trainer import job_document, trainer_config

VAE_WEIGHTS = "diffusion_pytorch_model.safetensors"
MODELS = {"sd": "tiny_model_dir", "sdxl": "tiny_sdxl_dir"}


@pytest.mark.parametrize("family", MODELS)
def test_another_vae_replaces_the_models_own(family, request, toy_cat_dir, tmp_path, caplog):
    model = request.getfixturevalue(MODELS[family])
    vae = build_tiny_vae(tmp_path / "fp16-fix-vae", seed=7)  # other weights than the model's vae/
    out = tmp_path / "out"
    doc = job_document(
        model.as_uri(), toy_cat_dir.as_uri(), out.as_uri(), steps=2, every=2, training={"method": "full"}
    )
    doc["spec"]["baseModel"].update(family=family, vae=vae.as_uri())
    doc["spec"]["validation"] = {"enabled": False}
    doc["spec"]["output"]["formats"] = ["diffusers"]
    with caplog.at_level("INFO"):
        run(trainer_config(doc), tmp_path / "w", metrics=TrainerMetrics())
    assert f"the VAE is {vae.as_uri()}'s (spec.baseModel.vae)" in caplog.text
    exported = load_file(out / "model" / "vae" / VAE_WEIGHTS)
    swapped, own = load_file(vae / VAE_WEIGHTS), load_file(model / "vae" / VAE_WEIGHTS)
    assert exported.keys() == swapped.keys()
    assert all(torch.equal(exported[k], swapped[k]) for k in swapped), "the export must carry the swapped VAE"
    assert any(not torch.equal(exported[k], own[k]) for k in own)
