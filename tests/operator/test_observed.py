"""The poll cycle's per-namespace view: Jobs by name, pods by their DreamBoothJob."""

from dreambooth.operator import naming
from dreambooth.operator.observed import NamespaceView


def _obj(name: str, **labels: str) -> dict:
    return {"metadata": {"name": name, "labels": labels}}


def test_jobs_and_pods_are_found_by_the_dreamboothjob_name():
    jobs = [_obj(naming.trainer_name("cat")), _obj(naming.trainer_name("9dog"))]
    pods = [
        _obj("cat-trainer-0-abc", **{naming.JOB_NAME_LABEL: "cat"}),
        _obj("cat-trainer-1-def", **{naming.JOB_NAME_LABEL: "cat"}),
        _obj("9dog-x", **{naming.JOB_NAME_LABEL: "9dog"}),
        _obj("stray"),
    ]  # no job label: belongs to no job
    view = NamespaceView.of(jobs, pods)
    assert view.trainer_job("cat")["metadata"]["name"] == "cat-trainer"
    assert view.trainer_job("9dog")["metadata"]["name"] == naming.trainer_name("9dog")  # hashed name
    assert [p["metadata"]["name"] for p in view.trainer_pods("cat")] == ["cat-trainer-0-abc", "cat-trainer-1-def"]
    assert view.trainer_job("gone") is None and view.trainer_pods("gone") == []
