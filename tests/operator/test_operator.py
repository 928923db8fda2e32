"""The real operator (``python -m dreambooth.operator``, kopf unmodified) against the API
emulator over HTTP. The test plays the Job controller and the kubelet explicitly
(kubesim/controllers.py) and serves a real trainer metrics endpoint on
127.0.0.2, as a trainer pod would."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from dreambooth.api import crd, manifest
from dreambooth.api.config import TrainerConfig
from dreambooth.trainer.metrics import TrainerMetrics
from kubesim.api import ApiError
from kubesim.controllers import GarbageCollector, JobController, Kubelet
from kubesim.net import free_port
from kubesim.procs import stop_process
from tests.support.kube import kube  # noqa: F401

ROOT = Path(__file__).resolve().parents[2]
POD_IP = "127.0.0.2"


class Operator:
    """The operator as a process, restartable, with its log kept for failure messages."""

    MAIN = (sys.executable, "-m", "dreambooth.operator")
    #: what the issue and docs/operator.md name: kopf's own command on the package
    KOPF = (str(Path(sys.executable).with_name("kopf")), "run", "--standalone", "-A", "-m", "dreambooth.operator")

    def __init__(self, env: dict[str, str], log: Path, argv: tuple[str, ...] = MAIN) -> None:
        self.env, self.log, self.proc, self.argv = env, log, None, argv

    def start(self) -> None:
        self.proc = subprocess.Popen(self.argv, env=self.env, stdout=self.log.open("a"), stderr=subprocess.STDOUT)

    def stop(self) -> None:
        stop_process(self.proc)

    def output(self) -> str:
        return self.log.read_text()


@pytest.fixture(params=["python -m", "kopf run -m"])
def any_operator(request, kube, tmp_path):  # noqa: F811
    """The operator started either way."""
    yield from _operator(kube, tmp_path, Operator.MAIN if request.param == "python -m" else Operator.KOPF)


@pytest.fixture
def operator(kube, tmp_path):  # noqa: F811
    yield from _operator(kube, tmp_path, Operator.MAIN)


def _operator(kube, tmp_path, argv, **extra_env):  # noqa: F811
    trainer_port = free_port(POD_IP)
    env = {
        **extra_env,
        **kube.env,
        "DREAMBOOTH_POLL_INTERVAL_SECONDS": "1",
        "DREAMBOOTH_METRICS_PORT": str(free_port()),
        "DREAMBOOTH_HEALTH_PORT": str(free_port()),
        "DREAMBOOTH_TRAINER_METRICS_PORT": str(trainer_port),
        "DREAMBOOTH_OUTPUT_ROOT": "s3://dreambooth",
        "DREAMBOOTH_S3_ENDPOINT": "minio.minio.svc:9000",
        "DREAMBOOTH_CREDENTIALS_SECRET": "minio-credentials",
    }
    op = Operator(env, tmp_path / "operator.log", argv)
    op.trainer_port = trainer_port
    op.start()
    # kopf is ready once it watches the resource (its second GET after the initial list)
    kube.wait_for(
        lambda: sum(1 for m, p in kube.requests if m == "GET" and "dreamboothjobs" in p) >= 2,
        timeout=30,
        what=f"the operator to watch dreamboothjobs\n{op.output()}",
    )
    yield op
    op.stop()


def example(name: str, **spec_changes) -> dict:
    (doc,) = [d.data for d in manifest.read(ROOT / "examples" / f"{name}.yaml") if d.kind == "DreamBoothJob"]
    doc["metadata"]["namespace"] = "default"
    for section, values in spec_changes.items():
        doc["spec"].setdefault(section, {}).update(values)
    return doc


def status_of(kube, name):  # noqa: F811
    return (kube.find("dbj", "default", name) or {}).get("status") or {}


def condition_in(status, ctype):
    return next((c for c in status.get("conditions", []) if c["type"] == ctype), None)


def condition(kube, name, ctype):  # noqa: F811
    return condition_in(status_of(kube, name), ctype)


def wait_phase(kube, op, name, phase, timeout=45, **progress):  # noqa: F811
    def reached():
        status = status_of(kube, name)
        return status.get("phase") == phase and all(
            (status.get("progress") or {}).get(k) == v for k, v in progress.items()
        )

    kube.wait_for(
        reached,
        timeout=timeout,
        what=f"{name} in phase {phase} {progress or ''}: {status_of(kube, name)}\n{op.output()[-3000:]}",
    )
    return status_of(kube, name)


def trainer_endpoint(op, step, total=400, loss=0.25, phase="training"):
    """A trainer's real metrics endpoint on the pod IP (what rank 0 serves)."""
    metrics = TrainerMetrics()
    metrics.phase.state(phase)
    metrics.total_steps.set(total)
    metrics.step.set(step)
    metrics.loss.set(loss)
    metrics.learning_rate.set(2e-6)
    metrics.images_per_second.set(8.0)
    metrics.serve(op.trainer_port, addr=POD_IP)
    return metrics


def operator_metrics(op) -> dict[str, float]:
    """The operator's own /metrics, as {'name{labels}': value}."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{op.env['DREAMBOOTH_METRICS_PORT']}/metrics", timeout=5).read()

    def key(sample) -> str:
        labels = ",".join(f'{k}="{v}"' for k, v in sample.labels.items())
        return f"{sample.name}{{{labels}}}" if labels else sample.name

    return {key(s): s.value for family in text_string_to_metric_families(text.decode()) for s in family.samples}


def first_pod(kube, jc):  # noqa: F811
    kube.wait_for(lambda: kube.find("jobs", "default", "toy-cat-trainer"), what="the trainer Job")
    jc.reconcile()
    return kube.list("pods", "default", labels={"dreambooth.io/job-name": "toy-cat"})[0]


def test_a_job_runs_to_success_with_progress_and_outputs(kube, operator):  # noqa: F811
    dbj = kube.create(example("toy-cat"))
    jc, kubelet = JobController(kube), Kubelet(kube)

    pod = first_pod(kube, jc)
    job = kube.get("jobs", "default", "toy-cat-trainer")
    config_map = kube.get("configmaps", "default", "toy-cat-trainer-config")
    service = kube.get("services", "default", "toy-cat-trainer")
    for child in (job, config_map, service):
        assert child["metadata"]["ownerReferences"][0]["uid"] == dbj["metadata"]["uid"]
    config = TrainerConfig.model_validate(json.loads(config_map["data"]["config.json"]))
    assert config.output_uri == "s3://dreambooth/default/toy-cat/"
    assert config.spec.training.steps == 400 and config.spec.training.batch_size == 4  # the object preset
    assert service["spec"]["clusterIP"] == "None" and job["spec"]["completionMode"] == "Indexed"
    assert wait_phase(kube, operator, "toy-cat", "Pending")

    metrics = trainer_endpoint(operator, step=120)
    kubelet.run(pod, ip=POD_IP)
    status = wait_phase(kube, operator, "toy-cat", "Training", step=120)
    assert status["progress"]["summary"] == "120/400" and status["progress"]["loss"] == 0.25
    assert status["progress"]["etaSeconds"] > 0

    # each poll cycle lists a namespace's trainer Jobs and pods once, for all its jobs
    kube.clear_requests()
    metrics.step.set(121)
    wait_phase(kube, operator, "toy-cat", "Training", step=121)
    gets = {p for m, p in kube.requests if m == "GET"}
    assert {"/apis/batch/v1/namespaces/default/jobs", "/api/v1/namespaces/default/pods"} <= gets
    assert "/apis/batch/v1/namespaces/default/jobs/toy-cat-trainer" not in gets

    metrics.step.set(400)
    metrics.last_checkpoint_step.set(400)
    kubelet.succeed(pod, message=json.dumps({"exitCode": 0, "reason": "Succeeded", "step": 400}))
    jc.reconcile()
    status = wait_phase(kube, operator, "toy-cat", "Succeeded")
    assert status["outputs"]["model"] == "s3://dreambooth/default/toy-cat/model/"
    assert status["completionTime"] and status["restarts"] == 0
    reasons = {e.get("reason") for e in kube.events(dbj)}
    assert {"Training", "Succeeded"} <= reasons
    assert any(m == "PATCH" and p.endswith("/dreamboothjobs/toy-cat/status") for m, p in kube.requests)


def test_kopf_run_on_the_package_and_the_command_both_run_the_operator(kube, any_operator):  # noqa: F811
    kube.create(example("toy-cat"))
    kube.wait_for(
        lambda: kube.find("jobs", "default", "toy-cat-trainer"), what=f"the trainer Job\n{any_operator.output()}"
    )
    assert wait_phase(kube, any_operator, "toy-cat", "Pending")


@pytest.mark.parametrize("argv", [Operator.MAIN, Operator.KOPF], ids=["python -m", "kopf run -m"])
def test_an_invalid_setting_stops_the_operator_with_a_message_naming_it(kube, tmp_path, argv):  # noqa: F811
    env = {**kube.env, "DREAMBOOTH_POLL_INTERVAL_SECONDS": "often"}
    done = subprocess.run(argv, check=False, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "DREAMBOOTH_POLL_INTERVAL_SECONDS='often': use a whole number" in done.stdout + done.stderr


def test_an_oom_killed_trainer_fails_the_job_with_reason_oomkilled(kube, operator):  # noqa: F811
    kube.create(example("toy-cat", runPolicy={"backoffLimit": 0}))
    jc, kubelet = JobController(kube), Kubelet(kube)
    pod = first_pod(kube, jc)
    kubelet.run(pod, ip=POD_IP)
    kubelet.oom_kill(pod)
    jc.reconcile()
    status = wait_phase(kube, operator, "toy-cat", "Failed")
    ready = condition_in(status, "Ready")
    assert ready["reason"] == "OOMKilled"
    # the operator's metrics count the failure once (what the DreamBoothJobFailed alert reads)
    failed = 'dreambooth_operator_job_phase_transitions_total{phase="Failed"}'
    kube.wait_for(
        lambda: operator_metrics(operator)[failed] == 1.0, timeout=10, what="the failure counted"
    )  # just after the status write
    assert operator_metrics(operator)[failed] == 1.0
    time.sleep(2.5)  # two more poll cycles see the job Failed again: not a new failure
    assert operator_metrics(operator)[failed] == 1.0
    assert operator_metrics(operator)['dreambooth_operator_jobs{phase="Failed"}'] == 1.0


def test_a_trainer_input_error_surfaces_its_own_reason(kube, operator):  # noqa: F811
    kube.create(example("toy-cat"))
    jc, kubelet = JobController(kube), Kubelet(kube)
    pod = first_pod(kube, jc)
    kubelet.run(pod, ip=POD_IP)
    message = "no instance photos found under s3://training-data/toy-cat/: upload them there, or fix the URI"
    kubelet.fail(pod, exit_code=11, message=json.dumps({"exitCode": 11, "reason": "BadData", "message": message}))
    jc.reconcile()  # the podFailurePolicy's FailJob rule matches exit code 11
    status = wait_phase(kube, operator, "toy-cat", "Failed")
    ready = condition_in(status, "Ready")
    assert ready["reason"] == "BadData" and "no instance photos" in ready["message"]


def test_an_invalid_spec_fails_with_invalid_spec_and_an_event(kube, operator):  # noqa: F811
    doc = example("toy-cat")
    doc["spec"]["preset"] = "custom"
    doc["spec"]["prior"] = {"enabled": True}  # no class prompt
    dbj = kube.create(doc)
    status = wait_phase(kube, operator, "toy-cat", "Failed")
    ready = condition_in(status, "Ready")
    assert ready["reason"] == "InvalidSpec" and "spec.prior.classPrompt" in ready["message"]
    # the Event follows the status write: wait for it rather than race it
    kube.wait_for(
        lambda: any(e.get("type") == "Warning" and e.get("reason") == "InvalidSpec" for e in kube.events(dbj)),
        timeout=30,
        what="a Warning InvalidSpec Event",
    )
    assert kube.find("jobs", "default", "toy-cat-trainer") is None


def test_a_missing_credentials_secret_is_a_clear_pending_reason(kube, operator):  # noqa: F811
    kube.create(example("toy-cat"))
    jc, kubelet = JobController(kube), Kubelet(kube)
    pod = first_pod(kube, jc)
    kubelet.pending(pod, reason="CreateContainerConfigError", message='secret "minio-credentials" not found')
    wait_phase(kube, operator, "toy-cat", "Pending")
    kube.wait_for(
        lambda: condition(kube, "toy-cat", "Ready")["reason"] == "SecretNotFound", what="reason SecretNotFound"
    )
    ready = condition(kube, "toy-cat", "Ready")
    assert "minio-credentials" in ready["message"]


def test_suspend_removes_the_pods_and_resume_brings_them_back(kube, operator):  # noqa: F811
    kube.create(example("toy-cat"))
    jc, kubelet = JobController(kube), Kubelet(kube)
    kubelet.run(first_pod(kube, jc), ip=POD_IP)
    trainer_endpoint(operator, step=50)
    wait_phase(kube, operator, "toy-cat", "Training", step=50)

    kube.patch("dbj", "default", "toy-cat", {"spec": {"runPolicy": {"suspend": True}}})
    kube.wait_for(
        lambda: kube.get("jobs", "default", "toy-cat-trainer")["spec"].get("suspend") is True, what="the Job suspended"
    )
    jc.reconcile()
    assert kube.list("pods", "default", labels={"dreambooth.io/job-name": "toy-cat"}) == []
    wait_phase(kube, operator, "toy-cat", "Suspended")

    kube.patch("dbj", "default", "toy-cat", {"spec": {"runPolicy": {"suspend": False}}})
    kube.wait_for(
        lambda: not kube.get("jobs", "default", "toy-cat-trainer")["spec"].get("suspend"), what="the Job resumed"
    )
    jc.reconcile()
    pods = kube.list("pods", "default", labels={"dreambooth.io/job-name": "toy-cat"})
    assert len(pods) == 1
    kubelet.run(pods[0], ip=POD_IP)
    wait_phase(kube, operator, "toy-cat", "Training")


def test_an_operator_restart_mid_job_makes_no_duplicates_and_status_continues(kube, operator):  # noqa: F811
    kube.create(example("toy-cat"))
    jc, kubelet = JobController(kube), Kubelet(kube)
    kubelet.run(first_pod(kube, jc), ip=POD_IP)
    metrics = trainer_endpoint(operator, step=100)
    wait_phase(kube, operator, "toy-cat", "Training", step=100)

    operator.stop()
    metrics.step.set(250)
    operator.start()
    wait_phase(kube, operator, "toy-cat", "Training", step=250)
    for kind in ("jobs", "configmaps", "services"):
        assert len(kube.list(kind, "default")) == 1, kind
    assert kube.get("jobs", "default", "toy-cat-trainer")["metadata"]["generation"] == 1


def test_an_api_request_never_answered_times_out_and_the_next_cycle_retries_it(kube, tmp_path):  # noqa: F811
    # a dead connection (a partition, a load balancer dropping it): the trainer Job's create
    # is never answered. Without a client timeout the job's sync waits for ever, and the job
    # with it (no other sync of it starts meanwhile); with one, the next poll cycle retries.
    kube.fail_next("POST", "/apis/batch/v1/namespaces/default/jobs", hang_s=600)
    operator = next(_operator(kube, tmp_path, Operator.MAIN, DREAMBOOTH_API_TIMEOUT_SECONDS="2"))
    try:
        kube.create(example("toy-cat"))
        kube.wait_for(
            lambda: kube.find("jobs", "default", "toy-cat-trainer"),
            timeout=20,
            what=f"the trainer Job, created after the held request timed out\n{operator.output()[-2000:]}",
        )
        assert wait_phase(kube, operator, "toy-cat", "Pending")
        assert "reconciling default/toy-cat failed" in operator.output()
    finally:
        operator.stop()


def test_a_request_held_for_one_job_does_not_hold_back_the_status_of_the_others(kube, operator):  # noqa: F811
    # toy-cat's next status write is never answered: its sync waits for the 30 s API timeout.
    # A poll cycle that waited for every sync would hold toy-dog's status back that long too.
    dog = example("toy-cat")
    dog["metadata"]["name"] = "toy-dog"
    kube.create(example("toy-cat"))
    kube.create(dog)
    jc, kubelet = JobController(kube), Kubelet(kube)
    for name in ("toy-cat", "toy-dog"):
        kube.wait_for(lambda name=name: kube.find("jobs", "default", f"{name}-trainer"), what=f"{name}'s Job")
        wait_phase(kube, operator, name, "Pending")
    jc.reconcile()
    pods = {
        name: kube.list("pods", "default", labels={"dreambooth.io/job-name": name})[0]
        for name in ("toy-cat", "toy-dog")
    }
    kube.fail_next("PATCH", "/dreamboothjobs/toy-cat/status", hang_s=600)
    kube.clear_requests()
    kubelet.run(pods["toy-cat"], ip=POD_IP)  # a new phase: the status write that is held
    kube.wait_for(
        lambda: (
            ("PATCH", "/apis/dreambooth.io/v1alpha1/namespaces/default/dreamboothjobs/toy-cat/status") in kube.requests
        ),
        timeout=15,
        what="toy-cat's held status write",
    )
    kubelet.run(pods["toy-dog"], ip=POD_IP)
    kubelet.succeed(pods["toy-dog"], message=json.dumps({"exitCode": 0, "reason": "Succeeded", "step": 400}))
    jc.reconcile()
    started = time.monotonic()
    wait_phase(kube, operator, "toy-dog", "Succeeded", timeout=10)
    assert time.monotonic() - started < 10


def test_deleting_a_job_deletes_its_children(kube, operator):  # noqa: F811
    kube.create(example("toy-cat"))
    jc = JobController(kube)
    first_pod(kube, jc)
    kube.delete("dbj", "default", "toy-cat")
    # kopf's timer holds a finalizer: the operator releases it, then the object is gone
    kube.wait_for(lambda: kube.find("dbj", "default", "toy-cat") is None, what=f"deletion\n{operator.output()}")
    GarbageCollector(kube).collect()  # what the cluster's garbage collector does with ownerReferences
    jc.reconcile()
    for kind in ("jobs", "configmaps", "services", "pods"):
        assert kube.list(kind, "default") == [], kind


def test_a_finished_job_is_deleted_after_its_ttl(kube, operator):  # noqa: F811
    kube.create(example("toy-cat", runPolicy={"ttlSecondsAfterFinished": 1}))
    jc, kubelet = JobController(kube), Kubelet(kube)
    pod = first_pod(kube, jc)
    kubelet.run(pod, ip=POD_IP)
    kubelet.succeed(pod)
    jc.reconcile()
    wait_phase(kube, operator, "toy-cat", "Succeeded")
    kube.wait_for(
        lambda: kube.find("dbj", "default", "toy-cat") is None,
        timeout=15,
        what=f"the job deleted after its TTL\n{operator.output()[-2000:]}",
    )


def immutable(field: str) -> str:
    """The CRD's message for an edit of ``field`` after creation (dreambooth/api/crd.py)."""
    return (
        f"{field} cannot change once the job exists; delete and re-create the job (only runPolicy.suspend may change)"
    )


def test_spec_changes_after_creation_are_refused_by_the_api_server_with_the_crds_message(kube, operator):  # noqa: F811
    """The CRD's CEL rules refuse an edit of anything but runPolicy.suspend (Kubernetes >=
    1.29, as the chart requires; the simulated cluster enforces them once it has the CRD
    object): the running job keeps its spec, and kubectl tells the user why."""
    kube.create(crd.crd())
    kube.create(example("toy-cat"))
    wait_phase(kube, operator, "toy-cat", "Pending")
    before = kube.get("dbj", "default", "toy-cat")
    for edit, where, field in (
        ({"training": {"steps": 999}}, "spec", "training"),
        ({"runPolicy": {"ttlSecondsAfterFinished": 60}}, "spec.runPolicy", "ttlSecondsAfterFinished"),
    ):
        with pytest.raises(ApiError) as err:
            kube.patch("dbj", "default", "toy-cat", {"spec": edit})
        assert err.value.status == 422 and err.value.message == (
            f'DreamBoothJob.dreambooth.io "toy-cat" is invalid: {where}: Invalid value: "object": {immutable(field)}'
        )
    after = kube.get("dbj", "default", "toy-cat")
    assert after["spec"] == before["spec"] and after["metadata"]["generation"] == before["metadata"]["generation"]
    config = json.loads(kube.get("configmaps", "default", "toy-cat-trainer-config")["data"]["config.json"])
    assert config["spec"]["training"]["steps"] == 400  # the running job keeps its spec

    # what a user sees (skipped where kubectl is missing: the refusal above is the same)
    done = kube.kubectl(
        "patch",
        "dbj",
        "toy-cat",
        "--type",
        "merge",
        "-p",
        json.dumps({"spec": {"training": {"steps": 999}}}),
        check=False,
    )
    assert done.returncode == 1
    assert (
        f'The DreamBoothJob "toy-cat" is invalid: spec: Invalid value: "object": {immutable("training")}'
    ) in done.stderr
    # suspend is the one field that may change, and it takes effect
    kube.kubectl("patch", "dbj", "toy-cat", "--type", "merge", "-p", '{"spec": {"runPolicy": {"suspend": true}}}')
    kube.wait_for(
        lambda: kube.get("jobs", "default", "toy-cat-trainer")["spec"]["suspend"] is True,
        what=f"the Job suspended\n{operator.output()[-2000:]}",
    )


def test_the_operator_keeps_no_state_on_the_job_and_retries_what_failed(kube, operator):  # noqa: F811
    """No kopf annotations or finalizers on the user's object; a failed create is retried
    by the next poll cycle; a trainer Job deleted by hand is created again."""
    kube.fail_next("POST", "/namespaces/default/jobs", status=500, times=1)
    kube.create(example("toy-cat"))
    wait_phase(kube, operator, "toy-cat", "Pending")  # the second try, a poll cycle later
    assert "reconciling default/toy-cat failed" in operator.output()
    dbj = kube.get("dbj", "default", "toy-cat")
    assert not dbj["metadata"].get("finalizers")
    assert not [k for k in dbj["metadata"].get("annotations") or {} if "kopf" in k or k.startswith("dreambooth.io/")]
    assert not [p for m, p in kube.requests if m == "PATCH" and p.endswith("/dreamboothjobs/toy-cat")]

    uid = kube.get("jobs", "default", "toy-cat-trainer")["metadata"]["uid"]
    kube.delete("jobs", "default", "toy-cat-trainer")
    kube.wait_for(
        lambda: (
            (kube.find("jobs", "default", "toy-cat-trainer") or {}).get("metadata", {}).get("uid") not in (None, uid)
        ),
        what=f"the trainer Job created again\n{operator.output()[-2000:]}",
    )


def test_multi_node_job_restarts_all_pods_together_once_the_old_ones_are_gone(kube, operator):  # noqa: F811
    """Defect 3: a 2-node job whose pod 1 fails: the Job fails (backoffLimit 0), the operator
    deletes it (pods in the background), waits until no old pod stops any more, then creates
    a new Job for all pods; a preemption restarts it again without counting."""
    dbj = kube.create(example("toy-cat", resources={"nodes": 2}))
    jc, kubelet, gc = JobController(kube), Kubelet(kube), GarbageCollector(kube)
    first = kube.wait_for(lambda: kube.find("jobs", "default", "toy-cat-trainer"), what="the trainer Job")
    jc.reconcile()
    pod0, pod1 = sorted(
        kube.list("pods", "default", labels={"dreambooth.io/job-name": "toy-cat"}),
        key=lambda p: p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"],
    )
    # pod 0 takes a while to stop (it checkpoints on SIGTERM): a finalizer keeps it for now
    kube.patch("pods", "default", pod0["metadata"]["name"], {"metadata": {"finalizers": ["test/stopping"]}})
    kubelet.run(pod0, ip=POD_IP)
    kubelet.run(pod1, ip="127.0.0.3")
    kubelet.fail(pod1, exit_code=137)  # kill -9, the OOM killer
    jc.reconcile()  # backoffLimit 0: the Job fails and its controller stops pod 0

    status = wait_phase(kube, operator, "toy-cat", "Pending")
    kube.wait_for(lambda: condition(kube, "toy-cat", "Ready")["reason"] == "Restarting", what="Restarting")
    kube.wait_for(
        lambda: kube.find("jobs", "default", "toy-cat-trainer") is None,
        what=f"the failed Job deleted\n{operator.output()[-2000:]}",
    )
    assert ("DELETE", "/apis/batch/v1/namespaces/default/jobs/toy-cat-trainer") in kube.requests
    status = status_of(kube, "toy-cat")
    assert status["restarts"] == 1
    message = condition_in(status, "Ready")["message"]
    assert f"pod {pod1['metadata']['name']}: Error (exit 137)" in message
    assert "restarting all 2 pods from the newest checkpoint (restart 1 of at most 3)" in message

    gc.collect()  # the Job's pods go (background): pod 1 at once, pod 0 is still stopping
    assert [p["metadata"]["name"] for p in kube.list("pods", "default")] == [pod0["metadata"]["name"]]
    time.sleep(2.5)  # two poll cycles: no new Job while an old pod may still write
    assert kube.find("jobs", "default", "toy-cat-trainer") is None
    kube.patch("pods", "default", pod0["metadata"]["name"], {"metadata": {"finalizers": None}})
    second = kube.wait_for(
        lambda: kube.find("jobs", "default", "toy-cat-trainer"), what=f"the new Job\n{operator.output()[-2000:]}"
    )
    assert second["metadata"]["uid"] != first["metadata"]["uid"]
    assert second["metadata"]["annotations"]["dreambooth.io/restarts"] == "1"
    assert second["spec"]["backoffLimit"] == 0
    jc.reconcile()
    new_pods = kube.list("pods", "default", labels={"dreambooth.io/job-name": "toy-cat"})
    assert sorted(p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] for p in new_pods) == [
        "0",
        "1",
    ]  # all pods, a new pod 0 too

    # a preemption ends the attempt too, and restarts it without counting
    kubelet.preempt(new_pods[1])
    jc.reconcile()
    kube.wait_for(lambda: condition(kube, "toy-cat", "Ready")["reason"] == "Preempted", what="Preempted")
    kube.wait_for(lambda: kube.find("jobs", "default", "toy-cat-trainer") is None, what="the Job deleted")
    gc.collect()
    third = kube.wait_for(lambda: kube.find("jobs", "default", "toy-cat-trainer"), what="the third Job")
    assert third["metadata"]["annotations"]["dreambooth.io/restarts"] == "1"
    assert status_of(kube, "toy-cat")["restarts"] == 1
    reasons = [e.get("reason") for e in kube.events(dbj)]
    assert reasons.count("Restarted") == 1 and "Preempted" in reasons, reasons
