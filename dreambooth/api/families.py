"""What the API knows of each model family, so that a job naming its family
(``baseModel.family``) is checked before it runs; a job with ``auto`` is checked by the same
rules once the trainer has opened the model (dreambooth/trainer/families)."""

from __future__ import annotations

from dataclasses import dataclass

from dreambooth.api.presets import ModelFamily
from dreambooth.api.spec import OutputFormat, Sampler

#: the diffusion samplers (DDPM-trained families take any of them)
DIFFUSION_SAMPLERS = frozenset(Sampler) - {Sampler.FLOW_EULER}
UNET_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
#: both streams of every MMDiT block (diffusers' train_dreambooth_lora_sd3.py default)
SD3_LORA_TARGETS = (
    "attn.add_k_proj",
    "attn.add_q_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "attn.to_k",
    "attn.to_out.0",
    "attn.to_q",
    "attn.to_v",
)


@dataclass(frozen=True)
class FamilyFacts:
    title: str
    #: the output formats the trainer can write for this family
    formats: frozenset[OutputFormat]
    textual_inversion: bool
    #: the smallest training.resolution the family is trained for (below it, samples are noise)
    min_resolution: int
    #: the shortest side of an aspect-ratio bucket (training.buckets.minSide); the trainer also
    #: needs sides on the model's downsampling (64 pixels for real SD and SDXL weights)
    min_bucket_side: int
    #: validation samplers that fit how the family was trained; class images use ``class_sampler``
    samplers: frozenset[Sampler] = DIFFUSION_SAMPLERS
    class_sampler: Sampler = Sampler.DDIM
    #: trained with flow matching (takes training.flowMatching; not Min-SNR weighting)
    flow_matching: bool = False
    #: has a T5 text encoder (takes training.t5 and training.maxSequenceLength)
    t5: bool = False
    #: its text encoders can be fine-tuned whole (training.trainTextEncoder)
    full_text_encoder: bool = True
    lora_targets: tuple[str, ...] = UNET_LORA_TARGETS


FACTS: dict[ModelFamily, FamilyFacts] = {
    ModelFamily.SD: FamilyFacts(
        "Stable Diffusion 1.x/2.x",
        frozenset(OutputFormat),
        textual_inversion=True,
        min_resolution=64,
        min_bucket_side=32,
    ),
    ModelFamily.SDXL: FamilyFacts(
        "Stable Diffusion XL", frozenset(OutputFormat), textual_inversion=False, min_resolution=64, min_bucket_side=32
    ),
    ModelFamily.SD3: FamilyFacts(
        "Stable Diffusion 3",
        frozenset({OutputFormat.DIFFUSERS, OutputFormat.LORA, OutputFormat.LORA_KOHYA}),
        textual_inversion=False,
        min_resolution=64,
        min_bucket_side=32,
        samplers=frozenset({Sampler.FLOW_EULER}),
        class_sampler=Sampler.FLOW_EULER,
        flow_matching=True,
        t5=True,
        full_text_encoder=False,
        lora_targets=SD3_LORA_TARGETS,
    ),
}
