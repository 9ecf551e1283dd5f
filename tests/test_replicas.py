"""Many replicas per family, fast reconnects, ListStages with families down.

A stack of its own, from the slim environment (its services start in a fraction of a second):
source, two upscale replicas (TILECHAIN_UPSCALE_ADDR lists both), reduce and the gateway;
blend, correct and persist are not started, so they are down."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Iterator

import grpc
import pytest

from tilechain.client import chain_request, connect
from tilechain.services.core.config import (
    FAMILIES,
    RECONNECT_MAX_MS,
    STREAM_WINDOW_BYTES,
    channel_options,
    channel_target,
    family_channel_options,
    server_options,
)
from tilechain.stack import Stack
from tilechain.v1 import gateway_pb2, stage_pb2, stage_pb2_grpc

from .conftest import SLIM_PYTHON, free_port

UP = ("source", "upscale", "reduce", "gateway")
DOWN = tuple(f for f in FAMILIES if f not in UP)  # blend, correct, persist, edit, text
NOISE_UPSCALE = [
    {"name": "noise", "type": "source-noise", "params": {"width": 64, "height": 64, "seed": 3}},
    {"name": "big", "type": "upscale-simple", "params": {"scale": 2}},
]
WITH_CROP = [*NOISE_UPSCALE, {"name": "cut", "type": "reduce-crop", "params": {"width": 16, "height": 16}}]


def test_address_settings_become_grpc_targets() -> None:
    assert channel_target("upscale:50054") == "upscale:50054"  # DNS: every address the name has
    assert channel_target("127.0.0.1:1,127.0.0.1:2") == "ipv4:127.0.0.1:1,127.0.0.1:2"
    assert channel_target(" localhost:1, 127.0.0.1:2 ") == "ipv4:127.0.0.1:1,127.0.0.1:2"  # names resolved once
    assert channel_target("[::1]:1,[::1]:2") == "ipv6:[::1]:1,[::1]:2"
    headless = "dns:///upscale.tilechain.svc.cluster.local:50054"
    assert channel_target(headless) == headless
    for bad, why in (("", "expected HOST:PORT"), ("upscale", "expected HOST:PORT"), (":50054", "expected HOST:PORT"),
                     ("127.0.0.1:1,[::1]:2", "mixes IPv4 and IPv6"), ("127.0.0.1:1,nosuchhost.invalid:2", "cannot resolve")):
        with pytest.raises(ValueError, match=why):
            channel_target(bad)


def test_channel_and_server_options() -> None:
    channel = dict(family_channel_options())
    assert json.loads(channel["grpc.service_config"]) == {"loadBalancingConfig": [{"round_robin": {}}]}
    assert channel["grpc.max_reconnect_backoff_ms"] == RECONNECT_MAX_MS <= 1000  # back within ~1 s
    assert channel["grpc.initial_reconnect_backoff_ms"] <= RECONNECT_MAX_MS
    server = dict(server_options())
    assert channel["grpc.keepalive_time_ms"] >= server["grpc.http2.min_ping_interval_without_data_ms"]  # no GOAWAY for pings
    assert 0 < server["grpc.max_connection_age_ms"] < server["grpc.max_connection_age_grace_ms"]
    assert server["grpc.so_reuseport"] == 0
    assert dict(server_options(1 << 28))["grpc.max_receive_message_length"] == 1 << 28
    # a fixed stream window inside the chain (gateway -> services); gRPC's probing at the edge
    fixed = {"grpc.http2.bdp_probe": 0, "grpc.http2.lookahead_bytes": STREAM_WINDOW_BYTES}
    assert fixed.items() <= channel.items() and fixed.items() <= server.items()
    assert not {"grpc.http2.bdp_probe", "grpc.http2.lookahead_bytes"} & set(dict(server_options(fixed_window=False)))
    assert not {"grpc.http2.bdp_probe", "grpc.http2.lookahead_bytes"} & set(dict(channel_options()))


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    addresses = {c: f"127.0.0.1:{free_port()}" for c in (*UP, *DOWN)}
    addresses["upscale"] = f"127.0.0.1:{free_port()},127.0.0.1:{free_port()}"
    stack = Stack(addresses, tmp_path_factory.mktemp("replica-logs"), python=str(SLIM_PYTHON))
    stack.start(UP)
    yield stack
    stack.stop()


def run(stack: Stack, stages: list[dict]) -> gateway_pb2.JobStatus:
    events = list(connect(stack.addresses["gateway"]).RunChain(chain_request({"stages": stages}), timeout=60))
    return events[-1].status


def streams(stack: Stack, name: str) -> int:
    with grpc.insecure_channel(stack.process_addresses[name]) as channel:
        return stage_pb2_grpc.StageStub(channel).Stats(stage_pb2.StatsRequest(), timeout=10).streams_started


def run_until_both_replicas_served(stack: Stack) -> None:
    """round_robin alternates over the connected replicas; pick_first would never reach the second."""
    before = {n: streams(stack, n) for n in ("upscale", "upscale-2")}
    for _ in range(20):
        assert run(stack, NOISE_UPSCALE).state == gateway_pb2.JOB_STATE_SUCCEEDED
        if all(streams(stack, n) > before[n] for n in before):
            return
    pytest.fail(f"20 jobs, and the streams did not reach both replicas: {before} -> { {n: streams(stack, n) for n in before} }")


def test_streams_spread_over_every_replica(replicas: Stack) -> None:
    run_until_both_replicas_served(replicas)


def test_a_killed_replica_gets_no_more_streams(replicas: Stack) -> None:
    """kill -9 one upscale replica: the next jobs all run on the other (round_robin skips a
    replica it cannot reach; no job is sent to the dead address); started again, it rejoins."""
    replicas.processes["upscale-2"].kill()
    replicas.processes["upscale-2"].wait()
    before = streams(replicas, "upscale")
    for _ in range(4):
        assert run(replicas, NOISE_UPSCALE).state == gateway_pb2.JOB_STATE_SUCCEEDED
    assert streams(replicas, "upscale") == before + 4
    replicas.restart("upscale-2")
    run_until_both_replicas_served(replicas)


def test_a_restarted_service_is_used_by_the_next_job(replicas: Stack) -> None:
    """Stop reduce: a chain that needs it is refused by name. Start it on the same port, wait for
    its health check, and the very next job runs on it."""
    replicas.stop("reduce")
    with pytest.raises(grpc.RpcError) as info:
        run(replicas, WITH_CROP)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert f"the reduce service at {replicas.addresses['reduce']} is unavailable" in info.value.details()
    replicas.restart("reduce")  # returns once its health check says SERVING
    assert run(replicas, WITH_CROP).state == gateway_pb2.JOB_STATE_SUCCEEDED


def test_list_stages_answers_with_the_families_that_are_up(replicas: Stack) -> None:
    response = connect(replicas.addresses["gateway"]).ListStages(gateway_pb2.ListStagesRequest(), timeout=30)
    assert {c.stages[0].family for c in response.catalogs} == {"source", "upscale", "reduce"}
    assert "upscale-simple" in {s.type for c in response.catalogs for s in c.stages}
    down = {d.family: d for d in response.families_down}
    assert set(down) == set(DOWN)
    for family in DOWN:
        assert down[family].address == replicas.addresses[family]
        assert "Connection refused" in down[family].error, down[family].error
    cli = subprocess.run(
        [str(SLIM_PYTHON), "-m", "tilechain.cli", "stages", "--gateway", replicas.addresses["gateway"]],
        capture_output=True, text=True, timeout=60,
    )
    assert cli.returncode == 1  # the catalog printed is incomplete
    assert "`upscale-simple`" in cli.stdout
    for family in DOWN:
        assert f"down: the {family} service at {replicas.addresses[family]}: " in cli.stderr


def test_a_replica_needs_its_own_listen_address(tmp_path: Path) -> None:
    """With several replicas in TILECHAIN_REDUCE_ADDR, `tilechain serve reduce` cannot guess
    which is its own: it says so instead of listening on one of them."""
    env = {"TILECHAIN_REDUCE_ADDR": f"127.0.0.1:{free_port()},127.0.0.1:{free_port()}", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([str(SLIM_PYTHON), "-m", "tilechain.cli", "serve", "reduce"], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 2
    assert "TILECHAIN_REDUCE_ADDR names several replicas or a resolver target: give this replica its own --address" in out.stderr


def test_a_bad_family_address_stops_the_gateway_with_its_name() -> None:
    env = {"TILECHAIN_UPSCALE_ADDR": "127.0.0.1:1,[::1]:2", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([str(SLIM_PYTHON), "-m", "tilechain.cli", "gateway", "--address", f"127.0.0.1:{free_port()}"],
                         capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 2
    assert "the upscale service's address (--upscale-address)" in out.stderr and "mixes IPv4 and IPv6" in out.stderr


def test_every_persist_replica_publishes_what_it_staged(tmp_path: Path) -> None:
    """Two persist replicas, each with its own output root (a volume per pod): a job's file is
    staged on the replica that ran its stream, and Finish goes to every replica, so each job's
    file is published, on that replica's volume, and nothing stays staged."""
    roots = [(tmp_path / f"outputs-{n}").resolve() for n in (1, 2)]
    persists = []
    for n, root in enumerate(roots):
        persist = Stack({"persist": f"127.0.0.1:{free_port()}"}, tmp_path / f"persist-{n}-logs", python=str(SLIM_PYTHON))
        persist.start(("persist",), extra_env={"TILECHAIN_OUTPUT_ROOT": str(root)})
        persists.append(persist)
    addresses = {c: f"127.0.0.1:{free_port()}" for c in ("source", "gateway")}
    addresses["persist"] = ",".join(p.addresses["persist"] for p in persists)
    stack = Stack(addresses, tmp_path / "logs", python=str(SLIM_PYTHON))
    try:
        stack.start(("source", "gateway"))
        save = {"name": "save", "type": "persist-disk", "params": {"filename": "spread/{job}.png"}}
        statuses = [run(stack, [NOISE_UPSCALE[0], save]) for _ in range(6)]
        assert [s.state for s in statuses] == [gateway_pb2.JOB_STATE_SUCCEEDED] * 6
        for status in statuses:
            [artifact] = status.artifacts
            assert [root for root in roots if (root / artifact.path).is_file()] != []
        written = [sorted(p.name for p in (root / "spread").glob("*.png")) if (root / "spread").exists() else [] for root in roots]
        assert all(written) and sorted(written[0] + written[1]) == sorted(f"{s.job_id}.png" for s in statuses)  # both served
        assert not [p for root in roots for p in (root / ".tilechain" / "staging").rglob("*") if p.is_file()]
    finally:
        stack.stop()
        for persist in persists:
            persist.stop()
