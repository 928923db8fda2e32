"""The tiny random SD-1.5-shaped model: layout, loading, generation, determinism."""

from __future__ import annotations

import json
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from dreambooth.trainer.tiny import build_tiny_model, main
from dreambooth.trainer.tiny_parts import WORDS

WEIGHTS = (
    "unet/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/model.safetensors",
)
LAYOUT = (
    "model_index.json",
    "unet/config.json",
    "vae/config.json",
    "text_encoder/config.json",
    "tokenizer/vocab.json",
    "tokenizer/merges.txt",
    "tokenizer/tokenizer_config.json",
    "tokenizer/special_tokens_map.json",
    "scheduler/scheduler_config.json",
    *WEIGHTS,
)


pytestmark = pytest.mark.usefixtures("one_thread")  # model, pipeline: tests/trainer/conftest.py


def test_layout_is_a_sd15_snapshot(model):
    assert sorted(str(p.relative_to(model)) for p in model.rglob("*") if p.is_file()) == sorted(LAYOUT)
    index = json.loads((model / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["requires_safety_checker"] is False
    assert index["safety_checker"] == [None, None]
    scheduler = json.loads((model / "scheduler/scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "PNDMScheduler"
    assert scheduler["prediction_type"] == "epsilon"
    assert all(oct(p.stat().st_mode)[-3:] == "644" for p in model.rglob("*") if p.is_file())


def test_pipeline_loads_and_generates(pipeline):
    assert pipeline.safety_checker is None and pipeline.feature_extractor is None
    assert pipeline.vae_scale_factor == 8
    assert pipeline.vae.config.scaling_factor == pytest.approx(0.18215)
    assert pipeline.vae.config.latent_channels == pipeline.unet.config.in_channels == 4
    assert pipeline.unet.config.sample_size == 8
    assert pipeline.unet.config.cross_attention_dim == pipeline.text_encoder.config.hidden_size
    pipeline.set_progress_bar_config(disable=True)
    image = pipeline(
        "a photo of zwx toy cat",
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert image.size == (64, 64) and image.mode == "RGB"
    assert type(image).__module__.startswith("PIL.")


def test_parts_load_like_a_training_loop_loads_them(model):
    scheduler = diffusers.DDPMScheduler.from_pretrained(model, subfolder="scheduler")
    assert scheduler.config.beta_schedule == "scaled_linear"
    assert scheduler.config.num_train_timesteps == 1000
    vae = diffusers.AutoencoderKL.from_pretrained(model, subfolder="vae")
    latents = vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.sample()
    assert latents.shape == (1, 4, 8, 8)


def test_tokenizer_knows_prompts_and_any_text(pipeline):
    tokenizer = pipeline.tokenizer
    assert tokenizer.model_max_length == pipeline.text_encoder.config.max_position_embeddings == 77
    ids = tokenizer("a photo of zwx toy cat").input_ids
    assert tokenizer.convert_ids_to_tokens(ids) == [
        "<|startoftext|>",
        "a</w>",
        "photo</w>",
        "of</w>",
        "zwx</w>",
        "toy</w>",
        "cat</w>",
        "<|endoftext|>",
    ]
    for word in WORDS:
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1, word
    text = "Ünïcode, émoji 🙂 and 日本語!"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert tokenizer.unk_token_id not in ids  # every byte has a token
    assert tokenizer.decode(ids) == "ünïcode , émoji 🙂 and 日本語 !"
    batch = tokenizer(["a dog"], padding="max_length", max_length=77, return_tensors="pt")
    assert batch.input_ids.shape == (1, 77)


def test_same_seed_gives_identical_files(model, tmp_path):
    again = build_tiny_model(tmp_path / "again")
    for name in LAYOUT:
        assert (again / name).read_bytes() == (model / name).read_bytes(), name
    other = build_tiny_model(tmp_path / "other", seed=1)
    for name in WEIGHTS:
        assert (other / name).read_bytes() != (model / name).read_bytes(), name


def test_v_prediction_and_resolution(tmp_path):
    path = build_tiny_model(tmp_path / "v", prediction_type="v_prediction", resolution=32)
    scheduler = diffusers.DDPMScheduler.from_pretrained(path, subfolder="scheduler")
    assert scheduler.config.prediction_type == "v_prediction"
    unet = json.loads((path / "unet/config.json").read_text())
    vae = json.loads((path / "vae/config.json").read_text())
    assert unet["sample_size"] == 4 and vae["sample_size"] == 32


def test_leaves_caller_rng_and_refuses_bad_input(model, tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_model(tmp_path / "m")
    assert torch.equal(torch.rand(3), expected)
    with pytest.raises(FileExistsError):
        build_tiny_model(model)
    with pytest.raises(ValueError, match="prediction_type"):
        build_tiny_model(tmp_path / "x", prediction_type="sample")
    with pytest.raises(ValueError, match="resolution"):
        build_tiny_model(tmp_path / "x", resolution=72)
    assert not (tmp_path / "x").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temporary folder left


def test_cli(tmp_path, capsys):
    main([str(tmp_path / "cli"), "--seed", "3"])
    assert capsys.readouterr().out.strip() == str(tmp_path / "cli")
    assert (tmp_path / "cli" / "model_index.json").is_file()
    with pytest.raises(SystemExit):
        main([str(tmp_path / "cli")])
