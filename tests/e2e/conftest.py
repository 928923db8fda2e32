"""Fixtures of the end-to-end scenarios: a :class:`~kubesim.cluster.LocalCluster` with
the example's inputs (the tiny model and four toy-cat photos) in its S3 buckets."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from kubesim.cluster import LocalCluster


@pytest.fixture
def cluster(tmp_path, s3_server, tiny_model_dir, toy_cat_dir) -> Iterator[LocalCluster]:
    """A fresh cluster per test (emulator, operator, controllers, Prometheus where
    installed) sharing the session's S3 server; its own output bucket."""
    with LocalCluster(tmp_path / "cluster", s3_server) as local:
        local.upload_example_inputs(tiny_model_dir, toy_cat_dir)
        yield local


@pytest.fixture
def cluster_without_credentials(tmp_path, s3_server, tiny_model_dir, toy_cat_dir) -> Iterator[LocalCluster]:
    """Like ``cluster``, but nobody has created the credentials Secret yet."""
    with LocalCluster(tmp_path / "cluster", s3_server, credentials=False, prometheus=False) as local:
        local.upload_example_inputs(tiny_model_dir, toy_cat_dir)
        yield local
