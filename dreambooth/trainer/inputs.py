"""The inputs of a training run (steps 2-3 of :mod:`dreambooth.trainer.run`): the storage
settings, the base model (and the VAE that replaces its own) fetched once per pod and loaded
by its family, the CLIP evaluator of spec.evaluation, and the instance photos, framed.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from dreambooth.api.config import TrainerConfig, for_family
from dreambooth.api.job import SpecError
from dreambooth.api.spec import DreamBoothJobSpec, ModelFamily
from dreambooth.api.uris import Scheme, Uri
from dreambooth.trainer import judging
from dreambooth.trainer.buckets import Framing
from dreambooth.trainer.context import Context
from dreambooth.trainer.data import Example, load_examples
from dreambooth.trainer.errors import ConfigError, DataError, NotFoundError, TrainerError
from dreambooth.trainer.families import VAE_FIELD, Components, load_components, load_vae
from dreambooth.trainer.models import fetch_from_hub
from dreambooth.trainer.pernode import once_per_node
from dreambooth.trainer.storage import S3Settings, open_storage, storage_uri

log = logging.getLogger("dreambooth.trainer")

ANY = frozenset(Scheme)  # every scheme a spec may name; fetch_prefix says what each means here
#: what an hf:// evaluator is fetched with: a CLIPModel folder (files at its root)
CLIP_PATTERNS = ["*.json", "*.txt", "model.safetensors"]
#: what an hf:// baseModel.vae is fetched with: a lone AutoencoderKL (or a model's vae/)
VAE_PATTERNS = [
    "config.json",
    "diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
]


def s3_settings(config: TrainerConfig) -> S3Settings | None:
    spec = config.spec
    uris = [spec.base_model.uri, spec.base_model.vae, spec.instance.uri, config.output_uri, spec.prior.uri]
    if spec.evaluation.enabled:
        uris.append(spec.evaluation.model.uri)
    if not any(storage_uri(u, ANY).scheme is Scheme.S3 for u in uris if u):
        return None
    return S3Settings.from_env(config.storage.endpoint, config.storage.secure, config.storage.region)


def fetch_prefix(
    uri: Uri | str, s3: S3Settings | None, dest: Path, *, what: str, empty: type[TrainerError] = DataError
) -> Path:
    """A local folder with the objects below ``uri`` (file:// URIs are used in place)."""
    parsed = storage_uri(uri, ANY)
    if parsed.scheme is Scheme.PVC:
        raise ConfigError(f"{uri}: pvc:// volumes are mounted by the operator; locally use file://")
    if parsed.scheme is Scheme.FILE:
        return Path(parsed.path)
    storage = open_storage(parsed, s3)
    if not storage.list():
        raise empty(f"no {what} found under {uri}: upload them there, or fix the URI")
    shutil.rmtree(dest, ignore_errors=True)
    files = storage.download_prefix("", dest)
    log.info("fetched %d files of %s from %s", len(files), what, uri)
    return dest


def fetch_once(ctx: Context, key: str, work) -> Path:
    """``work()`` (a fetch) by the pod's first process; the folder it returns, on all."""
    return Path(once_per_node(ctx.accelerator, ctx.workdir, key, lambda: str(work())))


def fetch_model(
    ctx: Context, key: str, uri: str, revision: str | None, *, what: str, patterns: list[str] | None = None
) -> Path:
    parsed = storage_uri(uri, ANY)
    if parsed.scheme is Scheme.HF:
        return fetch_once(
            ctx,
            key,
            lambda: fetch_from_hub(
                parsed.authority, revision or parsed.revision, ctx.workdir / "hub", patterns=patterns
            ),
        )
    return fetch_once(ctx, key, lambda: fetch_prefix(parsed, ctx.s3, ctx.workdir / key, what=what, empty=NotFoundError))


def fetch_base_model(ctx: Context) -> Path:
    model = ctx.spec.base_model
    return fetch_model(ctx, "base-model", model.uri, model.revision, what="base model files")


def open_judge(ctx: Context, components: Components, instances: list[Example]) -> None:
    """spec.evaluation: fetch the CLIP evaluator like the base model (once per node); the
    main process loads it and judges the sample rounds."""
    evaluation = ctx.spec.evaluation
    if not (evaluation.enabled and ctx.spec.validation.enabled):
        return
    judging.check_source(ctx, components.path)
    clip = None
    if evaluation.model.uri:
        clip = fetch_model(
            ctx,
            "evaluator",
            evaluation.model.uri,
            evaluation.model.revision,
            what="evaluation model files",
            patterns=CLIP_PATTERNS,
        )
    if ctx.main:
        ctx.judge = judging.make_judge(ctx, clip, components.path, instances)


def open_model(ctx: Context) -> Components:
    """Fetch, check and load the base model (and the VAE that replaces its own); a job with
    ``baseModel.family: auto`` gets the presets and rules of the family found in it from now
    on (``ctx.config`` changes)."""
    model = ctx.spec.base_model
    components = load_components(fetch_base_model(ctx), model.uri, model.family)
    if model.vae:
        folder = fetch_model(ctx, "vae", model.vae, None, what=f"VAE files ({VAE_FIELD})", patterns=VAE_PATTERNS)
        components.vae = load_vae(folder, model.vae, components)
        log.info("the VAE is %s's (%s)", model.vae, VAE_FIELD)
    try:
        ctx.config = for_family(ctx.config, ModelFamily(components.family.name))
    except SpecError as err:
        raise ConfigError(
            f"the model is {components.family.title}, which this job's spec does not fit: "
            + "; ".join(map(str, err.issues))
        ) from None
    components.family.configure(components, ctx.spec.training, model.uri)
    log.info("model family %s (%s)", components.family.name, components.family.title)
    return components


def load_instance_examples(ctx: Context, components: Components) -> list[Example]:
    """The photos, framed: one example per photo (and its mirror with training.randomFlip),
    in its aspect-ratio bucket or the ``resolution`` square."""
    training = ctx.spec.training
    multiple = components.resolution_multiple
    sizes = [("training.resolution", training.resolution)]
    if training.buckets is not None and training.buckets.enabled:
        sizes.append(("training.buckets.step", training.buckets.step))
    for name, value in sizes:
        if value % multiple:
            raise ConfigError(
                f"{name} {value} does not fit this model: it must be a multiple of {multiple} (VAE "
                f"and UNet downsampling), e.g. {max(multiple, value // multiple * multiple)}"
            )
    components.family.check_resolution(components, training.resolution)
    folder = fetch_once(
        ctx,
        "instance",
        lambda: fetch_prefix(ctx.spec.instance.uri, ctx.s3, ctx.workdir / "instance", what="instance photos"),
    )
    examples = load_examples(
        folder,
        prompt=ctx.spec.instance.prompt,
        resolution=training.resolution,
        use_captions=ctx.spec.instance.use_captions,
        source_uri=ctx.spec.instance.uri,
        framing=Framing.for_photos(training),
    )
    buckets = sorted({e.size.target for e in examples})
    log.info(
        "%d photos in %d bucket(s): %s",
        len(examples) // len(Framing.for_photos(training).flips),
        len(buckets),
        ", ".join(f"{w}x{h}" for h, w in buckets),
    )
    return examples


def class_framing(spec: DreamBoothJobSpec, instances: list[Example]) -> Framing:
    """Class images are framed in every bucket of the photos (mirrored too with randomFlip)."""
    return Framing.for_photos(spec.training).for_classes([e.size.target for e in instances])
