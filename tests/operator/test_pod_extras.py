"""What a real GPU cluster adds to trainer pods: environment variables (NCCL settings) and
extended resources (RDMA devices, hugepages), from the operator's settings (the chart's
trainer.env / trainer.extraResources) and from the job (spec.resources.env /
extraResources), the job winning per name; and what neither may set."""

from __future__ import annotations

import pytest

from dreambooth.api import SpecError, validate_job
from dreambooth.api.pod import RESERVED_ENV, env_name_problem
from dreambooth.operator import podtemplate, resources
from dreambooth.operator.settings import OperatorSettings, SettingsError
from tests.operator.test_resources import (
    CASES,
    CLUSTER_JOB,
    CLUSTER_SETTINGS,
    cluster_extras_doc,
    env_of,
    inputs_for,
    trainer,
)
from tests.support.jobs import make_job


def _pod_env(inputs) -> list[tuple[str, str]]:
    return [(e["name"], e.get("value")) for e in trainer(resources.job(inputs))["env"]]


def test_job_env_follows_the_operators_own_and_wins_over_its_defaults_per_name():
    env = _pod_env(inputs_for(cluster_extras_doc(), CLUSTER_SETTINGS))
    names = [name for name, _ in env]
    assert env[-3:] == [("NCCL_SOCKET_IFNAME", "eth0"), ("NCCL_DEBUG", "INFO"), ("NCCL_IB_HCA", "mlx5")]
    assert names.index("DREAMBOOTH_CONFIG") < names.index("NCCL_SOCKET_IFNAME")  # operator's first
    assert len(names) == len(set(names))
    plain = _pod_env(inputs_for(make_job(CLUSTER_JOB), CLUSTER_SETTINGS))  # the defaults alone
    assert plain[-2:] == [("NCCL_SOCKET_IFNAME", "eth0"), ("NCCL_DEBUG", "WARN")]
    assert not [n for n, _ in _pod_env(inputs_for(make_job(CLUSTER_JOB))) if n.startswith("NCCL_")]


def test_extra_resources_are_requested_and_limited_alike_and_the_job_wins():
    container = trainer(resources.job(inputs_for(cluster_extras_doc(), CLUSTER_SETTINGS)))
    expected = {
        "nvidia.com/gpu": "4",
        "memory": "256Gi",
        "hugepages-2Mi": "1Gi",
        "nvidia.com/hostdev": "4",
        "rdma/rdma_shared_device_a": "1",
    }
    assert container["resources"] == {"limits": expected, "requests": expected}
    more = make_job(CLUSTER_JOB, resources={"extraResources": {"rdma/rdma_shared_device_a": "2"}})
    assert (
        trainer(resources.job(inputs_for(more, CLUSTER_SETTINGS)))["resources"]["limits"]["rdma/rdma_shared_device_a"]
        == "2"
    )


def test_a_zero_drops_an_operator_default():
    """A CPU-only job on a cluster whose SRE requests RDMA devices for every trainer pod."""
    doc = make_job(CLUSTER_JOB, resources={"gpusPerNode": 0, "extraResources": {"rdma/rdma_shared_device_a": "0"}})
    assert "resources" not in trainer(resources.job(inputs_for(doc, CLUSTER_SETTINGS)))


def test_the_gpu_is_counted_by_gpus_per_node_only():
    """Even when an operator default names the GPU resource a job uses (here a vendor name
    the settings cannot know to be a GPU), the pod asks for gpusPerNode of it."""
    settings = OperatorSettings(trainer_extra_resources=(("example.com/accelerator", "8"),))
    doc = make_job(
        CLUSTER_JOB,
        resources={"gpusPerNode": 2, "gpu": {"resourceName": "example.com/accelerator"}},
        training={"batchSize": 2},
    )
    limits = trainer(resources.job(inputs_for(doc, settings)))["resources"]["limits"]
    assert limits == {"example.com/accelerator": "2"}


def kubernetes_expand(value: str, defined: dict[str, str]) -> str:
    """What the kubelet makes of an env value: ``$(NAME)`` of an earlier variable is replaced,
    ``$$`` becomes ``$``, anything else stays (Kubernetes' expansion rules)."""
    out, i = [], 0
    while i < len(value):
        if value[i] == "$" and i + 1 < len(value):
            if value[i + 1] == "$":
                out.append("$")
                i += 2
                continue
            end = value.find(")", i + 2)
            if value[i + 1] == "(" and end != -1:
                name = value[i + 2 : end]
                out.append(defined.get(name, value[i : end + 1]))
                i = end + 1
                continue
        out.append(value[i])
        i += 1
    return "".join(out)


@pytest.mark.parametrize(
    "value", ["eth0", "^docker,lo", "=mlx5_0:1", "$(HOME)", "a$$b", "cost $5", "ends with $", "$(UNDEFINED", ""]
)
def test_values_reach_the_process_literally(value):
    doc = make_job(CLUSTER_JOB, resources={"env": [{"name": "NCCL_SOCKET_IFNAME", "value": value}]})
    env = trainer(resources.job(inputs_for(doc)))["env"]
    defined = {e["name"]: e["value"] for e in env if "value" in e}
    assert kubernetes_expand(env_of(resources.job(inputs_for(doc)))["NCCL_SOCKET_IFNAME"]["value"], defined) == value


def test_the_expansion_model_is_kubernetes_own():
    """The helper above must expand, or the test before proves nothing."""
    assert kubernetes_expand("$(HOME)/x", {"HOME": "/h"}) == "/h/x"
    assert kubernetes_expand("$$(HOME)", {"HOME": "/h"}) == "$(HOME)"


def test_every_variable_the_operator_sets_is_refused_in_jobs_and_settings():
    """If the operator starts setting a new variable, a job must not be able to set it too
    (two values of one name in a pod): dreambooth/api/pod.py's RESERVED_ENV must grow."""
    own: set[str] = set()
    for _, inputs in CASES:
        extra = {e["name"] for e in podtemplate.extra_env(inputs)}
        own |= {e["name"] for e in podtemplate._env(inputs)} - extra
    assert {"DREAMBOOTH_CONFIG", "HOME", "AWS_ACCESS_KEY_ID", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT"} <= own
    for name in sorted(own):
        assert env_name_problem(name), f"{name} is set by the operator but a job may set it too"
        with pytest.raises(SpecError, match=rf"spec\.resources\.env\[0\]\.name: {name}"):
            validate_job(make_job(CLUSTER_JOB, resources={"env": [{"name": name, "value": "x"}]}), cluster=True)
        with pytest.raises(SettingsError, match="DREAMBOOTH_TRAINER_ENV="):
            OperatorSettings.from_env({"DREAMBOOTH_TRAINER_ENV": f'[{{"name": "{name}", "value": "x"}}]'})


def test_each_reserved_group_explains_itself():
    for group in RESERVED_ENV:
        for name in [*group.names, *(p + "X" for p in group.prefixes)]:
            assert group.why in env_name_problem(name) and group.action in env_name_problem(name)


# ------------------------------------------------------------------------------ settings


def test_settings_read_the_charts_json():
    s = OperatorSettings.from_env(
        {
            "DREAMBOOTH_TRAINER_ENV": '[{"name": "NCCL_IB_HCA", "value": "mlx5"}, {"name": "NCCL_DEBUG", "value": "INFO"}]',
            "DREAMBOOTH_TRAINER_EXTRA_RESOURCES": '{"rdma/rdma_shared_device_a": 1, "nvidia.com/hostdev": "8"}',
        }
    )
    assert s.trainer_env == (("NCCL_IB_HCA", "mlx5"), ("NCCL_DEBUG", "INFO"))
    assert s.trainer_extra_resources == (("nvidia.com/hostdev", "8"), ("rdma/rdma_shared_device_a", "1"))
    for empty in ("", "[]", "{}"):
        var = "DREAMBOOTH_TRAINER_ENV" if empty != "{}" else "DREAMBOOTH_TRAINER_EXTRA_RESOURCES"
        assert OperatorSettings.from_env({var: empty}) == OperatorSettings()


@pytest.mark.parametrize(
    ("var", "raw", "says"),
    [
        ("TRAINER_ENV", "NCCL_DEBUG=INFO", 'not JSON: use e.g. [{"name"'),
        ("TRAINER_ENV", '{"NCCL_DEBUG": "INFO"}', "use a list of {name, value}"),
        ("TRAINER_ENV", '[{"name": "NCCL_P2P_DISABLE", "value": 1}]', "with string values"),
        ("TRAINER_ENV", '[{"name": "AWS_REGION", "value": "x"}]', "come from spec.storage"),
        ("TRAINER_ENV", '[{"name": "WANDB_API_KEY", "value": "x"}]', "looks like a credential"),
        ("TRAINER_ENV", '[{"name": "A"}, {"name": "A"}]', "A is listed twice"),
        ("TRAINER_ENV", '[{"name": "1A"}]', "is not an environment variable name"),
        ("TRAINER_EXTRA_RESOURCES", '[{"rdma/hca": 1}]', "use an object of resource name -> number"),
        ("TRAINER_EXTRA_RESOURCES", '{"memory": "1Gi"}', "memory has its own field"),
        ("TRAINER_EXTRA_RESOURCES", '{"nvidia.com/gpu": 1}', "request it with resources.gpusPerNode"),
        ("TRAINER_EXTRA_RESOURCES", '{"nvidia.com/mig-1g.10gb": 1}', "the job's GPU"),
        ("TRAINER_EXTRA_RESOURCES", '{"hugepages-2Mi": "1Gi"}', "set them per job"),
        ("TRAINER_EXTRA_RESOURCES", '{"rdma/hca": 0.5}', "0.5 is not a whole number of devices"),
        ("TRAINER_EXTRA_RESOURCES", '{"rdma/hca": true}', "not a whole number"),
        ("TRAINER_EXTRA_RESOURCES", '{"rdma": 1}', "not an extended resource name"),
    ],
)
def test_settings_refuse_what_a_job_may_not_set_either(var, raw, says):
    with pytest.raises(SettingsError) as err:
        OperatorSettings.from_env({f"DREAMBOOTH_{var}": raw})
    (problem,) = err.value.problems
    assert problem.startswith(f"DREAMBOOTH_{var}=") and says in problem, problem
