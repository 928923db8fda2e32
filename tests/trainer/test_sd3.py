"""The SD3 family: a tiny SD3-shaped model in the real folder layout (three text encoders,
T5 tokenizer made locally, flow-matching scheduler) samples in diffusers, trains with LoRA
(T5 kept and dropped) and fully, learns, and exports what StableDiffusion3Pipeline loads."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from dreambooth.api.exitcodes import ExitCode
from dreambooth.api.spec import FlowMatchingSpec, TrainingSpec
from dreambooth.trainer.errors import ModelError
from dreambooth.trainer.families import FAMILIES, detect, load_components
from dreambooth.trainer.families.noising import flow_matching
from dreambooth.trainer.metrics import TrainerMetrics
from dreambooth.trainer.run import run
from tests.support.trainer import denoising_loss, job_document, trainer_config

PROMPT = "a photo of zwx toy cat"


def sd3_job(model, photos, out, *, steps, training, formats, every=None, **spec):
    """A job on SD3 (paths or URIs), validation off unless given."""
    model, photos, out = (x if isinstance(x, str) else x.as_uri() for x in (model, photos, out))
    doc = job_document(model, photos, out, steps=steps, every=every or steps, training=training, **spec)
    doc["spec"]["baseModel"]["family"] = "sd3"
    if "validation" not in spec:
        doc["spec"]["validation"] = {"enabled": False}
    doc["spec"]["output"]["formats"] = formats
    return doc


def test_the_tiny_sd3_model_is_an_sd3_pipeline_folder(tiny_sd3_dir, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    from dreambooth.trainer.tiny_sd3 import build_tiny_sd3

    assert detect(tiny_sd3_dir, "tiny").name == "sd3"
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_dir)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.tokenizer_3).__name__.startswith("T5Tokenizer")
    ids = pipe.tokenizer_3(PROMPT).input_ids
    assert ids[-1] == pipe.tokenizer_3.eos_token_id and pipe.tokenizer_3.unk_token_id not in ids
    image = pipe(
        PROMPT,
        num_inference_steps=2,
        height=64,
        width=64,
        max_sequence_length=77,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert image.size == (64, 64)
    config = pipe.transformer.config
    assert config.joint_attention_dim == pipe.text_encoder_3.config.d_model
    assert (
        config.pooled_projection_dim
        == pipe.text_encoder.config.projection_dim + pipe.text_encoder_2.config.projection_dim
    )
    clip = pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    assert clip < config.joint_attention_dim  # the CLIP states are really padded
    assert pipe.vae.config.shift_factor and pipe.vae.config.latent_channels == 16
    # our prompt encoding is the pipeline's
    components = load_components(tiny_sd3_dir, "tiny")
    FAMILIES["sd3"].configure(components, TrainingSpec(), "tiny")
    with torch.no_grad():
        ours = FAMILIES["sd3"].encode(components.tokenizers, components.text_encoders, [PROMPT], "cpu")
        embeds, _, pooled, _ = pipe.encode_prompt(
            PROMPT, None, None, do_classifier_free_guidance=False, max_sequence_length=77
        )
    assert ours.embeds.shape == (1, 77 + 77, config.joint_attention_dim)
    assert torch.allclose(ours.embeds, embeds, atol=1e-6) and torch.allclose(ours.pooled, pooled, atol=1e-6)
    again = build_tiny_sd3(tmp_path / "again")
    for part in (
        "transformer/diffusion_pytorch_model.safetensors",
        "text_encoder_3/model.safetensors",
        "tokenizer_3/tokenizer.json",
    ):
        assert (again / part).read_bytes() == (tiny_sd3_dir / part).read_bytes(), part


@pytest.mark.parametrize("weighting", ["logit_normal", "mode", "cosmap", "uniform"])
def test_flow_matching_draws_sigmas_and_targets_by_the_formulas(weighting, tiny_sd3_dir):
    """Against the SD3 paper's formulas (as diffusers' training utilities write them),
    recomputed here from the same generator draws."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(tiny_sd3_dir, subfolder="scheduler")
    flow = FlowMatchingSpec(weighting=weighting, logit_mean=0.3, logit_std=1.2, mode_scale=1.29, precondition=False)
    training = TrainingSpec(flow_matching=flow)
    n, x = 256, torch.randn(256, 16, 8, 8)
    noise = torch.randn_like(x)
    drawn = flow_matching(scheduler, x, noise, [torch.Generator().manual_seed(i) for i in range(n)], training)

    replay = [torch.Generator().manual_seed(i) for i in range(n)]
    if weighting == "logit_normal":
        u = torch.sigmoid(torch.cat([torch.normal(0.3, 1.2, (1,), generator=g) for g in replay]))
    else:
        u = torch.cat([torch.rand((1,), generator=g) for g in replay])
        if weighting == "mode":
            u = 1 - u - 1.29 * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    # the scheduler's training schedule: t = N..1, sigma = t / N shifted by 3
    plain = torch.arange(1000, 0, -1, dtype=torch.float64) / 1000
    schedule = 3 * plain / (1 + 2 * plain)
    sigma = schedule[(u.double() * 1000).long().clamp(max=999)].float()
    assert torch.allclose(drawn.timesteps, sigma * 1000, atol=1e-3)
    s = sigma.view(-1, 1, 1, 1)
    assert torch.allclose(drawn.noisy, (1 - s) * x + s * noise, atol=1e-5)
    assert torch.equal(drawn.target, noise - x)
    expected = 2 / (math.pi * (1 - 2 * sigma + 2 * sigma**2)) if weighting == "cosmap" else torch.ones(n)
    assert torch.allclose(drawn.weights, expected, atol=1e-5)
    if weighting == "logit_normal":  # the density: most draws in the middle, some near both ends
        assert 0.3 < sigma.median() < 0.95 and sigma.min() < 0.3 and sigma.max() > 0.95

    # preconditioning: the reference's loss on (noisy - sigma * pred) against x is ours
    # weighted by sigma^2
    pre = flow_matching(
        scheduler,
        x,
        noise,
        [torch.Generator().manual_seed(i) for i in range(n)],
        TrainingSpec(flow_matching=flow.model_copy(update={"precondition": True})),
    )
    pred = torch.randn_like(x)
    reference = ((pred * -s + pre.noisy - x) ** 2).mean(dim=(1, 2, 3)) * expected
    ours = ((pred - pre.target) ** 2).mean(dim=(1, 2, 3)) * pre.weights
    assert torch.allclose(reference, ours, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("t5", ["keep", "drop"])
def test_sd3_lora_learns_and_loads_in_diffusers(t5, s3_bucket, tiny_sd3_dir, toy_cat_dir, tmp_path):
    """S3 to S3 as a pod runs it (the trainer's entry point in its own process)."""
    from diffusers import StableDiffusion3Pipeline

    from tests.support.trainer import download, run_trainer, trainer_env, upload, write_config

    settings, bucket = s3_bucket
    upload(settings, f"s3://{bucket}/models/sd3/", tiny_sd3_dir)
    upload(settings, f"s3://{bucket}/data/cat/", toy_cat_dir)
    doc = sd3_job(
        f"s3://{bucket}/models/sd3/",
        f"s3://{bucket}/data/cat/",
        f"s3://{bucket}/jobs/{t5}/",
        steps=60,
        formats=["lora", "lora-kohya"],
        training={
            "method": "lora",
            "learningRate": 1e-2,
            "t5": t5,
            "lora": {"rank": 8, "alpha": 4, "textEncoder": t5 == "keep"},
        },
    )
    config = write_config(trainer_config(doc, endpoint=settings.endpoint), tmp_path)
    code, log, summary = run_trainer(config, tmp_path / "w", trainer_env(settings))
    assert code == 0 and summary["step"] == 60, log
    out = download(settings, f"s3://{bucket}/jobs/{t5}/", tmp_path / "out")
    assert set(json.loads((out / "result.json").read_text())["outputs"]) == {"lora", "lora-kohya"}
    keys = load_file(out / "lora" / "pytorch_lora_weights.safetensors").keys()
    assert any(k.startswith("transformer.") and ".attn.add_q_proj." in k for k in keys)  # both streams
    assert any(k.startswith("transformer.") and ".attn.to_q." in k for k in keys)
    assert any(k.startswith("text_encoder_2.") for k in keys) == (t5 == "keep")
    assert not any(k.startswith("text_encoder_3.") for k in keys)  # T5 never trains

    pipe = StableDiffusion3Pipeline.from_pretrained(
        tiny_sd3_dir, **({"text_encoder_3": None, "tokenizer_3": None} if t5 == "drop" else {})
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(out / "lora")
    image = pipe(PROMPT, num_inference_steps=2, height=64, width=64, max_sequence_length=77).images[0]
    assert image.size == (64, 64)
    pipe.fuse_lora()  # the base model with the adapters merged in: has it learned the photos?
    pipe.unload_lora_weights()
    comfy = load_file(next((out / "lora").glob("*_kohya.safetensors")))
    assert_comfyui_applies_the_same_update(comfy, tiny_sd3_dir, pipe, text_encoders=t5 == "keep")
    pipe.save_pretrained(tmp_path / "fused")
    settings = {"t5": t5}
    before = denoising_loss(tiny_sd3_dir, toy_cat_dir, PROMPT, training=settings)
    after = denoising_loss(tmp_path / "fused", toy_cat_dir, PROMPT, training=settings)
    # ~0.79x here after 60 steps, T5 kept or dropped: adapters on the attention projections
    # get close to a full fine-tune's ~0.75x, the floor of this tiny transformer (see below).
    # (It was ~0.85x while the diffusers file lost the image stream's adapters on loading:
    # UNet-style key names, which SD3's loader drops with a warning)
    assert after < 0.85 * before, (before, after)


def assert_comfyui_applies_the_same_update(comfy, base_dir, fused, *, text_encoders: bool) -> None:
    """The ComfyUI file holds the update diffusers' LoRA applied (``fused``: the pipeline with
    it merged in), as comfy/lora.py reads it: each module under ComfyUI's SD3 names
    (``lora_transformer_`` + the diffusers path, ``lora_te1_``/``lora_te2_`` + CLIP-L/G's
    ``text_model`` path, dots as underscores), ``W + up @ down * alpha / rank``."""
    from diffusers import StableDiffusion3Pipeline

    base = StableDiffusion3Pipeline.from_pretrained(base_dir, text_encoder_3=None, tokenizer_3=None)
    parts = {
        "lora_transformer": ("transformer", ""),
        "lora_te1": ("text_encoder", "text_model."),
        "lora_te2": ("text_encoder_2", "text_model."),
    }
    names = {}  # ComfyUI's key -> (part, the module's state-dict key)
    for prefix, (part, below) in parts.items():
        for key in getattr(base, part).state_dict():
            if key.endswith(".weight"):
                path = below + key.removesuffix(".weight").removeprefix(below)
                names[f"{prefix}_{path.replace('.', '_')}"] = (part, key)
    modules = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in comfy}
    assert modules and all(m in names for m in modules), sorted(m for m in modules if m not in names)[:3]
    assert {m.split("_")[1] for m in modules} == ({"transformer", "te1", "te2"} if text_encoders else {"transformer"})
    assert any("_attn_add_q_proj" in m for m in modules)  # both attention streams
    for module in modules:
        down, up = comfy[f"{module}.lora_down.weight"], comfy[f"{module}.lora_up.weight"]
        assert float(comfy[f"{module}.alpha"]) == 4.0 and down.shape[0] == 8
        part, key = names[module]
        update = up @ down * (comfy[f"{module}.alpha"] / down.shape[0])
        merged = getattr(fused, part).state_dict()[key] - getattr(base, part).state_dict()[key]
        assert torch.allclose(update, merged, atol=1e-5), module


def test_sd3_full_fine_tune_learns_and_exports_a_loadable_folder(tiny_sd3_dir, toy_cat_dir, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    out = tmp_path / "out"
    doc = sd3_job(
        tiny_sd3_dir,
        toy_cat_dir,
        out,
        steps=60,
        formats=["diffusers"],
        training={"method": "full", "learningRate": 1e-3},
        validation={"inferenceSteps": 2, "imagesPerPrompt": 1, "everySteps": 60},
    )
    outcome = run(trainer_config(doc), tmp_path / "w", metrics=TrainerMetrics())
    assert (out / "samples" / "step-60.png").is_file() and "samples" in outcome.outputs
    before = denoising_loss(tiny_sd3_dir, toy_cat_dir, PROMPT)
    after = denoising_loss(out / "model", toy_cat_dir, PROMPT)
    # ~0.75x already after 60 steps, and no lower after 300: the rest of the flow-matching
    # target is what this tiny transformer cannot predict (SDXL's tiny UNet: ~0.5x)
    assert after < 0.85 * before, (before, after)
    pipe = StableDiffusion3Pipeline.from_pretrained(out / "model")
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"  # its validation sampler
    assert json.loads((out / "model" / "model_index.json").read_text())["_class_name"] == "StableDiffusion3Pipeline"
    t5 = load_file(out / "model" / "text_encoder_3" / "model.safetensors")
    base = load_file(tiny_sd3_dir / "text_encoder_3" / "model.safetensors")
    assert all(torch.equal(t5[k], base[k]) for k in base)  # T5 exported untouched


@pytest.mark.parametrize("drop", ["text_encoder_3", "tokenizer_3", "text_encoder_2"])
def test_an_sd3_folder_missing_an_encoder_is_named(tiny_sd3_dir, toy_cat_dir, tmp_path, drop):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_sd3_dir, broken)
    shutil.rmtree(broken / drop)
    doc = sd3_job(broken, toy_cat_dir, tmp_path / "o", steps=2, training={"method": "lora"}, formats=["lora"])
    with pytest.raises(ModelError) as err:
        run(trainer_config(doc), tmp_path / "w", metrics=TrainerMetrics())
    assert broken.as_uri() in str(err.value) and err.value.exit_code is ExitCode.BAD_MODEL
    if drop == "text_encoder_2":
        assert "missing text_encoder_2/" in str(err.value)
    else:
        assert "no T5 text encoder" in str(err.value) and "training.t5: drop" in str(err.value)
        # and with T5 dropped the same folder trains
        doc["spec"]["training"]["t5"] = "drop"
        assert run(trainer_config(doc), tmp_path / "w2", metrics=TrainerMetrics()).step == 2


def _issues(doc) -> str:
    from dreambooth.api import SpecError, validate_job

    with pytest.raises(SpecError) as err:
        validate_job(doc)
    return str(err.value)


@pytest.mark.parametrize(
    ("family", "training", "base", "gpus", "expected"),
    [
        ("sd3", {"maxSequenceLength": 513}, {}, 0, "spec.training.maxSequenceLength"),
        (
            "sd3",
            {"maxSequenceLength": 256, "t5": "drop"},
            {},
            0,
            "spec.training.maxSequenceLength: is the prompt length T5 reads, and training.t5 is drop",
        ),
        ("sd3", {}, {"quantization": "nf4"}, 0, "spec.baseModel.quantization: nf4 (bitsandbytes 4-bit) needs GPUs"),
        (
            "sd3",
            {"method": "full"},
            {"quantization": "nf4"},
            1,
            "spec.baseModel.quantization: nf4 quantizes the frozen transformer of a LoRA run",
        ),
        ("sd3", {}, {"quantization": "nf4"}, 1, "spec.baseModel.quantization: nf4 is not supported yet"),
        ("sd3", {"snrGamma": 5.0}, {}, 0, "spec.training.snrGamma: Min-SNR weighting is for DDPM models"),
        ("sd3", {"method": "full", "trainTextEncoder": True}, {}, 0, "spec.training.trainTextEncoder"),
        ("sd", {"t5": "drop"}, {}, 0, "spec.training.t5: only applies to models with a T5 text encoder"),
        ("sdxl", {"flowMatching": {"weighting": "mode"}}, {}, 0, "spec.training.flowMatching: only applies"),
    ],
)
def test_what_sd3_cannot_take_is_refused_naming_the_field(family, training, base, gpus, expected, tmp_path):
    doc = job_document("s3://models/m/", "s3://data/cat/", "s3://out/o/", steps=10, every=10, training=training)
    doc["spec"]["baseModel"].update(family=family, **base)
    doc["spec"]["resources"]["gpusPerNode"] = gpus
    if training.get("method") == "full":
        doc["spec"]["output"]["formats"] = ["diffusers"]
    assert expected in _issues(doc)


def test_sd3_samples_only_with_its_own_scheduler():
    doc = job_document("s3://models/m/", "s3://data/cat/", "s3://out/o/", steps=10, every=10)
    doc["spec"]["baseModel"]["family"] = "sd3"
    doc["spec"]["validation"]["scheduler"] = "ddim"
    assert "spec.validation.scheduler: ddim does not sample Stable Diffusion 3 models: use flow_euler" in _issues(doc)
    doc["spec"]["baseModel"]["family"] = "sd"
    doc["spec"]["validation"]["scheduler"] = "flow_euler"
    assert "flow_euler does not sample Stable Diffusion 1.x/2.x models" in _issues(doc)


def _s3_sd3_config(settings, bucket, output, *, port=0, **training):
    doc = sd3_job(
        f"s3://{bucket}/models/sd3/",
        f"s3://{bucket}/data/cat/",
        f"s3://{bucket}/{output}/",
        steps=24,
        every=4,
        formats=["lora"],
        training={"method": "lora", "learningRate": 1e-2, "lora": {"rank": 4, "textEncoder": True}, **training},
    )
    return trainer_config(doc, endpoint=settings.endpoint, metrics_port=port)


@pytest.mark.slow
def test_sd3_lora_from_s3_killed_with_9_resumes_to_the_same_adapters(s3_bucket, tiny_sd3_dir, toy_cat_dir, tmp_path):
    """S3 to S3, as a pod runs it: a run killed (SIGKILL) after its second checkpoint and
    restarted ends with the adapters (transformer and both CLIP encoders) of a run never
    stopped, bit for bit; every flow-matching draw belongs to the sample's position."""
    from kubesim.net import free_port
    from tests.support.trainer import (
        download,
        run_trainer,
        start_trainer,
        trainer_env,
        upload,
        write_config,
    )
    from tests.trainer.test_resume import wait_for_step

    settings, bucket = s3_bucket
    upload(settings, f"s3://{bucket}/models/sd3/", tiny_sd3_dir)
    upload(settings, f"s3://{bucket}/data/cat/", toy_cat_dir)
    env = trainer_env(settings)
    code, log, _ = run_trainer(
        write_config(_s3_sd3_config(settings, bucket, "straight"), tmp_path / "a"), tmp_path / "a" / "work", env
    )
    assert code == 0, log

    port = free_port()
    config_path = write_config(_s3_sd3_config(settings, bucket, "killed", port=port), tmp_path / "b")
    proc = start_trainer(config_path, tmp_path / "b" / "work", env)
    wait_for_step(proc, port, 11)
    proc.send_signal(9)
    proc.wait()
    code, log, summary = run_trainer(config_path, tmp_path / "b" / "work", env)
    assert code == 0 and "resumed from" in log, log
    assert summary["step"] == 24
    files = [
        load_file(download(settings, f"s3://{bucket}/{run}/lora/", tmp_path / run) / "pytorch_lora_weights.safetensors")
        for run in ("straight", "killed")
    ]
    assert files[0].keys() == files[1].keys() and any(k.startswith("text_encoder.") for k in files[0])
    different = [k for k in files[0] if not torch.equal(files[0][k], files[1][k])]
    assert not different, f"{len(different)} tensors differ after resume, e.g. {different[:3]}"


def test_sd3_prior_preservation_generates_class_images_with_its_own_scheduler(tiny_sd3_dir, toy_cat_dir, tmp_path):
    out = tmp_path / "jobs" / "face"
    doc = sd3_job(
        tiny_sd3_dir,
        toy_cat_dir,
        out,
        steps=2,
        formats=["lora"],
        training={"method": "lora", "t5": "drop"},
        prior={"enabled": True, "classPrompt": "a photo of a cat", "numImages": 2},
    )
    metrics = TrainerMetrics()
    outcome = run(trainer_config(doc), tmp_path / "w", metrics=metrics)
    assert outcome.step == 2
    cached = list((tmp_path / "jobs" / ".cache" / "class-images").rglob("class-*.png"))
    assert len(cached) == 2
    from dreambooth.trainer.prior import cache_key

    key = cache_key(
        model=tiny_sd3_dir.as_uri(), revision=None, prompt="a photo of a cat", resolution=64, count=2, family="sd3"
    )
    assert cached[0].parent.name == key  # flow-matching Euler is part of the key: not SD's DDIM images
    assert key != cache_key(
        model=tiny_sd3_dir.as_uri(), revision=None, prompt="a photo of a cat", resolution=64, count=2
    )


@pytest.mark.slow
def test_sd3_two_processes_train_like_one(tiny_sd3_dir, toy_cat_dir, tmp_path):
    """accelerate launch with 2 processes (gloo): the adapters one process trains, up to the
    rounding of the gradient all-reduce."""
    from tests.support.trainer import launch, trainer_env, write_config

    results = {}
    for processes in (1, 2):
        out = tmp_path / f"out-{processes}"
        doc = sd3_job(
            tiny_sd3_dir,
            toy_cat_dir,
            out,
            steps=4,
            every=2,
            formats=["lora"],
            training={
                "method": "lora",
                "learningRate": 1e-2,
                "batchSize": 4,
                "gradientAccumulationSteps": 2,
                "lora": {"textEncoder": True},
            },
        )
        doc["spec"]["resources"] = {"nodes": processes, "gpusPerNode": 0}
        done = launch(
            processes,
            write_config(trainer_config(doc), tmp_path / f"c{processes}"),
            tmp_path / f"w{processes}",
            trainer_env(),
        )
        assert done.returncode == 0, done.stderr[-4000:]
        results[processes] = load_file(out / "lora" / "pytorch_lora_weights.safetensors")
    one, two = results[1], results[2]
    assert one.keys() == two.keys()
    # the B matrices start at zero: their size is how far training moved them
    trained = [k for k in one if "lora_B" in k or "lora_linear_layer.up" in k]
    assert trained and any(k.startswith("text_encoder_2.") for k in trained)
    drift = sum((one[k] - two[k]).abs().sum().item() for k in trained)
    moved = sum(one[k].abs().sum().item() for k in trained)
    assert moved > 0 and drift / moved < 0.01, f"2 processes drifted from 1 process by {drift / moved:.2%}"
