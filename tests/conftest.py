"""Fixtures: the real stack (a service per family, the gateway and Envoy, and the S3 server beside
them, each its own process) on free loopback ports, with its own output root."""

from __future__ import annotations

import os

from pathlib import Path
from typing import Iterator

import grpc
import pytest

from tilechain.client import connect
from tilechain.ports import unused_port
from tilechain.stack import BACKING, COMPONENTS, Stack
from tilechain.v1 import gateway_pb2_grpc


ROOT = Path(__file__).resolve().parents[1]
# the slim environment `make setup` builds (no torch): its services start in a fraction of a
# second, for tests that start stacks of their own with model-free chains
SLIM_PYTHON = ROOT / "var" / "venv-slim" / "bin" / "python"
os.environ["HF_HUB_OFFLINE"] = "1"  # the in-process model tests never reach the network either


def free_port() -> int:
    return unused_port("127.0.0.1")


def job_store_url(directory: Path) -> str:
    """A fresh SQLite job store for one gateway (or several, one after the other)."""
    return f"sqlite:///{directory.resolve() / 'jobs.db'}"


@pytest.fixture(scope="session")
def output_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("outputs").resolve()


# onnx-web's example pipelines write to this endpoint; the tests' S3 server stands in for it
ONNX_WEB_S3_ENDPOINT = "http://scylla.home.holdmyran.ch:8000"
S3_BUCKETS = ("tilechain", "storage-stable-diffusion")
SOURCE_MAX_BYTES = 8 * 1024 * 1024


def aws_files(folder: Path) -> dict[str, str]:
    """boto3's shared config and credentials files with the profile onnx-web's examples name
    (`ceph`), holding the tests' S3 server's keys: the services find them as any profile."""
    from tilechain import s3server

    access, secret = s3server.credentials({})
    (folder / "credentials").write_text(
        "".join(f"[{name}]\naws_access_key_id = {access}\naws_secret_access_key = {secret}\n" for name in ("default", "ceph"))
    )
    (folder / "config").write_text("[default]\nregion = us-east-1\n[profile ceph]\nregion = us-east-1\n")
    return {"AWS_SHARED_CREDENTIALS_FILE": str(folder / "credentials"), "AWS_CONFIG_FILE": str(folder / "config")}


SESSION_STACK = (*BACKING, *COMPONENTS)  # what `make up` starts but the web page's server


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory, output_root: Path) -> Iterator[Stack]:
    addresses = {c: f"127.0.0.1:{free_port()}" for c in SESSION_STACK}
    stack = Stack(addresses, tmp_path_factory.mktemp("logs"))
    env = {
        "TILECHAIN_OUTPUT_ROOT": str(output_root),
        "TILECHAIN_MAX_PIXELS": str(2048 * 2048),
        "TILECHAIN_MODELS_ROOT": str(ROOT / "var" / "models"),  # built by `make models`
        "TILECHAIN_MODELS_CONFIG": str(ROOT / "models.yaml"),
        "TILECHAIN_ENVOY_ADMIN_ADDR": f"127.0.0.1:{free_port()}",  # not 9901: a `make up` stack may hold it
        # its own job store: never var/jobs.db, where queued jobs of another run would wait
        "TILECHAIN_JOB_STORE": job_store_url(tmp_path_factory.mktemp("jobs")),
        # the S3 server (SeaweedFS), its buckets, and onnx-web's example endpoint mapped onto it
        "TILECHAIN_S3_DATA_DIR": str(tmp_path_factory.mktemp("s3")),
        "TILECHAIN_S3_BUCKETS": ",".join(S3_BUCKETS),
        "TILECHAIN_S3_ENDPOINTS": f"{ONNX_WEB_S3_ENDPOINT}=http://{addresses['s3']}",
        **aws_files(tmp_path_factory.mktemp("aws")),
        # source-url fetches from the tests' own HTTP server on loopback
        "TILECHAIN_SOURCE_ALLOW_NETWORKS": "127.0.0.1/32",
        "TILECHAIN_SOURCE_MAX_BYTES": str(SOURCE_MAX_BYTES),
    }
    stack.start(SESSION_STACK, extra_env=env)
    yield stack
    stack.stop()


@pytest.fixture(scope="session")
def gateway(stack: Stack) -> gateway_pb2_grpc.GatewayStub:
    return connect(stack.addresses["gateway"])


def run_events(gateway: gateway_pb2_grpc.GatewayStub, request, timeout: float = 60.0) -> list:
    return list(gateway.RunChain(request, timeout=timeout))


def rpc_error(gateway: gateway_pb2_grpc.GatewayStub, request) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        run_events(gateway, request)
    return info.value
