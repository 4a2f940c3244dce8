"""The cluster side in infra/: launcher configs pass Ray's own schema, Kubernetes manifests and job entry
points are consistent with the code (every flag they pass parses), token authentication everywhere."""

from __future__ import annotations

import importlib.util
import shlex
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml

from flows.cli import add_flow_commands
from pipeline.cli import build_parser

INFRA = Path(__file__).resolve().parents[1] / "infra"


def _launcher(name: str) -> dict[str, Any]:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((INFRA / "ray" / name).read_text())
    prepared = prepare_config(config)
    validate_config(prepared)  # Ray's JSON schema for cluster configs: raises on any unknown or bad field
    return prepared


def _manifests(name: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all((INFRA / "k8s" / name).read_text()) if doc]


def _pod_specs(cluster_spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    specs = {"head": cluster_spec["headGroupSpec"]["template"]["spec"]}
    specs |= {g["groupName"]: g["template"]["spec"] for g in cluster_spec["workerGroupSpecs"]}
    return specs


def test_aws_config_has_gpu_inference_and_cpu_crf_workers() -> None:
    config = _launcher("aws-gpu.yaml")
    types = config["available_node_types"]
    assert types["head"]["resources"] == {"CPU": 0}, "drivers only on the head"
    assert types["gpu"]["resources"]["GPU"] >= 1
    assert "GPU" not in types["cpu"]["resources"] and types["cpu"]["resources"]["CPU"] >= 8
    assert config["file_mounts"]["~/.ray/auth_token"], "the token reaches every node"
    options = " ".join(config["docker"]["run_options"])
    assert "RAY_AUTH_MODE=token" in options and "/data:/data" in options


def test_local_config_targets_loopback_and_never_stops_other_clusters() -> None:
    config = _launcher("local.yaml")
    assert config["provider"] == {"type": "local", "head_ip": "127.0.0.1", "worker_ips": []}
    starts = " ".join(config["head_start_ray_commands"])
    assert "ray stop" not in starts and "RAY_AUTH_MODE=token" in starts
    assert "~/.ray/auth_token" in config["file_mounts"]


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml"])
def test_kuberay_manifests_authenticate_and_share_storage(name: str) -> None:
    clusters = _clusters(name)
    assert clusters
    installed = ".".join(ray.__version__.split(".")[:2])
    for cluster in clusters:
        assert cluster["rayVersion"].startswith(installed)
        specs = _pod_specs(cluster)
        assert {"head", "gpu", "crf"} <= set(specs)
        # KubeRay makes the token and sets it in every Ray container, the autoscaler's included
        assert cluster["authOptions"] == {"mode": "token"}
        for group, spec in specs.items():
            (container,) = spec["containers"]
            assert {"name": "data", "mountPath": "/data"} in container["volumeMounts"], group
        gpu = specs["gpu"]["containers"][0]["resources"]
        assert gpu["limits"]["nvidia.com/gpu"] == "1"
        assert "nvidia.com/gpu" not in specs["crf"]["containers"][0]["resources"].get("requests", {})


def _clusters(name: str) -> list[dict[str, Any]]:
    docs = _manifests(name)
    return [d["spec"] for d in docs if d["kind"] == "RayCluster"] + [
        d["spec"]["rayClusterSpec"] for d in docs if d["kind"] == "RayJob"
    ]


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml"])
def test_kuberay_pods_are_closed_by_default(name: str) -> None:
    """Non-root, no privilege escalation, no capabilities, read-only root, requests and limits, /dev/shm,
    and the dashboard on the head's loopback (port-forward reaches it)."""
    for cluster in _clusters(name):
        assert cluster["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "127.0.0.1"
        autoscaler = cluster["autoscalerOptions"]
        assert autoscaler["securityContext"]["allowPrivilegeEscalation"] is False
        assert {"cpu", "memory"} <= set(autoscaler["resources"]["limits"])
        for group, spec in _pod_specs(cluster).items():
            assert (
                spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] > 0
            )
            volumes = {v["name"]: v for v in spec["volumes"]}
            (container,) = spec["containers"]
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False, group
            assert security["readOnlyRootFilesystem"] is True and security["capabilities"]["drop"] == ["ALL"]
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"][kind]), (group, kind)
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory", group
            assert "emptyDir" in volumes[mounts["/tmp"]], "Ray writes under /tmp on a read-only root"
    (job,) = [d for d in _manifests("rayjob.yaml") if d["kind"] == "RayJob"]
    # the submitter beside the head reaches the job API on localhost; KubeRay follows its container status
    assert job["spec"]["submissionMode"] == "SidecarMode"


def test_no_dashboard_or_port_is_opened_to_every_interface() -> None:
    for path in [*INFRA.rglob("*.yaml"), INFRA / "docker" / "Dockerfile"]:
        assert "0.0.0.0" not in path.read_text(), path
    starts = " ".join(_launcher("aws-gpu.yaml")["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in starts


def test_the_image_runs_as_a_user_without_compilers() -> None:
    dockerfile = (INFRA / "docker" / "Dockerfile").read_text()
    stages = dockerfile.split("\nFROM ")[1:]
    assert len(stages) >= 2, "a build stage and a runtime stage"
    runtime = stages[-1]
    assert "build-essential" not in runtime and "-dev" not in runtime and "gcc" not in runtime
    users = [line.split()[1] for line in runtime.splitlines() if line.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in {"0", "root"}


def test_job_entry_points_parse_with_the_cli() -> None:
    parser = build_parser(add_flow_commands)
    (job,) = [d for d in _manifests("rayjob.yaml") if d["kind"] == "RayJob"]
    words = shlex.split(job["spec"]["entrypoint"])
    assert words[0] == "deeplab"
    args = parser.parse_args(words[1:])
    assert args.command == "segment" and args.gpus_per_model_actor == 0.5

    spec = importlib.util.spec_from_file_location("segment_flow", INFRA / "ray" / "segment_flow.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    argv = module.flow_arguments(["scenes/", "--model", "m.safetensors", "--out", "out"])
    args = parser.parse_args(argv)
    assert args.command == "run-flow" and args.ray_address == "auto"
    args = parser.parse_args(
        module.flow_arguments(["s", "--model", "m", "--out", "o", "--ray-address", "x:1"])
    )
    assert args.ray_address == "x:1"


def test_container_image_is_cuda_with_the_project_installed() -> None:
    dockerfile = (INFRA / "docker" / "Dockerfile").read_text()
    assert dockerfile.startswith("#") and "\nARG BASE=nvidia/cuda:" in dockerfile
    assert "python3.11" in dockerfile and "pip wheel --no-deps --wheel-dir /wheels ." in dockerfile
    ignored = (INFRA.parent / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored
