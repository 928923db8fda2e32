"""Presets give the seed's recommended settings, explicit fields always win, and the
derived defaults are what the docs promise. The trainer sees all of it through
TrainerConfig, which survives JSON and never carries credentials."""

from __future__ import annotations

import re
from typing import Any

import pytest
from pydantic import BaseModel

from dreambooth.api import (
    Defaults,
    Preset,
    SpecError,
    TrainerConfig,
    build_trainer_config,
    effective_spec,
    validate_job,
    validate_spec,
)
from dreambooth.api.presets import BASE, PRESETS, preset_value
from dreambooth.api.spec import Method, OutputFormat, SecretKeyRef
from tests.support.jobs import DROP, make_job

DEFAULTS = Defaults(output_root="s3://outputs", s3_endpoint="minio.minio.svc:9000")


def effective(**sections: Any):
    return effective_spec(validate_spec(make_job(**sections)["spec"], cluster=True))


def config(**sections: Any) -> TrainerConfig:
    return build_trainer_config(validate_job(make_job(**sections), cluster=True), DEFAULTS)


# --- what each preset means ------------------------------------------------------------

EXPECTED = {
    # the blog's numbers
    Preset.OBJECT: {"steps": 400, "lr": 2e-6, "batch": 4, "prior": False, "class_prompt": None, "tte": False},
    Preset.FACE: {
        "steps": 1200,
        "lr": 1e-6,
        "batch": 2,
        "prior": True,
        "class_prompt": "a photo of a person",
        "tte": True,
    },
    Preset.STYLE: {"steps": 1500, "lr": 1e-6, "batch": 2, "prior": False, "class_prompt": None, "tte": False},
    Preset.CUSTOM: {"steps": 400, "lr": 2e-6, "batch": 1, "prior": False, "class_prompt": None, "tte": False},
}


@pytest.mark.parametrize("preset", list(Preset), ids=str)
def test_preset_resolves_to_its_settings(preset: Preset):
    want = EXPECTED[preset]
    for spec in (effective(preset=preset.value), config(preset=preset.value).spec):
        t, p = spec.training, spec.prior
        assert (t.steps, t.learning_rate, t.batch_size) == (want["steps"], want["lr"], want["batch"])
        assert (p.enabled, p.class_prompt) == (want["prior"], want["class_prompt"])
        assert t.train_text_encoder is want["tte"]
        # a disabled feature gets no settings (they would be refused if written)
        assert p.num_images == (preset_value(preset, "prior", "numImages") if p.enabled else None)


def test_face_preset_needs_no_class_prompt_of_its_own():
    validate_spec(make_job(preset="face")["spec"], cluster=True)  # custom would demand one


def test_the_default_preset_is_custom():
    assert validate_spec(make_job()["spec"], cluster=True).preset is Preset.CUSTOM
    assert effective().training.steps == BASE["training"]["steps"]


# --- explicit fields win --------------------------------------------------------------

CONTROLLED = sorted(
    {(section, name) for table in [BASE, *PRESETS.values()] for section in table for name in table[section]}
)
#: two valid explicit values per preset-controlled field; the test uses one the preset
#: does not give, so "the preset won" cannot pass by accident
ALTERNATIVES: dict[tuple[str, str], tuple[Any, Any]] = {
    ("training", "steps"): (777, 901),
    ("training", "learningRate"): (3e-6, 5e-6),
    ("training", "batchSize"): (1, 8),
    ("training", "trainTextEncoder"): (True, False),
    ("prior", "enabled"): (True, False),
    ("prior", "classPrompt"): ("a photo of a dog", "a painting"),
    ("prior", "numImages"): (42, 7),
    ("training", "method"): ("full", "lora"),
    ("training", "resolution"): (256, 768),
    ("validation", "scheduler"): ("pndm", "dpm"),
    ("validation", "inferenceSteps"): (30, 60),
    ("training", "buckets"): ({"enabled": True}, {"enabled": False}),
}
SNAKE = {
    "learningRate": "learning_rate",
    "batchSize": "batch_size",
    "trainTextEncoder": "train_text_encoder",
    "classPrompt": "class_prompt",
    "numImages": "num_images",
    "inferenceSteps": "inference_steps",
}


def test_every_preset_controlled_field_has_alternatives():
    assert set(CONTROLLED) == set(ALTERNATIVES)


@pytest.mark.parametrize("preset", list(Preset), ids=str)
@pytest.mark.parametrize("section, name", CONTROLLED, ids=lambda v: str(v))
def test_explicit_field_wins_over_preset(preset: Preset, section: str, name: str):
    given = preset_value(preset, section, name)
    value = next(v for v in ALTERNATIVES[(section, name)] if v != given)
    sections: dict[str, Any] = {"preset": preset.value, section: {name: value}}
    if (section, name) == ("prior", "enabled") and value:
        sections["prior"]["classPrompt"] = "a photo of a cat"
    if section == "prior" and name != "enabled":  # prior settings need prior preservation on
        sections["prior"]["enabled"] = True
        sections["prior"].setdefault("classPrompt", "a photo of a cat")
    for spec in (effective(**sections), config(**sections).spec):
        actual = getattr(getattr(spec, section), SNAKE.get(name, name))
        if isinstance(actual, BaseModel):  # a nested section (training.buckets): the fields given
            actual = {k: actual.wire()[k] for k in value}
        assert actual == value
    # and the rest of the preset still applies
    if (section, name) != ("training", "steps"):
        assert effective(**sections).training.steps == preset_value(preset, "training", "steps")


# --- derived defaults -------------------------------------------------------------------


def test_validation_prompts_default_to_the_instance_prompt():
    assert effective().validation.prompts == ["a photo of zwx toy cat"]
    explicit = ["a photo of zwx toy cat on the beach"]
    assert effective(validation={"prompts": explicit}).validation.prompts == explicit


@pytest.mark.parametrize(
    "sections, checkpoint_every, validation_every",
    [
        ({"training": {"steps": 40}}, 40, 40),  # fewer steps than 100: every step count
        ({"training": {"steps": 100}}, 100, 100),
        ({"training": {"steps": 101}}, 100, 100),
        ({"preset": "face"}, 100, 100),
        ({"training": {"steps": 400}, "checkpointing": {"everySteps": 25}}, 25, 25),
        ({"training": {"steps": 400}, "validation": {"everySteps": 50}}, 100, 50),
        ({"checkpointing": {"everySteps": 20}, "validation": {"everySteps": 60}}, 20, 60),
    ],
)
def test_checkpoint_and_sample_intervals(sections, checkpoint_every, validation_every):
    spec = effective(**sections)
    assert spec.checkpointing.every_steps == checkpoint_every
    assert spec.validation.every_steps == validation_every


@pytest.mark.parametrize(
    "training, output, formats",
    [
        ({}, None, [OutputFormat.DIFFUSERS, OutputFormat.SAFETENSORS]),
        ({"method": "lora"}, None, [OutputFormat.LORA]),
        ({}, {"formats": ["safetensors"]}, [OutputFormat.SAFETENSORS]),
    ],
)
def test_output_formats_follow_the_method(training, output, formats):
    sections = {"training": training} | ({"output": output} if output else {})
    assert effective(**sections).output.formats == formats


@pytest.mark.parametrize(
    "lora, rank, alpha",
    [(None, 4, 4.0), ({"rank": 16}, 16, 16.0), ({"rank": 16, "alpha": 8}, 16, 8.0)],
)
def test_lora_alpha_defaults_to_the_rank(lora, rank, alpha):
    training = {"method": "lora"} | ({"lora": lora} if lora else {})
    got = effective(training=training).training.lora
    assert (got.rank, got.alpha) == (rank, alpha)


def test_full_fine_tuning_gets_no_lora_settings():
    assert effective().training.lora is None
    assert effective().training.method is Method.FULL


@pytest.mark.parametrize(
    "training, want",
    [
        ({"trainTextEncoder": True, "learningRate": 3e-6}, 3e-6),
        ({"trainTextEncoder": True, "learningRate": 3e-6, "textEncoderLearningRate": 1e-6}, 1e-6),
        ({"trainTextEncoder": False}, None),
    ],
)
def test_text_encoder_learning_rate_defaults_to_the_learning_rate(training, want):
    assert effective(training=training).training.text_encoder_learning_rate == want


VARIANTS = {
    "plain": {},
    "lora": {"training": {"method": "lora"}},
    "lora-te-adapters": {"training": {"method": "lora", "lora": {"textEncoder": True}}},
    "text-encoder-steps": {"training": {"trainTextEncoder": True, "textEncoderSteps": 50}},
    "prior-images": {"prior": {"enabled": True, "classPrompt": "a cat", "uri": "s3://training-data/cats/"}},
    "two-gpus": {"training": {"batchSize": 4}, "resources": {"gpusPerNode": 2}},
    # SD3 only: T5 dropped, so the preset's prompt length for it must go too
    "t5-drop": {"training": {"method": "lora", "t5": "drop"}},
    "t5-drop-full": {"training": {"method": "full", "t5": "drop"}, "output": {"formats": ["diffusers"]}},
}


@pytest.mark.parametrize("preset", list(Preset), ids=str)
@pytest.mark.parametrize("variant", VARIANTS, ids=str)
@pytest.mark.parametrize("family", ["auto", "sdxl", "sd3"])
def test_effective_spec_is_pure_idempotent_and_valid(preset: Preset, variant: str, family: str):
    """The trainer re-validates the effective spec (TrainerConfig holds it): what the user
    was allowed to write must still be valid once the preset is applied, for every family
    (an SD3 example with t5: drop once failed in the trainer: its preset's maxSequenceLength)."""
    job = make_job(preset=preset.value, baseModel={"family": family}, **VARIANTS[variant])
    try:
        spec = validate_spec(job["spec"], cluster=True)
    except SpecError:
        assert family != "auto" or variant.startswith("t5-"), variant  # SD 1.x/2.x take every other variant
        return  # not what the user may write for this family
    before = spec.model_dump()
    once = effective_spec(spec)
    assert spec.model_dump() == before
    assert effective_spec(once) == once
    validate_spec(once.wire(), cluster=True)
    text = build_trainer_config(validate_job(job, cluster=True), DEFAULTS).model_dump_json(by_alias=True)
    TrainerConfig.model_validate_json(text)  # as the trainer reads it


def test_face_preset_with_lora_trains_no_full_text_encoder():
    """face turns on full text-encoder fine-tuning; a LoRA run cannot do that (it trains
    text-encoder adapters via training.lora.textEncoder), so the preset value is not used."""
    t = config(preset="face", training={"method": "lora"}).spec.training
    assert (t.train_text_encoder, t.text_encoder_learning_rate) == (False, None)
    assert t.steps == 1200 and t.learning_rate == 1e-6  # the rest of the preset applies


# --- TrainerConfig ----------------------------------------------------------------------


@pytest.mark.parametrize("preset", list(Preset), ids=str)
@pytest.mark.parametrize("method", ["full", "lora"])
def test_trainer_config_json_round_trip(preset: Preset, method: str):
    cfg = config(
        preset=preset.value,
        training={"method": method},
        storage={"credentialsSecret": {"name": "minio-credentials"}},
        resources={"tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}]},
    )
    text = cfg.model_dump_json(by_alias=True)
    assert TrainerConfig.model_validate_json(text) == cfg
    assert '"trainTextEncoder"' in text and '"train_text_encoder"' not in text  # wire names


def test_trainer_config_says_where_to_store():
    cfg = config(storage={"region": "eu-west-1"})
    assert cfg.storage.endpoint == "minio.minio.svc:9000" and cfg.storage.secure is True
    assert cfg.storage.region == "eu-west-1"
    cfg = config(storage={"endpoint": "s3.local:9000", "secure": False})
    assert (cfg.storage.endpoint, cfg.storage.secure) == ("s3.local:9000", False)


_SECRET_NAME = re.compile(r"password|passwd|secret(_access)?_key$|access_key(_id)?$|api_key|session_token|^token$")


def _fields(model: type[BaseModel], prefix: str = ""):
    for name, f in model.model_fields.items():
        yield f"{prefix}{name}", f.annotation
        for arg in [f.annotation, *getattr(f.annotation, "__args__", ())]:
            if isinstance(arg, type) and issubclass(arg, BaseModel) and arg is not SecretKeyRef:
                yield from _fields(arg, f"{prefix}{name}.")


def test_trainer_config_has_no_field_for_a_credential():
    offenders = [path for path, _ in _fields(TrainerConfig) if _SECRET_NAME.search(path.split(".")[-1])]
    assert offenders == []


def test_trainer_config_holds_no_credentials(monkeypatch):
    for var, value in {
        "AWS_ACCESS_KEY_ID": "sentinel-access-1f2e",
        "AWS_SECRET_ACCESS_KEY": "sentinel-secret-9a8b",
        "MINIO_ROOT_PASSWORD": "sentinel-password-7c6d",
    }.items():
        monkeypatch.setenv(var, value)
    cfg = config(storage={"credentialsSecret": {"name": "minio-credentials"}})
    text = cfg.model_dump_json(by_alias=True)
    assert "sentinel-" not in text
    # only the reference to the Secret travels, by name and key names
    assert cfg.spec.storage.credentials_secret == SecretKeyRef(name="minio-credentials")


@pytest.mark.parametrize(
    "root, namespace, output, want",
    [
        ("s3://outputs", "team-a", None, "s3://outputs/team-a/toy-cat/"),
        ("s3://outputs/", "team-a", None, "s3://outputs/team-a/toy-cat/"),
        ("s3://outputs/runs", None, None, "s3://outputs/runs/default/toy-cat/"),
        ("s3://outputs", "team-a", "s3://mine/cat", "s3://mine/cat/"),
        ("s3://outputs", "team-a", "pvc://results/cat/", "pvc://results/cat/"),
    ],
)
def test_output_uri_default(root, namespace, output, want):
    sections = {"output": {"uri": output}} if output else {}
    job = validate_job(make_job(metadata={"namespace": namespace or DROP}, **sections), cluster=True)
    cfg = build_trainer_config(job, Defaults(output_root=root))
    assert cfg.output_uri == want
    assert cfg.job.namespace == (namespace or "default") and cfg.job.name == "toy-cat"


def test_class_images_are_cached_per_bucket():
    cfg = config()
    assert cfg.output_uri == "s3://outputs/team-a/toy-cat/"
    assert cfg.class_cache_uri == "s3://outputs/.cache/class-images/"


def test_build_trainer_config_is_deterministic():
    job = validate_job(make_job(preset="face"), cluster=True)
    assert build_trainer_config(job, DEFAULTS) == build_trainer_config(job, DEFAULTS)
    assert build_trainer_config(job, DEFAULTS).spec == effective_spec(job.spec)


# --- presets per family -------------------------------------------------------------------

SDXL_PRESETS = {  # preset -> what it sets (diffusers' SDXL DreamBooth example, docs/presets.md)
    "object": {
        "method": "lora",
        "resolution": 1024,
        "steps": 500,
        "learning_rate": 1e-4,
        "batch_size": 4,
        "prior": False,
    },
    "face": {"method": "lora", "resolution": 1024, "steps": 500, "learning_rate": 1e-4, "batch_size": 4, "prior": True},
    "style": {
        "method": "lora",
        "resolution": 1024,
        "steps": 1000,
        "learning_rate": 1e-4,
        "batch_size": 4,
        "prior": False,
    },
}


@pytest.mark.parametrize("preset", SDXL_PRESETS)
def test_sdxl_presets(preset):
    spec = effective(preset=preset, baseModel={"uri": "s3://models/sdxl/", "family": "sdxl"})
    want, t = SDXL_PRESETS[preset], spec.training
    assert (t.method, t.resolution, t.steps, t.learning_rate, t.batch_size, spec.prior.enabled) == (
        want["method"],
        want["resolution"],
        want["steps"],
        want["learning_rate"],
        want["batch_size"],
        want["prior"],
    )
    assert (spec.validation.scheduler, spec.validation.inference_steps) == ("euler", 25)
    assert spec.output.formats == ["lora"] and spec.training.lora.rank == 4


def test_auto_and_sd_jobs_keep_the_blogs_numbers():
    for family in ("auto", "sd"):
        spec = effective(preset="object", baseModel={"uri": "s3://models/sd15/", "family": family})
        t = spec.training
        assert (t.method, t.resolution, t.steps, t.learning_rate, t.batch_size) == ("full", 512, 400, 2e-6, 4)
        assert (spec.validation.scheduler, spec.validation.inference_steps) == ("ddim", 100)
