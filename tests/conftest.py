"""Fixtures: the real stack (a service per family, the gateway and Envoy, each its own process) on free
loopback ports, with its own output root."""

from __future__ import annotations

import os

import socket
from pathlib import Path
from typing import Iterator

import grpc
import pytest

from tilechain.client import connect
from tilechain.stack import COMPONENTS, Stack
from tilechain.v1 import gateway_pb2_grpc


ROOT = Path(__file__).resolve().parents[1]
# the slim environment `make setup` builds (no torch): its services start in a fraction of a
# second, for tests that start stacks of their own with model-free chains
SLIM_PYTHON = ROOT / "var" / "venv-slim" / "bin" / "python"
os.environ["HF_HUB_OFFLINE"] = "1"  # the in-process model tests never reach the network either


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job_store_url(directory: Path) -> str:
    """A fresh SQLite job store for one gateway (or several, one after the other)."""
    return f"sqlite:///{directory.resolve() / 'jobs.db'}"


@pytest.fixture(scope="session")
def output_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("outputs").resolve()


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory, output_root: Path) -> Iterator[Stack]:
    addresses = {c: f"127.0.0.1:{free_port()}" for c in COMPONENTS}
    stack = Stack(addresses, tmp_path_factory.mktemp("logs"))
    env = {
        "TILECHAIN_OUTPUT_ROOT": str(output_root),
        "TILECHAIN_MAX_PIXELS": str(2048 * 2048),
        "TILECHAIN_MODELS_ROOT": str(ROOT / "var" / "models"),  # built by `make models`
        "TILECHAIN_MODELS_CONFIG": str(ROOT / "models.yaml"),
        "TILECHAIN_ENVOY_ADMIN_ADDR": f"127.0.0.1:{free_port()}",  # not 9901: a `make up` stack may hold it
        # its own job store: never var/jobs.db, where queued jobs of another run would wait
        "TILECHAIN_JOB_STORE": job_store_url(tmp_path_factory.mktemp("jobs")),
    }
    stack.start(extra_env=env)
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
