"""validation.compareSchedulers (a sweep's validation.scheduler axis): every round is drawn
again from the same weights and seeds with each further scheduler, next to the main grid."""

from __future__ import annotations

from PIL import Image, ImageChops

from dreambooth.trainer.run import run
from dreambooth.trainer.sampling import LABEL_HEIGHT
from tests.support.trainer import job_document, trainer_config


def test_each_round_is_sampled_with_every_scheduler(tiny_model_dir, toy_cat_dir, tmp_path):
    out = tmp_path / "out"
    doc = job_document(tiny_model_dir.as_uri(), toy_cat_dir.as_uri(), out.as_uri(), steps=4, every=2)
    doc["spec"]["validation"] = {
        "inferenceSteps": 3,
        "imagesPerPrompt": 1,
        "everySteps": 2,
        "scheduler": "ddim",
        "compareSchedulers": ["pndm", "lms"],
    }
    run(trainer_config(doc), tmp_path / "w")

    grids = sorted(p.name for p in (out / "samples").glob("step-*.png"))
    assert grids == [
        "step-2-lms.png",
        "step-2-pndm.png",
        "step-2.png",
        "step-4-lms.png",
        "step-4-pndm.png",
        "step-4.png",
    ]
    main, pndm = (Image.open(out / "samples" / name).convert("RGB") for name in ("step-4.png", "step-4-pndm.png"))
    assert main.size[1] == pndm.size[1]  # the same rows (widths follow the titles, which name the scheduler)
    images = (0, LABEL_HEIGHT, 64, main.size[1])  # below the title: one image per prompt, at the left
    assert ImageChops.difference(main.crop(images), pndm.crop(images)).getbbox() is not None  # other pixels
    # the progression and the gallery read the main grids only
    assert (out / "samples" / "progression.png").is_file()
