"""The job store's interface, and what both backends share.

A job is a record in the store, not an object in one gateway: its request (the serialized
ChainRequest, attachments included), state, attempts, artifacts, a compact event history and
its place in the queue. Any gateway on the same store can take a queued job, answer for any job,
and take over a job whose gateway died (its lease ran out). docs/jobs.md describes the life of a
job and both backends' schemas; the contract tests (tests/test_job_store.py) run against both."""

from __future__ import annotations

import abc
import asyncio
import json
import logging
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

import grpc

from tilechain.v1 import gateway_pb2

log = logging.getLogger("tilechain.gateway")

QUEUED = gateway_pb2.JOB_STATE_QUEUED
RUNNING = gateway_pb2.JOB_STATE_RUNNING
SUCCEEDED = gateway_pb2.JOB_STATE_SUCCEEDED
FAILED = gateway_pb2.JOB_STATE_FAILED
CANCELLED = gateway_pb2.JOB_STATE_CANCELLED
FINAL_STATES = frozenset((SUCCEEDED, FAILED, CANCELLED))

CANCELLED_CODE = grpc.StatusCode.CANCELLED.value[0]
UNAVAILABLE_CODE = grpc.StatusCode.UNAVAILABLE.value[0]
DEADLINE_CODE = grpc.StatusCode.DEADLINE_EXCEEDED.value[0]

# How many waiting jobs one admission pass looks at, oldest first: bounds the work per pass.
ADMISSION_SCAN = 200


class StoreError(Exception):
    """The job store cannot be reached or refused a request."""


@dataclass
class NewJob:
    id: str
    request: bytes               # the serialized ChainRequest
    needs: dict[str, int]        # streams per family the chain holds at once
    stages_total: int
    max_attempts: int
    deadline: float = 0.0        # unix time (RunChain's deadline); 0 = none


@dataclass
class Claim:
    """A job a gateway took to run, with the lease that proves it owns it. run counts every run
    of the job (the fencing token: each claim gets a new one); attempt counts the runs that count
    against max_attempts (a gateway handing a job back on shutdown does not use one up)."""

    id: str
    request: bytes
    attempt: int
    max_attempts: int
    run: int
    deadline: float = 0.0
    previous_owner: str = ""     # the gateway whose lease on the previous run ran out, if any


@dataclass
class FeedItem:
    """What a watcher hears live about a job. index orders it against the stored history:
    an event's index in the history (progress events keep the index of the stage's first one),
    or for a tile the history's length when it was emitted."""

    kind: str                               # "event", "tile", "final" (the job ended), "requeued"
    index: int = 0
    event: gateway_pb2.JobEvent | None = None


Sink = Callable[[FeedItem], None]


def admit(waiting: list[tuple[str, dict[str, int]]], free: dict[str, int]) -> list[str]:
    """Which waiting jobs (oldest first, with the streams they need per family) to admit, given
    the free streams per family: a job is admitted only with every stream its chain needs, so a
    chain never starts half-way. A job that does not fit keeps the streams it would use from the
    younger jobs behind it, so a big job is not starved by a stream of small ones; a younger job
    that needs only other families runs past it. The Redis backend runs the same rule in Lua."""
    free = dict(free)
    admitted = []
    for job_id, needs in waiting:
        if all(free.get(f, n) >= n for f, n in needs.items()):
            admitted.append(job_id)
            for f, n in needs.items():
                if f in free:
                    free[f] -= n
        else:
            for f, n in needs.items():
                if f in free:
                    free[f] = max(0, free[f] - n)
    return admitted


def event_kind(event: gateway_pb2.JobEvent) -> str:
    """How the history keeps an event: progress replaces the stage's previous progress, a stage's
    end counts towards stages_done, an artifact joins the status; everything else is appended."""
    kind = event.WhichOneof("kind")
    if kind == "progress":
        return "progress"
    if kind == "artifact":
        return "artifact"
    if kind == "stage" and event.stage.kind == gateway_pb2.StageEvent.KIND_FINISHED:
        return "finished"
    return "event"


def progress_slot(run: int, event: gateway_pb2.JobEvent) -> str:
    """Where the history keeps a stage's latest progress: one per run, stage and unit (a
    diffusion stage reports steps, then tiles; onnx-web's summary counts both)."""
    return f"{run}:{event.progress.stage_index}:{event.progress.progress.unit}"


def add_progress_summary(status: gateway_pb2.JobStatus, history: list[gateway_pb2.JobEvent]) -> None:
    """onnx-web's progress summary (JobStatus stages, steps, tiles as current of total), from
    the stage counts and each stage's latest progress per unit in the history, so that a poller
    can draw a bar without watching."""
    latest: dict[tuple[int, str], tuple[int, int]] = {}
    finished: set[int] = set()
    for event in history:
        kind = event.WhichOneof("kind")
        if kind == "progress":
            progress = event.progress.progress
            latest[(event.progress.stage_index, progress.unit)] = (progress.done, progress.total)
        elif kind == "stage" and event.stage.kind == gateway_pb2.StageEvent.KIND_FINISHED:
            finished.add(event.stage.stage_index)
    status.stages.total = status.stages_total
    status.stages.current = status.stages_total if status.state == SUCCEEDED else status.stages_done
    for unit, counter in (("steps", status.steps), ("tiles", status.tiles)):
        # a finished stage is complete whatever its last estimate said (an outpaint's tiles
        # that needed no steps count as done)
        counts = [(total if stage in finished else done, total) for (stage, kind), (done, total) in latest.items() if kind == unit]
        counter.current = sum(done for done, _ in counts)
        counter.total = sum(total for _, total in counts)


def set_times(status: gateway_pb2.JobStatus, created: float | None, started: float | None, ended: float | None) -> None:
    """The job's timestamps (unix seconds from the store; None or 0: not yet)."""
    for field_name, value in (("created_at", created), ("started_at", started), ("ended_at", ended)):
        if value:
            getattr(status, field_name).FromNanoseconds(int(value * 1e9))


def job_notice(message: str) -> gateway_pb2.JobEvent:
    """A notice about the job itself rather than one stage (name ""): retries, hand-backs."""
    return gateway_pb2.JobEvent(notice=gateway_pb2.NoticeEvent(message=message))


def dumps_needs(needs: dict[str, int]) -> str:
    return json.dumps(needs, sort_keys=True)


class LocalFeed:
    """This process's listeners: watchers of one job each, and whoever wants to hear of cancels
    and of the queue moving. The SQLite backend calls it directly; the Redis backend calls it
    from its pub/sub reader, so a listener never blocks the store."""

    def __init__(self) -> None:
        self.jobs: dict[str, set[Sink]] = {}
        self.cancel_listeners: list[Callable[[str], None]] = []
        self.queue_listeners: set[Callable[[], None]] = set()

    def deliver(self, job_id: str, item: FeedItem) -> None:
        for sink in list(self.jobs.get(job_id, ())):
            sink(item)

    def cancelled(self, job_id: str) -> None:
        for listener in list(self.cancel_listeners):
            listener(job_id)

    def queue_moved(self) -> None:
        for listener in list(self.queue_listeners):
            listener()

    def add(self, job_id: str, sink: Sink) -> bool:
        """Returns whether this is the job's first local sink."""
        sinks = self.jobs.setdefault(job_id, set())
        sinks.add(sink)
        return len(sinks) == 1

    def remove(self, job_id: str, sink: Sink) -> bool:
        """Returns whether that was the job's last local sink."""
        sinks = self.jobs.get(job_id)
        if sinks is None:
            return False
        sinks.discard(sink)
        if sinks:
            return False
        del self.jobs[job_id]
        return True


@dataclass
class StoreConfig:
    """What every backend is opened with (from the gateway's settings)."""

    limits: dict[str, int] = field(default_factory=dict)  # streams per family, all replicas
    lease: float = 30.0          # seconds a claim lives without renewal
    retention: float = 7 * 24 * 3600.0  # seconds a finished job stays readable


class JobStore(abc.ABC):
    """Every operation that changes a job is atomic in the store (one SQLite transaction, one
    Redis script), so a gateway dying at any point leaves a consistent record. Operations on a
    running job carry the owner and run that claimed it: a gateway that lost its lease (it
    stalled past it and another gateway took the job over) is refused."""

    # what a backend raises when it cannot be reached or fails (the gateway answers UNAVAILABLE)
    errors: tuple[type[BaseException], ...] = (StoreError,)

    def __init__(self, config: StoreConfig) -> None:
        self.config = config
        self.feed = LocalFeed()

    async def open(self) -> None:
        """Connect, create the schema, start listening."""

    async def close(self) -> None:
        """Stop listening and disconnect."""

    # --- jobs --------------------------------------------------------------------------------

    @abc.abstractmethod
    async def submit(self, job: NewJob) -> None:
        """Queue a new job (state QUEUED, attempt 0) at the back of the queue."""

    @abc.abstractmethod
    async def claim(self, owner: str, wait: float) -> Claim | None:
        """Take the next admitted job to run, waiting up to wait seconds for one: attempt + 1,
        run + 1, RUNNING, leased to owner. A job whose previous owner's lease ran out is taken over as a
        new attempt; one past its last attempt, cancelled, or past its deadline ends here instead
        (and is not returned)."""

    @abc.abstractmethod
    async def renew(self, owner: str, running: dict[str, int]) -> dict[str, str]:
        """Extend the leases of the jobs owner runs (job id -> run). Returns the jobs to stop:
        "cancel" (someone cancelled it) or "lost" (the lease is no longer this owner's)."""

    @abc.abstractmethod
    async def append(self, job_id: str, owner: str, run: int, event: gateway_pb2.JobEvent) -> int:
        """Keep an event in the job's compact history and send it to live watchers. Returns its
        index in the history, or -1 when owner no longer holds the job."""

    @abc.abstractmethod
    async def publish_tile(self, job_id: str, position: int, event: gateway_pb2.JobEvent) -> None:
        """Send a tile event to live watchers only (tiles are never kept)."""

    @abc.abstractmethod
    async def finish(self, job_id: str, owner: str, run: int, state: int, code: int = 0, message: str = "") -> bool:
        """End a running job: its final state, its streams given back, its request dropped (the
        status and history stay, for the retention time). False when owner no longer holds it."""

    @abc.abstractmethod
    async def requeue(self, job_id: str, owner: str, run: int, counted: bool) -> bool:
        """Put a running job back in the queue, at its old place (it is older than the jobs
        behind it), giving back its streams: a retry (counted: this attempt counts) or a hand-back
        by a stopping gateway (not counted). A job cancelled meanwhile ends CANCELLED instead."""

    @abc.abstractmethod
    async def cancel(self, job_id: str) -> gateway_pb2.JobStatus | None:
        """Cancel a job: a queued one ends at once; a running one is flagged and its gateway told
        (it stops the services' streams and ends the job); an ended one stays as it is.
        None for an unknown job."""

    @abc.abstractmethod
    async def status(self, job_id: str) -> gateway_pb2.JobStatus | None:
        """The job's status, with its queue position while it is queued; None if unknown."""

    @abc.abstractmethod
    async def snapshot(self, job_id: str) -> tuple[gateway_pb2.JobStatus, list[gateway_pb2.JobEvent]] | None:
        """Status and history, read together (consistent with each other)."""

    @abc.abstractmethod
    async def demand(self) -> dict[str, int]:
        """Jobs queued or running per family they need (the autoscalers' signal)."""

    @abc.abstractmethod
    async def release_previous(self, gateway_id: str, owner: str) -> int:
        """A restarted gateway (same gateway id, new owner) runs none of the jobs its previous
        process held: make them claimable now rather than when their leases run out."""

    @abc.abstractmethod
    async def set_limits(self, limits: dict[str, int]) -> None:
        """New stream limits per family (a family gained or lost replicas); admits what now fits."""

    async def maintain(self) -> None:
        """Periodic housekeeping (the worker calls it about once per lease)."""

    # --- live events -------------------------------------------------------------------------

    @asynccontextmanager
    async def subscribe(self, job_id: str, sink: Sink) -> AsyncIterator[None]:
        """Hear the job's live events while inside; subscribed before this returns, so that a
        snapshot taken inside misses nothing."""
        first = self.feed.add(job_id, sink)
        try:
            if first:
                await self._listen(job_id)
            yield
        finally:
            if self.feed.remove(job_id, sink):
                await self._unlisten(job_id)

    async def _listen(self, job_id: str) -> None:
        """Start hearing another process's events for the job (the Redis backend)."""

    async def _unlisten(self, job_id: str) -> None:
        pass

    def on_cancel(self, listener: Callable[[str], None]) -> None:
        self.feed.cancel_listeners.append(listener)

    @asynccontextmanager
    async def on_queue_moved(self, listener: Callable[[], None]) -> AsyncIterator[None]:
        self.feed.queue_listeners.add(listener)
        try:
            yield
        finally:
            self.feed.queue_listeners.discard(listener)


async def wait_event(event: asyncio.Event, timeout: float) -> None:
    """Wait for event up to timeout seconds; no error when it does not come."""
    try:
        await asyncio.wait_for(event.wait(), timeout)
    except asyncio.TimeoutError:
        pass
