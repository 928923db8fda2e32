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
    doc = job_document(
        model.as_uri(),
        photos.as_uri(),
        out.as_uri(),
        steps=DB_STEPS,
        every=2,
        training={
            "textualInversion": {
                "steps": TI_STEPS,
                "placeholderToken": "<zwx>",
                "initializerToken": "cat",
                "learningRate": 5e-2,
            }
        },
    )
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


@pytest.fixture
def fp16_loss_scaling(monkeypatch):
    """The CUDA fp16 path on this CPU: fp16 autocast and a real GradScaler (torch's works on
    the CPU), as accelerate sets them up on a GPU. accelerate's state is process-wide:
    reset after the test."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from dreambooth.trainer import run as run_module

    scalers = []

    def make(spec):
        accelerator = Accelerator(cpu=True, mixed_precision="fp16")
        accelerator.native_amp = True  # what accelerate sets for fp16 on a GPU
        accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
        scalers.append(accelerator.scaler)
        return accelerator

    AcceleratorState._reset_state(reset_partial_state=True)
    monkeypatch.setattr(run_module, "make_accelerator", make)
    yield scalers
    AcceleratorState._reset_state(reset_partial_state=True)


def test_fp16_loss_scaling_with_textual_inversion_trains_past_step_one(
    tiny_model_dir, toy_cat_dir, tmp_path, fp16_loss_scaling
):
    """Defect: the textual-inversion optimizer bypassed accelerate, so with fp16 the scaler's
    step/update never ran and the second step's unscale_ raised. Both phases now step and
    update the scaler."""
    config = ti_config(tiny_model_dir, toy_cat_dir, tmp_path / "out")
    metrics = TrainerMetrics()
    outcome = run(config, tmp_path / "w", metrics=metrics)
    assert outcome.step == TI_STEPS + DB_STEPS and torch.isfinite(torch.tensor(outcome.loss))
    [scaler] = fp16_loss_scaling
    assert scaler._scale is not None and scaler.get_scale() > 0, "the scaler was never used"
    key = "text_encoder.embeddings.token_embedding.weight"
    rows = [
        load_file(tmp_path / "out" / "checkpoints" / f"checkpoint-{s}" / "trainable.safetensors")[key][-1]
        for s in (2, TI_STEPS)
    ]
    assert not torch.equal(*rows), "the token did not learn between phase 1's checkpoints (every step skipped?)"


def test_half_precision_never_rounds_the_weights_it_does_not_train(
    tiny_model_dir, toy_cat_dir, tmp_path, fp16_loss_scaling
):
    """Defect: phase 1 cast the fp32 UNet to fp16 in place and phase 2 cast it back, so every
    base weight was rounded before DreamBooth started; the VAE was exported in fp16. Now
    phase 2 starts from the base UNet bit for bit and the export's VAE is the base VAE."""
    doc_config = ti_config(tiny_model_dir, toy_cat_dir, tmp_path / "out")
    spec = doc_config.spec.model_copy(
        update={"training": doc_config.spec.training.model_copy(update={"learning_rate": 0.0, "lr_warmup_steps": 0})}
    )
    config = doc_config.model_copy(update={"spec": spec})
    run(config, tmp_path / "w", metrics=TrainerMetrics())
    for part, name in (("unet", "diffusion_pytorch_model.safetensors"), ("vae", "diffusion_pytorch_model.safetensors")):
        base = load_file(tiny_model_dir / part / name)
        exported = load_file(tmp_path / "out" / "model" / part / name)
        assert all(exported[k].dtype == torch.float32 for k in exported), f"{part} exported in half precision"
        changed = [k for k in base if not torch.equal(base[k], exported[k])]
        assert not changed, (
            f"{part}: {len(changed)} tensors differ from the base after a run at LR 0, e.g. {changed[:3]}"
        )
