"""CEL over a DreamBoothJob spec: the expressions the CRD's rules are written with (a
field read with its preset's default, the run's method, prior preservation, text-encoder
training) and what a named model family cannot take, mirroring dreambooth.api.rules
(the CRD in dreambooth.api.crd attaches them; tests/api/test_crd.py checks that CEL and the
python rules agree)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from dreambooth.api.families import FACTS
from dreambooth.api.presets import ModelFamily, Preset, preset_value
from dreambooth.api.spec import LORA_FORMATS, OutputFormat, Quantization, T5Mode


def cel_string(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def preset_gives(section: str, field: str, test=bool) -> str:
    """CEL: the job's preset, for the job's family, gives ``section.field`` a value that
    passes ``test`` (an unnamed family, ``auto``, gets SD 1.x/2.x defaults, as in
    dreambooth.api.resolve.family_of)."""

    def among(family: ModelFamily) -> str:
        presets = [p.value for p in Preset if test(preset_value(p, section, field, family))]
        if len(presets) == len(Preset):
            return "true"
        return f"self.preset in [{', '.join(map(cel_string, presets))}]" if presets else "false"

    default = among(ModelFamily.SD)
    own = {f: among(f) for f in ModelFamily if f not in (ModelFamily.AUTO, ModelFamily.SD)}
    own = {f: test_ for f, test_ in own.items() if test_ != default}
    if not own:
        return default
    others = ", ".join(cel_string(f.value) for f in own)
    cases = [
        (f"!(self.baseModel.family in [{others}])", default),
        *((f"self.baseModel.family == {cel_string(f.value)}", test_) for f, test_ in own.items()),
    ]
    terms = [family + ("" if test_ == "true" else f" && {test_}") for family, test_ in cases if test_ != "false"]
    return "(" + " || ".join(f"({t})" for t in terms) + ")" if terms else "false"


def effective(path: str, section: str, field: str, value: str = "true") -> str:
    """CEL: the effective ``path`` (a spec field read with the preset's default) equals
    ``value``."""
    wire = f"self.{path}"
    return (
        f"(has({wire}) ? {wire}{'' if value == 'true' else ' == ' + value} : "
        f"{preset_gives(section, field, lambda v: cel_value(v) == value)})"
    )


def cel_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return cel_string(value) if isinstance(value, str) else repr(value)


#: CEL: the run trains LoRA adapters / with prior preservation / the text encoder
LORA = effective("training.method", "training", "method", "'lora'")
PRIOR = effective("prior.enabled", "prior", "enabled")
TEXT_ENCODER = (
    f"(has(self.training.trainTextEncoder) ? self.training.trainTextEncoder : "
    f"(!{LORA} && {preset_gives('training', 'trainTextEncoder')}))"
)
FORMATS = "self.output.formats"
LORA_FORMATS_CEL = ", ".join(cel_string(f.value) for f in sorted(LORA_FORMATS))


def _named(family: ModelFamily) -> str:
    """CEL: the job names ``family`` (``auto`` jobs are checked by the trainer, which finds
    the family in the model)."""
    return f"self.baseModel.family == {cel_string(family.value)}"


def family_rules() -> Iterator[tuple[str, str]]:
    """What a named family cannot take (dreambooth.api.rules.family_violations), as CEL
    (rule, message) pairs."""
    nf4 = f"has(self.baseModel.quantization) && self.baseModel.quantization == {cel_string(Quantization.NF4.value)}"
    for family, facts in FACTS.items():
        named, title = _named(family), facts.title
        if facts.formats != frozenset(OutputFormat):
            formats = ", ".join(cel_string(f.value) for f in sorted(facts.formats))
            allowed = ", ".join(sorted(f.value for f in facts.formats))
            yield (
                f"!({named}) || !has({FORMATS}) || {FORMATS}.all(f, f in [{formats}])",
                f"output.formats: {title} models can be written as {allowed} only",
            )
        if not facts.textual_inversion:
            yield (
                f"!({named}) || !has(self.training.textualInversion)",
                f"training.textualInversion is not supported for {title} models",
            )
        if not facts.t5:
            for field in ("t5", "maxSequenceLength"):
                yield (
                    f"!({named}) || !has(self.training.{field})",
                    f"training.{field} only applies to models with a T5 text encoder (SD3); {title} has none",
                )
        if not facts.flow_matching:
            yield (
                f"!({named}) || !has(self.training.flowMatching)",
                f"training.flowMatching only applies to flow-matching models (SD3); {title} trains with DDPM noise",
            )
            yield (
                f"!({named} && {nf4})",
                f"baseModel.quantization: nf4 is offered for SD3's transformer only, not for {title} models",
            )
        else:
            yield (
                f"!({named}) || !has(self.training.snrGamma) || self.training.snrGamma == 0.0",
                f"training.snrGamma: Min-SNR weighting is for DDPM models; {title} trains with flow matching",
            )
            yield (
                f"!({named} && {nf4}) || self.resources.gpusPerNode >= 1",
                "baseModel.quantization: nf4 (bitsandbytes 4-bit) needs GPUs (resources.gpusPerNode >= 1)",
            )
            yield (
                f"!({named} && {nf4}) || {LORA}",
                (
                    "baseModel.quantization: nf4 quantizes the frozen transformer of a LoRA run: use "
                    "training.method: lora, or quantization: none for a full fine-tune"
                ),
            )
            yield (
                f"!({named} && {nf4} && self.resources.gpusPerNode >= 1 && {LORA})",
                "baseModel.quantization: nf4 is not supported yet: use quantization: none",
            )
        if not facts.full_text_encoder:
            yield (
                f"!({named}) || !{TEXT_ENCODER}",
                (
                    f"training.trainTextEncoder: {title}'s text encoders are not fine-tuned whole here: use "
                    "training.method: lora with training.lora.textEncoder: true"
                ),
            )
        if facts.samplers:
            samplers = ", ".join(cel_string(s.value) for s in sorted(facts.samplers))
            yield (
                (f"!({named}) || !has(self.validation.scheduler) || self.validation.scheduler in [{samplers}]"),
                f"validation.scheduler does not sample {title} models: use "
                + ", ".join(sorted(s.value for s in facts.samplers)),
            )
    yield (
        (
            f"!(has(self.training.maxSequenceLength) && has(self.training.t5) && "
            f"self.training.t5 == {cel_string(T5Mode.DROP.value)})"
        ),
        (
            "training.maxSequenceLength is the prompt length T5 reads, and training.t5 is drop: "
            "remove maxSequenceLength, or keep T5"
        ),
    )
