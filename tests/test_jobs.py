"""Jobs that outlive gateways and services: real gateway processes on a real job store (SQLite,
or a valkey-server shared by two gateways), killed and restarted mid-job, with the model-free
services. "Mid-job" is made certain, not hoped for: a test waits for a job's progress event and
then freezes the service it streams from (SIGSTOP), so the job cannot end before the test acts.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Callable, Iterator

import grpc
import numpy as np
import pytest
from PIL import Image

from tilechain.client import chain_request, connect
from tilechain.services.core.codecs import read_metadata, tile_message
from tilechain.services.core.tiles import transport_grid
from tilechain.stack import Stack
from tilechain.v1 import gateway_pb2, gateway_pb2_grpc, stage_pb2, stage_pb2_grpc, tiles_pb2

from .conftest import ROOT, free_port, job_store_url
from .valkey import ValkeyServer

SERVICES = ("source", "upscale", "persist", "reduce")
SUCCEEDED, CANCELLED, QUEUED, RUNNING = (
    gateway_pb2.JOB_STATE_SUCCEEDED, gateway_pb2.JOB_STATE_CANCELLED, gateway_pb2.JOB_STATE_QUEUED, gateway_pb2.JOB_STATE_RUNNING,
)


# the slim environment `make setup` builds (no torch): its processes start in a fraction of a second
SLIM_PYTHON = str(ROOT / "var" / "venv-slim" / "bin" / "python")


class Services:
    """The model-free stage services, one process each, shared by this module's gateways."""

    def __init__(self, tmp: Path) -> None:
        self.output_root = (tmp / "outputs").resolve()
        self.output_root.mkdir()
        self.log_dir = tmp / "logs"
        addresses = {f: f"127.0.0.1:{free_port()}" for f in SERVICES}
        # blend and correct are not started: no chain here needs them
        addresses.update({f: f"127.0.0.1:{free_port()}" for f in ("blend", "correct")})
        self.stack = Stack(addresses, self.log_dir, python=SLIM_PYTHON)
        self.env = {"TILECHAIN_OUTPUT_ROOT": str(self.output_root), "TILECHAIN_MAX_PIXELS": str(4096 * 4096)}

    def start(self, *families: str) -> None:
        self.stack.start(families or SERVICES, extra_env=self.env)

    def stats(self, family: str, wait_idle: bool = False) -> stage_pb2.ServiceStats:
        with grpc.insecure_channel(self.stack.addresses[family]) as channel:
            return stage_pb2_grpc.StageStub(channel).Stats(stage_pb2.StatsRequest(wait_idle=wait_idle), timeout=60)

    def freeze(self, family: str) -> None:
        os.kill(self.stack.processes[family].pid, signal.SIGSTOP)

    def thaw(self, family: str) -> None:
        os.kill(self.stack.processes[family].pid, signal.SIGCONT)


class Gateway:
    """One gateway process on a given job store; killed, stopped and restarted at will."""

    def __init__(self, services: Services, name: str, store: str, **env: str) -> None:
        addresses = dict(services.stack.addresses, gateway=f"127.0.0.1:{free_port()}")
        self.stack = Stack(addresses, services.log_dir / name, python=SLIM_PYTHON)
        self.env = {**services.env, "TILECHAIN_JOB_STORE": store, "TILECHAIN_GATEWAY_ID": name, **env}
        self.address = addresses["gateway"]
        self.stub: gateway_pb2_grpc.GatewayStub = connect(self.address)

    def start(self) -> Gateway:
        self.stack.start(("gateway",), extra_env=self.env)
        return self

    def kill(self) -> None:
        process = self.stack.processes["gateway"]
        process.kill()  # SIGKILL: no clean-up of any kind
        process.wait()

    def stop(self) -> int | None:
        """SIGTERM and wait (nothing if it was never started or has exited); its exit status."""
        if "gateway" not in self.stack.processes:
            return None
        self.stack.stop("gateway")
        return self.stack.processes["gateway"].returncode

    @property
    def log(self) -> str:
        return (self.stack.log_dir / "gateway.log").read_text()


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    services = Services(tmp_path_factory.mktemp("jobs"))
    services.start()
    yield services
    services.stack.stop()


@pytest.fixture
def gateways(services: Services) -> Iterator[Callable[..., Gateway]]:
    """Makes the test's gateways, and stops every one of them when the test ends, however it ends."""
    made: list[Gateway] = []

    def make(name: str, store: str, **env: str) -> Gateway:
        made.append(Gateway(services, name, store, **env))
        return made[-1]

    yield make
    for gateway in made:
        gateway.stop()


@pytest.fixture(scope="module")
def valkey(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ValkeyServer]:
    server = ValkeyServer(tmp_path_factory.mktemp("valkey")).start()
    yield server
    server.stop()


def small_chain(folder: str) -> dict:
    return {"stages": [
        {"name": "noise", "type": "source-noise", "params": {"width": 64, "height": 64, "seed": 1}},
        {"name": "save", "type": "persist-disk", "params": {"filename": folder + "/{job}.png"}},
    ]}


def slow_chain(folder: str, early_file: bool = False, edge: int = 1024) -> dict:
    """Upscaling in (edge/256)² processing windows (progress after each), then a small file: cut
    from the last window, so written as the job ends, or with early_file from the first one, so
    written long before the job ends."""
    corner = 0 if early_file else 2 * edge - 64
    return {"stages": [
        {"name": "noise", "type": "source-noise", "params": {"width": edge, "height": edge, "seed": 2}},
        {"name": "up", "type": "upscale-simple", "params": {"scale": 2}},
        {"name": "cut", "type": "reduce-crop", "params": {"left": corner, "top": corner, "width": 64, "height": 64}},
        {"name": "save", "type": "persist-disk", "params": {"filename": folder + "/{job}.png"}},
    ]}


def submit(gateway: Gateway, chain: dict, **options) -> str:
    return gateway.stub.SubmitChain(chain_request(chain, transport_tile=64, **options), timeout=60).job_id


def wait_for(gateway: Gateway, job_id: str, kind: str = "progress", stage: str = "up") -> None:
    """Until the job's first progress event from that stage: its stream is open and working."""
    for event in gateway.stub.WatchJob(gateway_pb2.JobRef(job_id=job_id), timeout=120):
        if event.WhichOneof("kind") == kind == "progress" and event.progress.name == stage:
            return
    raise AssertionError(f"job {job_id} ended before {stage} sent {kind}")


def final(gateway: Gateway, job_id: str) -> tuple[gateway_pb2.JobStatus, list[gateway_pb2.JobEvent]]:
    """Watch the job to its end (its whole history first): its final status and the events."""
    events = list(gateway.stub.WatchJob(gateway_pb2.JobRef(job_id=job_id), timeout=300))
    assert events[-1].WhichOneof("kind") == "status"
    return events[-1].status, events


def notices(events: list[gateway_pb2.JobEvent]) -> list[str]:
    return [e.notice.message for e in events if e.WhichOneof("kind") == "notice"]


def test_kill_9_with_jobs_queued_and_running_then_restart_runs_each_once(services: Services, gateways: Callable[..., Gateway], tmp_path: Path) -> None:
    store = job_store_url(tmp_path)
    gateway = gateways("gw-kill", store, TILECHAIN_GATEWAY_MAX_JOBS="2").start()
    slow = [submit(gateway, slow_chain("kill", early_file=True)) for _ in range(2)]
    small = [submit(gateway, small_chain("kill")) for _ in range(20)]
    for job_id in slow:
        wait_for(gateway, job_id, "progress", "up")
    services.freeze("upscale")  # both slow jobs are mid-upscale and stay there
    try:
        for job_id in slow:
            assert gateway.stub.GetJob(gateway_pb2.JobRef(job_id=job_id)).state == RUNNING
        # the 20 wait behind them (the gateway runs 2 jobs at most), in the order they came
        statuses = [gateway.stub.GetJob(gateway_pb2.JobRef(job_id=j)) for j in small]
        assert [(s.state, s.queue_position, s.queue_length) for s in statuses] == [(QUEUED, n, 20) for n in range(1, 21)]
        gateway.kill()
    finally:
        services.thaw("upscale")

    gateway.start()  # the same gateway id: it takes back what its killed process held
    results = {job_id: final(gateway, job_id) for job_id in slow + small}
    assert {job_id: status.state for job_id, (status, _) in results.items()} == {job_id: SUCCEEDED for job_id in slow + small}
    for job_id in slow:
        status, events = results[job_id]
        assert status.attempt == 2
        assert any("attempt 1 (gw-kill/" in n and "attempt 2 of 3 starts over" in n for n in notices(events))
    assert {results[j][0].attempt for j in small} == {1}
    written = sorted(p.name for p in (services.output_root / "kill").iterdir())
    assert written == sorted(f"{j}.png" for j in slow + small)  # 22 files: none twice, none missing
    for job_id in slow:  # the first run's file, replaced by the second run's
        assert [a.path for a in results[job_id][0].artifacts] == [f"kill/{job_id}.png"]
        metadata = read_metadata((services.output_root / "kill" / f"{job_id}.png").read_bytes())
        assert metadata["job"] == job_id


def test_fifty_jobs_with_a_limit_of_two_streams(services: Services, gateways: Callable[..., Gateway], valkey: ValkeyServer) -> None:
    valkey.client().flushall()
    before = services.stats("upscale", wait_idle=True)
    limits = {"TILECHAIN_UPSCALE_MAX_STREAMS": "2"}
    # an API-only gateway takes the requests (it runs none), so the queue stands still while we look
    front = gateways("gw-front", valkey.url, TILECHAIN_GATEWAY_MAX_JOBS="0", **limits).start()
    chain = {"stages": [
        {"name": "noise", "type": "source-noise", "params": {"width": 128, "height": 128, "seed": 3}},
        {"name": "up", "type": "upscale-simple", "params": {"scale": 2}},
        {"name": "save", "type": "persist-disk", "params": {"filename": "fifty/{job}.png"}},
    ]}
    jobs = [submit(front, chain) for _ in range(50)]
    statuses = [front.stub.GetJob(gateway_pb2.JobRef(job_id=j)) for j in jobs]
    assert [(s.state, s.queue_position, s.queue_length) for s in statuses] == [(QUEUED, n, 50) for n in range(1, 51)]
    assert valkey.client().llen("tilechain:demand:upscale") == 50

    last = front.stub.WatchJob(gateway_pb2.JobRef(job_id=jobs[-1]), timeout=300)
    worker = gateways("gw-worker", valkey.url, TILECHAIN_GATEWAY_MAX_JOBS="50", **limits).start()
    events = list(last)
    positions = [e.queue.position for e in events if e.WhichOneof("kind") == "queue"]
    assert positions[0] == 50 and positions == sorted(positions, reverse=True) and len(set(positions)) == len(positions)
    assert events[-1].status.state == SUCCEEDED
    assert [final(front, j)[0].state for j in jobs] == [SUCCEEDED] * 50
    after = services.stats("upscale", wait_idle=True)
    assert after.streams_finished - before.streams_finished == 50
    assert after.peak_active_streams <= 2  # admission held the limit, over both gateways
    assert valkey.client().llen("tilechain:demand:upscale") == 0
def test_two_gateways_share_jobs_watch_cancel_and_take_over(services: Services, gateways: Callable[..., Gateway], valkey: ValkeyServer) -> None:
    valkey.client().flushall()
    lease = {"TILECHAIN_JOB_LEASE_S": "3", "TILECHAIN_GATEWAY_MAX_JOBS": "4"}
    one = gateways("gw-one", valkey.url, **lease).start()
    two = gateways("gw-two", valkey.url, **lease).start()
    # submitted to one, watched and cancelled through the other
    job = submit(one, slow_chain("two"))
    wait_for(two, job)
    status = two.stub.CancelJob(gateway_pb2.JobRef(job_id=job), timeout=30)
    assert (status.state, status.code) == (CANCELLED, grpc.StatusCode.CANCELLED.value[0])
    assert final(one, job)[0].state == CANCELLED
    stopped = services.stats("upscale", wait_idle=True)  # its streams ended
    assert stopped.active_streams == 0

    # kill one of them mid-job: the other takes its jobs over when their leases run out
    jobs = [submit(one, slow_chain("two")) for _ in range(4)]
    for job_id in jobs:
        wait_for(two, job_id)
    owners = {j: two.stub.GetJob(gateway_pb2.JobRef(job_id=j)).gateway.partition("/")[0] for j in jobs}
    victim = one if "gw-one" in owners.values() else two
    survivor = two if victim is one else one
    orphans = [j for j, owner in owners.items() if owner == victim.env["TILECHAIN_GATEWAY_ID"]]
    victim.kill()
    results = {j: final(survivor, j) for j in jobs}
    assert {j: s.state for j, (s, _) in results.items()} == {j: SUCCEEDED for j in jobs}
    for job_id in orphans:
        status, events = results[job_id]
        assert status.attempt == 2
        assert any("stopped; attempt 2 of 3 starts over" in n for n in notices(events))
    written = sorted(p.name for p in (services.output_root / "two").iterdir())
    assert written == sorted(f"{j}.png" for j in jobs)
def test_sigterm_hands_running_jobs_back_and_tells_runchain_callers_where_to_look(services: Services, gateways: Callable[..., Gateway], tmp_path: Path) -> None:
    store = job_store_url(tmp_path)
    gateway = gateways("gw-term", store).start()
    call = gateway.stub.RunChain(chain_request(slow_chain("term", early_file=True), transport_tile=64), timeout=300)
    job_id = ""
    for event in call:
        job_id = event.job_id
        if (event.WhichOneof("kind") == "stage" and event.stage.name == "save"
                and event.stage.kind == gateway_pb2.StageEvent.KIND_FINISHED):
            break  # its file is staged, its upscale goes on
    assert gateway.stop() == 0
    with pytest.raises(grpc.RpcError) as info:
        list(call)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert f"job {job_id}" in info.value.details() and "WatchJob" in info.value.details()
    gateway.start()  # after the restart it runs the job again, the hand-back not counted
    status, events = final(gateway, job_id)
    assert (status.state, status.attempt) == (SUCCEEDED, 1)
    assert any("is stopping: the job goes back to the queue" in n for n in notices(events))
    # the first run's staged file was discarded, the second run's published: one file, one artifact
    assert [p.name for p in (services.output_root / "term").iterdir()] == [f"{job_id}.png"]
    assert len([e for e in events if e.WhichOneof("kind") == "artifact"]) == 1


def test_a_job_whose_service_dies_runs_again_when_it_is_back(services: Services, gateways: Callable[..., Gateway], tmp_path: Path) -> None:
    gateway = gateways("gw-retry", job_store_url(tmp_path), TILECHAIN_JOB_RETRY_WAIT_S="120").start()
    job_id = submit(gateway, slow_chain("retry"))
    wait_for(gateway, job_id)
    upscale = services.stack.processes["upscale"]
    upscale.kill()  # kill -9 mid-stream
    upscale.wait()
    services.start("upscale")  # back on the same address
    status, events = final(gateway, job_id)
    assert (status.state, status.attempt) == (SUCCEEDED, 2)
    [retry] = [n for n in notices(events) if "attempt 1 of 3 failed" in n]
    assert "stage 'up' (upscale-simple): the upscale service at" in retry and "the job runs again" in retry
    assert [p.name for p in (services.output_root / "retry").iterdir()] == [f"{job_id}.png"]
def test_a_watcher_that_never_reads_holds_nothing_up(services: Services, gateways: Callable[..., Gateway], tmp_path: Path) -> None:
    gateway = gateways("gw-watch", job_store_url(tmp_path), TILECHAIN_WATCH_BUFFER_BYTES=str(1 << 20)).start()
    # every tile returned (far more than the watcher's 1 MiB), never read while the job runs
    chain = {"stages": slow_chain("watch", edge=2048)["stages"][:2]}  # 63 MB of tiles
    request = chain_request(chain, return_tiles=gateway_pb2.TILE_RETURN_ALL, transport_tile=64)
    stalled = gateway.stub.RunChain(request, timeout=300)
    job_id = next(stalled).job_id
    status, _ = final(gateway, job_id)  # a second watcher, who reads, sees it end
    assert status.state == SUCCEEDED
    events = list(stalled)  # the stalled watcher missed tiles, and is told so, and nothing else
    kinds = [e.WhichOneof("kind") for e in events]
    assert kinds[-1] == "status" and events[-1].status.state == SUCCEEDED
    dropped = [n for n in notices(events) if "tile event(s) dropped" in n]
    assert dropped and kinds.count("tile") < (4096 // 64) ** 2 + (2048 // 64) ** 2
    stage_events = sorted((e.stage.name, e.stage.kind) for e in events if e.WhichOneof("kind") == "stage")
    assert stage_events == sorted((name, kind) for name in ("noise", "up") for kind in (1, 2))  # none lost

    # a running job whose watcher never reads is cancelled at once
    stalled = gateway.stub.RunChain(chain_request(slow_chain("watch"), return_tiles=gateway_pb2.TILE_RETURN_ALL, transport_tile=64), timeout=300)
    job_id = next(stalled).job_id
    wait_for(gateway, job_id)
    status = gateway.stub.CancelJob(gateway_pb2.JobRef(job_id=job_id), timeout=10)  # no DEADLINE_EXCEEDED
    assert status.state == CANCELLED
    assert list(stalled)[-1].status.state == CANCELLED
def test_a_chain_with_more_stages_of_a_family_than_its_limit_runs_alone(services: Services, gateways: Callable[..., Gateway], tmp_path: Path) -> None:
    """Three upscale stages against a limit of two: the job is admitted when the family is idle
    and holds all of it, so a one-upscale job submitted with it waits until it has ended."""
    gateway = gateways("gw-alone", job_store_url(tmp_path), TILECHAIN_UPSCALE_MAX_STREAMS="2").start()
    big = {"stages": [
        {"name": "noise", "type": "source-noise", "params": {"width": 64, "height": 64, "seed": 4}},
        *({"name": f"x{n}", "type": "upscale-simple", "params": {"scale": 2}} for n in range(3)),
        {"name": "save", "type": "persist-disk", "params": {"filename": "alone/{job}.png"}},
    ]}
    services.stats("upscale", wait_idle=True)
    with grpc.insecure_channel(services.stack.addresses["upscale"]) as channel:
        stage_pb2_grpc.StageStub(channel).Stats(stage_pb2.StatsRequest(reset_peaks=True), timeout=60)
    jobs = [submit(gateway, big), submit(gateway, slow_chain("alone-small"))]
    assert [final(gateway, j)[0].state for j in jobs] == [SUCCEEDED, SUCCEEDED]
    assert (services.output_root / "alone" / f"{jobs[0]}.png").is_file()
    assert services.stats("upscale", wait_idle=True).peak_active_streams == 3  # the big job's own three, never 4


def test_bad_requests_are_refused_before_queuing_and_unknown_jobs_are_not_found(services: Services, gateways: Callable[..., Gateway], tmp_path: Path) -> None:
    gateway = gateways("gw-bad", job_store_url(tmp_path), TILECHAIN_GATEWAY_MAX_JOBS="0").start()
    bad = {"stages": [{"name": "up", "type": "upscale-simple", "params": {"scale": 12}}]}
    for call in (gateway.stub.SubmitChain, lambda r, timeout: list(gateway.stub.RunChain(r, timeout=timeout))):
        with pytest.raises(grpc.RpcError) as info:
            call(chain_request(bad), timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "stage 'up' (upscale-simple): param 'scale'" in info.value.details()
    job_id = submit(gateway, small_chain("bad"))
    assert gateway.stub.GetJob(gateway_pb2.JobRef(job_id=job_id)).queue_length == 1  # none of the bad ones
    for method in (gateway.stub.GetJob, gateway.stub.CancelJob, lambda r, timeout: list(gateway.stub.WatchJob(r, timeout=timeout))):
        with pytest.raises(grpc.RpcError) as info:
            method(gateway_pb2.JobRef(job_id="nope"), timeout=30)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert "job_id: no job 'nope'" in info.value.details()
def test_an_error_of_the_request_at_run_time_is_not_retried(services: Services, gateways: Callable[..., Gateway], tmp_path: Path) -> None:
    """Queued by an API-only gateway; before a worker runs it, its output file appears: the run
    fails ALREADY_EXISTS on its first attempt and is not run again (only UNAVAILABLE is)."""
    store = job_store_url(tmp_path)
    front = gateways("gw-api", store, TILECHAIN_GATEWAY_MAX_JOBS="0").start()
    job_id = submit(front, small_chain("taken"))
    front.stop()
    (services.output_root / "taken").mkdir(exist_ok=True)
    (services.output_root / "taken" / f"{job_id}.png").write_bytes(b"someone else's")
    worker = gateways("gw-run", store).start()
    status, events = final(worker, job_id)
    assert (status.state, status.code, status.attempt) == (gateway_pb2.JOB_STATE_FAILED, grpc.StatusCode.ALREADY_EXISTS.value[0], 1)
    assert f"stage 'save' (persist-disk): param 'filename': taken/{job_id}.png exists" in status.message
    assert not [n for n in notices(events) if "runs again" in n]
    assert (services.output_root / "taken" / f"{job_id}.png").read_bytes() == b"someone else's"
def persist_once(services: Services, job_id: str, attempt: int, value: int) -> list[stage_pb2.Artifact]:
    """One persist-disk stream straight to the service, an 8x8 image of one grey value, then
    Finish(commit) as the gateway sends when the job succeeds: the published artifacts."""
    pixels = np.full((8, 8, 3), value, dtype=np.uint8)
    canvas = tiles_pb2.Canvas(id=0, width=8, height=8, format=tiles_pb2.PIXEL_FORMAT_RGB8, role=tiles_pb2.CANVAS_ROLE_IMAGE)
    start = stage_pb2.StageStart(job_id=job_id, name="save", type="persist-disk", inputs=[canvas], attempt=attempt)
    start.params.update({"filename": "replace/out.png"})
    messages = [stage_pb2.StageInput(start=start), stage_pb2.StageInput(tile=tile_message(0, transport_grid(8, 8, 8)[0], pixels)),
                stage_pb2.StageInput(end=stage_pb2.InputEnd())]
    with grpc.insecure_channel(services.stack.addresses["persist"]) as channel:
        stub = stage_pb2_grpc.StageStub(channel)
        list(stub.Process(iter(messages), timeout=60))
        return list(stub.Finish(stage_pb2.FinishRequest(job_id=job_id, attempt=attempt, commit=True), timeout=60).artifacts)


def test_a_retried_attempt_replaces_its_own_file_and_no_other(services: Services) -> None:
    path = services.output_root / "replace" / "out.png"
    assert [a.path for a in persist_once(services, "job-a", 1, 10)] == ["replace/out.png"]
    assert np.asarray(Image.open(path))[0, 0, 0] == 10
    with pytest.raises(grpc.RpcError) as info:  # another job's run: refused
        persist_once(services, "job-b", 2, 20)
    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "stage 'save' (persist-disk): param 'filename': replace/out.png exists" in info.value.details()
    persist_once(services, "job-a", 2, 30)  # the same job, run again: its file is replaced
    assert np.asarray(Image.open(path))[0, 0, 0] == 30
    assert read_metadata(path.read_bytes())["job"] == "job-a"
    assert [p.name for p in path.parent.iterdir()] == ["out.png"]  # no temporary left behind


def test_a_job_store_that_went_away_is_unavailable_not_unknown(services: Services, gateways: Callable[..., Gateway], tmp_path: Path) -> None:
    store = ValkeyServer(tmp_path / "valkey").start()
    try:
        gateway = gateways("gw-lost", store.url, TILECHAIN_GATEWAY_MAX_JOBS="0").start()
        job_id = submit(gateway, small_chain("lost"))
        store.stop()
        for call in (gateway.stub.GetJob, gateway.stub.CancelJob, lambda r, timeout: list(gateway.stub.WatchJob(r, timeout=timeout))):
            with pytest.raises(grpc.RpcError) as info:
                call(gateway_pb2.JobRef(job_id=job_id), timeout=30)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "the job store is unavailable" in info.value.details()
        with pytest.raises(grpc.RpcError) as info:
            gateway.stub.SubmitChain(chain_request(small_chain("lost")), timeout=30)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        store.stop()
