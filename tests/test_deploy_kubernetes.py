"""The Kubernetes manifests (deploy/kubernetes): valid against the Kubernetes schemas, and in agreement with the daemon.

Offline: ``kubernetes-validate`` carries the schemas of each Kubernetes
release. Beyond the schemas, what Kubernetes cannot know is checked against
the daemon's own settings and code: the probes hit the daemon's endpoints on
its port, every ``KFGAN_*`` variable is a valid setting, the grace period
covers the daemon's longest stop after the preStop wait, the autoscalers scale
on the gauge the daemon exports, and each budget and Service selects the pods.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from kfgan_daemon.service.capacity import CAPACITY_IN_USE
from kfgan_daemon.service.config import ENV_PREFIX, Settings
from kfgan_daemon.service.server import longest_stop

kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install -e '.[test]'")

MANIFESTS = Path(__file__).resolve().parent.parent / "deploy" / "kubernetes"
# The oldest Kubernetes release still common in production, and the newest the package knows.
RELEASES = ("1.29.0", kubernetes_validate.utils.latest_version())
# Values of the variables that Kubernetes fills in at run time, as they would look.
RUNTIME_VALUES = {"status.podIP": "10.0.0.7", "metadata.name": "kfgan-daemon-cpu-5d8f7c9b6-x2k4p"}


def documents() -> list[tuple[str, dict[str, Any]]]:
    found = [(path.name, doc) for path in sorted(MANIFESTS.glob("*.yaml"))
             for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    assert found, f"no manifests in {MANIFESTS}"
    return found


def of_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in documents() if doc["kind"] == kind]


def daemon_settings(container: dict[str, Any]) -> Settings:
    """The settings the container's environment gives the daemon (secrets left out)."""
    values = {}
    for variable in container.get("env", []):
        assert variable["name"].startswith(ENV_PREFIX), variable["name"]
        field = variable["name"][len(ENV_PREFIX):].lower()
        if "value" in variable:
            values[field] = variable["value"]
        elif "fieldRef" in variable.get("valueFrom", {}):
            values[field] = RUNTIME_VALUES[variable["valueFrom"]["fieldRef"]["fieldPath"]]
    # Settings.load raises ConfigError naming any field that is unknown or malformed.
    return Settings.load(**values)


@pytest.mark.parametrize("release", RELEASES)
def test_every_manifest_is_valid_kubernetes(release: str) -> None:
    for name, doc in documents():
        try:
            kubernetes_validate.validate(doc, release, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{name}: {doc['kind']} {doc['metadata']['name']} is not valid Kubernetes {release}: {exc}")


def test_cpu_and_gpu_variants_are_shipped() -> None:
    deployments = {doc["metadata"]["name"]: doc for doc in of_kind("Deployment")}
    assert set(deployments) == {"kfgan-daemon-cpu", "kfgan-daemon-gpu"}
    cpu, gpu = (deployments[name]["spec"]["template"]["spec"]["containers"][0] for name in sorted(deployments))
    assert cpu["image"].endswith(":cpu") and gpu["image"].endswith(":cuda")  # docker/Dockerfile.cpu, .cuda
    assert "nvidia.com/gpu" in gpu["resources"]["limits"] and "nvidia.com/gpu" not in cpu["resources"]["limits"]


def test_pods_agree_with_the_daemon() -> None:
    for deployment in of_kind("Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        settings = daemon_settings(container)
        name = deployment["metadata"]["name"]
        # Media: callers reach the node's addresses (host networking), and each pod has a node of its own.
        assert pod["hostNetwork"] is True and pod["dnsPolicy"] == "ClusterFirstWithHostNet", name
        (port,) = container["ports"]
        assert (port["name"], port["containerPort"]) == ("http", settings.port), name
        # Readiness is the one that says full and draining; liveness must not restart a full daemon.
        assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}, name
        assert container["readinessProbe"]["failureThreshold"] == 1, "a full pod must leave the endpoints at once"
        for probe in ("livenessProbe", "startupProbe"):
            assert container[probe]["httpGet"] == {"path": "/healthz", "port": "http"}, (name, probe)
        # Each pod's own name starts its session ids.
        assert settings.instance_id == RUNTIME_VALUES["metadata.name"]
        pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
        assert pre_stop[0] == "sleep"
        grace = pod["terminationGracePeriodSeconds"]
        assert grace > float(pre_stop[1]) + longest_stop(settings), (
            f"{name}: {grace} s of grace cannot hold the preStop wait ({pre_stop[1]} s) and the daemon's longest "
            f"stop ({longest_stop(settings):.1f} s with drain_timeout = {settings.drain_timeout})"
        )
        assert settings.drain_timeout < grace


def test_selectors_reach_the_pods() -> None:
    pods = {doc["metadata"]["name"]: doc["spec"]["template"]["metadata"]["labels"] for doc in of_kind("Deployment")}

    def selects(selector: dict[str, str]) -> set[str]:
        return {name for name, labels in pods.items() if selector.items() <= labels.items()}

    for deployment in of_kind("Deployment"):
        assert selects(deployment["spec"]["selector"]["matchLabels"]) == {deployment["metadata"]["name"]}
    for budget in of_kind("PodDisruptionBudget"):
        assert selects(budget["spec"]["selector"]["matchLabels"]) == {budget["metadata"]["name"]}
        assert budget["spec"]["maxUnavailable"] == 1
    (service,) = of_kind("Service")
    assert selects(service["spec"]["selector"]) == set(pods)
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] == "http" and port["port"] == Settings.load().port


def test_autoscalers_scale_on_the_capacity_gauge_through_the_adapter() -> None:
    deployments = {doc["metadata"]["name"] for doc in of_kind("Deployment")}
    autoscalers = of_kind("HorizontalPodAutoscaler")
    assert {hpa["spec"]["scaleTargetRef"]["name"] for hpa in autoscalers} == deployments
    for hpa in autoscalers:
        (target,) = hpa["spec"]["metrics"]
        assert target["type"] == "Pods" and target["pods"]["metric"]["name"] == CAPACITY_IN_USE
        # Scaling out below full: the capacity gauge is a share, 1 when every slot is taken.
        assert 0 < float(target["pods"]["target"]["averageValue"].rstrip("m")) / 1000 < 1
    (adapter,) = of_kind("ConfigMap")
    (rule,) = yaml.safe_load(adapter["data"]["config.yaml"])["rules"]
    assert rule["seriesQuery"].startswith(f"{CAPACITY_IN_USE}{{") and rule["name"]["as"] == CAPACITY_IN_USE
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
