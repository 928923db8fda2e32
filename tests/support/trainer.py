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


def job_document(model_uri: str, instance_uri: str, output_uri: str, *, name: str = "toy-cat",
                 steps: int = 30, every: int = 10, training: dict[str, Any] | None = None,
                 **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "dreambooth.io/v1alpha1",
        "kind": "DreamBoothJob",
        "metadata": {"name": name, "namespace": "ml"},
        "spec": {
            "preset": "object",
            "baseModel": {"uri": model_uri},
            "instance": {"uri": instance_uri, "prompt": "a photo of zwx toy cat"},
            "training": {"steps": steps, "batchSize": 2, "resolution": 64, "learningRate": 1e-3,
                         **(training or {})},
            "validation": {"inferenceSteps": 4, "imagesPerPrompt": 2, "everySteps": steps},
            "checkpointing": {"everySteps": every, "keep": 2},
            "output": {"uri": output_uri},
            "resources": {"gpusPerNode": 0},
            **spec,
        },
    }


def trainer_config(doc: dict[str, Any], *, endpoint: str | None = None, metrics_port: int = 0) -> TrainerConfig:
    job = validate_job(doc)
    return build_trainer_config(
        job, Defaults(output_root="file:///unused", s3_endpoint=endpoint, s3_secure=False,
                      metrics_port=metrics_port)
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
        env.update(AWS_ACCESS_KEY_ID=s3.access_key, AWS_SECRET_ACCESS_KEY=secret_key or s3.secret_key,
                   AWS_ENDPOINT_URL_S3=f"http://{s3.endpoint}")
    return env


def start_trainer(config_path: Path, workdir: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "dreambooth.trainer", "--config", str(config_path),
         "--workdir", str(workdir), "--termination-log", str(workdir / "termination-log")],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def run_trainer(config_path: Path, workdir: Path, env: dict[str, str], timeout: float = 300):
    """Run to the end; returns (exit code, log text, termination summary or None)."""
    proc = start_trainer(config_path, workdir, env)
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out, termination_summary(workdir)


def launch(processes: int, config_path: Path, workdir: Path, env: dict[str, str], *,
           timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``accelerate launch`` of the trainer with ``processes`` CPU processes on this machine
    (gloo), as a multi-GPU pod runs it; the log lines carry each process's rank."""
    from kubesim.net import free_port

    argv = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    if processes > 1:
        argv += ["--multi_gpu", "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port())]
    argv += ["-m", "dreambooth.trainer", "--config", str(config_path), "--workdir", str(workdir),
             "--termination-log", str(workdir / "termination-log")]
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
def denoising_loss(model_dir: Path, images_dir: Path, prompt: str, *, draws: int = 48, seed: int = 1234) -> float:
    """Mean noise-prediction error of ``model_dir`` on the photos, over fixed noise draws.

    The same (timestep, noise) draws are used for every model compared, and averaged over
    many draws and all photos, so the random timestep that makes per-step training losses
    jumpy cancels out: a drop in this number is learning, not luck. Any family: the model's
    own text encoders and conditioning (SDXL: each photo's time ids).
    """
    from dreambooth.trainer.data import load_examples
    from dreambooth.trainer.families import load_components

    components = load_components(model_dir, str(model_dir))
    family, unet, vae = components.family, components.denoiser.eval(), components.vae.eval()
    scheduler = components.noise_scheduler
    examples = load_examples(images_dir, prompt=prompt, resolution=64, use_captions=False, source_uri="test")
    pixels = torch.stack([e.pixels for e in examples])
    latents = vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor
    cond = family.encode(components.tokenizers, [te.eval() for te in components.text_encoders], [prompt], "cpu")
    cond = type(cond).stack(cond.rows() * len(examples))
    sizes = [e.size for e in examples]
    generator = torch.Generator().manual_seed(seed)
    total = 0.0
    for _ in range(draws):
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(examples),), generator=generator)
        noise = torch.randn(latents.shape, generator=generator)
        pred = family.predict(unet, scheduler.add_noise(latents, noise, t), t, cond, sizes)
        total += torch.nn.functional.mse_loss(pred, noise).item()
    return total / draws


class StopAfter:
    """Stands in for SIGTERM in an in-process run: asks the trainer to stop (checkpoint,
    exit as preempted) once it has finished step ``n``."""

    def __init__(self, metrics, n: int) -> None:
        self.metrics, self.n = metrics, n

    def is_set(self) -> bool:
        return self.metrics.step._value.get() >= self.n
