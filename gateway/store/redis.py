"""The shared job store: a Redis-protocol server (Valkey or Redis, standalone), for several
gateways.

Work is shared through a Redis Stream with a consumer group: an admitted job is an entry of
`tilechain:queue`, a gateway takes one with XREADGROUP (group `gateways`, one consumer per
gateway process), and the entry stays pending for it while it runs. The pending entry's idle time
is the lease: the gateway renews it (XCLAIM ... JUSTID on its own entries) and a live gateway
takes over the entries of a dead one with XAUTOCLAIM once they have been idle for a lease.
Jobs wait for admission in a sorted set in submission order; every change of a job is one Lua
script, so admission (all of a chain's streams or none), the slots, the demand lists and the
job's record change together. Live events travel by pub/sub. Keys: docs/jobs.md."""

from __future__ import annotations

import asyncio
import json
import logging
import time

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from tilechain.services.core.config import FAMILIES
from tilechain.v1 import gateway_pb2

from .base import (
    ADMISSION_SCAN,
    QUEUED,
    Claim,
    FeedItem,
    JobStore,
    NewJob,
    StoreConfig,
    StoreError,
    dumps_needs,
    event_kind,
    progress_slot,
    set_times,
)

log = logging.getLogger("tilechain.gateway")

PREFIX = "tilechain:"
STREAM = PREFIX + "queue"
GROUP = "gateways"
CANCEL_CHANNEL = PREFIX + "cancel"
QUEUE_CHANNEL = PREFIX + "queue-moved"


def job_key(job_id: str) -> str:
    return f"{PREFIX}job:{job_id}"


def events_channel(job_id: str) -> str:
    return f"{PREFIX}events:{job_id}"


# Shared by every script (Lua has no imports): the admission rule (base.admit, the same rule),
# and how a job ends.
LUA_COMMON = """
local P = 'tilechain:'
local STREAM = P .. 'queue'
local GROUP = 'gateways'
local QUEUED, RUNNING, CANCELLED, FAILED = '1', '2', '5', '4'
local function is_final(state) return state == '3' or state == '4' or state == '5' end
local function jkey(id) return P .. 'job:' .. id end
local function now() local t = redis.call('TIME'); return tonumber(t[1]) + tonumber(t[2]) / 1e6 end

local function holds(key, owner, run)
  local f = redis.call('HMGET', key, 'state', 'owner', 'runs')
  return f[1] == RUNNING and f[2] == owner and f[3] == run
end

-- Admit waiting jobs, oldest first, each with every stream its chain needs or not at all; one
-- that does not fit keeps the streams it would use from the younger jobs behind it.
local function admit(limits_json, scan)
  local limits = cjson.decode(limits_json)
  local free = {}
  for family, limit in pairs(limits) do
    local used = 0
    for _, v in ipairs(redis.call('HVALS', P .. 'slots:' .. family)) do used = used + tonumber(v) end
    free[family] = limit - used
  end
  for _, id in ipairs(redis.call('ZRANGE', P .. 'waiting', 0, scan - 1)) do
    local needs = cjson.decode(redis.call('HGET', jkey(id), 'needs') or '{}')
    local fits = true
    for family, n in pairs(needs) do
      if free[family] ~= nil and free[family] < n then fits = false end
    end
    if fits then
      for family, n in pairs(needs) do
        redis.call('HSET', P .. 'slots:' .. family, id, n)
        if free[family] ~= nil then free[family] = free[family] - n end
      end
      redis.call('ZREM', P .. 'waiting', id)
      redis.call('HSET', jkey(id), 'entry', redis.call('XADD', STREAM, '*', 'job', id))
    else
      for family, n in pairs(needs) do
        if free[family] ~= nil then free[family] = math.max(0, free[family] - n) end
      end
    end
  end
end

-- A job's final state: streams given back, off the queue and the demand lists, its request
-- dropped, its keys expiring after the retention time, watchers told.
local function finalize(id, state, code, message, retention)
  local key = jkey(id)
  for family, _ in pairs(cjson.decode(redis.call('HGET', key, 'needs') or '{}')) do
    redis.call('HDEL', P .. 'slots:' .. family, id)
    redis.call('LREM', P .. 'demand:' .. family, 0, id)
  end
  redis.call('ZREM', P .. 'waiting', id)
  local moved = redis.call('ZREM', P .. 'queued', id)
  redis.call('SREM', P .. 'active', id)
  local entry = redis.call('HGET', key, 'entry')
  if entry and entry ~= '' then
    redis.call('XACK', STREAM, GROUP, entry)
    redis.call('XDEL', STREAM, entry)
  end
  redis.call('HSET', key, 'state', state, 'code', code, 'message', message, 'entry', '', 'owner', '', 'finished', now())
  redis.call('HDEL', key, 'request')
  for _, k in ipairs({key, key .. ':events', key .. ':progress', key .. ':artifacts'}) do
    redis.call('EXPIRE', k, retention)
  end
  redis.call('PUBLISH', P .. 'events:' .. id, 'f')
  if moved == 1 then redis.call('PUBLISH', P .. 'queue-moved', id) end
end
"""

# ARGV: id, needs, stages_total, max_attempts, deadline, limits, scan (the request is set beside
# it in the same MULTI: a large value is better not copied into Lua)
SUBMIT = """
local id = ARGV[1]
local key = jkey(id)
local seq = redis.call('INCR', P .. 'seq')
redis.call('HSET', key, 'state', QUEUED, 'code', 0, 'message', '', 'attempt', 0, 'runs', 0, 'max_attempts', ARGV[4],
  'stages_total', ARGV[3], 'stages_done', 0, 'needs', ARGV[2], 'deadline', ARGV[5], 'seq', seq,
  'owner', '', 'entry', '', 'cancel', 0, 'created', now())
redis.call('ZADD', P .. 'waiting', seq, id)
redis.call('ZADD', P .. 'queued', seq, id)
redis.call('SADD', P .. 'active', id)
for family, _ in pairs(cjson.decode(ARGV[2])) do redis.call('RPUSH', P .. 'demand:' .. family, id) end
admit(ARGV[6], tonumber(ARGV[7]))
return seq
"""

# A gateway got a stream entry (new, or taken over from a dead gateway). ARGV: id, entry,
# owner, retention, limits, scan. Returns {'run', request, attempt, max_attempts, run, deadline,
# previous owner} or {'ended'} / {'stale'}.
START = """
local id, entry, owner = ARGV[1], ARGV[2], ARGV[3]
local key = jkey(id)
local f = redis.call('HMGET', key, 'state', 'entry', 'cancel', 'attempt', 'max_attempts', 'deadline', 'owner', 'request')
if not f[1] or is_final(f[1]) or f[2] ~= entry then
  redis.call('XACK', STREAM, GROUP, entry)
  redis.call('XDEL', STREAM, entry)
  return {'stale'}
end
local previous = ''
if f[1] == RUNNING then previous = f[7] end
local attempt = tonumber(f[4]) + 1
if f[3] == '1' then
  finalize(id, CANCELLED, 1, 'cancelled', ARGV[4])
elseif attempt > tonumber(f[5]) then
  finalize(id, FAILED, 14, 'the gateway running attempt ' .. f[4] .. ' of ' .. f[5] .. ' (' .. previous .. ') stopped; no attempts left', ARGV[4])
elseif tonumber(f[6]) > 0 and now() > tonumber(f[6]) then
  finalize(id, FAILED, 4, 'the deadline passed before the job could run', ARGV[4])
else
  local run = redis.call('HINCRBY', key, 'runs', 1)
  redis.call('HSET', key, 'state', RUNNING, 'attempt', attempt, 'owner', owner, 'stages_done', 0, 'started', now())
  redis.call('DEL', key .. ':artifacts')
  if redis.call('ZREM', P .. 'queued', id) == 1 then redis.call('PUBLISH', P .. 'queue-moved', id) end
  return {'run', f[8], attempt, f[5], run, f[6], previous}
end
admit(ARGV[5], tonumber(ARGV[6]))
return {'ended'}
"""

# ARGV: owner, then job id and run pairs. Renews the leases this owner still holds (its
# pending entries' idle time); returns id, verdict pairs for the jobs to stop.
RENEW = """
local owner = ARGV[1]
local out = {}
for i = 2, #ARGV, 2 do
  local id, run = ARGV[i], ARGV[i + 1]
  local f = redis.call('HMGET', jkey(id), 'state', 'owner', 'runs', 'cancel', 'entry')
  local mine = false
  if f[1] == RUNNING and f[2] == owner and f[3] == run and f[5] and f[5] ~= '' then
    local pending = redis.call('XPENDING', STREAM, GROUP, f[5], f[5], 1)
    mine = #pending == 1 and pending[1][2] == owner
  end
  if not mine then
    table.insert(out, id)
    table.insert(out, 'lost')
  else
    redis.call('XCLAIM', STREAM, GROUP, owner, 0, f[5], 'JUSTID')
    if f[4] == '1' then
      table.insert(out, id)
      table.insert(out, 'cancel')
    end
  end
end
return out
"""

# ARGV: id, owner, run, kind, progress slot, event. Returns the event's history index, or -1.
APPEND = """
local id = ARGV[1]
local key = jkey(id)
if not holds(key, ARGV[2], ARGV[3]) then return -1 end
local events = key .. ':events'
local index = false
if ARGV[4] == 'progress' then
  index = redis.call('HGET', key .. ':progress', ARGV[5])
  if index then redis.call('LSET', events, index, ARGV[6]) end
end
if not index then
  index = redis.call('RPUSH', events, ARGV[6]) - 1
  if ARGV[4] == 'progress' then redis.call('HSET', key .. ':progress', ARGV[5], index) end
end
if ARGV[4] == 'artifact' then redis.call('RPUSH', key .. ':artifacts', ARGV[6]) end
if ARGV[4] == 'finished' then redis.call('HINCRBY', key, 'stages_done', 1) end
redis.call('PUBLISH', P .. 'events:' .. id, 'e' .. index .. ':' .. ARGV[6])
return tonumber(index)
"""

# ARGV: id, owner, run, state, code, message, retention, limits, scan
FINISH = """
if not holds(jkey(ARGV[1]), ARGV[2], ARGV[3]) then return 0 end
finalize(ARGV[1], ARGV[4], ARGV[5], ARGV[6], ARGV[7])
admit(ARGV[8], tonumber(ARGV[9]))
return 1
"""

# ARGV: id, owner, run, counted ('1' or '0'), retention, limits, scan
REQUEUE = """
local id = ARGV[1]
local key = jkey(id)
if not holds(key, ARGV[2], ARGV[3]) then return 0 end
if redis.call('HGET', key, 'cancel') == '1' then
  finalize(id, CANCELLED, 1, 'cancelled', ARGV[5])
else
  for family, _ in pairs(cjson.decode(redis.call('HGET', key, 'needs'))) do
    redis.call('HDEL', P .. 'slots:' .. family, id)
  end
  local entry = redis.call('HGET', key, 'entry')
  redis.call('XACK', STREAM, GROUP, entry)
  redis.call('XDEL', STREAM, entry)
  redis.call('HSET', key, 'state', QUEUED, 'owner', '', 'entry', '')
  if ARGV[4] == '0' then redis.call('HINCRBY', key, 'attempt', -1) end
  local seq = redis.call('HGET', key, 'seq')
  redis.call('ZADD', P .. 'waiting', seq, id)
  redis.call('ZADD', P .. 'queued', seq, id)
  redis.call('PUBLISH', P .. 'events:' .. id, 'q')
  redis.call('PUBLISH', P .. 'queue-moved', id)
end
admit(ARGV[6], tonumber(ARGV[7]))
return 1
"""

# ARGV: id, retention, limits, scan. Returns the state before, or nil for an unknown job.
CANCEL = """
local id = ARGV[1]
local state = redis.call('HGET', jkey(id), 'state')
if not state then return false end
if state == QUEUED then
  finalize(id, CANCELLED, 1, 'cancelled', ARGV[2])
  admit(ARGV[3], tonumber(ARGV[4]))
elseif state == RUNNING then
  redis.call('HSET', jkey(id), 'cancel', 1)
  redis.call('PUBLISH', P .. 'cancel', id)
end
return state
"""

# ARGV: families (JSON list), limits, scan. Rebuilds the demand lists and the slots from the
# jobs' own records (a gateway runs it when it starts), then admits.
RECONCILE = """
local families = cjson.decode(ARGV[1])
for _, family in ipairs(families) do redis.call('DEL', P .. 'demand:' .. family) end
local held = {}
for _, id in ipairs(redis.call('SMEMBERS', P .. 'active')) do
  local f = redis.call('HMGET', jkey(id), 'state', 'needs', 'entry')
  if not f[1] or is_final(f[1]) then
    redis.call('SREM', P .. 'active', id)
  else
    for family, _ in pairs(cjson.decode(f[2])) do redis.call('RPUSH', P .. 'demand:' .. family, id) end
    if f[3] and f[3] ~= '' then held[id] = true end
  end
end
for _, family in ipairs(families) do
  for _, id in ipairs(redis.call('HKEYS', P .. 'slots:' .. family)) do
    if not held[id] then redis.call('HDEL', P .. 'slots:' .. family, id) end
  end
end
admit(ARGV[2], tonumber(ARGV[3]))
return 1
"""

# ARGV: limits, scan
ADMIT = """
admit(ARGV[1], tonumber(ARGV[2]))
return 1
"""

STATUS_FIELDS = ("state", "code", "message", "attempt", "max_attempts", "stages_total", "stages_done", "owner", "created", "started", "finished")


class RedisStore(JobStore):
    errors = (StoreError, RedisError)

    def __init__(self, url: str, config: StoreConfig) -> None:
        super().__init__(config)
        self.url = url
        self.r = aioredis.Redis.from_url(url, decode_responses=False)
        self.scripts = {name: self.r.register_script(LUA_COMMON + body) for name, body in (
            ("submit", SUBMIT), ("start", START), ("renew", RENEW), ("append", APPEND), ("finish", FINISH),
            ("requeue", REQUEUE), ("cancel", CANCEL), ("reconcile", RECONCILE), ("admit", ADMIT),
        )}
        self.limits = json.dumps(config.limits, sort_keys=True)
        self.retention = max(1, int(config.retention))
        self.lease_ms = max(1, int(config.lease * 1000))
        self._pubsub = self.r.pubsub()
        self._reader: asyncio.Task[None] | None = None
        self._confirmed: dict[bytes, asyncio.Event] = {}
        self._next_reap = 0.0

    # --- plumbing ----------------------------------------------------------------------------

    async def _create_group(self) -> None:
        try:
            await self.r.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def open(self) -> None:
        try:
            await self._create_group()
            await self.scripts["reconcile"](args=[json.dumps(FAMILIES), self.limits, ADMISSION_SCAN])
            await self._subscribe(CANCEL_CHANNEL, QUEUE_CHANNEL)
        except RedisError as exc:
            raise StoreError(f"the job store at {self.url} is unavailable: {exc}") from exc

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        await self._pubsub.aclose()
        await self.r.aclose()

    async def _subscribe(self, *channels: str) -> None:
        """Subscribe and wait for the server's confirmation: from then on nothing published on
        them is missed."""
        waits = []
        for channel in channels:
            event = self._confirmed[channel.encode()] = asyncio.Event()
            waits.append(event.wait())
        await self._pubsub.subscribe(*channels)
        if self._reader is None:
            self._reader = asyncio.create_task(self._read())
        await asyncio.wait_for(asyncio.gather(*waits), 30.0)

    async def _read(self) -> None:
        """The one pub/sub reader: hands each message to this process's listeners, which never
        block it (watchers buffer and drop tiles on their own)."""
        while True:
            try:
                message = await self._pubsub.get_message(ignore_subscribe_messages=False, timeout=1.0)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the server went away: redis-py reconnects and resubscribes
                log.warning("job store pub/sub: %s", exc)
                await asyncio.sleep(0.5)
                continue
            if message is None:
                continue
            channel, data = message["channel"], message["data"]
            if message["type"] == "subscribe":
                event = self._confirmed.pop(channel, None)
                if event is not None:
                    event.set()
            elif message["type"] == "message":
                self._dispatch(channel.decode(), data)

    def _dispatch(self, channel: str, data: bytes) -> None:
        if channel == CANCEL_CHANNEL:
            self.feed.cancelled(data.decode())
        elif channel == QUEUE_CHANNEL:
            self.feed.queue_moved()
        elif channel.startswith(PREFIX + "events:"):
            job_id = channel.removeprefix(PREFIX + "events:")
            tag = data[:1]
            if tag in (b"e", b"t"):
                index, _, payload = data[1:].partition(b":")
                kind = "event" if tag == b"e" else "tile"
                self.feed.deliver(job_id, FeedItem(kind, int(index), gateway_pb2.JobEvent.FromString(payload)))
            elif tag == b"f":
                self.feed.deliver(job_id, FeedItem("final"))
            elif tag == b"q":
                self.feed.deliver(job_id, FeedItem("requeued"))

    async def _listen(self, job_id: str) -> None:
        await self._subscribe(events_channel(job_id))

    async def _unlisten(self, job_id: str) -> None:
        await self._pubsub.unsubscribe(events_channel(job_id))

    def _end_args(self) -> list[object]:
        return [self.retention, self.limits, ADMISSION_SCAN]

    # --- jobs --------------------------------------------------------------------------------

    async def submit(self, job: NewJob) -> None:
        async with self.r.pipeline(transaction=True) as pipe:
            pipe.hset(job_key(job.id), "request", job.request)
            await self.scripts["submit"](
                args=[job.id, dumps_needs(job.needs), job.stages_total, job.max_attempts, repr(job.deadline),
                      self.limits, ADMISSION_SCAN],
                client=pipe,
            )
            await pipe.execute()

    async def claim(self, owner: str, wait: float) -> Claim | None:
        try:
            return await self._claim(owner, wait)
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            await self._create_group()  # the server lost its data (restarted without persistence)
            return None

    async def _claim(self, owner: str, wait: float) -> Claim | None:
        deadline = time.monotonic() + wait
        while True:
            entry = None
            if time.monotonic() >= self._next_reap:
                entry = await self._take_over(owner)
                if entry is None:
                    self._next_reap = time.monotonic() + self.config.lease / 4
            if entry is None:
                left_ms = int((min(deadline, self._next_reap) - time.monotonic()) * 1000)
                # BLOCK 0 would wait forever: no time left means a look without waiting
                reply = await self.r.xreadgroup(GROUP, owner, {STREAM: ">"}, count=1, block=left_ms if left_ms > 0 else None)
                for _, entries in reply or []:
                    entry = next(iter(entries), None)
            if entry is not None:
                claim = await self._start(owner, entry)
                if claim is not None:
                    return claim
            elif time.monotonic() >= deadline:
                return None

    async def _take_over(self, owner: str) -> tuple[bytes, dict] | None:
        """A pending entry idle for a lease: its gateway stopped renewing (it died)."""
        cursor = "0-0"
        while True:
            reply = await self.r.xautoclaim(STREAM, GROUP, owner, self.lease_ms, start_id=cursor, count=1)
            cursor, claimed = reply[0], reply[1]
            for entry in claimed:
                if entry[1]:  # None: the entry was deleted meanwhile
                    return entry
            if cursor in (b"0-0", "0-0"):
                return None

    async def _start(self, owner: str, entry: tuple[bytes, dict]) -> Claim | None:
        entry_id, fields = entry
        job_id = fields[b"job"].decode()
        reply = await self.scripts["start"](args=[job_id, entry_id, owner, *self._end_args()])
        if reply[0] != b"run":
            return None
        _, request, attempt, max_attempts, run, deadline, previous = reply
        return Claim(job_id, request, int(attempt), int(max_attempts), int(run), float(deadline), previous.decode())

    async def renew(self, owner: str, running: dict[str, int]) -> dict[str, str]:
        if not running:
            return {}
        args: list[object] = [owner]
        for job_id, run in running.items():
            args += [job_id, run]
        reply = await self.scripts["renew"](args=args)
        return {reply[i].decode(): reply[i + 1].decode() for i in range(0, len(reply), 2)}

    async def append(self, job_id: str, owner: str, run: int, event: gateway_pb2.JobEvent) -> int:
        kind = event_kind(event)
        slot = progress_slot(run, event) if kind == "progress" else ""
        return int(await self.scripts["append"](args=[job_id, owner, run, kind, slot, event.SerializeToString()]))

    async def publish_tile(self, job_id: str, position: int, event: gateway_pb2.JobEvent) -> None:
        await self.r.publish(events_channel(job_id), b"t%d:" % position + event.SerializeToString())

    async def finish(self, job_id: str, owner: str, run: int, state: int, code: int = 0, message: str = "") -> bool:
        done = await self.scripts["finish"](args=[job_id, owner, run, state, code, message, *self._end_args()])
        return bool(done)

    async def requeue(self, job_id: str, owner: str, run: int, counted: bool) -> bool:
        done = await self.scripts["requeue"](args=[job_id, owner, run, int(counted), *self._end_args()])
        return bool(done)

    async def cancel(self, job_id: str) -> gateway_pb2.JobStatus | None:
        before = await self.scripts["cancel"](args=[job_id, *self._end_args()])
        return None if before is None else await self.status(job_id)

    async def status(self, job_id: str) -> gateway_pb2.JobStatus | None:
        found = await self._read_job(job_id, with_history=False)
        return None if found is None else found[0]

    async def snapshot(self, job_id: str) -> tuple[gateway_pb2.JobStatus, list[gateway_pb2.JobEvent]] | None:
        return await self._read_job(job_id, with_history=True)

    async def _read_job(self, job_id: str, with_history: bool) -> tuple[gateway_pb2.JobStatus, list[gateway_pb2.JobEvent]] | None:
        key = job_key(job_id)
        async with self.r.pipeline(transaction=True) as pipe:
            pipe.hmget(key, STATUS_FIELDS)
            pipe.lrange(key + ":artifacts", 0, -1)
            pipe.zrank(PREFIX + "queued", job_id)
            pipe.zcard(PREFIX + "queued")
            if with_history:
                pipe.lrange(key + ":events", 0, -1)
            replies = await pipe.execute()
        values = replies[0]
        if values[0] is None:
            return None
        state, code, message, attempt, max_attempts, stages_total, stages_done, owner, created, started, finished = values
        status = gateway_pb2.JobStatus(
            job_id=job_id, state=int(state), code=int(code), message=message.decode(),
            attempt=int(attempt), max_attempts=int(max_attempts),
            stages_total=int(stages_total), stages_done=int(stages_done), gateway=(owner or b"").decode(),
        )
        set_times(status, *(float(t) if t else None for t in (created, started, finished)))
        status.artifacts.extend(gateway_pb2.JobEvent.FromString(a).artifact for a in replies[1])
        if status.state == QUEUED and replies[2] is not None:
            status.queue_position, status.queue_length = replies[2] + 1, replies[3]
        history = [gateway_pb2.JobEvent.FromString(e) for e in replies[4]] if with_history else []
        return status, history

    async def demand(self) -> dict[str, int]:
        async with self.r.pipeline(transaction=False) as pipe:
            for family in FAMILIES:
                pipe.llen(f"{PREFIX}demand:{family}")
            counts = await pipe.execute()
        return {family: n for family, n in zip(FAMILIES, counts) if n}

    async def release_previous(self, gateway_id: str, owner: str) -> int:
        released = 0
        for consumer in await self.r.xinfo_consumers(STREAM, GROUP):
            name = consumer["name"].decode() if isinstance(consumer["name"], bytes) else consumer["name"]
            if not name.startswith(gateway_id + "/") or name == owner or not consumer["pending"]:
                continue
            pending = await self.r.xpending_range(STREAM, GROUP, "-", "+", consumer["pending"], consumername=name)
            ids = [p["message_id"] for p in pending]
            # idle past the lease: the next XAUTOCLAIM takes them
            await self.r.xclaim(STREAM, GROUP, name, 0, ids, idle=self.lease_ms * 2, justid=True)
            released += len(ids)
        if released:
            self._next_reap = 0.0
        return released

    async def set_limits(self, limits: dict[str, int]) -> None:
        self.config.limits = dict(limits)
        self.limits = json.dumps(limits, sort_keys=True)
        await self.scripts["admit"](args=[self.limits, ADMISSION_SCAN])

    async def maintain(self) -> None:
        """Forget consumers (gateway processes) with nothing pending that have been silent for
        ten leases: they are gone."""
        for consumer in await self.r.xinfo_consumers(STREAM, GROUP):
            if not consumer["pending"] and consumer["idle"] > 10 * self.lease_ms:
                await self.r.xgroup_delconsumer(STREAM, GROUP, consumer["name"])
