"""The evaluator of sample rounds (``spec.evaluation``): a CLIP model, the rounds judged so
far, and what each round publishes (``evaluation.jsonl``, metrics, the termination summary).

The CLIP model is a ``CLIPModel`` folder (``evaluation.model.uri``) or, failing that, the
vision tower and projection of the base model's ``safety_checker/`` (a
``StableDiffusionSafetyChecker``, which SD 1.x snapshots ship): image-image figures only.
Only the main process holds it; the figures are :mod:`dreambooth.trainer.evaluation`'s.

Resume: the records travel inside each checkpoint (``evaluation.jsonl`` in its folder); a
resumed run starts from the checkpoint's records and rewrites the job's ``evaluation.jsonl``
from them, so a round is never listed twice and rounds after the checkpoint (whose weights
were lost) are dropped until drawn again.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from dreambooth.api import evaluation as judged
from dreambooth.api.evaluation import Record, Sign
from dreambooth.api.spec import EvaluationThresholds
from dreambooth.api.status import CheckpointRef, Evaluation
from dreambooth.trainer.errors import ModelError
from dreambooth.trainer.evaluation import PromptSamples, measure

log = logging.getLogger("dreambooth.trainer")

SAFETY_CHECKER = "safety_checker"
FEATURE_EXTRACTOR = "feature_extractor"


class Evaluator:
    """Image (and, with a full CLIP, text) embeddings."""

    def __init__(
        self,
        vision,
        projection,
        processor,
        *,
        device,
        text=None,
        text_projection=None,
        tokenizer=None,
        source: str = "",
    ) -> None:
        self.vision, self.projection, self.processor = vision.to(device).eval(), projection.to(device), processor
        self.text = text.to(device).eval() if text is not None else None
        self.text_projection = text_projection.to(device) if text_projection is not None else None
        self.tokenizer, self.device, self.source = tokenizer, device, source

    @classmethod
    def from_clip(cls, folder: Path, source: str, device) -> Evaluator:
        """A ``CLIPModel`` folder: both towers."""
        from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

        try:
            model = CLIPModel.from_pretrained(folder)
            processor = CLIPImageProcessor.from_pretrained(folder)
            tokenizer = CLIPTokenizer.from_pretrained(folder)
        except (OSError, ValueError, KeyError) as err:
            raise ModelError(
                f"evaluation.model.uri {source} is not a CLIPModel folder with its tokenizer "
                f"and preprocessor_config.json ({err}); save one with CLIPModel.save_pretrained "
                "and CLIPProcessor.save_pretrained"
            ) from None
        return cls(
            model.vision_model,
            model.visual_projection,
            processor,
            device=device,
            text=model.text_model,
            text_projection=model.text_projection,
            tokenizer=tokenizer,
            source=source,
        )

    @classmethod
    def from_safety_checker(cls, model: Path, source: str, device) -> Evaluator:
        """The base model's ``safety_checker/``: CLIP's vision tower, no text tower."""
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
        from transformers import CLIPImageProcessor

        try:
            checker = StableDiffusionSafetyChecker.from_pretrained(model / SAFETY_CHECKER)
            processor = CLIPImageProcessor.from_pretrained(model / FEATURE_EXTRACTOR)
        except (OSError, ValueError, KeyError) as err:
            raise ModelError(
                f"{source}: its safety_checker/ and feature_extractor/ cannot serve as the "
                f"evaluator ({err}); set evaluation.model.uri to a CLIPModel folder"
            ) from None
        return cls(
            checker.vision_model,
            checker.visual_projection,
            processor,
            device=device,
            source=f"{source} ({SAFETY_CHECKER}/)",
        )

    @property
    def has_text(self) -> bool:
        return self.text is not None

    @torch.no_grad()
    def images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        pixels = self.processor(images=[i.convert("RGB") for i in images], return_tensors="pt").pixel_values
        pooled = self.vision(pixel_values=pixels.to(self.device)).pooler_output
        return self.projection(pooled).float().cpu()

    @torch.no_grad()
    def texts(self, prompts: Sequence[str]) -> torch.Tensor | None:
        if self.text is None:
            return None
        ids = self.tokenizer(
            list(prompts),
            padding="max_length",
            truncation=True,
            return_tensors="pt",
            max_length=self.tokenizer.model_max_length,
        ).input_ids.to(self.device)
        return self.text_projection(self.text(input_ids=ids).pooler_output).float().cpu()


def has_safety_checker(model: Path) -> bool:
    return (model / SAFETY_CHECKER / "config.json").is_file() and (model / FEATURE_EXTRACTOR).is_dir()


def pixels_to_image(pixels: torch.Tensor) -> Image.Image:
    """A training example's pixels ([-1, 1], CHW) as the photo the trainer sees."""
    array = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)


class Rounds:
    """The rounds judged so far, and the class-image losses since the last one."""

    def __init__(self, thresholds: EvaluationThresholds, total_steps: int) -> None:
        self.thresholds, self.total_steps = thresholds, total_steps
        self.records: list[Record] = []
        self._prior: list[float] = []

    def add_losses(self, values: dict[str, float]) -> None:
        if "prior_loss" in values and math.isfinite(values["prior_loss"]):
            self._prior.append(float(values["prior_loss"]))

    @property
    def base(self) -> Record | None:
        return next((r for r in self.records if r.base), None)

    @property
    def first_prior_loss(self) -> float | None:
        return next((r.prior_loss for r in self.records if not r.base and r.prior_loss is not None), None)

    def judge(self, record: Record, checkpoint: str | None) -> Record:
        """``record`` with its checkpoint, signs and score, kept (replacing one of the same step)."""
        signs = [] if record.base else judged.overfitting_signs(record, self.thresholds)
        base = self.base
        if not record.base and judged.underfitting(
            record, base.subject_fidelity if base else None, self.total_steps, self.thresholds
        ):
            signs.append(Sign.SUBJECT_NOT_LEARNED)
        record = record.model_copy(update={"checkpoint": checkpoint, "signs": signs, "score": judged.score(record)})
        self.records = sorted([r for r in self.records if r.step != record.step] + [record], key=lambda r: r.step)
        return record

    def take_prior_loss(self) -> float | None:
        losses, self._prior = self._prior, []
        return sum(losses) / len(losses) if losses else None

    def best(self) -> Record | None:
        return judged.best(self.records)

    def latest(self) -> Record | None:
        return self.records[-1] if self.records and not self.records[-1].base else None

    def jsonl(self) -> bytes:
        return "".join(r.model_dump_json(by_alias=True, exclude_none=True) + "\n" for r in self.records).encode()

    def load(self, path: Path) -> None:
        """The records a checkpoint holds (none when it was written without evaluation)."""
        self.records = []
        if path.is_file():
            lines = path.read_text().splitlines()
            self.records = [Record.model_validate_json(line) for line in lines if line.strip()]

    def status(self, uri_of) -> Evaluation | None:
        """The latest figures and the best checkpoint, as ``status.evaluation`` shows them
        (``uri_of``: a key of the job's prefix -> its URI)."""
        latest = self.latest()
        if latest is None:
            return None
        best, base = self.best(), self.base
        return Evaluation(
            step=latest.step,
            subject_fidelity=latest.subject_fidelity,
            prompt_fidelity=latest.prompt_fidelity,
            memorization=latest.memorization,
            sample_similarity=latest.sample_similarity,
            prior_loss_drift=latest.prior_loss_drift,
            score=latest.score,
            base_subject_fidelity=base.subject_fidelity if base else None,
            best_checkpoint=CheckpointRef(step=best.step, uri=uri_of(best.checkpoint)) if best else None,
        )


class Judge:
    """The main process's evaluator: embeds the photos and prompts once, then each round."""

    def __init__(
        self, evaluator: Evaluator, photos: Sequence[Image.Image], prompts: Sequence[str], rounds: Rounds
    ) -> None:
        self.evaluator, self.prompts, self.rounds = evaluator, list(prompts), rounds
        self.photos = evaluator.images(photos)
        self.text = evaluator.texts(self.prompts)
        log.info(
            "evaluating sample rounds with %s%s",
            evaluator.source,
            "" if evaluator.has_text else " (image-image figures only)",
        )

    def round(
        self, step: int, rows: Sequence[Sequence[Image.Image]], checkpoint: str | None, *, base: bool = False
    ) -> Record:
        samples = [
            PromptSamples(p, self.evaluator.images(images), None if self.text is None else self.text[i])
            for i, (p, images) in enumerate(zip(self.prompts, rows, strict=True))
        ]
        prior = None if base else self.rounds.take_prior_loss()
        record = measure(
            step, samples, self.photos, prior_loss=prior, first_prior_loss=self.rounds.first_prior_loss, base=base
        )
        record = self.rounds.judge(record, checkpoint)
        log.info(
            "evaluation step %d: subject fidelity %.3f%s, memorization %.3f%s",
            step,
            record.subject_fidelity,
            f", prompt fidelity {record.prompt_fidelity:.3f}" if record.prompt_fidelity is not None else "",
            record.memorization,
            f"; signs: {', '.join(record.signs)}" if record.signs else "",
        )
        return record
