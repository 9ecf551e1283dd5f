"""Starting and stopping the local stack: the six stage services, the gateway and Envoy in front
of it, and the S3 server beside them, each its own process, on loopback. Used by `make up`/`make
down` (via the CLI) and by the tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tilechain.services.core.config import FAMILIES, address_env, default_address

COMPONENTS: tuple[str, ...] = (*FAMILIES, "gateway", "envoy")
# servers the local stack runs beside tilechain's own (on Kubernetes they are external): the S3
# server (SeaweedFS) that persist-s3 and source-s3 use by default
BACKING: tuple[str, ...] = ("s3",)
LOCAL_STACK: tuple[str, ...] = (*BACKING, *COMPONENTS)


def command(component: str, python: str = sys.executable) -> list[str]:
    if component == "s3":
        return [python, "-m", "tilechain.s3server"]
    if component == "gateway":
        return [python, "-m", "tilechain.cli", "gateway"]
    if component == "envoy":
        # renders the config from the environment's addresses, runs envoy as its child
        return [python, "-m", "tilechain.envoy"]
    return [python, "-m", "tilechain.cli", "serve", component]


@dataclass
class Stack:
    addresses: dict[str, str]
    log_dir: Path
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    python: str = sys.executable  # another environment's interpreter runs the stack from it

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ)
        env.update({address_env(c): a for c, a in self.addresses.items()})
        env.update(extra or {})
        if "s3" in self.addresses and not env.get("TILECHAIN_S3_ENDPOINT"):
            # the local S3 server is the services' default endpoint, with its credentials
            from tilechain import s3server

            access, secret = s3server.credentials(env)
            env.update(TILECHAIN_S3_ENDPOINT=f"http://{self.addresses['s3']}", AWS_ACCESS_KEY_ID=access, AWS_SECRET_ACCESS_KEY=secret)
            env.setdefault("AWS_DEFAULT_REGION", "us-east-1")
        return env

    def start(self, components: tuple[str, ...] = COMPONENTS, extra_env: dict[str, str] | None = None, detach: bool = False) -> None:
        self.extra_env = dict(extra_env or {})
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for component in components:
            log = open(self.log_dir / f"{component}.log", "ab")
            self.processes[component] = subprocess.Popen(
                command(component, self.python), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=self.env(extra_env), start_new_session=detach,
            )
            log.close()
        for component in components:
            self.wait_serving(component)

    def wait_serving(self, component: str, timeout: float = 60.0) -> None:
        """Block until the component's health check says SERVING; fail early if it died.
        Envoy passes gRPC through to the gateway: its check is the gateway's, answered via Envoy."""
        process = self.processes.get(component)
        deadline = time.monotonic() + timeout
        if component in BACKING:
            self._wait_backing(component, process, deadline, timeout)
            return
        with grpc.insecure_channel(self.addresses[component]) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                if process is not None and process.poll() is not None:
                    raise RuntimeError(f"{component} exited with {process.returncode}; see {self.log_dir / (component + '.log')}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{component} at {self.addresses[component]} not SERVING after {timeout:.0f}s")
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0, wait_for_ready=True)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass  # not listening yet: the next attempt waits for it again

    def _wait_backing(self, component: str, process: subprocess.Popen | None, deadline: float, timeout: float) -> None:
        """Poll a server that has no gRPC health check (it has no event to wait on)."""
        from tilechain import s3server

        env = self.env(getattr(self, "extra_env", None))
        while not s3server.ready(self.addresses[component], env):
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"{component} exited with {process.returncode}; see {self.log_dir / (component + '.log')}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{component} at {self.addresses[component]} not ready after {timeout:.0f}s")
            time.sleep(0.2)

    def stop(self, component: str | None = None, timeout: float = 30.0) -> None:
        names = [component] if component else list(self.processes)
        for name in names:
            process = self.processes[name]
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for name in names:
            try:
                self.processes[name].wait(timeout)
            except subprocess.TimeoutExpired:
                self.processes[name].kill()
                self.processes[name].wait()


def default_addresses() -> dict[str, str]:
    return {c: default_address(c) for c in LOCAL_STACK}


def up(run_dir: Path, log_dir: Path) -> Stack:
    """Start the stack in the background (it outlives this process), writing pid files."""
    stack = Stack(default_addresses(), log_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    stale = [c for c in LOCAL_STACK if (run_dir / f"{c}.pid").exists()]
    if stale:
        down(run_dir)
    stack.start(LOCAL_STACK, detach=True)
    for component, process in stack.processes.items():
        (run_dir / f"{component}.pid").write_text(str(process.pid))
    return stack


def down(run_dir: Path, timeout: float = 30.0) -> list[str]:
    """SIGTERM every process with a pid file (each drains its streams), then wait for it."""
    stopped = []
    for pid_file in sorted(run_dir.glob("*.pid")):
        pid = int(pid_file.read_text())
        try:
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                os.kill(pid, 0)
                time.sleep(0.05)  # waiting on a process we did not start: no handle to wait on
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        pid_file.unlink()
        stopped.append(pid_file.stem)
    return stopped
