"""Watchers: a client following a job (WatchJob, RunChain), from any gateway.

A job never waits for its watchers. Each watcher has its own bounded buffer, filled without
blocking: when a watcher reads more slowly than the job produces, tile events past its tile
budget are dropped (a notice in the stream says how many), progress events replace the stage's
previous one still waiting, and every other event (stage, notice, artifact, queue, the final
status) is kept. So a watcher that stops reading costs at most its tile budget and a few small
events, and the job runs on at full speed. docs/jobs.md, "Watching"."""

from __future__ import annotations

import asyncio
from collections import deque
from typing import AsyncIterator, Awaitable, Callable

from tilechain.v1 import gateway_pb2

from .store.base import FINAL_STATES, QUEUED, FeedItem, JobStore

DEFAULT_TILE_BUDGET = 32 * 1024 * 1024  # bytes of tile events one watcher may have waiting
MAX_WAITING_EVENTS = 10_000              # a watcher this far behind on non-tile events is dropped
# With nothing heard for this long, a watcher reads the job's status: the end of a job is never
# missed, even if a live message was (a dropped pub/sub connection loses what was sent meanwhile).
QUIET_CHECK_SECONDS = 5.0

FINAL = "final"          # markers in a watcher's buffer, besides events
REQUEUED = "requeued"
RECHECK = "recheck"


class JobNotFound(Exception):
    pass


class WatcherClosed(Exception):
    """The watcher ended before its job did: the gateway is stopping, or the watcher fell too
    far behind (reason says which)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Watcher:
    def __init__(self, tile_budget: int = DEFAULT_TILE_BUDGET) -> None:
        self.tile_budget = tile_budget
        self.tile_bytes = 0
        self.tiles_waiting = 0   # tile events in `waiting`: bounded by their bytes, not their number
        self.waiting: deque[gateway_pb2.JobEvent | str] = deque()
        self.progress: dict[int, gateway_pb2.JobEvent] = {}  # stage -> its progress event waiting
        self.drop_notice: gateway_pb2.JobEvent | None = None
        self.dropped = 0
        self.skip_below = 0      # history entries already replayed: live ones before are duplicates
        self.heard_up_to = 0     # history entries heard live so far (all read once the buffer is empty)
        self.queued = False      # follow the job's place in the queue
        self.recheck = False
        self.closed: str | None = None
        self.ready = asyncio.Event()

    # --- filled by the store's feed (never blocks) --------------------------------------------

    def offer(self, item: FeedItem) -> None:
        if item.kind == "final":
            self._push(FINAL)
        elif item.kind == "requeued":
            self._push(REQUEUED)
        elif item.event is not None and (item.index >= self.skip_below or item.event.WhichOneof("kind") == "progress"):
            if item.kind == "event":
                self.heard_up_to = max(self.heard_up_to, item.index + 1)
            self.put(item.event)

    def put(self, event: gateway_pb2.JobEvent) -> None:
        kind = event.WhichOneof("kind")
        if kind == "tile":
            size = event.ByteSize()
            if self.tile_bytes + size > self.tile_budget:
                self._drop(event)
                return
            self.tile_bytes += size
            self.tiles_waiting += 1
        elif kind == "progress":
            waiting = self.progress.get(event.progress.stage_index)
            if waiting is not None:
                waiting.CopyFrom(event)
                return
            event = copy_event(event)  # this watcher's own, to update in place (others share the original)
            self.progress[event.progress.stage_index] = event
        self._push(event)

    def _drop(self, tile: gateway_pb2.JobEvent) -> None:
        self.dropped += 1
        if self.drop_notice is None:
            self.drop_notice = gateway_pb2.JobEvent(
                job_id=tile.job_id,
                notice=gateway_pb2.NoticeEvent(stage_index=tile.tile.stage_index, name=tile.tile.name),
            )
            self._push(self.drop_notice)

    def _push(self, item: gateway_pb2.JobEvent | str) -> None:
        if len(self.waiting) - self.tiles_waiting >= MAX_WAITING_EVENTS:
            self.close(f"this watcher fell more than {MAX_WAITING_EVENTS} events behind the job")
            return
        self.waiting.append(item)
        self.ready.set()

    def queue_moved(self) -> None:
        if self.queued:
            self.recheck = True
            self.ready.set()

    def close(self, reason: str) -> None:
        if self.closed is None:
            self.closed = reason
            self.ready.set()

    # --- read by the client's handler ----------------------------------------------------------

    async def get(self) -> gateway_pb2.JobEvent | str:
        while True:
            if self.closed is not None:
                raise WatcherClosed(self.closed)
            if self.waiting:
                item = self.waiting.popleft()
                if isinstance(item, str):
                    return item
                kind = item.WhichOneof("kind")
                if kind == "tile":
                    self.tile_bytes -= item.ByteSize()
                    self.tiles_waiting -= 1
                elif kind == "progress":
                    self.progress.pop(item.progress.stage_index, None)
                elif item is self.drop_notice:
                    item.notice.message = (
                        f"{self.dropped} tile event(s) dropped: this watcher read more slowly than the job "
                        "made them (the job did not wait); the stage, progress and final events are all here"
                    )
                    self.drop_notice, self.dropped = None, 0
                return item
            if self.recheck:
                self.recheck = False
                return RECHECK
            self.ready.clear()
            try:
                await asyncio.wait_for(self.ready.wait(), QUIET_CHECK_SECONDS)
            except asyncio.TimeoutError:
                return RECHECK


def copy_event(event: gateway_pb2.JobEvent) -> gateway_pb2.JobEvent:
    copied = gateway_pb2.JobEvent()
    copied.CopyFrom(event)
    return copied


def queue_event(job_id: str, status: gateway_pb2.JobStatus) -> gateway_pb2.JobEvent:
    return gateway_pb2.JobEvent(
        job_id=job_id,
        queue=gateway_pb2.QueueEvent(position=status.queue_position, length=status.queue_length, attempt=status.attempt + 1),
    )


def final_event(status: gateway_pb2.JobStatus) -> gateway_pb2.JobEvent:
    return gateway_pb2.JobEvent(job_id=status.job_id, status=status)


async def follow(
    store: JobStore, job_id: str, watcher: Watcher, replay: bool, submit: Callable[[], Awaitable[None]] | None = None
) -> AsyncIterator[gateway_pb2.JobEvent]:
    """The job's events for one watcher, until its final status: with replay, its history first
    (a late watcher sees what happened), then live events, and while it waits in the queue, a
    queue event each time its place changes. Tiles come only live: those made before the
    watcher came are not kept. submit, for RunChain, queues the job once the watcher listens.
    JobNotFound for an unknown job; WatcherClosed if cut off."""
    async with store.subscribe(job_id, watcher.offer), store.on_queue_moved(watcher.queue_moved):
        # subscribed first, so that nothing between the snapshot and now is missed
        if submit is not None:
            await submit()
        if replay:
            found = await store.snapshot(job_id)
            if found is None:
                raise JobNotFound(job_id)
            status, history = found
        else:
            status, history = await store.status(job_id), []
            if status is None:
                raise JobNotFound(job_id)
        watcher.skip_below = len(history)
        for event in history:
            yield event
        if replay and status.state in FINAL_STATES:
            yield final_event(status)
            return
        # (without a replay, a job that ended already has its events and end in the buffer)
        position = 0
        watcher.queued = status.state == QUEUED
        if watcher.queued:
            position = status.queue_position
            yield queue_event(job_id, status)
        while True:
            item = await watcher.get()
            if item == FINAL:
                status = await store.status(job_id)
                if status is not None:
                    yield final_event(status)
                return
            if item in (REQUEUED, RECHECK):
                watcher.queued = watcher.queued or item == REQUEUED
                status = await store.status(job_id)
                if status is None or status.state in FINAL_STATES:
                    # it ended and its last live messages were lost or are late: the history has them
                    found = await store.snapshot(job_id)
                    if found is not None:
                        status, history = found
                        for event in history[max(watcher.heard_up_to, watcher.skip_below):]:
                            yield event
                        yield final_event(status)
                    return
                if status.state != QUEUED:
                    watcher.queued = False
                elif watcher.queued and (item == REQUEUED or status.queue_position != position):
                    position = status.queue_position
                    yield queue_event(job_id, status)
                continue
            assert not isinstance(item, str)
            if item.WhichOneof("kind") == "stage":
                watcher.queued = False  # it runs
            yield item
