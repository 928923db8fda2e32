"""The seed's recipe: text encoder, LoRA, 8-bit Adam, EMA, sample grids, v-prediction,
and several processes giving the same result as one."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from dreambooth.trainer.errors import Preempted
from dreambooth.trainer.metrics import TrainerMetrics
from dreambooth.trainer.run import run
from kubesim.net import free_port
from tests.support.grids import assert_grid
from tests.support.trainer import (
    StopAfter,
    assert_kohya_lora_draws_like_diffusers,
    job_document,
    tensor_dtypes,
    trainer_config,
    write_config,
)


def local_job(model, photos, out, *, steps=4, every=2, training=None, **spec):
    doc = job_document(
        model.as_uri(), photos.as_uri(), out.as_uri(), steps=steps, every=every, training=training, **spec
    )
    if "validation" not in spec:
        doc["spec"]["validation"] = {"enabled": False}
    return doc


def train(doc, workdir):
    config = trainer_config(doc)
    return run(config, workdir, metrics=TrainerMetrics()), config


def checkpoint_tensors(out, step):
    return load_file(out / "checkpoints" / f"checkpoint-{step}" / "trainable.safetensors")


def test_text_encoder_trains_until_text_encoder_steps_then_freezes(tiny_model_dir, toy_cat_dir, tmp_path):
    out = tmp_path / "out"  # 7 steps: the last one is exported, not checkpointed
    doc = local_job(
        tiny_model_dir,
        toy_cat_dir,
        out,
        steps=7,
        every=1,
        training={"trainTextEncoder": True, "textEncoderSteps": 3, "textEncoderLearningRate": 5e-4},
    )
    doc["spec"]["checkpointing"]["keep"] = 10
    train(doc, tmp_path / "w")
    te = {s: {k: v for k, v in checkpoint_tensors(out, s).items() if k.startswith("text_encoder.")} for s in (1, 3, 6)}
    assert te[1] and te[1].keys() == te[3].keys()
    assert any(not torch.equal(te[1][k], te[3][k]) for k in te[1]), "the text encoder did not train"
    assert all(torch.equal(te[3][k], te[6][k]) for k in te[3]), "the text encoder trained after textEncoderSteps"
    unet = {s: checkpoint_tensors(out, s)["unet.conv_in.weight"] for s in (3, 6)}
    assert not torch.equal(unet[3], unet[6]), "the UNet must keep training"


def test_lora_exports_adapters_that_diffusers_loads(tiny_model_dir, toy_cat_dir, tmp_path):
    """Both LoRA formats: diffusers' and kohya's (A1111, ComfyUI), which draws the same."""
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "out"
    doc = local_job(
        tiny_model_dir,
        toy_cat_dir,
        out,
        steps=6,
        every=3,
        training={"method": "lora", "learningRate": 1e-2, "lora": {"rank": 4, "alpha": 8, "textEncoder": True}},
    )
    doc["spec"]["output"]["formats"] = ["lora", "lora-kohya"]
    outcome, _ = train(doc, tmp_path / "w")
    kohya = out / "lora" / "toy-cat_kohya.safetensors"
    assert outcome.outputs == {"lora": (out / "lora").as_uri() + "/", "lora-kohya": kohya.as_uri()}
    keys = load_file(kohya)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in keys
    assert {float(v) for k, v in keys.items() if k.endswith(".alpha")} == {8.0}
    assert_kohya_lora_draws_like_diffusers(
        StableDiffusionPipeline, tiny_model_dir, out, kohya, "a photo of zwx toy cat"
    )
    saved = checkpoint_tensors(out, 3)
    assert saved and all("lora" in k for k in saved), "a LoRA checkpoint holds only the adapters"
    assert any(k.startswith("text_encoder.") for k in saved)
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert not (out / "model").exists()

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    pipe.set_progress_bar_config(disable=True)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(1))
    ids = pipe.tokenizer(["a photo of zwx toy cat"], return_tensors="pt").input_ids
    with torch.no_grad():
        before = pipe.unet(latents, 10, cond).sample, pipe.text_encoder(ids)[0]
        pipe.load_lora_weights(out / "lora")
        after = pipe.unet(latents, 10, cond).sample, pipe.text_encoder(ids)[0]
    assert not torch.allclose(before[0], after[0]), "loading the LoRA must change the UNet"
    assert not torch.allclose(before[1], after[1]), "loading the LoRA must change the text encoder"
    image = pipe("a photo of zwx toy cat", num_inference_steps=2, height=64, width=64).images[0]
    assert image.size == (64, 64)


def test_8bit_adam_gradient_checkpointing_snr_and_offset_noise_train(tiny_model_dir, toy_cat_dir, tmp_path):
    doc = local_job(
        tiny_model_dir,
        toy_cat_dir,
        tmp_path / "out",
        steps=3,
        every=2,
        training={
            "optimizer": "adamw8bit",
            "gradientCheckpointing": True,
            "snrGamma": 5.0,
            "noiseOffset": 0.1,
            "lrScheduler": "cosine",
            "lrWarmupSteps": 1,
        },
    )
    metrics = TrainerMetrics()
    run(trainer_config(doc), tmp_path / "w", metrics=metrics)
    assert metrics.step._value.get() == 3
    assert torch.isfinite(torch.tensor(metrics.loss._value.get()))
    state = torch.load(tmp_path / "out" / "checkpoints" / "checkpoint-2" / "optimizer.pt", weights_only=False)
    # bitsandbytes keeps tensors of >= 4096 elements in 8 bits (small ones stay 32-bit)
    dtypes = tensor_dtypes(state["state"])
    assert torch.uint8 in dtypes, f"no 8-bit optimizer state: {dtypes}"


def test_ema_weights_are_exported(tiny_model_dir, toy_cat_dir, tmp_path):
    unet = "model/unet/diffusion_pytorch_model.safetensors"
    exported = {}
    for ema in (True, False):  # the EMA does not change how the weights train
        out = tmp_path / f"out-{ema}"
        train(local_job(tiny_model_dir, toy_cat_dir, out, steps=4, every=2, training={"ema": ema}), tmp_path / "w")
        exported[ema] = load_file(out / unet)["conv_in.weight"]
    assert (tmp_path / "out-True" / "checkpoints" / "checkpoint-2" / "ema.pt").is_file()
    assert not torch.equal(exported[True], exported[False]), "the export must carry the EMA weights, not the raw ones"


def test_sample_grids_and_progression(tiny_model_dir, toy_cat_dir, tmp_path):
    out = tmp_path / "out"
    prompts = ["a photo of zwx toy cat", "a photo of zwx toy cat in a box", "zwx toy cat, watercolor"]
    doc = local_job(
        tiny_model_dir,
        toy_cat_dir,
        out,
        steps=4,
        every=2,
        validation={"prompts": prompts, "imagesPerPrompt": 2, "inferenceSteps": 3, "everySteps": 2},
    )
    train(doc, tmp_path / "w")
    for step in (2, 4):
        with Image.open(out / "samples" / f"step-{step}.png") as grid:
            # rows prompts, columns images; wider than 2 images: "a photo of zwx toy cat in a box"
            assert_grid(grid, rows=3, columns=2, size=64)
            assert grid.size[0] > 2 * 64
    with Image.open(out / "samples" / "progression.png") as prog:
        # rows steps, columns prompts: the title names all three prompts, so it is wider still
        assert_grid(prog, rows=2, columns=3, size=64)
        assert prog.size[0] > 3 * 64


def test_v_prediction_model_trains(toy_cat_dir, tmp_path):
    from dreambooth.trainer.tiny import build_tiny_model

    model = build_tiny_model(tmp_path / "v-model", prediction_type="v_prediction")
    outcome, _ = train(local_job(model, toy_cat_dir, tmp_path / "out", steps=2, every=2), tmp_path / "w")
    assert outcome.step == 2


RESUMABLE = {
    "8-bit AdamW": ({"optimizer": "adamw8bit"}, "model/unet/diffusion_pytorch_model.safetensors"),
    "EMA": ({"ema": True}, "model/unet/diffusion_pytorch_model.safetensors"),
    "text encoder": ({"trainTextEncoder": True, "textEncoderSteps": 3}, "model/text_encoder/model.safetensors"),
    "LoRA": (
        {"method": "lora", "learningRate": 1e-2, "lora": {"textEncoder": True}},
        "lora/pytorch_lora_weights.safetensors",
    ),
}


@pytest.mark.parametrize("option", RESUMABLE)
def test_stopped_runs_resume_to_the_same_weights(tiny_model_dir, toy_cat_dir, tmp_path, option):
    training, artifact = RESUMABLE[option]
    results = []
    for stop_at in (None, 3):
        out = tmp_path / f"out-{stop_at}"
        config = trainer_config(local_job(tiny_model_dir, toy_cat_dir, out, steps=6, every=1, training=training))
        if stop_at:
            metrics = TrainerMetrics()
            with pytest.raises(Preempted):
                run(config, tmp_path / "w1", metrics=metrics, stop=StopAfter(metrics, stop_at))
        run(config, tmp_path / "w2", metrics=TrainerMetrics())
        results.append(load_file(out / artifact))
    straight, resumed = results
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight), f"{option}: resumed run differs"


#: per family: the model fixture and the exported parts compared (file in each folder)
TWO_PROCESS_FAMILIES = {
    "sd": ("tiny_model_dir", {"unet": "diffusion_pytorch_model.safetensors", "text_encoder": "model.safetensors"}),
    "sdxl": (
        "tiny_sdxl_dir",
        {
            "unet": "diffusion_pytorch_model.safetensors",
            "text_encoder": "model.safetensors",
            "text_encoder_2": "model.safetensors",
        },
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("family", TWO_PROCESS_FAMILIES)
def test_two_processes_train_like_one(family, request, toy_cat_dir, tmp_path):
    """accelerate launch with 2 processes (gloo on the CPU) gives the weights one process
    gives: data sharded, UNet and text-encoder gradients (SDXL: both encoders') synchronised,
    also with gradient accumulation; only rank 0 writes."""
    fixture, exported = TWO_PROCESS_FAMILIES[family]
    model = request.getfixturevalue(fixture)
    training = {"batchSize": 4, "gradientAccumulationSteps": 2, "trainTextEncoder": True, "method": "full"}
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "DREAMBOOTH_DEBUG_WEIGHT_CHECKSUMS": "1",
    }
    results = {}
    for processes in (1, 2):
        out = tmp_path / f"out-{processes}"
        doc = local_job(model, toy_cat_dir, out, steps=4, every=2, training=training)
        doc["spec"]["baseModel"]["family"] = family
        doc["spec"]["output"]["formats"] = ["diffusers"]
        doc["spec"]["resources"] = {"nodes": processes, "gpusPerNode": 0}
        config_path = write_config(trainer_config(doc), tmp_path / f"c{processes}")
        launch = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--num_processes",
            str(processes),
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
        ]
        if processes > 1:
            launch += ["--multi_gpu", "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port())]
        proc = subprocess.run(
            launch
            + ["-m", "dreambooth.trainer", "--config", str(config_path), "--workdir", str(tmp_path / f"w{processes}")],
            check=False,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        if processes > 1:
            # both ranks hold identical weights after every step
            sums = {}
            for rank, step, checksum in re.findall(r"rank(\d) INFO \S+ weights step=(\d+) checksum=(\S+)", proc.stderr):
                sums.setdefault(int(step), {})[rank] = checksum
            assert sorted(sums) == [1, 2, 3, 4]
            assert all(len(set(by_rank.values())) == 1 and len(by_rank) == 2 for by_rank in sums.values()), sums
            # only rank 0 writes checkpoints (once per checkpoint; the last step is exported)
            uploads = re.findall(r"rank(\d) INFO \S+ checkpoint (\S+)", proc.stderr)
            assert uploads == [("0", (out / "checkpoints" / "checkpoint-2").as_uri() + "/")], uploads
        results[processes] = {
            f"{part}.{k}": v
            for part, file in exported.items()
            for k, v in load_file(out / "model" / part / file).items()
        }
    one, two = results[1], results[2]
    assert one.keys() == two.keys() and all(any(k.startswith(f"{part}.") for k in one) for part in exported)
    base = {
        f"{part}.{k}": v for part in exported for k, v in load_file(next((model / part).glob("*.safetensors"))).items()
    }
    # Adam normalises updates, so float-rounding differences of the gradient all-reduce show
    # up as tiny differences in a few weights; a wrong data shard or unsynchronised gradients
    # would make the two runs differ by about as much as they moved.
    drift = sum((one[k] - two[k]).abs().sum().item() for k in one)
    moved = sum((one[k] - base[k]).abs().sum().item() for k in one)
    assert moved > 0 and drift / moved < 0.01, f"2 processes drifted from 1 process by {drift / moved:.2%}"
    for part in exported:  # every part trained, each encoder's gradients synchronised too
        part_drift = sum((one[k] - two[k]).abs().sum().item() for k in one if k.startswith(f"{part}."))
        part_moved = sum((one[k] - base[k]).abs().sum().item() for k in one if k.startswith(f"{part}."))
        assert part_moved > 0 and part_drift / part_moved < 0.01, (part, part_drift, part_moved)
