"""Textual inversion + DreamBooth: a new token is learned first, then DreamBooth trains with
it; both phases checkpoint and resume, and the exported model knows the token."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from dreambooth.trainer.errors import Preempted
from dreambooth.trainer.metrics import TrainerMetrics
from dreambooth.trainer.run import run
from tests.support.trainer import StopAfter, job_document, trainer_config

TI_STEPS, DB_STEPS = 4, 4


def ti_config(model, photos, out):
    doc = job_document(model.as_uri(), photos.as_uri(), out.as_uri(), steps=DB_STEPS, every=2,
                       training={"textualInversion": {"steps": TI_STEPS, "placeholderToken": "<zwx>",
                                                      "initializerToken": "cat", "learningRate": 5e-2}})
    doc["spec"]["instance"]["prompt"] = "a photo of <zwx> toy cat"
    doc["spec"]["validation"] = {"enabled": False}
    doc["spec"]["checkpointing"]["keep"] = 10
    return trainer_config(doc)


@pytest.fixture(scope="module")
def straight(tiny_model_dir, toy_cat_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ti") / "out"
    outcome = run(ti_config(tiny_model_dir, toy_cat_dir, out), out.parent / "w", metrics=TrainerMetrics())
    assert outcome.step == TI_STEPS + DB_STEPS
    return out


def test_the_exported_model_knows_the_new_token(straight, tiny_model_dir):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(straight / "model")
    base = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    token_id = pipe.tokenizer.convert_tokens_to_ids("<zwx>")
    assert token_id == len(base.tokenizer)  # a new token, not an unknown word
    learned = pipe.text_encoder.get_input_embeddings().weight
    original = base.text_encoder.get_input_embeddings().weight
    cat = base.tokenizer.convert_tokens_to_ids("cat</w>")
    assert not torch.allclose(learned[token_id], original[cat]), "the embedding did not learn"
    assert torch.equal(learned[:token_id], original), "other embeddings must not change"
    image = pipe("a photo of <zwx> toy cat", num_inference_steps=2, height=64, width=64).images[0]
    assert image.size == (64, 64)


def test_phase_one_trains_only_the_embedding(straight, tiny_model_dir):
    boundary = load_file(straight / "checkpoints" / f"checkpoint-{TI_STEPS}" / "trainable.safetensors")
    assert list(boundary) == ["text_encoder.embeddings.token_embedding.weight"]
    final = load_file(straight / "model" / "unet" / "diffusion_pytorch_model.safetensors")
    base = load_file(tiny_model_dir / "unet" / "diffusion_pytorch_model.safetensors")
    assert not torch.equal(final["conv_in.weight"], base["conv_in.weight"]), "phase 2 trains the UNet"


@pytest.mark.parametrize("stop_at", [TI_STEPS - 1, TI_STEPS, TI_STEPS + 2])
def test_stopping_in_either_phase_resumes_to_the_same_model(straight, tiny_model_dir, toy_cat_dir, tmp_path, stop_at):
    config = ti_config(tiny_model_dir, toy_cat_dir, tmp_path / "out")
    metrics = TrainerMetrics()
    with pytest.raises(Preempted):
        run(config, tmp_path / "w", metrics=metrics, stop=StopAfter(metrics, stop_at))
    outcome = run(config, tmp_path / "w2", metrics=TrainerMetrics())
    assert outcome.step == TI_STEPS + DB_STEPS
    for part in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        a, b = load_file(straight / "model" / part), load_file(tmp_path / "out" / "model" / part)
        assert all(torch.equal(a[k], b[k]) for k in a), f"{part} differs after stopping at {stop_at}"
