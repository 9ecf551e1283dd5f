"""A watcher's buffer: filled without waiting, bounded by its tile budget; a slow reader loses
tiles (and is told how many), never stage, notice, artifact or final events; progress coalesces."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tilechain.gateway import watch
from tilechain.gateway.store import open_store
from tilechain.gateway.store.base import SUCCEEDED, FeedItem, NewJob, StoreConfig
from tilechain.gateway.watch import FINAL, Watcher, WatcherClosed, follow
from tilechain.v1 import gateway_pb2, stage_pb2, tiles_pb2


def tile(stage: int, size: int) -> gateway_pb2.JobEvent:
    return gateway_pb2.JobEvent(tile=gateway_pb2.TileEvent(stage_index=stage, name=f"s{stage}", tile=tiles_pb2.Tile(pixels=b"x" * size)))


def progress(stage: int, done: int) -> gateway_pb2.JobEvent:
    return gateway_pb2.JobEvent(progress=gateway_pb2.StageProgress(stage_index=stage, name=f"s{stage}", progress=stage_pb2.Progress(done=done, total=9)))


def stage(index: int) -> gateway_pb2.JobEvent:
    return gateway_pb2.JobEvent(stage=gateway_pb2.StageEvent(kind=gateway_pb2.StageEvent.KIND_STARTED, stage_index=index, name=f"s{index}"))


def drain(watcher: Watcher) -> list:
    async def read() -> list:
        items = []
        while True:
            item = await watcher.get()
            items.append(item)
            if item == FINAL:
                return items

    return asyncio.run(read())


def test_a_slow_watcher_loses_tiles_past_its_budget_and_is_told() -> None:
    watcher = Watcher(tile_budget=3000)
    watcher.put(stage(0))
    for _ in range(10):  # 10 tiles of ~1000 bytes against a 3000-byte budget, nobody reading
        watcher.put(tile(0, 1000))
    watcher.put(stage(1))
    watcher.offer(FeedItem("final"))
    items = drain(watcher)
    kinds = [i if isinstance(i, str) else i.WhichOneof("kind") for i in items]
    assert kinds == ["stage", "tile", "tile", "notice", "stage", FINAL]
    assert items[3].notice.message.startswith("8 tile event(s) dropped")
    assert (items[3].notice.stage_index, items[3].notice.name) == (0, "s0")
    # read again: the budget is free again
    watcher.put(tile(1, 1000))
    assert asyncio.run(watcher.get()).WhichOneof("kind") == "tile"


def test_tiles_within_the_budget_never_count_as_falling_behind() -> None:
    """Small tiles are bounded by their bytes, not their number: many thousands of them inside
    the budget keep the watcher open; only non-tile events count towards MAX_WAITING_EVENTS."""
    watcher = Watcher(tile_budget=64 * 1024 * 1024)
    for _ in range(3 * watch.MAX_WAITING_EVENTS):
        watcher.put(tile(0, 16))
    assert watcher.closed is None
    for _ in range(watch.MAX_WAITING_EVENTS + 1):
        watcher.put(stage(1))
    assert watcher.closed is not None and "behind" in watcher.closed


def test_progress_coalesces_without_touching_other_watchers_events() -> None:
    one, two = Watcher(), Watcher()
    first = progress(0, 1)
    for watcher in (one, two):
        watcher.put(first)
    one.put(progress(0, 2))
    one.put(progress(1, 1))
    one.put(progress(0, 3))  # replaces stage 0's waiting progress in place
    one.offer(FeedItem("final"))
    items = drain(one)
    assert [(i.progress.stage_index, i.progress.progress.done) for i in items[:-1]] == [(0, 3), (1, 1)]
    assert first.progress.progress.done == 1 and asyncio.run(two.get()).progress.progress.done == 1


def test_replayed_events_are_not_delivered_twice_but_progress_always_is() -> None:
    watcher = Watcher()
    watcher.skip_below = 3  # three history entries replayed
    watcher.offer(FeedItem("event", 2, stage(0)))       # already in the replay
    watcher.offer(FeedItem("event", 1, progress(0, 5)))  # a newer progress of a replayed slot
    watcher.offer(FeedItem("tile", 2, tile(0, 10)))      # made before the replay's end
    watcher.offer(FeedItem("event", 3, stage(1)))
    watcher.offer(FeedItem("final"))
    kinds = [i if isinstance(i, str) else i.WhichOneof("kind") for i in drain(watcher)]
    assert kinds == ["progress", "stage", FINAL]


def test_closed_watcher_ends_with_the_reason() -> None:
    watcher = Watcher()
    watcher.put(stage(0))
    watcher.close("stopping")
    with pytest.raises(WatcherClosed) as info:
        asyncio.run(watcher.get())
    assert info.value.reason == "stopping"


def test_a_watcher_that_hears_nothing_live_still_gets_every_event_and_the_end(tmp_path: Path, monkeypatch) -> None:
    """Two stores on one SQLite file are two processes: no live message passes between them, as
    when a pub/sub connection drops. The watcher's quiet check finds the end, and the history
    gives it what it missed, each event once."""
    monkeypatch.setattr(watch, "QUIET_CHECK_SECONDS", 0.1)

    async def test() -> list[str]:
        url = f"sqlite:///{tmp_path / 'jobs.db'}"
        watching, running = (open_store(url, StoreConfig(limits={"source": 1})) for _ in range(2))
        await watching.open()
        await running.open()
        try:
            await running.submit(NewJob("j", b"", {"source": 1}, 1, 3))
            claim = await running.claim("gw/1", wait=0)
            await running.append("j", "gw/1", claim.run, stage(0))
            seen: list[str] = []

            async def watcher() -> None:
                async for event in follow(watching, "j", Watcher(), replay=True):
                    seen.append(event.WhichOneof("kind"))

            task = asyncio.create_task(watcher())
            for done in (1, 2):
                await running.append("j", "gw/1", claim.run, progress(0, done))
            await running.append("j", "gw/1", claim.run, gateway_pb2.JobEvent(stage=gateway_pb2.StageEvent(
                kind=gateway_pb2.StageEvent.KIND_FINISHED, stage_index=0, name="s0")))
            await running.finish("j", "gw/1", claim.run, SUCCEEDED)
            await asyncio.wait_for(task, 30)
            return seen
        finally:
            await watching.close()
            await running.close()

    assert asyncio.run(test()) == ["stage", "progress", "stage", "status"]
