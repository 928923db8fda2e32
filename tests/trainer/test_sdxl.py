"""The SDXL family: a tiny SDXL-shaped model in the real folder layout trains with LoRA
(on the UNet and both text encoders) and fully from S3 to S3, learns, and exports what
diffusers loads; what SDXL cannot take is refused naming the field (models it cannot
train: tests/trainer/test_bad_inputs.py)."""

from __future__ import annotations

import json

import pytest
import torch

from dreambooth.trainer.families import detect, load_components
from dreambooth.trainer.metrics import TrainerMetrics
from dreambooth.trainer.run import run
from tests.support.trainer import (
    assert_kohya_lora_draws_like_diffusers,
    denoising_loss,
    download,
    job_document,
    tensor_dtypes,
    trainer_config,
    trainer_env,
    upload,
)

PROMPT = "a photo of zwx toy cat"


@pytest.fixture(scope="module")
def tiny_sdxl_wide_dir(tmp_path_factory):
    """The second text encoder wider than the first, as in SDXL (1280 vs 768): how
    ``from_single_file`` tells the two apart."""
    from dreambooth.trainer.tiny import build_tiny_sdxl

    return build_tiny_sdxl(tmp_path_factory.mktemp("models") / "tiny-sdxl-wide", text_encoder_2_width=48)


def sdxl_job(model, photos, out, *, steps, training, formats, every=None, **spec):
    doc = job_document(
        model.as_uri(), photos.as_uri(), out.as_uri(), steps=steps, every=every or steps, training=training, **spec
    )
    doc["spec"]["baseModel"]["family"] = "sdxl"
    doc["spec"]["validation"] = {"enabled": False}
    doc["spec"]["output"]["formats"] = formats
    return trainer_config(doc)


def test_the_tiny_sdxl_model_is_an_sdxl_pipeline_folder(tiny_sdxl_dir):
    from diffusers import StableDiffusionXLPipeline

    assert detect(tiny_sdxl_dir, "tiny").name == "sdxl"
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    pipe.set_progress_bar_config(disable=True)
    image = pipe(PROMPT, num_inference_steps=2, height=64, width=64, generator=torch.Generator().manual_seed(0)).images[
        0
    ]
    assert image.size == (64, 64)
    unet = pipe.unet.config
    widths = [pipe.text_encoder.config.hidden_size, pipe.text_encoder_2.config.hidden_size]
    assert unet.cross_attention_dim == sum(widths)
    assert (
        unet.projection_class_embeddings_input_dim
        == 6 * unet.addition_time_embed_dim + pipe.text_encoder_2.config.projection_dim
    )


@pytest.fixture
def sdxl_s3(s3_bucket, tiny_sdxl_dir, toy_cat_dir, tmp_path, monkeypatch):
    """A bucket holding the tiny SDXL model, a copy of its VAE as a lone VAE folder, and the
    photos; the trainer runs here with a pod's S3 environment. Returns (settings, bucket)."""
    settings, bucket = s3_bucket
    upload(settings, f"s3://{bucket}/models/tiny-sdxl/", tiny_sdxl_dir)
    upload(settings, f"s3://{bucket}/models/sdxl-vae/", tiny_sdxl_dir / "vae")
    upload(settings, f"s3://{bucket}/data/toy-cat/", toy_cat_dir)
    for key, value in trainer_env(settings).items():
        if key.startswith("AWS_"):
            monkeypatch.setenv(key, value)
    return settings, bucket


def sdxl_s3_job(settings, bucket, *, steps, training, formats, vae=False):
    doc = job_document(
        f"s3://{bucket}/models/tiny-sdxl/",
        f"s3://{bucket}/data/toy-cat/",
        f"s3://{bucket}/out/",
        steps=steps,
        every=steps // 2,
        training=training,
    )
    doc["spec"]["baseModel"]["family"] = "sdxl"
    if vae:  # fetched from S3 like the base model (the same weights here: the criterion compares)
        doc["spec"]["baseModel"]["vae"] = f"s3://{bucket}/models/sdxl-vae/"
    doc["spec"]["validation"] = {"enabled": False}
    doc["spec"]["output"]["formats"] = formats
    return trainer_config(doc, endpoint=settings.endpoint)


def test_sdxl_lora_on_unet_and_both_text_encoders_learns_from_s3_to_s3_and_loads(
    sdxl_s3, tiny_sdxl_dir, toy_cat_dir, tmp_path
):
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import load_file

    settings, bucket = sdxl_s3
    config = sdxl_s3_job(
        settings,
        bucket,
        steps=60,
        formats=["lora", "lora-kohya"],
        training={"method": "lora", "learningRate": 1e-2, "lora": {"rank": 8, "alpha": 16, "textEncoder": True}},
    )
    outcome = run(config, tmp_path / "w", metrics=TrainerMetrics())
    assert outcome.step == 60 and set(outcome.outputs) == {"lora", "lora-kohya"}
    out = download(settings, f"s3://{bucket}/out/", tmp_path / "out")
    assert (out / "checkpoints" / "checkpoint-30" / "manifest.json").is_file()
    keys = load_file(out / "lora" / "pytorch_lora_weights.safetensors").keys()
    assert any(k.startswith("unet.") for k in keys)
    assert any(k.startswith("text_encoder.") for k in keys) and any(k.startswith("text_encoder_2.") for k in keys)
    # kohya's SDXL names: the original UNet's blocks, te1/te2; it draws what diffusers' format draws
    kohya = out / "lora" / "toy-cat_kohya.safetensors"
    names = {k.split(".")[0] for k in load_file(kohya)}
    assert "lora_unet_input_blocks_3_1_transformer_blocks_1_attn2_to_out_0" in names
    assert "lora_unet_output_blocks_0_1_proj_in" not in names  # only the attention projections adapt
    assert {n.split("_")[1] for n in names} == {"unet", "te1", "te2"}
    assert_kohya_lora_draws_like_diffusers(StableDiffusionXLPipeline, tiny_sdxl_dir, out, kohya, PROMPT)

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    pipe.set_progress_bar_config(disable=True)
    ids = pipe.tokenizer_2([PROMPT], return_tensors="pt").input_ids
    with torch.no_grad():
        before = pipe.text_encoder_2(ids)[0]
        pipe.load_lora_weights(out / "lora")
        after = pipe.text_encoder_2(ids)[0]
    assert not torch.allclose(before, after), "loading the LoRA must change the second text encoder"
    image = pipe(PROMPT, num_inference_steps=2, height=64, width=64).images[0]
    assert image.size == (64, 64)
    pipe.fuse_lora()  # the base model with the adapters merged in: has it learned the photos?
    pipe.unload_lora_weights()
    pipe.save_pretrained(tmp_path / "fused")
    # LoRA adapts only the attention projections, a small share of this tiny UNet's weights:
    # the error on the fixed draws falls less than a full fine-tune's (~0.92x here), but falls
    before = denoising_loss(tiny_sdxl_dir, toy_cat_dir, PROMPT)
    after = denoising_loss(tmp_path / "fused", toy_cat_dir, PROMPT)
    assert after < 0.96 * before, (before, after)


def test_sdxl_full_fine_tune_learns_from_s3_to_s3_and_exports_a_loadable_folder(
    sdxl_s3, tiny_sdxl_dir, toy_cat_dir, tmp_path
):
    from diffusers import StableDiffusionXLPipeline

    settings, bucket = sdxl_s3
    config = sdxl_s3_job(
        settings, bucket, steps=60, formats=["diffusers"], vae=True, training={"method": "full", "learningRate": 1e-3}
    )
    outcome = run(config, tmp_path / "w", metrics=TrainerMetrics())
    assert outcome.outputs["diffusers"] == f"s3://{bucket}/out/model/"
    out = download(settings, f"s3://{bucket}/out/", tmp_path / "out")
    # the same criterion as the SD run (tests/trainer/test_s3_run.py): at most 60% of the
    # base model's error on fixed noise draws
    before = denoising_loss(tiny_sdxl_dir, toy_cat_dir, PROMPT)
    after = denoising_loss(out / "model", toy_cat_dir, PROMPT)
    assert after < 0.6 * before, (before, after)
    pipe = StableDiffusionXLPipeline.from_pretrained(out / "model")
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"  # SDXL's validation sampler travels
    assert json.loads((out / "model" / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"
    image = pipe(PROMPT, num_inference_steps=2, height=64, width=64, generator=torch.Generator().manual_seed(0)).images[
        0
    ]
    assert image.size == (64, 64)


def test_sdxl_single_file_reads_back_to_the_trained_weights(tiny_sdxl_wide_dir, toy_cat_dir, tmp_path):
    """model.safetensors in Stability's SDXL layout: diffusers' own single-file reader gives
    back every trained tensor of the UNet, the VAE and both text encoders."""
    from diffusers import StableDiffusionXLPipeline
    from safetensors import safe_open

    out = tmp_path / "out"
    config = sdxl_job(
        tiny_sdxl_wide_dir,
        toy_cat_dir,
        out,
        steps=3,
        formats=["diffusers", "safetensors"],
        training={"method": "full", "learningRate": 1e-3, "trainTextEncoder": True},
    )
    outcome = run(config, tmp_path / "w", metrics=TrainerMetrics())
    assert outcome.outputs["safetensors"] == (out / "model.safetensors").as_uri()
    with safe_open(out / "model.safetensors", "pt") as file:
        keys = set(file.keys())
        projection = file.get_slice("conditioner.embedders.1.model.text_projection").get_shape()
    assert {k.split(".")[0] for k in keys} == {"model", "first_stage_model", "conditioner"}
    assert "model.diffusion_model.label_emb.0.0.weight" in keys  # the text_time embedding
    assert "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight" in keys
    assert "conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight" in keys
    assert projection == [48, 32]  # OpenCLIP's (width, projection): the transposed linear weight

    trained = StableDiffusionXLPipeline.from_pretrained(out / "model")
    base = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_wide_dir)
    loaded = StableDiffusionXLPipeline.from_single_file(
        str(out / "model.safetensors"), config=str(tiny_sdxl_wide_dir), local_files_only=True
    )
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        want, got = getattr(trained, part).state_dict(), getattr(loaded, part).state_dict()
        assert want.keys() == got.keys(), part
        unequal = [k for k in want if not torch.equal(want[k], got[k])]
        assert not unequal, f"{part}: {unequal[:5]}"
        if part != "vae":  # the VAE never trains
            before = getattr(base, part).state_dict()
            assert any(not torch.equal(want[k], before[k]) for k in want), f"{part} did not train"


#: the recipe's options, each one SDXL run of 3 steps (checkpoint at 2): a finite loss, and
#: for some what a user would notice of them
OPTIONS = {
    "EMA": {"method": "full", "ema": True},
    "8-bit AdamW": {"method": "full", "optimizer": "adamw8bit"},
    "gradient checkpointing, both encoders": {
        "method": "full",
        "trainTextEncoder": True,
        "gradientCheckpointing": True,
    },
    "LoRA on both encoders, gradient checkpointing": {
        "method": "lora",
        "lora": {"textEncoder": True},
        "gradientCheckpointing": True,
    },
    "SNR gamma and offset noise": {"method": "full", "snrGamma": 5.0, "noiseOffset": 0.1},
}


@pytest.mark.parametrize("option", OPTIONS)
def test_the_recipes_options_train_sdxl(option, tiny_sdxl_dir, toy_cat_dir, tmp_path):
    training = OPTIONS[option]
    out = tmp_path / "out"
    metrics = TrainerMetrics()
    formats = ("lora",) if training["method"] == "lora" else ("diffusers",)
    run(
        sdxl_job(tiny_sdxl_dir, toy_cat_dir, out, steps=3, every=2, training=training, formats=list(formats)),
        tmp_path / "w",
        metrics=metrics,
    )
    assert metrics.step._value.get() == 3 and torch.isfinite(torch.tensor(metrics.loss._value.get()))
    checkpoint = out / "checkpoints" / "checkpoint-2"
    if training.get("ema"):
        assert (checkpoint / "ema.pt").is_file()
    if training.get("optimizer") == "adamw8bit":
        state = torch.load(checkpoint / "optimizer.pt", weights_only=False)["state"]
        assert torch.uint8 in tensor_dtypes(state), "no 8-bit optimizer state"
    if training.get("trainTextEncoder") or training.get("lora", {}).get("textEncoder"):
        from safetensors.torch import load_file

        saved = load_file(checkpoint / "trainable.safetensors")
        assert any(k.startswith("text_encoder.") for k in saved) and any(k.startswith("text_encoder_2.") for k in saved)


def test_both_text_encoders_train_until_text_encoder_steps_then_freeze(tiny_sdxl_dir, toy_cat_dir, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "out"
    training = {"method": "full", "trainTextEncoder": True, "textEncoderSteps": 2, "textEncoderLearningRate": 5e-4}
    config = sdxl_job(
        tiny_sdxl_dir,
        toy_cat_dir,
        out,
        steps=5,
        training=training,
        formats=["diffusers"],
        checkpointing={"everySteps": 1, "keep": 10},
    )
    run(config, tmp_path / "w", metrics=TrainerMetrics())
    saved = {
        step: load_file(out / "checkpoints" / f"checkpoint-{step}" / "trainable.safetensors") for step in (1, 2, 4)
    }
    for encoder in ("text_encoder", "text_encoder_2"):
        te = {s: {k: v for k, v in t.items() if k.startswith(encoder + ".")} for s, t in saved.items()}
        assert te[1] and te[1].keys() == te[2].keys() == te[4].keys()
        assert any(not torch.equal(te[1][k], te[2][k]) for k in te[1]), f"{encoder} did not train"
        assert all(torch.equal(te[2][k], te[4][k]) for k in te[2]), f"{encoder} trained after textEncoderSteps"
    assert not torch.equal(saved[2]["unet.conv_in.weight"], saved[4]["unet.conv_in.weight"])
    # the first encoder's last layer is never read (SDXL takes its penultimate states): not trained
    assert not any(k.startswith("text_encoder.encoder.layers.1.") for k in saved[1])


def test_prompt_embeddings_are_cached_with_both_encoders_and_the_pooled_vector(tiny_sdxl_dir):
    """Once no text encoder trains, a prompt is encoded once: the cached conditioning (both
    encoders' states side by side and the pooled embedding) is what encoding anew gives."""
    from dreambooth.trainer.loop import PromptEncoder

    c = load_components(tiny_sdxl_dir, "tiny")
    encoders = [te.eval() for te in c.text_encoders]
    prompts = PromptEncoder(c.family, c.tokenizers, encoders, "cpu")
    batch = [PROMPT, "a photo of a cat", PROMPT]
    cached = prompts(batch, training=False)
    assert sorted(prompts.cache) == sorted(set(batch))
    with torch.no_grad():
        fresh = c.family.encode(c.tokenizers, encoders, batch, "cpu")
    widths = sum(te.config.hidden_size for te in encoders)
    assert cached.embeds.shape == (3, c.tokenizers[0].model_max_length, widths)
    assert cached.pooled.shape == (3, encoders[1].config.projection_dim)
    assert torch.equal(cached.embeds, fresh.embeds) and torch.equal(cached.pooled, fresh.pooled)


def test_what_sdxl_cannot_take_is_refused_before_training(tiny_sdxl_dir, toy_cat_dir, tmp_path):
    """A job naming its family is refused by validation; an auto job once the trainer has
    opened the model, before anything trains."""
    from dreambooth.api import SpecError, validate_job
    from dreambooth.trainer.errors import ConfigError

    doc = job_document(
        tiny_sdxl_dir.as_uri(),
        toy_cat_dir.as_uri(),
        (tmp_path / "o").as_uri(),
        steps=2,
        every=2,
        training={"method": "full", "textualInversion": {"placeholderToken": "<zwx>", "initializerToken": "cat"}},
    )
    doc["spec"]["instance"]["prompt"] = "a photo of <zwx> toy cat"
    doc["spec"]["baseModel"]["family"] = "sdxl"
    with pytest.raises(SpecError) as err:
        validate_job(doc)
    text = str(err.value)
    assert "spec.training.textualInversion: textual inversion is not supported for Stable Diffusion XL" in text
    assert "spec.output.formats" not in text  # its default formats, the single file included, are written
    doc["spec"]["baseModel"]["family"] = "auto"
    with pytest.raises(ConfigError) as err:
        run(trainer_config(doc), tmp_path / "w", metrics=TrainerMetrics())
    assert "spec.training.textualInversion" in str(err.value) and not (tmp_path / "o" / "checkpoints").exists()


def test_an_auto_job_gets_the_presets_of_the_family_the_trainer_finds(tiny_sdxl_dir, toy_cat_dir, tmp_path):
    """The operator cannot look into the model, so it renders an auto job with SD 1.x's
    presets and the spec as written; the trainer re-applies the presets of the family it
    finds (SDXL: LoRA), and says which family it found."""
    from prometheus_client import generate_latest

    from dreambooth.api.spec import Method

    doc = job_document(tiny_sdxl_dir.as_uri(), toy_cat_dir.as_uri(), (tmp_path / "o").as_uri(), steps=2, every=2)
    doc["spec"]["validation"] = {"enabled": False}
    config = trainer_config(doc)
    assert config.spec.training.method is Method.FULL and config.requested is not None  # as assumed
    metrics = TrainerMetrics()
    outcome = run(config, tmp_path / "w", metrics=metrics)
    assert set(outcome.outputs) == {"lora"}, outcome.outputs  # SDXL's presets train LoRA
    assert 'dreambooth_trainer_model_info{family="sdxl"} 1.0' in generate_latest(metrics.registry).decode()
