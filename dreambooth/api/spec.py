"""The DreamBoothJob spec: the one typed definition shared by the CRD, operator and trainer.

Field names are snake_case in Python and camelCase on the wire. Every field carries a
description (it becomes ``kubectl explain``), bounds and a default. Fields whose default
depends on the preset are ``None`` until :func:`dreambooth.api.resolve.effective_spec`
fills them. Cross-field rules live in :mod:`dreambooth.api.rules`.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo
from pydantic.alias_generators import to_camel

from dreambooth.api import k8s_names as k8s
from dreambooth.api.k8s_names import anchored, say
from dreambooth.api.pod import ENV_NAME_MAX, ENV_NAME_PATTERN, ENV_VALUE_MAX
from dreambooth.api.presets import ModelFamily, Preset, describe
from dreambooth.api.redact import shown
from dreambooth.api.uris import REVISION, Scheme, UriError, check_revision, parse_uri, uri_pattern


class ApiModel(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True)

    def wire(self) -> dict[str, Any]:
        """The object as it appears in YAML/JSON: camelCase, unset optional fields left out."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


# ---------------------------------------------------------------------------------------
# Reusable field types
# ---------------------------------------------------------------------------------------

#: words, not blank, no control characters (they would reach file names, logs and Events)
Prompt = Annotated[str, Field(min_length=1, max_length=1000, pattern=anchored(k8s.PROMPT))]
#: an object name (DNS subdomain): a Secret, a PriorityClass
Name = Annotated[str, Field(min_length=1, max_length=k8s.DNS_SUBDOMAIN_MAX, pattern=anchored(k8s.DNS_SUBDOMAIN))]
Quantity = Annotated[str, Field(max_length=64, pattern=anchored(k8s.QUANTITY))]


def _prefix_fits(key: str) -> str:
    problem = k8s.qualified_name_problem(key)
    if problem:
        raise ValueError(f"the key {shown(key)} {problem}")
    return key


#: a label key, nodeSelector key or taint key (the CRD cannot check a map's keys: model-only)
LabelKey = Annotated[
    str, Field(max_length=k8s.QUALIFIED_NAME_MAX, pattern=anchored(k8s.QUALIFIED_NAME)), AfterValidator(_prefix_fits)
]
LabelValue = Annotated[str, Field(max_length=k8s.LABEL_VALUE_MAX, pattern=anchored(k8s.LABEL_VALUE))]
SecretKey = Annotated[str, Field(min_length=1, max_length=k8s.SECRET_KEY_MAX, pattern=anchored(k8s.SECRET_KEY))]

DATA_URI_PATTERN = uri_pattern(Scheme.S3, Scheme.PVC)
MODEL_URI_PATTERN = uri_pattern(Scheme.S3, Scheme.PVC, Scheme.HF)
REVISION_PATTERN = f"^{REVISION}$"


def _words(check):
    """An AfterValidator running ``check`` (a :mod:`dreambooth.api.uris` check), whose
    message says what to write instead (pydantic's would quote the regex)."""

    def run(value: str) -> str:
        try:
            check(value)
        except UriError as err:
            raise ValueError(str(err)) from None
        return value

    return AfterValidator(run)


def _uri_validator(schemes: frozenset[Scheme]):
    def check(value: str, info: ValidationInfo) -> str:
        allowed = set(schemes)
        if not (info.context or {}).get("cluster"):
            allowed.add(Scheme.FILE)
        try:
            parse_uri(value, allowed=allowed)
        except UriError as err:
            raise ValueError(str(err)) from None
        return value

    return AfterValidator(check)


#: Instance/class images and outputs: S3 or a PVC (and local files outside a cluster).
DataUri = Annotated[
    str,
    Field(max_length=1024, json_schema_extra={"pattern": DATA_URI_PATTERN}),
    _uri_validator(frozenset({Scheme.S3, Scheme.PVC})),
]
#: Base models may also come from the Hugging Face Hub.
ModelUri = Annotated[
    str,
    Field(max_length=1024, json_schema_extra={"pattern": MODEL_URI_PATTERN}),
    _uri_validator(frozenset({Scheme.S3, Scheme.PVC, Scheme.HF})),
]
#: A Hub revision: a branch or tag name, or a commit hash.
Revision = Annotated[
    str,
    Field(max_length=128, json_schema_extra={"pattern": REVISION_PATTERN}),
    _words(check_revision),
]


# ---------------------------------------------------------------------------------------
# Enumerations
# ---------------------------------------------------------------------------------------


class Method(StrEnum):
    FULL = "full"
    LORA = "lora"


class MixedPrecision(StrEnum):
    NO = "no"
    FP16 = "fp16"
    BF16 = "bf16"


class Optimizer(StrEnum):
    ADAMW = "adamw"
    ADAMW_8BIT = "adamw8bit"


class LRScheduler(StrEnum):
    CONSTANT = "constant"
    CONSTANT_WITH_WARMUP = "constant_with_warmup"
    COSINE = "cosine"
    LINEAR = "linear"


class Sampler(StrEnum):
    DDIM = "ddim"
    PNDM = "pndm"
    LMS = "lms"
    DPM = "dpm"
    EULER = "euler"
    FLOW_EULER = "flow_euler"


class Weighting(StrEnum):
    """How flow-matching training draws its sigmas (and weighs the loss)."""

    LOGIT_NORMAL = "logit_normal"
    MODE = "mode"
    COSMAP = "cosmap"
    UNIFORM = "uniform"


class T5Mode(StrEnum):
    KEEP = "keep"
    DROP = "drop"


class Quantization(StrEnum):
    NONE = "none"
    NF4 = "nf4"


class ExportChoice(StrEnum):
    FINAL = "final"
    BEST = "best"


class OutputFormat(StrEnum):
    DIFFUSERS = "diffusers"
    SAFETENSORS = "safetensors"
    LORA = "lora"
    LORA_KOHYA = "lora-kohya"


#: the formats of a LoRA run's adapters
LORA_FORMATS = frozenset({OutputFormat.LORA, OutputFormat.LORA_KOHYA})


# ---------------------------------------------------------------------------------------
# Spec sections
# ---------------------------------------------------------------------------------------


class BaseModelSpec(ApiModel):
    """The Stable Diffusion model to fine-tune (a diffusers folder: SD 1.x/2.x or SDXL)."""

    uri: ModelUri = Field(
        description="Where the base model is: s3://bucket/prefix/ or pvc://claim/path holding a "
        "diffusers folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, "
        "scheduler/), or hf://org/name for a Hugging Face Hub repository."
    )
    revision: Revision | None = Field(
        None,
        description="Hub revision (branch, tag or commit) for hf:// models. Default: the one "
        "given as hf://org/name@revision, else main.",
    )
    family: ModelFamily = Field(
        ModelFamily.AUTO,
        description="The model's family: sd (Stable Diffusion 1.x/2.x), sdxl, sd3 (Stable "
        "Diffusion 3/3.5), or auto (read from its model_index.json when the trainer opens it). "
        "A family that does not match the folder fails the job with a message.",
    )
    quantization: Quantization = Field(
        Quantization.NONE,
        description="nf4: hold the frozen SD3 transformer of a LoRA run in 4-bit NF4 "
        "(bitsandbytes, GPUs only). Not supported yet: refused with a message.",
    )
    vae: ModelUri | None = Field(
        None,
        description="Another VAE to use in place of the model's vae/, e.g. the fp16-fix SDXL VAE: "
        "s3://, pvc:// or hf://org/name[@revision] of a folder holding an AutoencoderKL "
        "(config.json and diffusion_pytorch_model.safetensors, as AutoencoderKL.save_pretrained "
        "writes them). It encodes the photos, decodes samples and class images, and is the VAE "
        "of the exported model. Default: the base model's own.",
    )


class InstanceSpec(ApiModel):
    """The subject to teach: a few photos and the prompt that names it."""

    uri: DataUri = Field(
        description="Prefix holding the instance photos (png, jpg, jpeg, webp), e.g. "
        "s3://training-data/toy-cat/. A same-named .txt file next to a photo is its caption."
    )
    prompt: Prompt = Field(
        description="Prompt with the identifier of the subject, e.g. 'a photo of zwx toy cat'. "
        "The identifier need not be rare like 'sks'; natural words work."
    )
    use_captions: bool = Field(True, description="Use a photo's same-named .txt file as its prompt when present.")


class PriorSpec(ApiModel):
    """Prior preservation: also train on images of the subject's class so it is not forgotten."""

    enabled: bool | None = Field(
        None,
        description="Train with class images next to the instance photos. Essential for faces,"
        " little difference for objects." + describe("prior", "enabled"),
    )
    class_prompt: Prompt | None = Field(
        None,
        description="Prompt for the class, without the identifier, e.g. 'a photo of a cat'. "
        "Required when prior preservation is on." + describe("prior", "classPrompt"),
    )
    num_images: int | None = Field(
        None,
        ge=1,
        le=10000,
        description="How many class images to train with; missing ones are generated with the "
        "base model and cached." + describe("prior", "numImages"),
    )
    loss_weight: float = Field(1.0, ge=0.0, le=10.0, description="Weight of the class-image loss.")
    uri: DataUri | None = Field(
        None,
        description="Prefix holding your own class images. Default: generated by the base model "
        "and cached under s3://<output bucket>/.cache/class-images/.",
    )


class LoraSpec(ApiModel):
    """LoRA adapter settings (only with training.method lora)."""

    rank: int = Field(4, ge=1, le=256, description="Rank of the LoRA update matrices.")
    alpha: float | None = Field(None, gt=0, le=1024, description="LoRA scaling alpha. Default: the rank.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA layers.")
    target_modules: list[Annotated[str, Field(min_length=1, max_length=128)]] | None = Field(
        None,
        min_length=1,
        max_length=64,
        description="Denoiser module names (or name endings) that get adapters; a name with a "
        "block path, e.g. transformer_blocks.12.attn.to_q, adapts only that block. Default: the "
        "family's attention projections (SD 1.x/2.x, SDXL: to_q, to_k, to_v, to_out.0; SD3: "
        "those of both streams, attn.to_q/k/v, attn.to_out.0, attn.add_q/k/v_proj, "
        "attn.to_add_out).",
    )
    text_encoder: bool = Field(
        False,
        description="Also train LoRA adapters on the text encoder's attention (SD3: the "
        "two CLIP encoders; T5 never trains).",
    )


_TOKEN = say(r"^\S+$", "use one word without spaces, e.g. <zwx>")


class TextualInversionSpec(ApiModel):
    """Textual inversion before DreamBooth: first learn a new token's embedding, then fine-tune."""

    steps: int = Field(2000, ge=1, le=100000, description="Steps of the embedding-only phase.")
    placeholder_token: str = Field(
        min_length=1,
        max_length=64,
        pattern=_TOKEN,
        description="The new token, e.g. '<zwx>'; it must appear in instance.prompt.",
    )
    initializer_token: str = Field(
        min_length=1,
        max_length=64,
        pattern=_TOKEN,
        description="An existing single token the new embedding starts from, e.g. 'cat'.",
    )
    learning_rate: float = Field(5e-4, gt=0, le=1.0, description="Learning rate of the embedding-only phase.")


class FlowMatchingSpec(ApiModel):
    """Flow-matching training (SD3): how sigmas are drawn and the loss weighed."""

    weighting: Weighting = Field(
        Weighting.LOGIT_NORMAL,
        description="logit_normal (the SD3 paper's and diffusers' default), mode, cosmap or uniform.",
    )
    logit_mean: float = Field(0.0, ge=-10, le=10, description="Mean of logit_normal.")
    logit_std: float = Field(1.0, gt=0, le=10, description="Standard deviation of logit_normal.")
    mode_scale: float = Field(1.29, ge=0, le=10, description="Scale of mode.")
    precondition: bool = Field(
        True,
        description="Precondition the outputs as diffusers' SD3 scripts do by default (EDM): "
        "the same target, each sample's loss weighed by sigma squared.",
    )


class BucketsSpec(ApiModel):
    """Aspect-ratio buckets: each photo keeps (about) its shape instead of a square crop."""

    enabled: bool | None = Field(
        None,
        description="Train each photo in the bucket (height x width, about resolution^2 pixels, "
        "sides multiples of step between minSide and maxSide) nearest its aspect ratio: it is "
        "resized to cover the bucket and center-cropped, and every micro-batch comes from one "
        "bucket. Off: every photo is center-cropped to a square. Default: the family's (off for "
        "SD 1.x/2.x, on for SDXL, which was trained on buckets).",
    )
    min_side: int | None = Field(
        None,
        ge=8,
        le=4096,
        multiple_of=8,
        description="Shortest bucket side in pixels, a multiple of step. Default: half of "
        "training.resolution (rounded up to a multiple of step).",
    )
    max_side: int | None = Field(
        None,
        ge=8,
        le=4096,
        multiple_of=8,
        description="Longest bucket side in pixels, a multiple of step and at least "
        "training.resolution. Default: twice training.resolution.",
    )
    step: int = Field(
        64,
        ge=8,
        le=1024,
        multiple_of=8,
        description="Bucket sides are multiples of this many pixels; it must be a multiple of "
        "the model's downsampling (64 for SD 1.x/2.x and SDXL) and divide training.resolution.",
    )
    max_upscale: float = Field(
        2.0,
        ge=1.0,
        le=16.0,
        description="The most a photo may be enlarged to cover its bucket. A photo that would "
        "need more fails the job (BadData, naming it) instead of training blurred: 1 never "
        "enlarges. Class images are framed in whatever bucket a batch has.",
    )


class TrainingSpec(ApiModel):
    """How to fine-tune. Prefer a low learning rate and more steps: DreamBooth overfits fast."""

    steps: int | None = Field(None, ge=1, le=1_000_000, description="Optimizer steps." + describe("training", "steps"))
    learning_rate: float | None = Field(
        None,
        gt=0,
        le=1e-2,
        description="Peak learning rate." + describe("training", "learningRate"),
    )
    text_encoder_learning_rate: float | None = Field(
        None,
        gt=0,
        le=1e-2,
        description="Learning rate of the text encoder. Default: training.learningRate.",
    )
    batch_size: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="Images per optimizer step over all GPUs and accumulation steps; each "
        "GPU processes batchSize / (processes x gradientAccumulationSteps) at a time."
        + describe("training", "batchSize"),
    )
    gradient_accumulation_steps: int = Field(
        1, ge=1, le=128, description="Micro-batches accumulated per optimizer step (saves memory)."
    )
    resolution: int | None = Field(
        None,
        ge=64,
        le=2048,
        multiple_of=8,
        description="Training image size in pixels: photos are resized and center-cropped to "
        "this square, or with training.buckets to a bucket of about this many pixels squared. "
        "Default: the family's (512 for SD 1.x/2.x; use 768 for SD 2.x 768-v; 1024 for SDXL "
        "and SD3).",
    )
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seed for initialisation, data and noise.")
    method: Method | None = Field(
        None,
        description="full: fine-tune the weights; lora: train small adapters. Default: "
        "the family's (full for SD 1.x/2.x, lora for SDXL and SD3).",
    )
    lora: LoraSpec | None = Field(None, description="LoRA settings (method lora only).")
    train_text_encoder: bool | None = Field(
        None,
        description="Fine-tune the text encoder with the UNet: the best results by far, "
        "especially for faces, at the cost of memory." + describe("training", "trainTextEncoder"),
    )
    text_encoder_steps: int | None = Field(
        None,
        ge=1,
        le=1_000_000,
        description="Freeze the text encoder after this many steps. Default: train it for all steps.",
    )
    lr_scheduler: LRScheduler = Field(LRScheduler.CONSTANT, description="Learning-rate schedule.")
    lr_warmup_steps: int = Field(0, ge=0, le=1_000_000, description="Warmup steps of the learning-rate schedule.")
    max_grad_norm: float = Field(1.0, gt=0, le=1000, description="Gradient clipping norm.")
    mixed_precision: MixedPrecision = Field(
        MixedPrecision.NO,
        description="no, fp16 or bf16 (bf16 on A100/H100). Mixed precision needs GPUs.",
    )
    optimizer: Optimizer = Field(
        Optimizer.ADAMW,
        description="adamw, or adamw8bit (bitsandbytes) to fit text-encoder training in 16 GB.",
    )
    weight_decay: float = Field(1e-2, ge=0, le=1, description="AdamW weight decay.")
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in the backward pass: less memory, slower."
    )
    ema: bool = Field(
        False,
        description="Keep an exponential moving average of the trained weights and export it "
        "(the blog saw similar results with and without).",
    )
    snr_gamma: float | None = Field(
        None, gt=0, le=100, description="Min-SNR loss weighting gamma (5.0 is common). Default: off."
    )
    noise_offset: float = Field(
        0.0, ge=0, le=1, description="Offset noise strength (0.05-0.1 helps very dark/bright images)."
    )
    buckets: BucketsSpec | None = Field(
        None, description="Aspect-ratio buckets. Default: the family's (off for SD 1.x/2.x, on for SDXL)."
    )
    random_flip: bool = Field(
        False,
        description="Mirror each sample left-right with probability 1/2 (drawn from the seed and "
        "the sample's position, so resume and several GPUs see the same flips). Doubles the "
        "cached latents; avoid for subjects whose sides differ (text, logos).",
    )
    max_sequence_length: int | None = Field(
        None,
        ge=1,
        le=512,
        description="SD3: tokens of the prompt that T5 reads (at most 512). Default: 77 (diffusers' SD3 scripts).",
    )
    t5: T5Mode | None = Field(
        None,
        description="SD3: keep the T5 text encoder, or drop it (its part of the prompt "
        "becomes zeros, as StableDiffusion3Pipeline does with text_encoder_3=None): the "
        "documented way to fit smaller GPUs. Default: keep.",
    )
    flow_matching: FlowMatchingSpec | None = Field(
        None, description="SD3: sigma sampling and loss weighting. Default: logit_normal, preconditioned."
    )
    textual_inversion: TextualInversionSpec | None = Field(
        None,
        description="Run textual inversion first (the blog's TI + DreamBooth recipe, good for "
        "16 GB GPUs). Default: off.",
    )


class ValidationSpec(ApiModel):
    """Sample images during training: the way a person judges a DreamBooth run."""

    enabled: bool = Field(True, description="Generate sample grids during and after training.")
    prompts: list[Prompt] = Field(
        default_factory=list,
        max_length=16,
        description="Prompts to sample (rows of the grid). Default: instance.prompt.",
    )
    negative_prompt: str | None = Field(
        None, max_length=1000, pattern=anchored(k8s.TEXT), description="Negative prompt."
    )
    every_steps: int | None = Field(
        None,
        ge=1,
        le=1_000_000,
        description="Sample every this many steps. Default: checkpointing.everySteps.",
    )
    scheduler: Sampler | None = Field(
        None,
        description="Sampling scheduler. Default: the family's (SD 1.x/2.x: ddim, which beat PNDM "
        "and LMS clearly on overfit models; SDXL: euler, the scheduler it ships with; SD3: "
        "flow_euler, its flow-matching Euler scheduler, the only one it takes).",
    )
    compare_schedulers: list[Sampler] = Field(
        default_factory=list,
        max_length=6,
        description="Also sample each round with these schedulers, from the same weights and seeds: "
        "samples/step-<step>-<scheduler>.png next to the main grid (a sweep's validation.scheduler "
        "axis sets it). Evaluation judges the main scheduler's samples only.",
    )
    inference_steps: int | None = Field(
        None,
        ge=1,
        le=1000,
        description="Inference steps per image. Default: the family's (SD "
        "1.x/2.x: 100, which worked well with DDIM; SDXL: 25, diffusers' SDXL DreamBooth example; "
        "SD3: 28, StableDiffusion3Pipeline's).",
    )
    images_per_prompt: int = Field(4, ge=1, le=16, description="Images per prompt (grid columns).")
    guidance_scale: float = Field(7.5, ge=0, le=50, description="Classifier-free guidance scale.")


class EvaluatorSpec(ApiModel):
    """The CLIP model that judges the samples."""

    uri: ModelUri | None = Field(
        None,
        description="A CLIPModel folder (config.json, model.safetensors, tokenizer and "
        "preprocessor_config.json side by side, as CLIPModel.save_pretrained and "
        "CLIPProcessor.save_pretrained write them), e.g. a saved openai/clip-vit-large-patch14: "
        "s3://, pvc:// or hf://, fetched like the base model. Default: the CLIP vision tower of "
        "the base model's safety_checker/ (SD 1.x snapshots ship one), which measures image-image "
        "similarities only (no prompt fidelity).",
    )
    revision: Revision | None = Field(
        None, description="Hub revision for an hf:// evaluator. Default: the one in the URI, else main."
    )


class EvaluationThresholds(ApiModel):
    """When a sample round counts as a sign of over- or underfitting (docs/evaluation.md)."""

    memorization: float = Field(
        0.95,
        gt=0,
        le=1.0,
        description="Overfitting (reason Memorization) when the mean over prompts of each prompt's "
        "highest similarity of a sample to a training photo reaches this: every prompt "
        "reproduces the photos.",
    )
    diversity_collapse: float = Field(
        0.95,
        gt=0,
        le=1.0,
        description="Overfitting (reason DiversityCollapse) when the mean pairwise similarity of a "
        "prompt's samples, averaged over prompts, reaches this: the samples are all the same "
        "(needs validation.imagesPerPrompt >= 2).",
    )
    prior_loss_drift: float = Field(
        0.5,
        gt=0,
        le=100,
        description="Overfitting (reason PriorLossDrift) when the class-image loss since the last "
        "round is this fraction above its value in the first round (0.5: 50% higher), with prior "
        "preservation on: the model forgets its class.",
    )
    underfitting_share: float = Field(
        0.5,
        gt=0,
        le=1.0,
        description="Underfitting is judged once this share of the steps is done.",
    )
    underfitting_margin: float = Field(
        0.02,
        ge=0,
        le=1.0,
        description="Underfitting (reason SubjectNotLearned) when subject fidelity is at most this "
        "much above the base model's (measured before the first step).",
    )


class EvaluationSpec(ApiModel):
    """Judge each sample round with a CLIP model: subject fidelity, prompt fidelity,
    memorization, diversity and prior-loss drift (docs/evaluation.md)."""

    enabled: bool = Field(
        False,
        description="Evaluate every sample round (needs validation.enabled). Off by default: the "
        "evaluator is a model the job must name (model.uri) or the base model must ship "
        "(safety_checker/).",
    )
    model: EvaluatorSpec = Field(default_factory=EvaluatorSpec, description="The CLIP evaluator.")
    thresholds: EvaluationThresholds = Field(
        default_factory=EvaluationThresholds, description="Over- and underfitting signs."
    )


class CheckpointingSpec(ApiModel):
    """Checkpoints make a killed or preempted run resume where it left off."""

    every_steps: int | None = Field(
        None,
        ge=1,
        le=1_000_000,
        description="Checkpoint every this many steps: at most this much work is lost when a "
        "pod dies. Default: 100, or the number of steps if fewer.",
    )
    keep: int = Field(3, ge=1, le=100, description="Complete checkpoints to keep (older ones are pruned).")


class OutputSpec(ApiModel):
    """Where the results go and in which formats."""

    uri: DataUri | None = Field(
        None,
        description="Prefix for checkpoints, samples and the final model. Default: "
        "s3://<operator's default bucket>/<namespace>/<name>/.",
    )
    formats: list[OutputFormat] | None = Field(
        None,
        min_length=1,
        max_length=4,
        description="diffusers (a folder for StableDiffusionPipeline.from_pretrained), "
        "safetensors (one file in the original layout: AUTOMATIC1111, ComfyUI), lora "
        "(lora/pytorch_lora_weights.safetensors for diffusers' load_lora_weights), lora-kohya "
        "(lora/<name>_kohya.safetensors, the kohya/WebUI LoRA format: AUTOMATIC1111, Forge, "
        "ComfyUI). Default: diffusers and safetensors for method full, lora for method lora.",
    )
    export: ExportChoice = Field(
        ExportChoice.FINAL,
        description="final: export the model of the last step; best: the checkpoint with the best "
        "evaluation score (status.outputs.bestCheckpoint; needs evaluation.enabled). The best "
        "checkpoint is never pruned.",
    )


class SecretKeyRef(ApiModel):
    """A Secret in the job's namespace holding S3 credentials."""

    name: Name = Field(description="Name of the Secret.")
    access_key_key: SecretKey = Field("AWS_ACCESS_KEY_ID", description="Key of the access key.")
    secret_key_key: SecretKey = Field("AWS_SECRET_ACCESS_KEY", description="Key of the secret key.")


class StorageSpec(ApiModel):
    """The S3/MinIO endpoint for every s3:// URI of the job."""

    endpoint: str | None = Field(
        None,
        max_length=253,
        pattern=anchored(k8s.ENDPOINT),
        description="host[:port] of the S3 API, e.g. minio.minio.svc:9000. Default: the operator's.",
    )
    secure: bool | None = Field(None, description="Use TLS. Default: the operator's (true).")
    region: str = Field("us-east-1", min_length=1, max_length=64, description="S3 region.")
    credentials_secret: SecretKeyRef | None = Field(
        None,
        description="Secret with the access and secret key. Default: the operator's. "
        "Credentials are never put in a spec.",
    )


class Toleration(ApiModel):
    """A Kubernetes toleration (as in a Pod spec)."""

    key: str | None = Field(
        None,
        max_length=253,
        pattern=anchored(k8s.optional(k8s.QUALIFIED_NAME)),
        description="Taint key (a label key); empty matches all, with operator Exists.",
    )
    operator: str = Field(
        "Equal",
        pattern=say("^(Equal|Exists)$", "use Equal or Exists"),
        description="Equal or Exists (which takes no value).",
    )
    value: str | None = Field(
        None,
        max_length=k8s.LABEL_VALUE_MAX,
        pattern=anchored(k8s.LABEL_VALUE),
        description="Taint value (a label value) for Equal.",
    )
    effect: str | None = Field(
        None,
        pattern=say(
            "^(NoSchedule|PreferNoSchedule|NoExecute)$",
            "use NoSchedule, PreferNoSchedule or NoExecute, or leave it out to match all",
        ),
        description="NoSchedule, PreferNoSchedule or NoExecute; empty matches all.",
    )
    toleration_seconds: int | None = Field(
        None,
        ge=0,
        le=2**31 - 1,
        description="How long a NoExecute taint is tolerated (only with effect NoExecute).",
    )


class GpuSpec(ApiModel):
    resource_name: str = Field(
        "nvidia.com/gpu",
        max_length=253,
        pattern=say(
            r"^[a-z0-9.-]+/[a-z0-9._-]+$",
            "use <domain>/<name> in lowercase as the device "
            "plugin advertises it, e.g. nvidia.com/gpu or nvidia.com/mig-3g.20gb",
        ),
        description="Extended resource name of the GPU (nvidia.com/gpu, amd.com/gpu, or a MIG "
        "profile such as nvidia.com/mig-3g.20gb). A MIG slice is one CUDA device: with a MIG "
        "profile, gpusPerNode must be 1.",
    )


class EnvVar(ApiModel):
    """An environment variable of the trainer container, with a literal value."""

    name: str = Field(
        min_length=1,
        max_length=ENV_NAME_MAX,
        pattern=say(
            ENV_NAME_PATTERN, "use letters, digits and '_', not starting with a digit (e.g. NCCL_SOCKET_IFNAME)"
        ),
        description="Variable name, e.g. NCCL_SOCKET_IFNAME. Names the operator, the launcher "
        "or the device plugin set (DREAMBOOTH_*, AWS_*, PYTHON*, HOME, HF_HOME, RANK, "
        "CUDA_VISIBLE_DEVICES, NVIDIA_*, ...) and names that look like credentials are refused.",
    )
    value: str = Field(
        "",
        max_length=ENV_VALUE_MAX,
        description="Literal value ($(VAR) is not expanded). Never a credential: those reach "
        "the pods only from Secrets.",
    )


class ResourcesSpec(ApiModel):
    """Where and on what the trainer pods run."""

    nodes: int = Field(1, ge=1, le=64, description="Trainer pods (one per node).")
    gpus_per_node: int = Field(
        1, ge=0, le=16, description="GPUs per pod; one training process per GPU (0: one CPU process)."
    )
    gpu: GpuSpec = Field(default_factory=GpuSpec, description="GPU resource settings.")
    cpu: Quantity | None = Field(None, description="CPU request and limit per pod, e.g. '8'.")
    memory: Quantity | None = Field(None, description="Memory request and limit per pod, e.g. '64Gi'.")
    shared_memory: Quantity = Field(
        "8Gi", description="Size of /dev/shm (data loaders and NCCL need more than the default)."
    )
    node_selector: dict[LabelKey, LabelValue] = Field(
        default_factory=dict,
        max_length=32,
        description="Node labels the pods must match (label keys and values).",
    )
    tolerations: list[Toleration] = Field(
        default_factory=list, max_length=32, description="Tolerations for tainted GPU nodes."
    )
    image: str | None = Field(
        None,
        max_length=k8s.IMAGE_MAX,
        pattern=anchored(k8s.IMAGE),
        description="Trainer image reference ([registry[:port]/]path[:tag][@digest]). Default: the operator's.",
    )
    priority_class_name: Name | None = Field(None, description="PriorityClass of the pods.")
    env: list[EnvVar] = Field(
        default_factory=list,
        max_length=64,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
        description="Environment variables of the trainer containers, literal values only, "
        "e.g. NCCL_SOCKET_IFNAME, NCCL_IB_HCA, NCCL_DEBUG=INFO. Each wins over the operator's "
        "default of the same name (the chart's trainer.env).",
    )
    extra_resources: dict[str, Quantity] = Field(
        default_factory=dict,
        max_length=16,
        description="Extended resources each pod requests (requests = limits, as for the GPU), "
        "e.g. rdma/rdma_shared_device_a: '1' for RDMA, or hugepages-2Mi: 1Gi. Each wins over "
        "the operator's default of the same name (the chart's trainer.extraResources); '0' drops "
        "a default. cpu, memory and the GPU have their own fields.",
    )

    @property
    def num_processes(self) -> int:
        return self.nodes * max(1, self.gpus_per_node)


class RunPolicySpec(ApiModel):
    """Lifecycle of the run; only suspend may change once the job exists."""

    suspend: bool = Field(
        False,
        description="Stop the pods and keep the checkpoints; set back to false to resume (Kueue uses this).",
    )
    backoff_limit: int = Field(3, ge=0, le=100, description="Pod failures retried (each resumes from a checkpoint).")
    active_deadline_seconds: int | None = Field(
        None, ge=1, le=2**31 - 1, description="Fail the job after this many seconds. Default: none."
    )
    ttl_seconds_after_finished: int | None = Field(
        None,
        ge=0,
        le=2**31 - 1,
        description="Delete the finished job after this many seconds. Default: keep it.",
    )
    rendezvous_timeout_seconds: int = Field(
        1800,
        ge=1,
        le=86400,
        description="How long the pods of a multi-node job wait for each other to start "
        "(scheduling, image pulls) before the attempt fails and all pods restart together. "
        "Longer than the slowest image pull on a fresh node.",
    )
    collective_timeout_seconds: int = Field(
        1800,
        ge=1,
        le=86400,
        description="How long a training process waits for the others in a collective "
        "operation (NCCL on GPUs, gloo on CPUs) before the run fails and is retried. NCCL's "
        "own default is 10 minutes; keep this well above the slowest step.",
    )


class DreamBoothJobSpec(ApiModel):
    """A DreamBooth fine-tuning run: base model + a few photos + prompt -> a new model."""

    preset: Preset = Field(
        Preset.CUSTOM,
        description="Recommended settings: object (400 steps, LR 2e-6, batch 4), face (1,200 "
        "steps, LR 1e-6, batch 2, prior preservation, text encoder), style, or custom. "
        "Fields you set always win.",
    )
    base_model: BaseModelSpec = Field(description="The model to fine-tune.")
    instance: InstanceSpec = Field(description="The subject's photos and prompt.")
    prior: PriorSpec = Field(default_factory=PriorSpec, description="Prior preservation.")
    training: TrainingSpec = Field(default_factory=TrainingSpec, description="Training settings.")
    validation: ValidationSpec = Field(default_factory=ValidationSpec, description="Sample grids during training.")
    evaluation: EvaluationSpec = Field(
        default_factory=EvaluationSpec, description="Judge the sample rounds (over- and underfitting)."
    )
    checkpointing: CheckpointingSpec = Field(default_factory=CheckpointingSpec, description="Checkpoints for resuming.")
    output: OutputSpec = Field(default_factory=OutputSpec, description="Results.")
    storage: StorageSpec = Field(default_factory=StorageSpec, description="S3/MinIO access.")
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec, description="Pods, GPUs and scheduling.")
    run_policy: RunPolicySpec = Field(
        default_factory=RunPolicySpec, description="Suspend, retries, deadlines, cleanup."
    )
