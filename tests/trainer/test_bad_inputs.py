"""Bad inputs end with the documented exit code and a message that says what to fix."""

from __future__ import annotations

import json
import logging
import shutil

import pytest

from dreambooth.api.exitcodes import DO_NOT_RETRY, ExitCode
from dreambooth.trainer.__main__ import main as trainer_main
from dreambooth.trainer.storage import open_storage
from tests.support.trainer import job_document, trainer_config, upload, write_config


@pytest.fixture
def run_in_process(tmp_path, monkeypatch, caplog):
    """Run the trainer's entry point here (imports are warm) with a pod's environment."""

    def run(config, s3=None, secret_key=None):
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL_S3"):
            monkeypatch.delenv(key, raising=False)
        if s3 is not None:
            monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3.access_key)
            monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret_key or s3.secret_key)
            monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://{s3.endpoint}")
        path = config if not hasattr(config, "wire") else write_config(config, tmp_path)
        summary_path = tmp_path / "termination-log"
        caplog.clear()
        with caplog.at_level(logging.INFO):
            code = trainer_main(
                ["--config", str(path), "--workdir", str(tmp_path / "work"), "--termination-log", str(summary_path)]
            )
        summary = json.loads(summary_path.read_text())
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert errors and "Traceback" not in errors[-1].getMessage(), "a traceback is no explanation"
        assert summary["exitCode"] == code
        return ExitCode(code), summary["message"]

    return run


@pytest.fixture
def inputs(s3_bucket, tiny_model_dir, toy_cat_dir):
    settings, bucket = s3_bucket
    upload(settings, f"s3://{bucket}/models/tiny/", tiny_model_dir)
    upload(settings, f"s3://{bucket}/data/cat/", toy_cat_dir)
    return settings, bucket


def doc(bucket, *, model="models/tiny/", data="data/cat/", out="out/", **kw):
    return job_document(
        f"s3://{bucket}/{model}", f"s3://{bucket}/{data}", f"s3://{bucket}/{out}", steps=2, every=2, **kw
    )


def test_empty_instance_prefix(inputs, run_in_process):
    s3, bucket = inputs
    code, message = run_in_process(trainer_config(doc(bucket, data="nothing/"), endpoint=s3.endpoint), s3)
    assert code is ExitCode.BAD_DATA
    assert f"no instance photos found under s3://{bucket}/nothing/" in message


def test_broken_image_is_named(inputs, run_in_process):
    s3, bucket = inputs
    open_storage(f"s3://{bucket}/data/cat/", s3).write_bytes("broken.png", b"\x89PNG not really")
    code, message = run_in_process(trainer_config(doc(bucket), endpoint=s3.endpoint), s3)
    assert code is ExitCode.BAD_DATA
    assert f"s3://{bucket}/data/cat/broken.png is not a readable image" in message


def test_wrong_credentials(inputs, run_in_process):
    s3, bucket = inputs
    code, message = run_in_process(
        trainer_config(doc(bucket), endpoint=s3.endpoint), s3, secret_key="not-the-secret-123"
    )
    assert code is ExitCode.STORAGE_AUTH
    assert "credentialsSecret" in message and "not-the-secret-123" not in message


def test_missing_bucket(inputs, run_in_process):
    s3, bucket = inputs
    config = trainer_config(
        job_document(
            f"s3://{bucket}/models/tiny/", "s3://no-such-bucket-here/cat/", f"s3://{bucket}/out/", steps=2, every=2
        ),
        endpoint=s3.endpoint,
    )
    code, message = run_in_process(config, s3)
    assert code is ExitCode.NOT_FOUND
    assert "no-such-bucket-here" in message


def test_unknown_model_layout(inputs, run_in_process):
    s3, bucket = inputs
    store = open_storage(f"s3://{bucket}/models/flux/", s3)
    for name in (
        "transformer/config.json",
        "vae/config.json",
        "text_encoder/config.json",
        "tokenizer/tokenizer_config.json",
        "scheduler/scheduler_config.json",
    ):
        store.write_bytes(name, b"{}")
    store.write_bytes("model_index.json", json.dumps({"_class_name": "FluxPipeline"}).encode())
    code, message = run_in_process(trainer_config(doc(bucket, model="models/flux/"), endpoint=s3.endpoint), s3)
    assert code is ExitCode.BAD_MODEL
    assert "holds a FluxPipeline model" in message
    assert "Stable Diffusion 1.x/2.x (StableDiffusionPipeline)" in message
    assert "Stable Diffusion XL (StableDiffusionXLPipeline)" in message


def test_not_a_model_folder(toy_cat_dir, tmp_path, run_in_process):
    config = trainer_config(
        job_document(toy_cat_dir.as_uri(), toy_cat_dir.as_uri(), (tmp_path / "o").as_uri(), steps=2, every=2)
    )
    code, message = run_in_process(config)
    assert code is ExitCode.BAD_MODEL
    assert "missing model_index.json" in message


def test_resolution_the_model_cannot_take(tiny_model_dir, toy_cat_dir, tmp_path, run_in_process):
    config = trainer_config(
        job_document(
            tiny_model_dir.as_uri(),
            toy_cat_dir.as_uri(),
            (tmp_path / "o").as_uri(),
            steps=2,
            every=2,
            training={"resolution": 72},
        )
    )
    code, message = run_in_process(config)
    assert code is ExitCode.INVALID_CONFIG
    assert "training.resolution 72" in message and "multiple of 16" in message


def test_invalid_config_file(tmp_path, run_in_process):
    path = tmp_path / "bad.json"
    path.write_text(
        json.dumps(
            {
                "apiVersion": "dreambooth.io/v1alpha1",
                "kind": "TrainerConfig",
                "job": {"name": "x"},
                "outputUri": "file:///tmp/x/",
                "classCacheUri": "file:///tmp/c/",
                "spec": {
                    "baseModel": {"uri": "file:///m"},
                    "instance": {"uri": "file:///i", "prompt": "p"},
                    "training": {"steps": 0},
                },
            }
        )
    )
    code, message = run_in_process(path)
    assert code is ExitCode.INVALID_CONFIG
    assert "spec.training.steps" in message


def test_a_gpu_pod_without_cuda_fails_instead_of_training_on_the_cpu(
    tiny_model_dir, toy_cat_dir, tmp_path, run_in_process
):
    """Defect: a job asking for GPUs on a node whose driver or device plugin is broken trained
    on the pod's CPU, silently and for days. Now it stops at once with a reason to act on."""
    config = trainer_config(
        job_document(
            tiny_model_dir.as_uri(),
            toy_cat_dir.as_uri(),
            (tmp_path / "o").as_uri(),
            steps=2,
            every=2,
            resources={"gpusPerNode": 1},
        )
    )
    code, message = run_in_process(config)  # this machine's torch is a CPU build
    assert code is ExitCode.GPU_UNAVAILABLE and code in DO_NOT_RETRY
    assert "resources.gpusPerNode is 1" in message and "CPU-only build" in message
    assert not (tmp_path / "o" / "checkpoints").exists(), "nothing may train"


def test_do_not_retry_codes_are_the_input_errors():
    assert {c.name for c in DO_NOT_RETRY} == {
        "INVALID_CONFIG",
        "BAD_DATA",
        "STORAGE_AUTH",
        "NOT_FOUND",
        "BAD_MODEL",
        "GPU_UNAVAILABLE",
    }
    assert ExitCode.STORAGE_UNAVAILABLE not in DO_NOT_RETRY and ExitCode.PREEMPTED not in DO_NOT_RETRY


def test_under_a_launcher_every_process_leaves_its_verdict(tmp_path, monkeypatch):
    """The launch script forms the pod's verdict from every process's own (see
    tests/operator/test_resources.py); a process other than the pod's first never writes
    the pod's termination message itself."""
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    path = tmp_path / "bad.json"
    path.write_text("{}")
    log = tmp_path / "termination-log"
    code = trainer_main(["--config", str(path), "--workdir", str(tmp_path / "work"), "--termination-log", str(log)])
    verdict = json.loads((tmp_path / "work" / "verdicts" / "rank-3.json").read_text())
    assert code == verdict["exitCode"] == ExitCode.INVALID_CONFIG and verdict["rank"] == 3
    assert verdict["reason"] == "InvalidConfig" and verdict["finishedAt"] > 0
    assert not log.exists()


def _vae_without_config(model, folder):
    folder.mkdir()
    shutil.copy(model / "vae" / "diffusion_pytorch_model.safetensors", folder)


def _a_unet(model, folder):
    shutil.copytree(model / "unet", folder)


def _vae_without_weights(model, folder):
    folder.mkdir()
    shutil.copy(model / "vae" / "config.json", folder)


NOT_A_VAE = {  # what baseModel.vae points at -> what the message says
    "no config.json": (_vae_without_config, "is not a VAE: missing config.json"),
    "a UNet": (_a_unet, "/config.json describes a UNet2DConditionModel, not an AutoencoderKL"),
    "no weights": (_vae_without_weights, "has no .safetensors weights (diffusion_pytorch_model.safetensors)"),
}


@pytest.mark.parametrize("case", NOT_A_VAE)
def test_a_vae_folder_that_is_not_a_vae_is_named(case, tiny_model_dir, toy_cat_dir, tmp_path, run_in_process):
    build, says = NOT_A_VAE[case]
    folder = tmp_path / "vae"
    build(tiny_model_dir, folder)
    doc = job_document(tiny_model_dir.as_uri(), toy_cat_dir.as_uri(), (tmp_path / "o").as_uri(), steps=2, every=2)
    doc["spec"]["baseModel"]["vae"] = folder.as_uri()
    code, message = run_in_process(trainer_config(doc))
    assert code is ExitCode.BAD_MODEL
    assert message.startswith(f"spec.baseModel.vae: {folder.as_uri()}") and says in message, message
    assert not (tmp_path / "o" / "checkpoints").exists(), "nothing may train"


def test_an_empty_vae_prefix_is_named(inputs, run_in_process):
    s3, bucket = inputs
    config = doc(bucket)
    config["spec"]["baseModel"]["vae"] = f"s3://{bucket}/vaes/none/"
    code, message = run_in_process(trainer_config(config, endpoint=s3.endpoint), s3)
    assert code is ExitCode.NOT_FOUND
    assert f"no VAE files (spec.baseModel.vae) found under s3://{bucket}/vaes/none/" in message


def _without(part):
    def build(models, tmp_path):
        broken = tmp_path / "model"
        shutil.copytree(models["sdxl"], broken)
        shutil.rmtree(broken / part)
        return broken, {}

    return build


def _forced(family, folder):
    return lambda models, tmp_path: (models[folder], {"baseModel": {"family": family}})


def _sdxl_made_for_256(models, tmp_path):
    from dreambooth.trainer.tiny import build_tiny_sdxl

    return build_tiny_sdxl(tmp_path / "model", resolution=256), {"training": {"resolution": 64}}


BAD_MODELS = {  # (model folder, job changes) -> exit code, what the message says
    "an SDXL folder without text_encoder_2/": (
        _without("text_encoder_2"),
        ExitCode.BAD_MODEL,
        "is not a Stable Diffusion XL model we can train: missing text_encoder_2/config.json",
    ),
    "an SDXL folder without tokenizer_2/": (
        _without("tokenizer_2"),
        ExitCode.BAD_MODEL,
        "missing tokenizer_2/tokenizer_config.json",
    ),
    "baseModel.family sdxl on an SD 1.x folder": (
        _forced("sdxl", "sd"),
        ExitCode.BAD_MODEL,
        (
            "baseModel.family is sdxl but {model} holds a Stable Diffusion 1.x/2.x model (StableDiffusionPipeline): "
            "set baseModel.family: sd"
        ),
    ),
    "baseModel.family sd on an SDXL folder": (
        _forced("sd", "sdxl"),
        ExitCode.BAD_MODEL,
        (
            "baseModel.family is sd but {model} holds a Stable Diffusion XL model (StableDiffusionXLPipeline): "
            "set baseModel.family: sdxl"
        ),
    ),
    "a resolution below the SDXL model's": (
        _sdxl_made_for_256,
        ExitCode.INVALID_CONFIG,
        (
            "training.resolution 64 is below what this Stable Diffusion XL model takes: it is made for 256 px "
            "(unet/config.json sample_size 32 x VAE factor 8); train at 128 px or more"
        ),
    ),
}


@pytest.mark.parametrize("case", BAD_MODELS)
def test_a_model_the_job_cannot_train_is_named(
    case, tiny_model_dir, tiny_sdxl_dir, toy_cat_dir, tmp_path, run_in_process
):
    build, exit_code, says = BAD_MODELS[case]
    model, changes = build({"sd": tiny_model_dir, "sdxl": tiny_sdxl_dir}, tmp_path)
    doc = job_document(model.as_uri(), toy_cat_dir.as_uri(), (tmp_path / "o").as_uri(), steps=2, every=2)
    doc["spec"]["validation"] = {"enabled": False}
    for section, values in changes.items():
        doc["spec"][section].update(values)
    code, message = run_in_process(trainer_config(doc))
    assert code is exit_code
    assert says.format(model=model.as_uri()) in message, message
    assert not (tmp_path / "o" / "checkpoints").exists(), "nothing may train"
