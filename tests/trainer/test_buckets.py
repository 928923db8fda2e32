"""Aspect-ratio buckets: photos of several shapes train in one job, each micro-batch from one
bucket, each sample conditioned on its own size and crop (mirrored with randomFlip), and the
draw stays a pure function of the run's positions (resume, several processes)."""

from __future__ import annotations

import random
import signal

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from dreambooth.api.exitcodes import ExitCode
from dreambooth.trainer.buckets import (
    Draw,
    Framing,
    bucket_sizes,
    cover,
    mirrored_left,
    nearest_bucket,
)
from dreambooth.trainer.data import load_examples, sample_positions
from dreambooth.trainer.errors import ConfigError, DataError, Preempted
from dreambooth.trainer.families import FAMILIES
from dreambooth.trainer.families import sdxl as sdxl_module
from dreambooth.trainer.metrics import TrainerMetrics
from dreambooth.trainer.run import run
from kubesim.net import free_port
from tests.support.trainer import (
    StopAfter,
    job_document,
    launch,
    run_trainer,
    start_trainer,
    trainer_config,
    trainer_env,
    write_config,
)

#: (width, height) of the photos: landscape, portrait and square, two of each; the landscape
#: ones and the class images crop off-center by a pixel, so that a mirrored crop's left edge
#: differs from the plain one's
PHOTO_SIZES = [(194, 112), (112, 194), (128, 128)] * 2
CLASS_SIZE = (151, 100)  # class images of their own shape
#: the tiny models downsample by 16: buckets of about 64 x 64 pixels on a 16-pixel step
BUCKETS = {"enabled": True, "minSide": 32, "maxSide": 128, "step": 16}


def draw_photos(folder, sizes, seed=0):
    """Toy-cat-like photos: a disc and a bar on a background, so that crops and mirrors differ."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i, (w, h) in enumerate(sizes):
        img = Image.new("RGB", (w, h), tuple(rng.randint(60, 230) for _ in range(3)))
        px = img.load()
        r = min(w, h) // 4
        cx, cy = w // 2 + rng.randint(-8, 8), h // 2
        for x in range(w):
            for y in range(h):
                if (x - cx) ** 2 + (y - cy) ** 2 < r * r:
                    px[x, y] = (235, 140, 40)
                elif x < w // 6:
                    px[x, y] = (20, 20, 120)  # a bar on the left: mirrored photos differ
        img.save(folder / f"photo-{i}.png")
    return folder


@pytest.fixture(scope="module")
def mixed_photos(tmp_path_factory):
    return draw_photos(tmp_path_factory.mktemp("photos") / "mixed", PHOTO_SIZES)


@pytest.fixture(scope="module")
def class_images(tmp_path_factory):
    return draw_photos(tmp_path_factory.mktemp("photos") / "class", [CLASS_SIZE] * 2, seed=1)


@pytest.fixture(scope="module")
def tiny_sdxl_dir(tmp_path_factory):
    from dreambooth.trainer.tiny import build_tiny_sdxl

    return build_tiny_sdxl(tmp_path_factory.mktemp("models") / "tiny-sdxl")


def bucket_job(model, photos, out, *, family="sd", steps=6, every=3, training=None, **spec):
    doc = job_document(
        model.as_uri(),
        photos.as_uri(),
        out.as_uri(),
        steps=steps,
        every=every,
        training={"buckets": BUCKETS, "randomFlip": True, "method": "full", **(training or {})},
        **spec,
    )
    doc["spec"]["baseModel"]["family"] = family
    doc["spec"]["validation"] = {"enabled": False}
    doc["spec"]["output"]["formats"] = ["diffusers"]
    return doc


# --- the geometry and the draw, as pure functions -------------------------------------------


def test_buckets_hold_about_resolution_squared_pixels_in_both_orientations():
    sizes = bucket_sizes(64, 32, 128, 16)
    assert sizes == [(32, 96), (32, 112), (32, 128), (48, 80), (64, 64), (80, 48), (96, 32), (112, 32), (128, 32)]
    assert all(0.75 * 64 * 64 <= h * w <= 64 * 64 for h, w in sizes)
    xl = bucket_sizes(1024, 512, 2048, 64)
    assert (1024, 1024) in xl and (832, 1216) in xl and (1216, 832) in xl and (512, 2048) in xl
    assert nearest_bucket((112, 192), sizes) == (48, 80)  # a landscape photo: 1.71 -> 1.67
    assert nearest_bucket((192, 112), sizes) == (80, 48)
    assert nearest_bucket((1000, 1001), sizes) == (64, 64)


def test_a_photo_is_covered_center_cropped_and_mirrored_with_its_crop(mixed_photos):
    framing = Framing(tuple(bucket_sizes(64, 32, 128, 16)), flip=True)
    examples = load_examples(
        mixed_photos, prompt="p", resolution=64, use_captions=False, source_uri="s3://b/p/", framing=framing
    )
    assert len(examples) == 2 * len(PHOTO_SIZES)
    for plain, mirror in zip(examples[::2], examples[1::2], strict=True):
        assert (plain.flipped, mirror.flipped) == (False, True) and plain.name == mirror.name
        h, w = plain.size.target
        assert plain.pixels.shape == (3, h, w)
        assert torch.equal(mirror.pixels, plain.pixels.flip(-1))  # the same crop, mirrored
        scale, resized, (top, left) = cover(plain.size.original, plain.size.target)
        assert scale < 1 and resized[0] >= h and resized[1] >= w  # covered, never enlarged here
        assert plain.size.crop_top_left == (top, left)
        assert mirror.size.crop_top_left == (top, mirrored_left(resized[1], left, w))
    assert {e.size.target for e in examples} == {(48, 80), (80, 48), (64, 64)}
    assert {e.size.original for e in examples} == {(h, w) for w, h in PHOTO_SIZES}


def micro_batches(draw, *, processes, steps, batch, accumulation):
    """{(step, micro): [(instance variant, class variant) per sample]} as ``processes`` draw them."""
    per_device = batch // (processes * accumulation)
    out = {}
    for step in range(steps):
        for micro in range(accumulation):
            rows = []
            for rank in range(processes):
                positions = sample_positions(
                    step, micro, rank, per_device=per_device, processes=processes, accumulation=accumulation
                )
                rows += list(zip(draw.instances(positions), draw.classes(positions), strict=True))
            out[step, micro] = rows
    return out


def test_the_draw_is_one_bucket_per_micro_batch_and_the_same_on_any_number_of_processes():
    photo_buckets = (0, 0, 0, 1, 1, 2)  # 3 photos in one bucket, 2 in another, 1 alone
    draw = Draw(seed=7, micro_size=4, photo_buckets=photo_buckets, flips=2, class_images=5)
    runs = {p: micro_batches(draw, processes=p, steps=12, batch=8, accumulation=2) for p in (1, 2, 4)}
    assert runs[1] == runs[2] == runs[4]
    # a fresh draw, asked in another order, says the same: nothing depends on what came before
    again = Draw(seed=7, micro_size=4, photo_buckets=photo_buckets, flips=2, class_images=5)
    assert {k: runs[1][k] for k in reversed(list(runs[1]))} == {
        k: list(
            zip(
                again.instances(range(k[0] * 8 + k[1] * 4, k[0] * 8 + k[1] * 4 + 4)),
                again.classes(range(k[0] * 8 + k[1] * 4, k[0] * 8 + k[1] * 4 + 4)),
                strict=True,
            )
        )
        for k in reversed(list(runs[1]))
    }
    epoch = 1 + 1 + 1  # micro-batches an epoch: ceil(3/4) + ceil(2/4) + ceil(1/4)
    seen_flips = set()
    for index, rows in enumerate(runs[1].values()):
        photos = [v // 2 for v, _ in rows]
        buckets = {photo_buckets[p] for p in photos}
        assert len(buckets) == 1, rows  # the micro-batch's photos share a bucket
        # class variants are (class image * buckets + bucket) * flips + flip: the same bucket
        assert {(c // 2) % 3 for _, c in rows} == buckets
        seen_flips |= {v % 2 for v, _ in rows} | {c % 2 for _, c in rows}
        if index % epoch == epoch - 1:  # every photo trained once an epoch
            window = list(runs[1].values())[index - epoch + 1 : index + 1]
            assert {v // 2 for rows_ in window for v, _ in rows_} == set(range(len(photo_buckets)))
    assert seen_flips == {0, 1}
    assert Draw(seed=8, micro_size=4, photo_buckets=photo_buckets, flips=2, class_images=5).instances(
        range(24)
    ) != draw.instances(range(24))


# --- real runs ----------------------------------------------------------------------------------


class Recorder:
    """Wraps a family's ``predict`` (and SDXL's time ids) to see what each micro-batch trained on."""

    def __init__(self, monkeypatch, family):
        self.calls, self.time_ids = [], []
        original, original_ids = type(family).predict, sdxl_module.time_ids

        def predict(this, denoiser, noisy, timesteps, cond, sizes):
            self.calls.append((tuple(noisy.shape), list(sizes)))
            return original(this, denoiser, noisy, timesteps, cond, sizes)

        def time_ids(sizes, device, dtype):
            ids = original_ids(sizes, device, dtype)
            self.time_ids.append(ids.detach().clone())
            return ids

        monkeypatch.setattr(type(family), "predict", predict)
        monkeypatch.setattr(sdxl_module, "time_ids", time_ids)


def mirrored(original, target, crop) -> bool | None:
    """Whether ``crop`` is the mirrored one (None: both are the same); fails if it is neither."""
    _, resized, (top, left) = cover(original, target)
    plain, flipped = (top, left), (top, mirrored_left(resized[1], left, target[1]))
    assert crop in (plain, flipped), (original, target, crop)
    return None if plain == flipped else crop == flipped


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_photos_of_three_aspect_ratios_train_in_one_job(
    family, monkeypatch, tiny_model_dir, tiny_sdxl_dir, mixed_photos, class_images, tmp_path
):
    """Each micro-batch's photos and class images share a bucket; each sample carries its own
    original size and crop (mirrored when flipped) into SDXL's time ids."""
    model = tiny_sdxl_dir if family == "sdxl" else tiny_model_dir
    recorder = Recorder(monkeypatch, FAMILIES[family])
    doc = bucket_job(
        model,
        mixed_photos,
        tmp_path / "out",
        family=family,
        steps=8,
        every=8,
        prior={"enabled": True, "classPrompt": "a photo of a cat", "uri": class_images.as_uri()},
    )
    outcome = run(trainer_config(doc), tmp_path / "w", metrics=TrainerMetrics())
    assert outcome.step == 8 and outcome.loss == outcome.loss  # finite, not NaN
    assert (tmp_path / "out" / "model" / "model_index.json").is_file()

    photos = {(h, w) for w, h in PHOTO_SIZES}
    targets, flips = set(), set()
    assert len(recorder.calls) == 8
    for shape, sizes in recorder.calls:
        assert len(sizes) == 4  # batch 2 + 2 class images
        latent_side = (shape[2] * 8, shape[3] * 8)
        assert {s.target for s in sizes} == {latent_side}, sizes  # one bucket, the latents' shape
        instance, prior = sizes[:2], sizes[2:]
        for s in instance:
            assert s.original in photos and s.target == nearest_bucket(s.original, bucket_sizes(64, 32, 128, 16))
            flips.add(mirrored(s.original, s.target, s.crop_top_left))
        for s in prior:  # class images keep their own size and crop, not the photo's
            assert s.original == (CLASS_SIZE[1], CLASS_SIZE[0])
            flips.add(mirrored(s.original, s.target, s.crop_top_left))
        targets.add(latent_side)
    assert targets == {(48, 80), (80, 48), (64, 64)} and {False, True} <= flips
    if family == "sdxl":
        assert len(recorder.time_ids) == len(recorder.calls)
        for ids, (_, sizes) in zip(recorder.time_ids, recorder.calls, strict=True):
            assert ids.tolist() == [[*s.original, *s.crop_top_left, *s.target] for s in sizes]


def test_stopped_runs_with_buckets_resume_to_the_same_weights(tiny_sdxl_dir, mixed_photos, class_images, tmp_path):
    results = []
    for stop_at in (None, 3):
        out = tmp_path / f"out-{stop_at}"
        doc = bucket_job(
            tiny_sdxl_dir,
            mixed_photos,
            out,
            family="sdxl",
            steps=6,
            every=1,
            prior={"enabled": True, "classPrompt": "a photo of a cat", "uri": class_images.as_uri()},
        )
        config = trainer_config(doc)
        if stop_at:
            metrics = TrainerMetrics()
            with pytest.raises(Preempted):
                run(config, tmp_path / "w1", metrics=metrics, stop=StopAfter(metrics, stop_at))
        run(config, tmp_path / "w2", metrics=TrainerMetrics())
        results.append(load_file(out / "model" / "unet" / "diffusion_pytorch_model.safetensors"))
    straight, resumed = results
    assert all(torch.equal(straight[k], resumed[k]) for k in straight), "the resumed run differs"


@pytest.mark.slow
def test_kill_9_with_buckets_resumes_to_the_same_weights(tiny_model_dir, mixed_photos, tmp_path):
    from tests.trainer.test_resume import wait_for_step

    steps, every, env = 14, 3, trainer_env()
    unet = "model/unet/diffusion_pytorch_model.safetensors"
    straight = write_config(
        trainer_config(bucket_job(tiny_model_dir, mixed_photos, tmp_path / "a", steps=steps, every=every)),
        tmp_path / "ca",
    )
    code, log, _ = run_trainer(straight, tmp_path / "wa", env)
    assert code == 0, log
    assert "6 photos in 3 bucket(s): 80x48, 64x64, 48x80" in log

    port = free_port()
    killed = write_config(
        trainer_config(
            bucket_job(tiny_model_dir, mixed_photos, tmp_path / "b", steps=steps, every=every), metrics_port=port
        ),
        tmp_path / "cb",
    )
    proc = start_trainer(killed, tmp_path / "wb", env)
    wait_for_step(proc, port, random.Random().randint(2 * every + 1, steps - every))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    code, log, _ = run_trainer(killed, tmp_path / "wb", env)
    assert code == 0 and "resumed from" in log, log
    a, b = load_file(tmp_path / "a" / unet), load_file(tmp_path / "b" / unet)
    assert all(torch.equal(a[k], b[k]) for k in a), "the resumed run differs"


@pytest.mark.slow
def test_two_processes_with_buckets_train_like_one(tiny_model_dir, mixed_photos, tmp_path):
    env = {**trainer_env(), "DREAMBOOTH_DEBUG_WEIGHT_CHECKSUMS": "1"}
    unets = {}
    for processes in (1, 2):
        out = tmp_path / f"out-{processes}"
        doc = bucket_job(
            tiny_model_dir,
            mixed_photos,
            out,
            steps=4,
            every=4,
            training={"batchSize": 4, "gradientAccumulationSteps": 2},
        )
        doc["spec"]["resources"] = {"nodes": processes, "gpusPerNode": 0}
        done = launch(
            processes, write_config(trainer_config(doc), tmp_path / f"c{processes}"), tmp_path / f"w{processes}", env
        )
        assert done.returncode == 0, done.stderr[-4000:]
        unets[processes] = load_file(out / "model" / "unet" / "diffusion_pytorch_model.safetensors")
    base = load_file(next((tiny_model_dir / "unet").glob("*.safetensors")))
    drift = sum((unets[1][k] - unets[2][k]).abs().sum().item() for k in base)
    moved = sum((unets[1][k] - base[k]).abs().sum().item() for k in base)
    assert moved > 0 and drift / moved < 0.01, f"2 processes drifted from 1 process by {drift / moved:.2%}"


# --- what buckets cannot take ------------------------------------------------------------------


def test_a_photo_that_would_be_enlarged_past_max_upscale_is_named(tiny_model_dir, tmp_path):
    photos = draw_photos(tmp_path / "small", [(128, 128), (40, 24)])
    doc = bucket_job(tiny_model_dir, photos, tmp_path / "out", training={"buckets": {**BUCKETS, "maxUpscale": 1.5}})
    with pytest.raises(DataError) as err:
        run(trainer_config(doc), tmp_path / "w", metrics=TrainerMetrics())
    message = str(err.value)
    assert "photo-1.png is 40x24 pixels: covering its 80x48 bucket would enlarge it 2.00x" in message
    assert "training.buckets.maxUpscale (1.5)" in message and err.value.exit_code is ExitCode.BAD_DATA
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_a_bucket_step_off_the_models_downsampling_is_refused(tiny_model_dir, mixed_photos, tmp_path):
    doc = bucket_job(
        tiny_model_dir,
        mixed_photos,
        tmp_path / "out",
        training={"buckets": {"enabled": True, "minSide": 32, "maxSide": 128, "step": 8}},
    )
    with pytest.raises(ConfigError) as err:
        run(trainer_config(doc), tmp_path / "w", metrics=TrainerMetrics())
    assert "training.buckets.step 8 does not fit this model: it must be a multiple of 16" in str(err.value)
    assert err.value.exit_code is ExitCode.INVALID_CONFIG
