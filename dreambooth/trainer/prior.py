"""Prior preservation: class images from the user, or generated once and shared.

Generated class images depend only on (base model, revision, VAE, class prompt,
resolution, count, sampler settings), so they are cached under
``<classCacheUri>/<sha256 of those>/`` with a ``manifest.json`` written last; any later
job asking for the same set reuses them without generating anything. Generation is
spread over all processes: image ``i`` is always drawn from seed ``i``, so the set is the
same whatever the number of GPUs, and the images still missing (an interrupted pod keeps
those it drew) are dealt out round-robin, so no process waits for another's whole share.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import torch

from dreambooth.api import layout
from dreambooth.api.families import FACTS
from dreambooth.api.presets import ModelFamily
from dreambooth.api.spec import Sampler, ValidationSpec
from dreambooth.api.telemetry import TrainerPhase
from dreambooth.trainer.buckets import Framing
from dreambooth.trainer.data import Example, find_images, load_examples
from dreambooth.trainer.errors import DataError
from dreambooth.trainer.pernode import once_per_node
from dreambooth.trainer.sampling import generate, scheduler_for
from dreambooth.trainer.storage import Storage, open_storage

log = logging.getLogger(__name__)

#: how class images are drawn (part of the cache key): the seed's DDIM, a common CFG scale
SAMPLER = {"scheduler": Sampler.DDIM.value, "inferenceSteps": 50, "guidanceScale": 7.5, "seed": 0}
GENERATION_BATCH = 4


def sampler_of(family: str) -> dict:
    """:data:`SAMPLER` with the family's own class-image scheduler (SD3: flow-matching Euler)."""
    return {**SAMPLER, "scheduler": FACTS[ModelFamily(family)].class_sampler.value}


def cache_key(
    *,
    model: str,
    revision: str | None,
    prompt: str,
    resolution: int,
    count: int,
    family: str = "sd",
    vae: str | None = None,
) -> str:
    facts = {
        "model": model,
        "revision": revision,
        "prompt": prompt,
        "resolution": resolution,
        "count": count,
        **sampler_of(family),
    }
    if vae:  # another VAE decodes other images (keys without one stay as they were)
        facts["vae"] = vae
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:32]


def _complete(store: Storage, count: int) -> bool:
    if not store.exists(layout.MANIFEST):
        return False
    try:
        files = json.loads(store.read_bytes(layout.MANIFEST))["files"]
    except (ValueError, KeyError):
        return False
    present = {o.key: o.size for o in store.list()}
    return len(files) == count and all(present.get(k) == size for k, size in files.items())


def missing_share(done: set[str], count: int, rank: int, processes: int) -> list[int]:
    """The indices this rank draws: the images not ``done`` yet, dealt out round-robin."""
    missing = [i for i in range(count) if _name(i) not in done]
    return missing[rank::processes]


def _generate_share(ctx, components, store: Storage, count: int, workdir: Path) -> None:
    """Draw this rank's share of the class images and upload them."""
    from accelerate.utils import broadcast_object_list

    a, prior, resolution = ctx.accelerator, ctx.spec.prior, ctx.spec.training.resolution
    # drawn by an earlier, interrupted pod: keep them. One listing for all ranks, so that
    # each one deals out the same missing images
    done = [{o.key for o in store.list()} if ctx.main else None]
    if a.num_processes > 1:
        broadcast_object_list(done)
    done = done[0]
    mine = missing_share(done, count, a.process_index, a.num_processes)
    if ctx.main:
        log.info(
            "generating %d class images for %r into %s (%d already there) with %s",
            count - len(done & {_name(i) for i in range(count)}),
            prior.class_prompt,
            store.uri(),
            len(done),
            components.family.pipeline_name,
        )
    if not mine:
        return
    pipeline = components.family.pipeline(
        vae=components.vae,
        text_encoders=components.text_encoders,
        tokenizers=components.tokenizers,
        denoiser=components.denoiser,
        scheduler=scheduler_for(
            Sampler(sampler_of(components.family.name)["scheduler"]), components.noise_scheduler.config
        ),
    ).to(a.device)
    settings = ValidationSpec(
        prompts=[prior.class_prompt],
        inference_steps=SAMPLER["inferenceSteps"],
        guidance_scale=SAMPLER["guidanceScale"],
        images_per_prompt=1,
    )
    workdir.mkdir(parents=True, exist_ok=True)
    for n, index in enumerate(mine):
        with a.autocast():
            [[image]] = generate(
                pipeline,
                settings,
                resolution=resolution,
                seed=SAMPLER["seed"] + index,
                device=a.device,
                options=components.family.sampling_options(ctx.spec.training),
            )
        path = workdir / _name(index)
        image.save(path)
        store.upload_file(path, path.name)
        if ctx.main and n % 10 == 0:
            log.info("class image %d/%d", index + 1, count)


def _name(index: int) -> str:
    return f"class-{index:05d}.png"


def class_examples(ctx, components, framing: Framing | None = None) -> list[Example]:
    """The class images of this run (generated and cached if needed), as examples (one per
    variant of ``framing``: each bucket of the photos, mirrored or not)."""
    a, prior, training = ctx.accelerator, ctx.spec.prior, ctx.spec.training
    count, prompt = prior.num_images, prior.class_prompt
    folder = ctx.workdir / "class-images"
    if prior.uri:
        source = prior.uri
        store = open_storage(source, ctx.s3)
    else:
        model = ctx.spec.base_model
        key = cache_key(
            model=model.uri,
            revision=model.revision,
            prompt=prompt,
            resolution=training.resolution,
            count=count,
            family=components.family.name,
            vae=model.vae,
        )
        source = ctx.config.class_cache_uri.rstrip("/") + f"/{key}/"
        store = open_storage(source, ctx.s3)
        if not _complete(store, count):
            if ctx.metrics:
                ctx.metrics.phase.state(TrainerPhase.GENERATING_CLASS_IMAGES)
            _generate_share(ctx, components, store, count, ctx.workdir / "class-generated")
            a.wait_for_everyone()  # the shares differ by one image at most
            if ctx.main:
                files = {o.key: o.size for o in store.list() if o.key != layout.MANIFEST}
                store.write_bytes(
                    layout.MANIFEST, json.dumps({"prompt": prompt, "count": count, "files": files}).encode()
                )
            a.wait_for_everyone()
        else:
            log.info("reusing %d cached class images from %s", count, source)

    def download() -> str:
        shutil.rmtree(folder, ignore_errors=True)
        if store.list():
            store.download_prefix("", folder)
        return str(folder)

    once_per_node(a, ctx.workdir, "class-images", download)
    paths = find_images(folder)
    if not paths:
        raise DataError(
            f"no class images found under {source}: upload some there or drop prior.uri to have them generated"
        )
    if len(paths) < count:
        log.warning(
            "only %d class images under %s (prior.numImages is %d): training with those", len(paths), source, count
        )
    examples = load_examples(
        folder,
        prompt=prompt,
        resolution=training.resolution,
        use_captions=False,
        source_uri=source,
        framing=framing,
        limit=count,
    )
    torch.manual_seed(training.seed)  # generation consumed random numbers; training starts afresh
    return examples
