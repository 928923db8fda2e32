"""Helpers for running the trainer as a pod would: a TrainerConfig file and a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from dreambooth.api import Defaults, build_trainer_config, validate_job
from dreambooth.api.config import TrainerConfig
from dreambooth.trainer.storage import S3Settings, open_storage
from tests.support.jobs import DROP, make_job


def job_document(
    model_uri: str,
    instance_uri: str,
    output_uri: str,
    *,
    name: str = "toy-cat",
    steps: int = 30,
    every: int = 10,
    training: dict[str, Any] | None = None,
    **spec: Any,
) -> dict[str, Any]:
    """``make_job`` (tests/support/jobs.py) for a short CPU run of a tiny model: the object
    preset at 64 px, batch 2, samples at the end, ``every`` steps a checkpoint, no GPU; in
    namespace ``ml``. ``training`` merges into the run's training settings; every other
    section given replaces the run's own."""
    run = {
        "preset": "object",
        "baseModel": {"uri": model_uri},
        "instance": {"uri": instance_uri},
        "training": {"steps": steps, "batchSize": 2, "resolution": 64, "learningRate": 1e-3, **(training or {})},
        "validation": {"inferenceSteps": 4, "imagesPerPrompt": 2, "everySteps": steps},
        "checkpointing": {"everySteps": every, "keep": 2},
        "output": {"uri": output_uri},
        "resources": {"gpusPerNode": 0},
    }
    return make_job({section: DROP for section in spec}, metadata={"name": name, "namespace": "ml"}, **(run | spec))


def trainer_config(doc: dict[str, Any], *, endpoint: str | None = None, metrics_port: int = 0) -> TrainerConfig:
    job = validate_job(doc)
    return build_trainer_config(
        job, Defaults(output_root="file:///unused", s3_endpoint=endpoint, s3_secure=False, metrics_port=metrics_port)
    )


def write_config(config: TrainerConfig, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "trainer-config.json"
    path.write_text(json.dumps(config.wire()))
    return path


def trainer_env(s3: S3Settings | None = None, secret_key: str | None = None) -> dict[str, str]:
    """The environment the operator gives a trainer pod (credentials from a Secret)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    if s3 is not None:
        env.update(
            AWS_ACCESS_KEY_ID=s3.access_key,
            AWS_SECRET_ACCESS_KEY=secret_key or s3.secret_key,
            AWS_ENDPOINT_URL_S3=f"http://{s3.endpoint}",
        )
    return env


def start_trainer(config_path: Path, workdir: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dreambooth.trainer",
            "--config",
            str(config_path),
            "--workdir",
            str(workdir),
            "--termination-log",
            str(workdir / "termination-log"),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def run_trainer(config_path: Path, workdir: Path, env: dict[str, str], timeout: float = 300):
    """Run to the end; returns (exit code, log text, termination summary or None)."""
    proc = start_trainer(config_path, workdir, env)
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out, termination_summary(workdir)


def launch(
    processes: int, config_path: Path, workdir: Path, env: dict[str, str], *, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """``accelerate launch`` of the trainer with ``processes`` CPU processes on this machine
    (gloo), as a multi-GPU pod runs it; the log lines carry each process's rank."""
    from kubesim.net import free_port

    argv = [
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
        argv += ["--multi_gpu", "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port())]
    argv += [
        "-m",
        "dreambooth.trainer",
        "--config",
        str(config_path),
        "--workdir",
        str(workdir),
        "--termination-log",
        str(workdir / "termination-log"),
    ]
    env = {**env, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(argv, check=False, env=env, capture_output=True, text=True, timeout=timeout)


def termination_summary(workdir: Path) -> dict[str, Any] | None:
    path = workdir / "termination-log"
    return json.loads(path.read_text()) if path.is_file() else None


def upload(settings: S3Settings, uri: str, folder: Path) -> None:
    open_storage(uri, settings).upload_dir(folder)


def download(settings: S3Settings | None, uri: str, dest: Path) -> Path:
    open_storage(uri, settings).download_prefix("", dest)
    return dest


@torch.no_grad()
def denoising_loss(
    model_dir: Path,
    images_dir: Path,
    prompt: str,
    *,
    draws: int = 48,
    seed: int = 1234,
    training: dict[str, Any] | None = None,
) -> float:
    """Mean error of ``model_dir``'s prediction of its training target (the noise, or SD3's
    flow-matching ``noise - x``) on the photos, over fixed draws.

    The same draws are used for every model compared, and averaged over many draws and all
    photos, so the random timestep that makes per-step training losses jumpy cancels out: a
    drop in this number is learning, not luck. Any family: its own text encoders,
    conditioning (SDXL: each photo's time ids) and noising; ``training`` (wire names, e.g.
    ``{"t5": "drop"}``) sets what the family reads of the training settings.
    """
    from dreambooth.api.spec import TrainingSpec
    from dreambooth.trainer.data import load_examples
    from dreambooth.trainer.families import load_components

    settings = TrainingSpec.model_validate(training or {})
    components = load_components(model_dir, str(model_dir))
    family, denoiser, vae = components.family, components.denoiser.eval(), components.vae.eval()
    family.configure(components, settings, str(model_dir))
    examples = load_examples(images_dir, prompt=prompt, resolution=64, use_captions=False, source_uri="test")
    pixels = torch.stack([e.pixels for e in examples])
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    latents = (vae.encode(pixels).latent_dist.mean - shift) * vae.config.scaling_factor
    cond = family.encode(components.tokenizers, [te.eval() for te in components.text_encoders], [prompt], "cpu")
    cond = type(cond).stack(cond.rows() * len(examples))
    sizes = [e.size for e in examples]
    total = 0.0
    for draw in range(draws):
        gens = [torch.Generator().manual_seed(seed + 1000 * draw + i) for i in range(len(examples))]
        noise = torch.stack([torch.randn(latents.shape[1:], generator=g) for g in gens])
        drawn = family.noised(components.noise_scheduler, latents, noise, gens, settings)
        pred = family.predict(denoiser, drawn.noisy, drawn.timesteps, cond, sizes)
        total += torch.nn.functional.mse_loss(pred, drawn.target).item()
    return total / draws


def tensor_dtypes(node) -> set[torch.dtype]:
    """The dtypes of every tensor in a nested state dict (an optimizer's state)."""
    if torch.is_tensor(node):
        return {node.dtype}
    return set().union(*map(tensor_dtypes, node.values())) if isinstance(node, dict) else set()


class StopAfter:
    """Stands in for SIGTERM in an in-process run: asks the trainer to stop (checkpoint,
    exit as preempted) once it has finished step ``n``."""

    def __init__(self, metrics, n: int) -> None:
        self.metrics, self.n = metrics, n

    def is_set(self) -> bool:
        return self.metrics.step._value.get() >= self.n


@torch.no_grad()
def images_with_lora(pipeline_class, model_dir: Path, lora: Path | None, prompt: str, **call) -> torch.Tensor:
    """What a fresh pipeline of ``model_dir`` draws for ``prompt`` (fixed seed, 2 steps, 64 px)
    with the LoRA ``lora`` (a folder or one file, any format diffusers reads; None: none)."""
    pipe = pipeline_class.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    if lora is not None:
        pipe.load_lora_weights(lora.parent, weight_name=lora.name) if lora.is_file() else pipe.load_lora_weights(lora)
    out = pipe(
        prompt,
        num_inference_steps=2,
        height=64,
        width=64,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
        **call,
    )
    return out.images


def assert_kohya_lora_draws_like_diffusers(pipeline_class, model_dir: Path, out: Path, kohya: Path, prompt: str):
    """The kohya-format file of a run loads in diffusers and draws what its diffusers-format
    LoRA draws (and not what the base model draws)."""
    base = images_with_lora(pipeline_class, model_dir, None, prompt)
    ours = images_with_lora(pipeline_class, model_dir, out / "lora" / "pytorch_lora_weights.safetensors", prompt)
    theirs = images_with_lora(pipeline_class, model_dir, kohya, prompt)
    assert (ours - base).abs().max() > 1e-3, "the LoRA must change what the model draws"
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()
