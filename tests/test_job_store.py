"""The job store's contract, run against both backends: embedded SQLite and a real valkey-server
(Redis protocol). The same scenario must give the same answers from either."""

from __future__ import annotations

import asyncio
import socket
import sqlite3
from pathlib import Path
from typing import Awaitable, Callable, Iterator

import pytest

from tilechain.services.core.config import FAMILIES

from tilechain.gateway.settings import DEFAULT_MAX_STREAMS, StreamLimits, replica_addresses, replica_count
from tilechain.gateway.store import open_store
from tilechain.gateway.store.base import (
    CANCELLED,
    FAILED,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    FeedItem,
    JobStore,
    NewJob,
    StoreConfig,
    admit,
)
from tilechain.v1 import gateway_pb2, stage_pb2

from .valkey import ValkeyServer

LIMITS = {"source": 2, "blend": 2, "correct": 2, "upscale": 2, "persist": 16, "reduce": 16}


@pytest.fixture(scope="module")
def valkey(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ValkeyServer]:
    server = ValkeyServer(tmp_path_factory.mktemp("valkey")).start()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "redis"])
def backend(request, tmp_path: Path) -> Callable[..., JobStore]:
    """A factory of stores on one fresh backend: several stores on it are several gateways."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'jobs.db'}"
    else:
        server: ValkeyServer = request.getfixturevalue("valkey")
        server.client().flushall()
        url = server.url

    def make(**config) -> JobStore:
        store = open_store(url, StoreConfig(**{"limits": LIMITS, **config}))
        store.backend = request.param  # type: ignore[attr-defined]
        store.url = url  # type: ignore[attr-defined]
        return store

    return make


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(test())


def new_job(job_id: str, needs: dict[str, int] | None = None, max_attempts: int = 3, deadline: float = 0.0) -> NewJob:
    request = gateway_pb2.ChainRequest(chain_json='{"stages": []}', attachments=[gateway_pb2.Attachment(stage="s", data=b"x" * 1000)])
    return NewJob(job_id, request.SerializeToString(), needs or {"source": 1, "persist": 1}, 2, max_attempts, deadline)


def progress(stage: int, done: int) -> gateway_pb2.JobEvent:
    return gateway_pb2.JobEvent(progress=gateway_pb2.StageProgress(stage_index=stage, name=f"s{stage}", progress=stage_pb2.Progress(unit="tiles", done=done, total=9)))


def stage_event(stage: int, kind: int) -> gateway_pb2.JobEvent:
    return gateway_pb2.JobEvent(stage=gateway_pb2.StageEvent(kind=kind, stage_index=stage, name=f"s{stage}"))


def request_kept(store: JobStore, job_id: str) -> bool:
    """Whether the store still holds the job's request (its attachment bytes)."""
    if store.backend == "sqlite":  # type: ignore[attr-defined]
        with sqlite3.connect(store.url.removeprefix("sqlite:///")) as db:  # type: ignore[attr-defined]
            return db.execute("SELECT request IS NOT NULL FROM jobs WHERE id = ?", (job_id,)).fetchone()[0] == 1
    import redis

    return bool(redis.Redis.from_url(store.url).hexists(f"tilechain:job:{job_id}", "request"))  # type: ignore[attr-defined]


async def opened(store: JobStore) -> JobStore:
    await store.open()
    return store


def test_a_job_from_queue_to_end_keeps_a_compact_history(backend) -> None:
    async def test() -> None:
        store = await opened(backend())
        try:
            job = new_job("job1")
            await store.submit(job)
            status = await store.status("job1")
            assert (status.state, status.attempt, status.max_attempts) == (QUEUED, 0, 3)
            assert (status.queue_position, status.queue_length, status.stages_total) == (1, 1, 2)
            assert await store.status("nope") is None

            claim = await store.claim("gw/1", wait=0)
            assert claim is not None and (claim.id, claim.attempt, claim.max_attempts) == ("job1", 1, 3)
            assert claim.request == job.request and claim.previous_owner == ""
            status = await store.status("job1")
            assert (status.state, status.attempt, status.queue_position, status.gateway) == (RUNNING, 1, 0, "gw/1")

            events = [
                stage_event(0, gateway_pb2.StageEvent.KIND_STARTED), progress(0, 1), progress(0, 2),
                gateway_pb2.JobEvent(notice=gateway_pb2.NoticeEvent(stage_index=0, name="s0", message="no face found")),
                progress(0, 3), stage_event(0, gateway_pb2.StageEvent.KIND_FINISHED),
                gateway_pb2.JobEvent(artifact=stage_pb2.Artifact(stage="s1", uri="file:///x.png", width=8)),
            ]
            indices = [await store.append("job1", "gw/1", 1, e) for e in events]
            assert indices == [0, 1, 1, 2, 1, 3, 4]  # progress replaces the stage's previous one in place
            status, history = await store.snapshot("job1")
            assert [e.WhichOneof("kind") for e in history] == ["stage", "progress", "notice", "stage", "artifact"]
            assert history[1].progress.progress.done == 3  # only the latest progress
            assert status.stages_done == 1 and [a.uri for a in status.artifacts] == ["file:///x.png"]
            assert request_kept(store, "job1")

            assert await store.finish("job1", "gw/1", 1, SUCCEEDED)
            status = await store.status("job1")
            assert (status.state, status.attempt, len(status.artifacts)) == (SUCCEEDED, 1, 1)
            created, started, ended = (t.ToNanoseconds() for t in (status.created_at, status.started_at, status.ended_at))
            assert 0 < created <= started <= ended
            assert not request_kept(store, "job1")  # the attachment bytes are gone, the record stays
            assert len((await store.snapshot("job1"))[1]) == 5
            assert await store.append("job1", "gw/1", 1, progress(1, 1)) == -1  # ended: nothing more
        finally:
            await store.close()

    run(test)


def test_admission_takes_every_stream_of_a_chain_or_none(backend) -> None:
    async def test() -> None:
        store = await opened(backend())
        try:
            await store.submit(new_job("a", {"upscale": 1}))
            await store.submit(new_job("big", {"upscale": 2, "persist": 1}))   # waits for both upscale streams
            await store.submit(new_job("small", {"upscale": 1}))               # younger: may not take big's stream
            await store.submit(new_job("other", {"reduce": 1, "persist": 1}))  # other families: runs past big
            first = await store.claim("gw/1", wait=0)
            second = await store.claim("gw/1", wait=0)
            assert (first.id, second.id) == ("a", "other")
            assert await store.claim("gw/1", wait=0) is None
            status = await store.status("big")
            assert (status.state, status.queue_position, status.queue_length) == (QUEUED, 1, 2)
            assert (await store.status("small")).queue_position == 2

            await store.finish("a", "gw/1", 1, SUCCEEDED)
            assert (await store.claim("gw/1", wait=0)).id == "big"
            assert await store.claim("gw/1", wait=0) is None  # big holds both upscale streams
            await store.finish("big", "gw/1", 1, SUCCEEDED)
            assert (await store.claim("gw/1", wait=0)).id == "small"
        finally:
            await store.close()

    run(test)


def test_admission_rule_is_one_function() -> None:
    """The rule both backends implement (the Redis backend in Lua, checked by the test above)."""
    waiting = [("big", {"upscale": 2}), ("small", {"upscale": 1}), ("other", {"persist": 1}), ("more", {"upscale": 1})]
    assert admit(waiting, {"upscale": 1, "persist": 16}) == ["other"]
    assert admit(waiting, {"upscale": 3, "persist": 16}) == ["big", "small", "other"]


def test_new_limits_admit_what_now_fits(backend) -> None:
    async def test() -> None:
        store = await opened(backend(limits={**LIMITS, "upscale": 0}))  # a family scaled to zero
        try:
            await store.submit(new_job("wait", {"upscale": 1}))
            assert await store.claim("gw/1", wait=0) is None
            await store.set_limits({**LIMITS, "upscale": 2})  # its first replica came up
            assert (await store.claim("gw/1", wait=0)).id == "wait"
        finally:
            await store.close()

    run(test)


def test_stream_limits_follow_the_replicas() -> None:
    addresses = {f: "127.0.0.1:1" for f in FAMILIES}
    addresses["upscale"] = "127.0.0.1:1,127.0.0.1:2,127.0.0.1:3"
    addresses["blend"] = "ipv4:127.0.0.1:1,127.0.0.1:2"
    addresses["source"] = "dns:///source.tilechain.svc.cluster.local:50051"
    pods = [2]

    def headless_service(host: str, port: int, type: int) -> list:  # one address per ready pod
        assert (host, port, type) == ("source.tilechain.svc.cluster.local", 50051, socket.SOCK_STREAM)
        if not pods[0]:
            raise socket.gaierror(socket.EAI_NONAME, "no address")
        return [(socket.AF_INET, type, 6, "", (f"10.0.0.{n}", port)) for n in range(pods[0])]

    limits = StreamLimits(DEFAULT_MAX_STREAMS, addresses, env={"TILECHAIN_CORRECT_REPLICAS": "5"}, resolve=headless_service)
    assert limits.replicas == {f: 1 for f in FAMILIES} | {"source": 2, "blend": 2, "correct": 5, "upscale": 3}
    assert limits.limits["upscale"] == 3 * DEFAULT_MAX_STREAMS["upscale"] and limits.changing == ["source"]
    assert not limits.recount()
    pods[0] = 0  # scaled to zero: nothing is admitted for it
    assert limits.recount() and limits.limits["source"] == 0
    pods[0] = 4
    assert limits.recount() and limits.limits["source"] == 4 * DEFAULT_MAX_STREAMS["source"]
    assert replica_count("dns:///localhost:50051") >= 1  # the real resolver
    assert replica_count("dns://8.8.8.8/nosuchname.invalid:1", lambda *a, **k: []) == 0
    # each replica's own address: where the gateway sends Finish (every replica publishes its own)
    assert replica_addresses("dns:///source.tilechain.svc.cluster.local:50051", headless_service) == [f"10.0.0.{n}:50051" for n in range(4)]
    assert replica_addresses("127.0.0.1:1, 127.0.0.1:2") == ["127.0.0.1:1", "127.0.0.1:2"]
    assert replica_addresses("ipv6:[::1]:1,[::1]:2") == ["[::1]:1", "[::1]:2"]
    assert replica_addresses("persist:50055") == ["persist:50055"]
    assert replica_addresses("unix:/run/persist.sock") == ["unix:/run/persist.sock"]


def test_claims_are_shared_and_the_limit_holds_across_gateways(backend) -> None:
    async def test() -> None:
        one, two = await opened(backend()), await opened(backend())
        try:
            for n in range(5):
                await one.submit(new_job(f"j{n}", {"upscale": 1}))
            claims = [await one.claim("gw-a/1", wait=0), await two.claim("gw-b/1", wait=0)]
            assert sorted(c.id for c in claims) == ["j0", "j1"]
            assert await two.claim("gw-b/1", wait=0) is None and await one.claim("gw-a/1", wait=0) is None
            assert (await two.status("j2")).queue_position == 1
            assert await two.demand() == {"upscale": 5}
            await two.finish(claims[0].id, "gw-a/1", 1, SUCCEEDED)  # through either store
            assert (await two.claim("gw-b/1", wait=0)).id == "j2"
            assert await one.demand() == {"upscale": 4}
        finally:
            await one.close()
            await two.close()

    run(test)


def test_retry_and_hand_back(backend) -> None:
    async def test() -> None:
        store = await opened(backend())
        try:
            await store.submit(new_job("r"))
            await store.submit(new_job("later"))
            claim = await store.claim("gw/1", wait=0)
            assert claim.id == "r"
            # a retry keeps the job's place (it is older than the jobs behind it) and counts
            assert await store.requeue("r", "gw/1", 1, counted=True)
            status = await store.status("r")
            assert (status.state, status.attempt, status.queue_position) == (QUEUED, 1, 1)
            claims = {c.id: c for c in [await store.claim("gw/1", wait=0), await store.claim("gw/1", wait=0)]}
            assert (claims["r"].attempt, claims["r"].run) == (2, 2) and claims["later"].attempt == 1
            # a hand-back by a stopping gateway does not count (but it is another run)
            assert await store.requeue("r", "gw/1", 2, counted=False)
            assert (await store.status("r")).attempt == 1
            claim = await store.claim("gw/2", wait=0)
            assert (claim.attempt, claim.run) == (2, 3)
            assert not await store.requeue("r", "gw/1", 2, counted=True)  # gw/1 no longer holds it
            assert not await store.append("r", "gw/2", 2, progress(0, 1)) >= 0  # nor run 2
            assert await store.append("r", "gw/2", 3, progress(0, 1)) >= 0
        finally:
            await store.close()

    run(test)


def test_a_dead_gateways_lease_runs_out_and_another_takes_over(backend) -> None:
    async def test() -> None:
        dead, live = await opened(backend(lease=0.5)), await opened(backend(lease=0.5))
        try:
            await dead.submit(new_job("orphan"))
            first = await dead.claim("gw-a/1", wait=0)
            assert first.attempt == 1
            # gw-a renews nothing from now on (it "died"); gw-b waits for the lease to run out
            claim = await live.claim("gw-b/1", wait=30)
            assert claim is not None and (claim.id, claim.attempt, claim.previous_owner) == ("orphan", 2, "gw-a/1")
            # the old owner is fenced off: it can no longer write
            assert await dead.renew("gw-a/1", {"orphan": 1}) == {"orphan": "lost"}
            assert await dead.append("orphan", "gw-a/1", 1, progress(0, 1)) == -1
            assert not await dead.finish("orphan", "gw-a/1", 1, SUCCEEDED)
            assert await live.renew("gw-b/1", {"orphan": 2}) == {}
            assert await live.finish("orphan", "gw-b/1", 2, SUCCEEDED)
            assert (await dead.status("orphan")).state == SUCCEEDED
        finally:
            await dead.close()
            await live.close()

    run(test)


def test_restarted_gateway_takes_its_jobs_back_at_once_until_attempts_run_out(backend) -> None:
    async def test() -> None:
        store = await opened(backend())
        try:
            await store.submit(new_job("j", max_attempts=2))
            assert (await store.claim("host:1/old", wait=0)).attempt == 1
            assert await store.claim("host:1/new", wait=0) is None  # leased to the old process
            assert await store.release_previous("host:1", "host:1/new") == 1
            assert await store.release_previous("other:1", "other:1/x") == 0
            claim = await store.claim("host:1/new", wait=5)
            assert (claim.attempt, claim.previous_owner) == (2, "host:1/old")
            await store.release_previous("host:1", "host:1/newer")  # and that one died too
            assert await store.claim("host:1/newer", wait=0) is None
            status = await store.status("j")
            assert status.state == FAILED and "attempt 2 of 2" in status.message and "no attempts left" in status.message
            assert status.code == 14  # UNAVAILABLE
        finally:
            await store.close()

    run(test)


def test_cancel_queued_running_and_unknown(backend) -> None:
    async def test() -> None:
        store = await opened(backend())
        heard: list[str] = []
        store.on_cancel(heard.append)
        try:
            await store.submit(new_job("run"))
            await store.submit(new_job("wait", {"upscale": 2}))
            await store.submit(new_job("blocked", {"upscale": 2}))
            assert (await store.claim("gw/1", wait=0)).id == "run"
            assert (await store.claim("gw/1", wait=0)).id == "wait"
            assert await store.cancel("nope") is None

            status = await store.cancel("blocked")  # queued: ends at once
            assert (status.state, status.code, status.queue_position) == (CANCELLED, 1, 0)
            assert (await store.status("wait")).state == RUNNING

            status = await store.cancel("run")  # running: flagged, its gateway told
            assert status.state == RUNNING
            await until(lambda: heard == ["run"])
            assert await store.renew("gw/1", {"run": 1, "wait": 1}) == {"run": "cancel"}
            # a retry of a cancelled job ends it instead
            assert await store.requeue("run", "gw/1", 1, counted=True)
            assert (await store.status("run")).state == CANCELLED
            assert (await store.cancel("run")).state == CANCELLED  # ended: stays as it is
        finally:
            await store.close()

    run(test)


def test_deadline_passed_in_the_queue(backend) -> None:
    async def test() -> None:
        store = await opened(backend())
        try:
            await store.submit(new_job("late", deadline=1.0))  # long past
            assert await store.claim("gw/1", wait=0) is None
            status = await store.status("late")
            assert (status.state, status.code) == (FAILED, 4) and "deadline" in status.message
        finally:
            await store.close()

    run(test)


def test_live_feed_and_queue_moves(backend) -> None:
    async def test() -> None:
        store = await opened(backend())
        heard: list[FeedItem] = []
        moves: list[int] = []
        try:
            await store.submit(new_job("f"))
            await store.submit(new_job("g"))
            async with store.subscribe("f", heard.append), store.on_queue_moved(lambda: moves.append(1)):
                claim = await store.claim("gw/1", wait=0)
                await until(lambda: moves)  # f left the queue: g moved up
                await store.append("f", "gw/1", 1, progress(0, 1))
                await store.append("f", "gw/1", 1, progress(0, 2))
                await store.publish_tile("f", 1, gateway_pb2.JobEvent(tile=gateway_pb2.TileEvent(name="s0")))
                await store.requeue("f", "gw/1", claim.attempt, counted=True)
                assert (await store.claim("gw/1", wait=0)).id == "g"  # admitted before f came back
                claim = await store.claim("gw/1", wait=0)
                assert (claim.id, claim.attempt) == ("f", 2)
                await store.finish("f", "gw/1", claim.attempt, SUCCEEDED)
                await until(lambda: heard and heard[-1].kind == "final")
            assert [(i.kind, i.index) for i in heard] == [("event", 0), ("event", 0), ("tile", 1), ("requeued", 0), ("final", 0)]
            assert heard[1].event.progress.progress.done == 2
        finally:
            await store.close()

    run(test)


def test_demand_per_family_is_exact(backend) -> None:
    async def test() -> None:
        store = await opened(backend())
        try:
            await store.submit(new_job("a", {"source": 1, "upscale": 1}))
            await store.submit(new_job("b", {"upscale": 2}))
            await store.submit(new_job("c", {"persist": 1}))
            assert await store.demand() == {"source": 1, "upscale": 2, "persist": 1}
            claim = await store.claim("gw/1", wait=0)
            assert await store.demand() == {"source": 1, "upscale": 2, "persist": 1}  # running still needs them
            await store.finish(claim.id, "gw/1", 1, SUCCEEDED)
            await store.cancel("c")
            assert await store.demand() == {"upscale": 1}
            if store.backend == "redis":  # type: ignore[attr-defined]
                import redis

                client = redis.Redis.from_url(store.url)  # type: ignore[attr-defined]
                assert client.lrange("tilechain:demand:upscale", 0, -1) == [b"b"]
                assert client.llen("tilechain:demand:persist") == 0
                client.delete("tilechain:demand:upscale")  # lost (e.g. a restored backup): rebuilt on open
                await (await opened(backend())).close()
                assert client.lrange("tilechain:demand:upscale", 0, -1) == [b"b"]
        finally:
            await store.close()

    run(test)


async def until(condition: Callable[[], object], timeout: float = 30.0) -> None:
    """Wait for something another task or process delivers (a pub/sub message), yielding the
    loop meanwhile; fails after timeout."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "not delivered in time"
        await asyncio.sleep(0.01)


def test_the_progress_summary_counts_a_finished_stage_as_complete() -> None:
    """onnx-web's summary in GetJob: a stage whose last estimate fell short (outpaint tiles that
    needed no steps) is complete once it has finished; a running stage counts what it did."""
    from tilechain.gateway.store.base import add_progress_summary

    def unit_progress(stage: int, unit: str, done: int, total: int) -> gateway_pb2.JobEvent:
        event = gateway_pb2.JobEvent()
        event.progress.stage_index, event.progress.progress.unit = stage, unit
        event.progress.progress.done, event.progress.progress.total = done, total
        return event

    finished = gateway_pb2.JobEvent(stage=gateway_pb2.StageEvent(stage_index=0, kind=gateway_pb2.StageEvent.KIND_FINISHED))
    history = [unit_progress(0, "steps", 649, 675), unit_progress(0, "tiles", 30, 30), finished, unit_progress(1, "steps", 2, 10)]
    status = gateway_pb2.JobStatus(state=gateway_pb2.JOB_STATE_RUNNING, stages_total=2, stages_done=1)
    add_progress_summary(status, history)
    assert (status.stages.current, status.stages.total) == (1, 2)
    assert (status.steps.current, status.steps.total) == (675 + 2, 675 + 10)
    assert (status.tiles.current, status.tiles.total) == (30, 30)
