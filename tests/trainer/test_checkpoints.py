"""Checkpoints in storage: complete only with their manifest, verified when fetched back."""

from __future__ import annotations

import hashlib
import json
import os

from dreambooth.api import layout
from dreambooth.trainer import checkpoints
from dreambooth.trainer.storage import open_storage


def folder_with(tmp_path, name: str, files: dict[str, bytes]):
    folder = tmp_path / name
    for rel, data in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    return folder


def test_the_manifest_holds_each_files_size_and_sha256_and_comes_last(tmp_path):
    store = open_storage((tmp_path / "out").as_uri())
    files = {"trainable.safetensors": os.urandom(3000), "optimizer.pt": os.urandom(5000), "state.json": b"{}"}
    saved = checkpoints.save(store, folder_with(tmp_path, "c", files), 10, keep=2)
    manifest = json.loads(store.read_bytes(saved.prefix + layout.MANIFEST))
    assert manifest == {
        "step": 10,
        "files": {
            name: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()} for name, data in files.items()
        },
    }
    assert [c.step for c in checkpoints.complete(store)] == [10]


def test_a_newest_checkpoint_whose_bytes_changed_is_skipped_for_the_one_before(tmp_path, caplog):
    store = open_storage((tmp_path / "out").as_uri())
    for step in (5, 10):
        checkpoints.save(store, folder_with(tmp_path, f"c{step}", {"optimizer.pt": os.urandom(4000)}), step, keep=2)
    damaged = tmp_path / "out" / "checkpoints" / "checkpoint-10" / "optimizer.pt"
    data = damaged.read_bytes()
    os.remove(damaged)  # a new file: no recorded digest of its own, the same size
    damaged.write_bytes(bytes([data[0] ^ 1]) + data[1:])
    found = checkpoints.download_latest(store, tmp_path / "resume")
    assert found is not None and found[0].step == 5
    assert "checkpoint at step 10 is corrupt" in caplog.text
