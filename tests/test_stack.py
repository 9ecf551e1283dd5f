"""`tilechain up` and `down`: all or nothing, every address its own, Valkey on request.

Stacks from the slim environment (services start in a fraction of a second), on free ports;
Envoy, Valkey and the S3 server are the dev environment's binaries (TILECHAIN_ENVOY_BIN,
TILECHAIN_VALKEY_BIN, TILECHAIN_WEED_BIN)."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path
from typing import Iterator

import pytest
import redis

from tilechain import envoy, ports, s3server, valkey
from tilechain.ports import unused_port
from tilechain.services.core.config import address_env
from tilechain.stack import COMPONENTS, LOCAL_COMPONENTS, Stack, job_store_uses

from .conftest import SLIM_PYTHON, free_port


def processes_with(variable: str, value: str) -> list[int]:
    """The pids of this user's processes whose environment holds variable=value."""
    needle = f"{variable}={value}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if needle in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:  # gone, or another user's
                pass
    return found


@pytest.fixture
def stack_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({address_env(c): f"127.0.0.1:{free_port()}" for c in (*LOCAL_COMPONENTS, "valkey")})
    env.update({
        envoy.ADMIN_ENV: f"127.0.0.1:{free_port()}",
        envoy.BINARY_ENV: envoy.binary(),
        valkey.BINARY_ENV: valkey.binary(),
        s3server.BINARY_ENV: s3server.binary(),
    })
    env.pop("TILECHAIN_JOB_STORE", None)
    return env


def tilechain(env: dict[str, str], tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    dirs = ["--run-dir", str(tmp_path / "run"), "--log-dir", str(tmp_path / "log")]
    if args[0] == "up":
        dirs += ["--data-dir", str(tmp_path / "data")]
    return subprocess.run([str(SLIM_PYTHON), "-m", "tilechain.cli", *args, *dirs], capture_output=True, text=True, env=env, timeout=180)


def test_up_with_valkey_then_down(stack_env: dict[str, str], tmp_path: Path) -> None:
    up = tilechain(stack_env, tmp_path, "up", "--with", "valkey")
    try:
        assert up.returncode == 0, up.stderr
        lines = {line.split()[0]: line for line in up.stdout.splitlines() if not line.startswith("web page:")}
        for component in (*LOCAL_COMPONENTS, "valkey"):
            assert f" {stack_env[address_env(component)]} " in lines[component] and "SERVING" in lines[component]
        assert stack_env[envoy.ADMIN_ENV] in next(line for line in up.stdout.splitlines() if line.startswith("envoy-admin "))
        assert f"web page: http://{stack_env[address_env('web')]}/" in up.stdout
        pids = {p.stem: int(p.read_text()) for p in (tmp_path / "run").glob("*.pid")}
        assert set(pids) == {*LOCAL_COMPONENTS, "valkey"}
        # the gateway was pointed at the Valkey it started
        gateway_env = (Path("/proc") / str(pids["gateway"]) / "environ").read_bytes().split(b"\0")
        assert f"TILECHAIN_JOB_STORE=redis://{stack_env[address_env('valkey')]}/0".encode() in gateway_env
    finally:
        down = tilechain(stack_env, tmp_path, "down")
    assert down.returncode == 0 and set(down.stdout.removeprefix("stopped: ").strip().split(", ")) == {*LOCAL_COMPONENTS, "valkey"}
    assert processes_with(address_env("gateway"), stack_env[address_env("gateway")]) == []


def test_up_refuses_a_taken_port_before_starting_anything(stack_env: dict[str, str], tmp_path: Path) -> None:
    """Envoy's admin port is taken: up says so, names it, and starts nothing."""
    with socket.socket() as taken:
        host, port = stack_env[envoy.ADMIN_ENV].rsplit(":", 1)
        taken.bind((host, int(port)))
        taken.listen()
        up = tilechain(stack_env, tmp_path, "up")
    assert up.returncode == 1
    assert f"envoy (admin) failed to start: {stack_env[envoy.ADMIN_ENV]} is in use by another process" in up.stderr
    assert list((tmp_path / "run").glob("*.pid")) == []
    assert not (tmp_path / "log" / "gateway.log").exists()


def test_up_is_all_or_nothing(stack_env: dict[str, str], tmp_path: Path) -> None:
    """Envoy fails after the services and the gateway have started: up names Envoy, its exit
    status and its log, and stops every process it started (none with this stack's addresses is
    left, no pid file either)."""
    broken = tmp_path / "envoy"
    broken.write_text("#!/bin/sh\necho 'envoy: cannot start (a test stand-in)'\nexit 3\n")
    broken.chmod(0o755)
    up = tilechain({**stack_env, envoy.BINARY_ENV: str(broken)}, tmp_path, "up")
    assert up.returncode == 1
    assert "envoy failed to start: exited with status 3" in up.stderr
    assert "envoy: cannot start (a test stand-in)" in up.stderr  # the log's last lines say why
    assert f"log: {tmp_path / 'log' / 'envoy.log'}" in up.stderr
    assert list((tmp_path / "run").glob("*.pid")) == []
    assert processes_with(address_env("gateway"), stack_env[address_env("gateway")]) == []
    for component in (*COMPONENTS[:-1],):  # they had started, and were stopped
        log = (tmp_path / "log" / f"{component}.log").read_text()
        assert "serving" in log and "stopped" in log, component


def test_a_service_refuses_a_port_another_server_holds(stack_env: dict[str, str], tmp_path: Path) -> None:
    """gRPC servers listen with SO_REUSEPORT by default, so a second one on a taken port would
    start and share it; ours exit instead (grpc.so_reuseport off)."""
    stack = Stack({"reduce": stack_env[address_env("reduce")]}, tmp_path, python=str(SLIM_PYTHON))
    stack.start(("reduce",))
    try:
        twin = Stack({"reduce": stack_env[address_env("reduce")]}, tmp_path / "twin", python=str(SLIM_PYTHON))
        with pytest.raises(RuntimeError, match="is in use by another process"):
            twin.start(("reduce",))
        twin.launch("reduce", stack_env[address_env("reduce")])  # past the stack's own check
        assert twin.processes["reduce"].wait(timeout=60) == 1
        assert f"cannot listen on {stack_env[address_env('reduce')]}" in twin.log_path("reduce").read_text()
    finally:
        stack.stop()


@pytest.fixture
def valkey_stack(tmp_path: Path) -> Iterator[Stack]:
    stack = Stack({"valkey": f"127.0.0.1:{free_port()}"}, tmp_path / "log", data_dir=tmp_path)
    stack.start(("valkey",))
    yield stack
    stack.stop()


def test_valkey_answers_and_keeps_its_data(valkey_stack: Stack, tmp_path: Path) -> None:
    host, port = valkey_stack.addresses["valkey"].rsplit(":", 1)
    client = redis.Redis(host=host, port=int(port), socket_timeout=10)
    assert client.ping()
    assert client.config_get("appendonly") == {"appendonly": "yes"}
    assert client.config_get("dir") == {"dir": str(tmp_path / "valkey")}
    client.rpush("tilechain:test", "kept")
    valkey_stack.stop("valkey")
    assert valkey_stack.processes["valkey"].returncode == 0  # SIGTERM: a clean shutdown
    valkey_stack.restart("valkey")
    assert client.lrange("tilechain:test", 0, -1) == [b"kept"]  # read back from the append-only file
    assert "Ready to accept connections" in (tmp_path / "log" / "valkey.log").read_text()


def test_which_job_store_settings_name_the_local_valkey() -> None:
    assert job_store_uses("127.0.0.1:6379", "redis://127.0.0.1:6379/0")
    assert job_store_uses("127.0.0.1:6379", "redis://localhost/0")  # default port
    assert job_store_uses("127.0.0.1:7000", "redis://localhost:7000")
    assert not job_store_uses("127.0.0.1:6379", "redis://127.0.0.1:6380/0")
    assert not job_store_uses("127.0.0.1:6379", "redis://valkey.example:6379/0")
    assert not job_store_uses("127.0.0.1:6379", "sqlite:///var/jobs.db")
    assert not job_store_uses("127.0.0.1:6379", "")


def test_ports_are_picked_below_the_ephemeral_range_and_never_twice() -> None:
    """A port an outgoing connection could take as its source port before our server binds it is
    never picked (the kernel's ephemeral range leaves room below it on Linux by default), nor
    one a backing server's internal listener may pick while the stack's own are not yet bound."""
    picked = [unused_port() for _ in range(200)]
    internal = [unused_port(internal=True) for _ in range(200)]
    assert len(set(picked + internal)) == 400
    low = ports.ephemeral_low()
    assert all(ports.LOWEST <= port < low for port in picked + internal)
    assert max(internal) < min(picked)
    assert all(ports.bindable("127.0.0.1", port) for port in picked + internal)
