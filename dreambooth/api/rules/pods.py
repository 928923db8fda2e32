"""The API server's rules for what a job puts into its pods: tolerations, MIG slices, env
names, extra resources."""

from __future__ import annotations

from dreambooth.api.pod import (
    env_name_problem,
    is_hugepages,
    is_mig,
    is_zero,
    quantity_problem,
    resource_name_problem,
)
from dreambooth.api.rules.violation import Violation


def tolerations(spec, eff):
    """The API server's rules for a pod's tolerations."""
    for i, t in enumerate(spec.resources.tolerations):
        at = f"resources.tolerations[{i}]"
        if t.operator == "Exists" and t.value:
            yield Violation(
                f"{at}.value",
                "operator Exists takes no value (it matches any value "
                "of the key): remove value, or use operator: Equal",
            )
        if not t.key and t.operator != "Exists":
            yield Violation(
                f"{at}.operator",
                "a toleration without a key matches every taint and needs operator: Exists; or set key",
            )
        if t.toleration_seconds is not None and t.effect != "NoExecute":
            yield Violation(
                f"{at}.tolerationSeconds",
                "only applies to effect NoExecute: set effect: NoExecute, or remove tolerationSeconds",
            )


def mig_is_one_device(spec, eff):
    gpu = spec.resources.gpu.resource_name
    if is_mig(gpu) and spec.resources.gpus_per_node > 1:
        yield Violation(
            "resources.gpusPerNode",
            f"{gpu} is a MIG slice, one CUDA device per process, and NCCL does not run between "
            f"MIG slices of one pod: use gpusPerNode: 1, or whole GPUs (resources.gpu."
            f"resourceName: nvidia.com/gpu) for {spec.resources.gpus_per_node} GPUs per pod",
        )


def pod_env(spec, eff):
    seen: set[str] = set()
    for i, var in enumerate(spec.resources.env):
        problem = env_name_problem(var.name)
        if problem is None and var.name in seen:
            problem = f"{var.name} is listed twice: keep one"
        if problem:
            yield Violation(f"resources.env[{i}].name", problem)
        seen.add(var.name)


def extra_resources(spec, eff):
    res = spec.resources
    for name, quantity in res.extra_resources.items():
        problem = resource_name_problem(name, res.gpu.resource_name) or quantity_problem(name, quantity)
        if problem:
            yield Violation(f"resources.extraResources.{name}", problem)
    hugepages = [n for n, q in res.extra_resources.items() if is_hugepages(n) and not is_zero(q)]
    if hugepages and not (res.cpu or res.memory):
        yield Violation(
            "resources.extraResources",
            f"{hugepages[0]} needs a CPU or memory request as well (Kubernetes refuses the pod "
            "otherwise): set resources.memory (or resources.cpu)",
        )
