"""Starting and stopping the local stack: the stage services (one per family), the gateway, Envoy in front
of it, the web page's server and the S3 server beside them (SeaweedFS), each its own process,
on loopback; and, when asked, Valkey (the job store's Redis-protocol server). Used by `make up`/`make down` (via the CLI), the tests
and the benches.

A family's address setting may list several host:port (comma-separated): the stack then starts
one replica per address, named upscale, upscale-2, ..., and the gateway balances over them.
Starting is all-or-nothing: if one component fails to come up, the ones started are stopped
and StartError says which failed, why, and where its log is."""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tilechain.ports import unused_port
from tilechain.services.core.config import (
    FAMILIES,
    RESOLVER_SCHEMES,
    address_env,
    default_address,
    split_addresses,
    split_host_port,
)

COMPONENTS: tuple[str, ...] = (*FAMILIES, "gateway", "envoy")  # the gRPC stack
# Servers the local stack runs beside tilechain's own (on Kubernetes they are external): the S3
# server (SeaweedFS) that persist-s3 and source-s3 use by default.
BACKING: tuple[str, ...] = ("s3",)
# The web page's server (tilechain.web): HTTP, not gRPC; `make up` starts it after Envoy.
WEB = "web"
LOCAL_COMPONENTS: tuple[str, ...] = (*BACKING, *COMPONENTS, WEB)  # what `make up` starts
OPTIONAL_COMPONENTS: tuple[str, ...] = ("valkey",)              # started when asked
JOB_STORE_ENV = "TILECHAIN_JOB_STORE"
S3_DATA_ENV = "TILECHAIN_S3_DATA_DIR"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


class StartError(RuntimeError):
    """A component did not come up; everything the stack had started is stopped again."""

    def __init__(self, name: str, reason: str, log: Path | None = None) -> None:
        super().__init__(f"{name} failed to start: {reason}" + (f"\n  log: {log}" if log else ""))
        self.name = name
        self.reason = reason
        self.log = log


def command(component: str, address: str, python: str = sys.executable, data_dir: Path | None = None) -> list[str]:
    """The command line of one process of a component, listening on `address` (one host:port)."""
    if component == "gateway":
        return [python, "-m", "tilechain.cli", "gateway", "--address", address]
    if component == "envoy":
        # renders the config from the environment's addresses, runs envoy as its child
        return [python, "-m", "tilechain.envoy", "--address", address]
    if component == "valkey":
        # execs valkey-server: its pid is this process's
        return [python, "-m", "tilechain.valkey", "--address", address, "--dir", str(data_dir or Path("var") / "valkey")]
    if component == WEB:
        return [python, "-m", "tilechain.web", "--address", address]
    if component == "s3":
        # runs SeaweedFS's weed as its child (its data: TILECHAIN_S3_DATA_DIR)
        return [python, "-m", "tilechain.s3server", "--address", address]
    return [python, "-m", "tilechain.cli", "serve", component, "--address", address]


def process_names(component: str, setting: str) -> list[tuple[str, str]]:
    """(process name, its address) for each replica of a component: upscale, upscale-2, ..."""
    if setting.startswith(RESOLVER_SCHEMES):
        raise ValueError(f"{address_env(component)}={setting}: a resolver target names replicas elsewhere; "
                         "the local stack starts its replicas from HOST:PORT addresses")
    addresses = split_addresses(setting) if component in FAMILIES else [setting]
    return [(component if i == 0 else f"{component}-{i + 1}", a) for i, a in enumerate(addresses)]


@dataclass
class Stack:
    addresses: dict[str, str]  # component -> address setting (a family's may list replicas)
    log_dir: Path
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)  # process name -> process
    python: str = sys.executable  # another environment's interpreter runs the stack from it
    data_dir: Path | None = None  # Valkey's data lives in data_dir/valkey (default: next to the logs)
    pid_dir: Path | None = None   # where `tilechain up` keeps a pid file per process
    process_addresses: dict[str, str] = field(default_factory=dict)  # process name -> its address
    extra_env: dict[str, str] = field(default_factory=dict)  # the environment start() was given
    detach: bool = False

    def __post_init__(self) -> None:
        # A family this stack was given no address for gets a fresh loopback port that nothing
        # listens on: its processes see that family as down, never as the default port, where
        # another stack (`make up`) may be serving.
        for family in FAMILIES:
            self.addresses.setdefault(family, f"127.0.0.1:{unused_port()}")

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

    def log_path(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def start(self, components: tuple[str, ...] = COMPONENTS, extra_env: dict[str, str] | None = None, detach: bool = False) -> None:
        """Start every process of the components, then wait until each answers. All or nothing:
        if one fails, stop the ones started here and raise StartError."""
        self.extra_env, self.detach = dict(extra_env or {}), detach
        planned = [(name, address) for c in components for name, address in process_names(c, self.addresses[c])]
        for name, address in planned + self.side_addresses(components):
            if address_taken(address):
                raise StartError(name, f"{address} is in use by another process")
        started: list[str] = []
        try:
            for name, address in planned:
                self.launch(name, address)
                started.append(name)
            for name in started:
                self.wait_serving(name)
        except BaseException:
            self.stop(started)
            raise

    def side_addresses(self, components: tuple[str, ...]) -> list[tuple[str, str]]:
        """Addresses a component listens on besides its own: Envoy's admin interface."""
        if "envoy" not in components:
            return []
        from tilechain.envoy import ADMIN_ENV, DEFAULT_ADMIN

        admin = self.env(self.extra_env).get(ADMIN_ENV) or DEFAULT_ADMIN
        return [] if admin == "off" else [("envoy (admin)", admin)]

    def launch(self, name: str, address: str) -> None:
        """Start one process (a component, or one replica of a family) listening on address."""
        component = self.component_of(name)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        data_dir = (self.data_dir or self.log_dir.parent).resolve()
        valkey_dir = data_dir / "valkey"
        if component == "valkey":
            valkey_dir.mkdir(parents=True, exist_ok=True)
        env = self.env(self.extra_env)
        if component == "gateway" and not env.get(JOB_STORE_ENV):
            # the stack's own SQLite file, per gateway port, beside its other data: a stack
            # never shares (or leaves) a queue in another's place
            data_dir.mkdir(parents=True, exist_ok=True)
            env[JOB_STORE_ENV] = f"sqlite:///{data_dir / f'jobs-{split_host_port(address)[1]}.db'}"
        if component == "s3" and not env.get(S3_DATA_ENV):
            env[S3_DATA_ENV] = str(data_dir / "s3")
        with open(self.log_path(name), "ab") as log:
            self.processes[name] = subprocess.Popen(
                command(component, address, self.python, valkey_dir), stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, env=env, start_new_session=self.detach,
            )
        self.process_addresses[name] = address
        if self.pid_dir is not None:
            self.pid_dir.mkdir(parents=True, exist_ok=True)
            (self.pid_dir / f"{name}.pid").write_text(str(self.processes[name].pid))

    def restart(self, name: str) -> None:
        """Start a stopped process again on its address, and wait until it answers."""
        if self.processes[name].poll() is None:
            raise RuntimeError(f"{name} is still running")
        self.launch(name, self.process_addresses[name])
        try:
            self.wait_serving(name)
        except BaseException:
            self.stop(name)
            raise

    def component_of(self, name: str) -> str:
        return next(c for c in (*LOCAL_COMPONENTS, *OPTIONAL_COMPONENTS) if name == c or name.startswith(c + "-"))

    def wait_serving(self, name: str, timeout: float | None = None) -> None:
        """Block until the process answers (its health check says SERVING; Valkey: PING); raise
        StartError if it exits first or stays silent. Envoy passes gRPC through to the gateway:
        its check is the gateway's, answered via Envoy. A service preloading models answers
        NOT_SERVING until they are loaded, which can take minutes with real checkpoints:
        TILECHAIN_START_TIMEOUT (seconds, default 300)."""
        if timeout is None:
            timeout = float(os.environ.get("TILECHAIN_START_TIMEOUT") or 300)
        process = self.processes.get(name)
        address = self.process_addresses.get(name) or self.addresses[name]
        deadline = time.monotonic() + timeout

        def check_alive() -> None:
            if process is not None and process.poll() is not None:
                raise StartError(name, f"exited with status {process.returncode}{log_tail(self.log_path(name))}", self.log_path(name))
            if time.monotonic() > deadline:
                raise StartError(name, f"not answering at {address} after {timeout:.0f} s{log_tail(self.log_path(name))}", self.log_path(name))

        if self.component_of(name) == WEB:
            return self._wait_http(address, check_alive)
        if self.component_of(name) in BACKING:
            from tilechain import s3server

            env = self.env(self.extra_env)
            while not s3server.ready(address, env):
                check_alive()
                time.sleep(0.2)  # an HTTP server without a health event to wait on: poll
            return
        if self.component_of(name) == "valkey":
            import redis  # the job store's client, a dependency of the slim install too

            host, port = split_host_port(address)
            client = redis.Redis(host=host, port=port, socket_connect_timeout=1.0, socket_timeout=1.0)
            try:
                while True:
                    check_alive()
                    try:
                        if client.ping():
                            check_alive()
                            return
                    except redis.exceptions.BusyLoadingError:
                        pass  # still reading its append-only file
                    except redis.exceptions.ConnectionError:
                        pass
                    time.sleep(0.05)  # a plain TCP server: nothing to block on until it listens
            finally:
                client.close()
        with grpc.insecure_channel(address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                check_alive()
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0, wait_for_ready=True)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        check_alive()  # it was this process that answered
                        return
                except grpc.RpcError:
                    pass  # not listening yet: the next attempt waits for it again

    @staticmethod
    def _wait_http(address: str, check_alive: Callable[[], None]) -> None:
        """The web component answers GET /healthz once it listens."""
        host, port = split_host_port(address)
        host = "localhost" if host in ("0.0.0.0", "::", "") else host
        while True:
            check_alive()
            connection = http.client.HTTPConnection(host, port, timeout=1.0)
            try:
                connection.request("GET", "/healthz")
                if connection.getresponse().status == 200:
                    return
            except OSError:
                time.sleep(0.1)  # not listening yet (connection refused at once): poll again
            finally:
                connection.close()

    def stop(self, names: str | list[str] | None = None, timeout: float = 30.0) -> None:
        """SIGTERM the processes (each drains its streams), wait, SIGKILL any still running."""
        if names is None:
            names = list(self.processes)
        elif isinstance(names, str):
            names = [names]
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
            if self.pid_dir is not None:
                (self.pid_dir / f"{name}.pid").unlink(missing_ok=True)


def address_taken(address: str) -> bool:
    """Is something listening on host:port already? Checked before starting anything, so that a
    taken port stops `up` at once, and so that a health check is never answered by a stranger
    on our port. (A bind with SO_REUSEADDR: connections in TIME_WAIT do not count.)"""
    host, port = split_host_port(address)
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror:
        return False  # the server will say what is wrong with its address
    family, kind, proto, _, sockaddr = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(sockaddr)
        except OSError:
            return True
    return False


def process_memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of a process, in KiB (for the tests and benches that measure it)."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields


def log_tail(path: Path, lines: int = 5) -> str:
    """The last lines of a log, to say why a component failed."""
    try:
        text = path.read_text(errors="replace").strip().splitlines()[-lines:]
    except OSError:
        return ""
    return ("\n    " + "\n    ".join(text)) if text else ""


def default_addresses(components: tuple[str, ...] = LOCAL_COMPONENTS) -> dict[str, str]:
    return {c: default_address(c) for c in components}


def job_store_uses(valkey_address: str, job_store: str) -> bool:
    """Does the job store setting name the local Valkey (redis://HOST:PORT/DB on its address)?"""
    url = urlsplit(job_store)
    if url.scheme not in ("redis", "valkey") or url.hostname is None:
        return False
    host, port = split_host_port(valkey_address)
    same_host = url.hostname == host or (url.hostname in LOOPBACK and host in LOOPBACK)
    return same_host and (url.port or 6379) == port


def up(run_dir: Path, log_dir: Path, data_dir: Path = Path("var"), with_components: tuple[str, ...] = ()) -> Stack:
    """Start the stack in the background (it outlives this process), with pid files in run_dir.
    Valkey too when asked (with_components) or when TILECHAIN_JOB_STORE names its address; the
    gateway's job store then defaults to it. All or nothing (StartError)."""
    valkey_address = default_address("valkey")
    job_store = os.environ.get(JOB_STORE_ENV, "")
    components = list(LOCAL_COMPONENTS)
    extra_env: dict[str, str] = {}
    if "valkey" in with_components or job_store_uses(valkey_address, job_store):
        components.insert(0, "valkey")  # before the gateway, which keeps its jobs in it
        if not job_store:
            extra_env[JOB_STORE_ENV] = f"redis://{valkey_address}/0"
    stack = Stack(default_addresses(tuple(components)), log_dir, data_dir=data_dir, pid_dir=run_dir)
    if any(run_dir.glob("*.pid")):
        down(run_dir)
    stack.start(tuple(components), extra_env=extra_env, detach=True)
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
