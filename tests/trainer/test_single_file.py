"""Single-file export: the original SD layout, read back by diffusers' own single-file loader."""

from __future__ import annotations

import json
import os
import re
import shutil

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from safetensors import safe_open

from dreambooth.trainer.single_file import (
    SingleFileExportError,
    save_single_file,
    to_original_state_dict,
)
from dreambooth.trainer.single_file_sdxl import PARTS as SDXL_PARTS
from dreambooth.trainer.single_file_sdxl import to_sdxl_state_dict

PARTS = ("unet", "vae", "text_encoder")


pytestmark = pytest.mark.usefixtures("one_thread")  # model, pipeline: tests/trainer/conftest.py


@pytest.fixture(scope="module")
def exported(pipeline, tmp_path_factory):
    return save_single_file(pipeline, tmp_path_factory.mktemp("export") / "model.safetensors")


def load_single_file(path, config):
    """diffusers' own reader; ``config`` (a local diffusers folder) supplies every component
    config, so nothing is fetched from the Hub."""
    return StableDiffusionPipeline.from_single_file(str(path), config=str(config), local_files_only=True)


def assert_same_weights(expected, actual, parts=PARTS):
    for part in parts:
        want, got = getattr(expected, part).state_dict(), getattr(actual, part).state_dict()
        assert want.keys() == got.keys(), part
        unequal = [key for key in want if not torch.equal(want[key], got[key])]
        assert not unequal, f"{part}: {unequal[:5]}"


def test_file_has_the_original_layout(exported):
    with safe_open(exported, "pt") as file:
        metadata, keys = file.metadata(), set(file.keys())
        attention = file.get_slice("first_stage_model.decoder.mid.attn_1.q.weight").get_shape()
    assert metadata["format"] == "pt"
    assert json.loads(metadata["dreambooth"])["prediction_type"] == "epsilon"
    assert {key.split(".")[0] for key in keys} == {"model", "first_stage_model", "cond_stage_model"}
    assert "model.diffusion_model.input_blocks.2.0.op.weight" in keys  # the tiny UNet's downsampler
    assert "cond_stage_model.transformer.text_model.final_layer_norm.weight" in keys
    assert attention == [16, 16, 1, 1]  # a 1x1 convolution, as in LDM


def test_from_single_file_round_trips_every_tensor_and_generates(model, pipeline, exported):
    loaded = load_single_file(exported, model)
    assert_same_weights(pipeline, loaded)
    image = loaded(
        "a photo of sks dog",
        num_inference_steps=2,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert image.size == (64, 64)


def test_sd15_block_layout():
    """SD 1.5's topology (4 levels, 2 layers each), tiny widths: the LDM numbering matches the
    real checkpoint's keys, and diffusers' converter maps them straight back."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(8, 16, 16, 32),
        layers_per_block=2,
        norm_num_groups=8,
        cross_attention_dim=8,
        attention_head_dim=2,
    )
    original = to_original_state_dict(unet.state_dict(), {}, {})
    for key in (
        "input_blocks.3.0.op.weight",
        "input_blocks.9.0.op.weight",
        "input_blocks.11.0.out_layers.3.weight",
        "middle_block.1.proj_in.weight",
        "output_blocks.2.1.conv.weight",
        "output_blocks.5.2.conv.weight",
        "output_blocks.11.0.skip_connection.weight",
        "output_blocks.11.1.transformer_blocks.0.attn2.to_k.weight",
    ):
        assert f"model.diffusion_model.{key}" in original, key
    back = convert_ldm_unet_checkpoint(original, dict(unet.config))
    want = unet.state_dict()
    assert back.keys() == want.keys()
    assert all(torch.equal(back[key], want[key]) for key in want)


def test_sd2_openclip_text_encoder(model, tmp_path):
    sd2 = shutil.copytree(model, tmp_path / "sd2")
    for name, key, value in (
        ("text_encoder/config.json", "hidden_act", "gelu"),  # what marks OpenCLIP
        ("scheduler/scheduler_config.json", "prediction_type", "v_prediction"),
    ):
        config = json.loads((sd2 / name).read_text())
        (sd2 / name).write_text(json.dumps({**config, key: value}))
    pipeline = StableDiffusionPipeline.from_pretrained(sd2)
    path = save_single_file(pipeline, tmp_path / "sd2.safetensors", dtype=torch.float16)
    tensors = safetensors_torch.load_file(path)
    assert tensors["cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight"].shape == (
        96,
        32,
    )
    assert {t.dtype for t in tensors.values()} == {torch.float16}
    with safe_open(path, "pt") as file:
        info = json.loads(file.metadata()["dreambooth"])
    assert info == {
        "layout": "ldm",
        "text_encoder": "openclip",
        "prediction_type": "v_prediction",
        "dtype": "float16",
    }
    loaded = load_single_file(path, sd2)
    assert_same_weights(pipeline.to(torch.float16), loaded, parts=("text_encoder",))


@pytest.mark.parametrize(
    ("part", "key", "message"),
    [
        ("unet", "add_embedding.linear_1.weight", "UNet key 'add_embedding.linear_1.weight'"),
        ("vae", "encoder.mid_block.resnets.2.conv1.weight", "VAE key 'encoder.mid_block"),
        ("text_encoder", "text_projection.weight", "text encoder key 'text_projection.weight'"),
        (
            "unet",
            "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.default.weight",
            "merge LoRA/PEFT adapters",
        ),
    ],
)
def test_unexpected_key_is_named(pipeline, part, key, message):
    parts = {name: dict(getattr(pipeline, name).state_dict()) for name in PARTS}
    parts[part][key] = torch.zeros(1)
    with pytest.raises(SingleFileExportError, match=re.escape(message)):
        to_original_state_dict(parts["unet"], parts["vae"], parts["text_encoder"])


def test_missing_component_is_an_error(pipeline, tmp_path):
    with pytest.raises(SingleFileExportError, match="no text_encoder"):
        save_single_file({"unet": pipeline.unet, "vae": pipeline.vae}, tmp_path / "x.safetensors")
    assert not list(tmp_path.iterdir())


@pytest.fixture(scope="module")
def sdxl_parts(tmp_path_factory):
    from diffusers import StableDiffusionXLPipeline

    from dreambooth.trainer.tiny import build_tiny_sdxl

    pipe = StableDiffusionXLPipeline.from_pretrained(build_tiny_sdxl(tmp_path_factory.mktemp("xl") / "m"))
    return {name: dict(getattr(pipe, name).state_dict()) for name in SDXL_PARTS}


@pytest.mark.parametrize(
    ("part", "key", "message"),
    [
        ("unet", "add_embedding.linear_3.weight", "UNet key 'add_embedding.linear_3.weight'"),
        ("text_encoder", "text_projection.weight", "text encoder key 'text_projection.weight'"),
        ("text_encoder_2", "encoder.layers.0.self_attn.q_proj.lora_A.weight", "text encoder 2 key"),
    ],
)
def test_sdxl_unexpected_key_is_named(sdxl_parts, part, key, message):
    parts = {name: dict(sd) for name, sd in sdxl_parts.items()}
    parts[part][key] = torch.zeros(1)
    with pytest.raises(SingleFileExportError, match=re.escape(message)):
        to_sdxl_state_dict(*(parts[name] for name in SDXL_PARTS))


def test_a_kohya_lora_of_a_model_without_adapters_is_an_error(pipeline, tmp_path):
    from dreambooth.trainer.families import FAMILIES
    from dreambooth.trainer.kohya import KohyaExportError

    with pytest.raises(KohyaExportError, match="no LoRA adapters"):
        FAMILIES["sd"].save_lora_kohya(pipeline, tmp_path / "x.safetensors")
    assert not list(tmp_path.iterdir())
