"""``dreambooth gallery runs/``: local runs found from their files, named as the demo's
message says, their outputs read only inside the folder."""

from __future__ import annotations

import asyncio
import json

import pytest

from dreambooth.api.history import History, Point
from dreambooth.gallery.objects import Missing, Unavailable, open_store
from dreambooth.gallery.sources import LocalSource


def history(steps: int) -> bytes:
    return History([Point(s, 0.5, 0.5, 1e-4, 1000.0 + s) for s in range(1, steps + 1)]).to_bytes()


def test_local_runs_are_found_with_their_phase_and_progress(tmp_path):
    demo = tmp_path / "demo" / "output"
    (demo / "samples").mkdir(parents=True)
    (demo / "history.jsonl").write_bytes(history(60))
    (demo / "result.json").write_text(json.dumps({"step": 60, "totalSteps": 60}))
    (demo / "samples" / "step-60.png").write_bytes(b"\x89PNG")
    live = tmp_path / "default" / "toy-cat"
    live.mkdir(parents=True)
    (live / "history.jsonl").write_bytes(history(10))
    (tmp_path / ".work" / "toy-cat").mkdir(parents=True)
    (tmp_path / ".work" / "toy-cat" / "trainer-config.json").write_text(
        json.dumps({"output_uri": live.as_uri() + "/", "spec": {"training": {"steps": 40}}})
    )
    source = LocalSource(tmp_path)
    jobs = {o["metadata"]["name"]: o for o in asyncio.run(source.jobs())}
    assert set(jobs) == {"demo", "default.toy-cat"}
    assert jobs["demo"]["status"]["phase"] == "Succeeded"
    assert jobs["demo"]["status"]["progress"]["summary"] == "60/60"
    running = jobs["default.toy-cat"]["status"]
    assert running["phase"] == "Training" and running["progress"]["summary"] == "10/40"
    assert running["progress"]["percent"] == 25.0


def test_a_local_store_reads_only_inside_the_runs_folder(tmp_path):
    runs, elsewhere = tmp_path / "runs", tmp_path / "secret"
    (runs / "a").mkdir(parents=True)
    elsewhere.mkdir()
    (elsewhere / "result.json").write_text("{}")
    (runs / "a" / "samples").symlink_to(elsewhere)
    store = open_store((runs / "a").as_uri(), None, local_root=runs)
    with pytest.raises(Missing):
        asyncio.run(store.stream("samples/result.json"))
    with pytest.raises(Unavailable, match="outside"):
        open_store(elsewhere.as_uri(), None, local_root=runs)
    with pytest.raises(Unavailable, match="no S3 endpoint"):
        open_store("s3://bucket/ml/x/", None)
