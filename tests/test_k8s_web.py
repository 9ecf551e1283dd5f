"""The web page on Kubernetes: the k8s/web component, applied over the base by k8s/overlays/web,
adds a Deployment and a Service named web beside Envoy and leaves the base's objects as they are."""

from __future__ import annotations

import kubernetes_validate
import yaml
from kubernetes_validate.utils import latest_version

from tilechain.services.core.config import DEFAULT_PORTS, address_env
from tilechain.stack import WEB

from .test_k8s import build, by_kind, container


def test_the_web_overlay_adds_the_web_component() -> None:
    base, overlay = build("base"), build("overlays/web")
    deployments, services = by_kind(overlay, "Deployment"), by_kind(overlay, "Service")
    assert set(deployments) == set(by_kind(base, "Deployment")) | {WEB}
    assert set(services) == set(by_kind(base, "Service")) | {WEB}
    for name, deployment in by_kind(base, "Deployment").items():
        assert deployments[name] == deployment, name  # the base untouched

    deployment, service = deployments[WEB], services[WEB]
    port = DEFAULT_PORTS[WEB]
    assert deployment["metadata"]["namespace"] == service["metadata"]["namespace"] == "tilechain"
    c = container(deployment)
    assert c["image"] == "tilechain:latest"
    assert c["args"] == ["web", "--address", f"[::]:{port}"]
    [container_port] = c["ports"]
    [service_port] = service["spec"]["ports"]
    assert container_port["containerPort"] == service_port["port"] == port and service_port["targetPort"] == container_port["name"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in service["spec"]["selector"].items())
    for probe in ("readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/healthz", "port": "http"}

    # the shared settings (the generated, hashed ConfigMap): Envoy's address and the output root
    [env_from] = c["envFrom"]
    [config] = [o for n, o in by_kind(overlay, "ConfigMap").items() if n.startswith("tilechain-config-")]
    assert env_from["configMapRef"]["name"] == config["metadata"]["name"]
    assert config["data"][address_env("envoy")] == f"envoy:{DEFAULT_PORTS['envoy']}"

    # the outputs volume, read-only, on persist's node (ReadWriteOnce)
    spec = deployment["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == config["data"]["TILECHAIN_OUTPUT_ROOT"])
    assert mount["readOnly"] is True
    assert volumes[mount["name"]]["persistentVolumeClaim"] == {"claimName": "tilechain-outputs", "readOnly": True}
    [term] = spec["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert term["labelSelector"]["matchLabels"] == {"app.kubernetes.io/name": "persist"}
    assert c["securityContext"]["readOnlyRootFilesystem"] is True

    version = latest_version()
    for document in (deployment, service):
        kubernetes_validate.validate(document, version, strict=True)


def test_the_image_carries_the_page() -> None:
    from .test_k8s import K8S

    assert "COPY web/static web/static" in (K8S / "Dockerfile").read_text()
    assert "!web/static/" in (K8S / "Dockerfile.dockerignore").read_text().split()
    assert yaml.safe_load((K8S / "web" / "kustomization.yaml").read_text())["kind"] == "Component"
