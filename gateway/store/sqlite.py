"""The embedded job store: one SQLite file in WAL mode (default var/jobs-<gateway port>.db).

Jobs are rows with state and lease columns; every change is one transaction (BEGIN IMMEDIATE,
so two processes on one file take turns), run on one worker thread so the event loop never
waits on the disk. synchronous=NORMAL: a commit survives the gateway being killed (kill -9);
a power cut may lose the last commits. Live events go to this process's watchers directly:
one gateway serves a SQLite store at a time (a restarted one picks up where it stopped);
several gateways share work through the Redis backend (docs/jobs.md)."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from tilechain.v1 import gateway_pb2

from .base import (
    ADMISSION_SCAN,
    CANCELLED,
    CANCELLED_CODE,
    DEADLINE_CODE,
    QUEUED,
    RUNNING,
    UNAVAILABLE_CODE,
    Claim,
    FeedItem,
    JobStore,
    NewJob,
    StoreConfig,
    StoreError,
    admit,
    dumps_needs,
    event_kind,
    progress_slot,
    set_times,
    wait_event,
)

SCHEMA_VERSION = 1
SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,  -- submission order: the queue's order
    id           TEXT NOT NULL UNIQUE,
    state        INTEGER NOT NULL,                   -- tilechain.v1.JobState
    code         INTEGER NOT NULL DEFAULT 0,
    message      TEXT NOT NULL DEFAULT '',
    attempt      INTEGER NOT NULL DEFAULT 0,         -- runs that count against max_attempts
    max_attempts INTEGER NOT NULL,
    runs         INTEGER NOT NULL DEFAULT 0,         -- every run, hand-backs included: the fencing token
    stages_total INTEGER NOT NULL,
    stages_done  INTEGER NOT NULL DEFAULT 0,
    needs        TEXT NOT NULL,                      -- {"family": streams}
    request      BLOB,                               -- the ChainRequest; NULL once the job ended
    deadline     REAL NOT NULL DEFAULT 0,            -- unix time, 0 = none
    admitted     INTEGER NOT NULL DEFAULT 0,         -- 0, or its place in the order of admission:
                                                     -- it holds its streams (rows in slots)
    owner        TEXT NOT NULL DEFAULT '',           -- gateway-id/process running it
    lease_until  REAL NOT NULL DEFAULT 0,
    cancel       INTEGER NOT NULL DEFAULT 0,
    created      REAL NOT NULL,                      -- unix times
    started      REAL,
    finished     REAL
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, seq);
CREATE INDEX IF NOT EXISTS jobs_by_admission ON jobs (admitted);
CREATE TABLE IF NOT EXISTS events (
    job_id  TEXT NOT NULL,
    idx     INTEGER NOT NULL,   -- position in the job's history
    run     INTEGER NOT NULL,   -- the job's run that made it
    kind    TEXT NOT NULL,      -- event, progress, finished, artifact (base.event_kind)
    slot    TEXT,               -- progress: "run:stage", replaced in place
    data    BLOB NOT NULL,      -- a serialized JobEvent
    PRIMARY KEY (job_id, idx)
);
CREATE TABLE IF NOT EXISTS slots (
    job_id  TEXT NOT NULL,
    family  TEXT NOT NULL,
    streams INTEGER NOT NULL,
    PRIMARY KEY (job_id, family)
);
"""

Note = tuple  # ("event", job_id, FeedItem) | ("cancel", job_id) | ("queue",) | ("work",)


class SqliteStore(JobStore):
    errors = (StoreError, sqlite3.Error, OSError)

    def __init__(self, path: Path, config: StoreConfig) -> None:
        super().__init__(config)
        self.path = path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="jobstore")
        self._db: sqlite3.Connection | None = None
        self._work = asyncio.Event()

    # --- plumbing ----------------------------------------------------------------------------

    async def open(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            await self._call(self._open)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"the job store {self.path} cannot be opened: {exc} (TILECHAIN_JOB_STORE sets where it is)") from exc

    def _open(self) -> list[Note]:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30.0)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA foreign_keys=OFF")
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version not in (0, SCHEMA_VERSION):
            raise RuntimeError(f"{self.path}: job store schema version {version}, this gateway knows {SCHEMA_VERSION}")
        db.executescript(SCHEMA)
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        db.row_factory = sqlite3.Row
        self._db = db
        return []

    async def close(self) -> None:
        if self._db is not None:
            await asyncio.get_running_loop().run_in_executor(self._executor, self._db.close)
            self._db = None
        self._executor.shutdown(wait=False)

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run fn on the store's thread; deliver the notes it returns (after its commit) here."""
        result = await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        notes, value = (result, None) if isinstance(result, list) else result
        for note in notes:
            if note[0] == "event":
                self.feed.deliver(note[1], note[2])
            elif note[0] == "cancel":
                self.feed.cancelled(note[1])
            elif note[0] == "queue":
                self.feed.queue_moved()
            elif note[0] == "work":
                self._work.set()
        return value

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        db = self._db
        assert db is not None, "the job store is not open"
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def _row(self, db: sqlite3.Connection, job_id: str) -> sqlite3.Row | None:
        return db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()

    # --- admission ---------------------------------------------------------------------------

    def _admit(self, db: sqlite3.Connection) -> list[Note]:
        used: dict[str, int] = dict(db.execute("SELECT family, SUM(streams) FROM slots GROUP BY family").fetchall())
        free = {f: limit - used.get(f, 0) for f, limit in self.config.limits.items()}
        waiting = [
            (job_id, json.loads(needs))
            for job_id, needs in db.execute(
                "SELECT id, needs FROM jobs WHERE state = ? AND admitted = 0 ORDER BY seq LIMIT ?", (QUEUED, ADMISSION_SCAN)
            )
        ]
        admitted = admit(waiting, free)
        needs_of = dict(waiting)
        last = db.execute("SELECT COALESCE(MAX(admitted), 0) FROM jobs").fetchone()[0]
        for order, job_id in enumerate(admitted, start=last + 1):
            db.execute("UPDATE jobs SET admitted = ? WHERE id = ?", (order, job_id))
            db.executemany(
                "INSERT INTO slots (job_id, family, streams) VALUES (?, ?, ?)",
                [(job_id, f, n) for f, n in needs_of[job_id].items()],
            )
        return [("work",)] if admitted else []

    def _end(self, db: sqlite3.Connection, job_id: str, state: int, code: int, message: str) -> list[Note]:
        """A job's final state: streams given back, request dropped, watchers told."""
        was_queued = db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()[0] == QUEUED
        db.execute(
            "UPDATE jobs SET state = ?, code = ?, message = ?, request = NULL, admitted = 0, owner = '', "
            "lease_until = 0, finished = ? WHERE id = ?",
            (state, code, message, time.time(), job_id),
        )
        db.execute("DELETE FROM slots WHERE job_id = ?", (job_id,))
        notes: list[Note] = [("event", job_id, FeedItem("final"))]
        if was_queued:
            notes.append(("queue",))
        return notes + self._admit(db)

    # --- jobs --------------------------------------------------------------------------------

    async def submit(self, job: NewJob) -> None:
        await self._call(self._submit, job)

    def _submit(self, job: NewJob) -> list[Note]:
        with self._tx() as db:
            db.execute(
                "INSERT INTO jobs (id, state, max_attempts, stages_total, needs, request, deadline, created) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (job.id, QUEUED, job.max_attempts, job.stages_total, dumps_needs(job.needs), job.request, job.deadline, time.time()),
            )
            return self._admit(db)

    async def claim(self, owner: str, wait: float) -> Claim | None:
        deadline = time.monotonic() + wait
        while True:
            self._work.clear()
            claim = await self._call(self._claim, owner)
            if claim is not None:
                return claim
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            # woken by this process's changes; a lease running out is no event: look again
            await wait_event(self._work, min(left, self.config.lease / 4))

    def _claim(self, owner: str) -> tuple[list[Note], Claim | None]:
        notes: list[Note] = []
        with self._tx() as db:
            while True:
                now = time.time()
                # in the order of admission, as the Redis backend's stream
                row = db.execute(
                    "SELECT * FROM jobs WHERE admitted > 0 AND (state = ? OR (state = ? AND lease_until < ?)) "
                    "ORDER BY admitted LIMIT 1",
                    (QUEUED, RUNNING, now),
                ).fetchone()
                if row is None:
                    return notes, None
                previous = row["owner"] if row["state"] == RUNNING else ""
                attempt = row["attempt"] + 1
                ended = self._cannot_start(row, attempt, previous, now)
                if ended is not None:
                    notes += self._end(db, row["id"], *ended)
                    continue
                run = row["runs"] + 1
                db.execute(
                    "UPDATE jobs SET state = ?, attempt = ?, runs = ?, owner = ?, lease_until = ?, stages_done = 0, started = ? "
                    "WHERE id = ?",
                    (RUNNING, attempt, run, owner, now + self.config.lease, now, row["id"]),
                )
                if row["state"] == QUEUED:
                    notes.append(("queue",))
                return notes, Claim(row["id"], row["request"], attempt, row["max_attempts"], run, row["deadline"], previous)

    @staticmethod
    def _cannot_start(row: sqlite3.Row, attempt: int, previous: str, now: float) -> tuple[int, int, str] | None:
        """Why a claimed job ends instead of starting (the same checks as the Redis backend)."""
        if row["cancel"]:
            return CANCELLED, CANCELLED_CODE, "cancelled"
        if attempt > row["max_attempts"]:
            return (gateway_pb2.JOB_STATE_FAILED, UNAVAILABLE_CODE,
                    f"the gateway running attempt {row['attempt']} of {row['max_attempts']} ({previous}) stopped; no attempts left")
        if row["deadline"] and now > row["deadline"]:
            return gateway_pb2.JOB_STATE_FAILED, DEADLINE_CODE, "the deadline passed before the job could run"
        return None

    async def renew(self, owner: str, running: dict[str, int]) -> dict[str, str]:
        return await self._call(self._renew, owner, running)

    def _renew(self, owner: str, running: dict[str, int]) -> tuple[list[Note], dict[str, str]]:
        stop: dict[str, str] = {}
        with self._tx() as db:
            until = time.time() + self.config.lease
            for job_id, run in running.items():
                row = db.execute(
                    "SELECT cancel FROM jobs WHERE id = ? AND state = ? AND owner = ? AND runs = ?",
                    (job_id, RUNNING, owner, run),
                ).fetchone()
                if row is None:
                    stop[job_id] = "lost"
                    continue
                db.execute("UPDATE jobs SET lease_until = ? WHERE id = ?", (until, job_id))
                if row[0]:
                    stop[job_id] = "cancel"
        return [], stop

    def _holds(self, db: sqlite3.Connection, job_id: str, owner: str, run: int) -> bool:
        return db.execute(
            "SELECT 1 FROM jobs WHERE id = ? AND state = ? AND owner = ? AND runs = ?", (job_id, RUNNING, owner, run)
        ).fetchone() is not None

    async def append(self, job_id: str, owner: str, run: int, event: gateway_pb2.JobEvent) -> int:
        return await self._call(self._append, job_id, owner, run, event)

    def _append(self, job_id: str, owner: str, run: int, event: gateway_pb2.JobEvent) -> tuple[list[Note], int]:
        kind = event_kind(event)
        data = event.SerializeToString()
        with self._tx() as db:
            if not self._holds(db, job_id, owner, run):
                return [], -1
            index = None
            slot = progress_slot(run, event) if kind == "progress" else None
            if slot is not None:
                found = db.execute("SELECT idx FROM events WHERE job_id = ? AND slot = ?", (job_id, slot)).fetchone()
                if found is not None:
                    index = found[0]
                    db.execute("UPDATE events SET data = ? WHERE job_id = ? AND idx = ?", (data, job_id, index))
            if index is None:
                index = db.execute("SELECT COALESCE(MAX(idx) + 1, 0) FROM events WHERE job_id = ?", (job_id,)).fetchone()[0]
                db.execute(
                    "INSERT INTO events (job_id, idx, run, kind, slot, data) VALUES (?, ?, ?, ?, ?, ?)",
                    (job_id, index, run, kind, slot, data),
                )
            if kind == "finished":
                db.execute("UPDATE jobs SET stages_done = stages_done + 1 WHERE id = ?", (job_id,))
        return [("event", job_id, FeedItem("event", index, event))], index

    async def publish_tile(self, job_id: str, position: int, event: gateway_pb2.JobEvent) -> None:
        self.feed.deliver(job_id, FeedItem("tile", position, event))

    async def finish(self, job_id: str, owner: str, run: int, state: int, code: int = 0, message: str = "") -> bool:
        return await self._call(self._finish, job_id, owner, run, state, code, message)

    def _finish(self, job_id: str, owner: str, run: int, state: int, code: int, message: str) -> tuple[list[Note], bool]:
        with self._tx() as db:
            if not self._holds(db, job_id, owner, run):
                return [], False
            return self._end(db, job_id, state, code, message), True

    async def requeue(self, job_id: str, owner: str, run: int, counted: bool) -> bool:
        return await self._call(self._requeue, job_id, owner, run, counted)

    def _requeue(self, job_id: str, owner: str, run: int, counted: bool) -> tuple[list[Note], bool]:
        with self._tx() as db:
            if not self._holds(db, job_id, owner, run):
                return [], False
            if db.execute("SELECT cancel FROM jobs WHERE id = ?", (job_id,)).fetchone()[0]:
                return self._end(db, job_id, CANCELLED, CANCELLED_CODE, "cancelled"), True
            db.execute(
                "UPDATE jobs SET state = ?, attempt = attempt - ?, owner = '', lease_until = 0, admitted = 0 WHERE id = ?",
                (QUEUED, 0 if counted else 1, job_id),
            )
            db.execute("DELETE FROM slots WHERE job_id = ?", (job_id,))
            notes: list[Note] = [("event", job_id, FeedItem("requeued")), ("queue",)]
            return notes + self._admit(db), True

    async def cancel(self, job_id: str) -> gateway_pb2.JobStatus | None:
        found = await self._call(self._cancel, job_id)
        return await self.status(job_id) if found else None

    def _cancel(self, job_id: str) -> tuple[list[Note], bool]:
        with self._tx() as db:
            row = db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                return [], False
            if row[0] == QUEUED:
                return self._end(db, job_id, CANCELLED, CANCELLED_CODE, "cancelled"), True
            if row[0] == RUNNING:
                db.execute("UPDATE jobs SET cancel = 1 WHERE id = ?", (job_id,))
                return [("cancel", job_id)], True
            return [], True

    async def status(self, job_id: str) -> gateway_pb2.JobStatus | None:
        return await self._call(self._status_only, job_id)

    def _status_only(self, job_id: str) -> tuple[list[Note], gateway_pb2.JobStatus | None]:
        db = self._db
        assert db is not None
        db.execute("BEGIN")
        try:
            return [], self._status(db, job_id)
        finally:
            db.execute("COMMIT")

    def _status(self, db: sqlite3.Connection, job_id: str) -> gateway_pb2.JobStatus | None:
        row = self._row(db, job_id)
        if row is None:
            return None
        status = gateway_pb2.JobStatus(
            job_id=job_id, state=row["state"], code=row["code"], message=row["message"],
            stages_total=row["stages_total"], stages_done=row["stages_done"],
            attempt=row["attempt"], max_attempts=row["max_attempts"], gateway=row["owner"],
        )
        set_times(status, row["created"], row["started"], row["finished"])
        for (data,) in db.execute(
            "SELECT data FROM events WHERE job_id = ? AND kind = 'artifact' AND run = ? ORDER BY idx", (job_id, row["runs"])
        ):
            status.artifacts.append(gateway_pb2.JobEvent.FromString(data).artifact)
        if row["state"] == QUEUED:
            ahead, length = db.execute(
                "SELECT SUM(seq < ?), COUNT(*) FROM jobs WHERE state = ?", (row["seq"], QUEUED)
            ).fetchone()
            status.queue_position, status.queue_length = ahead + 1, length
        return status

    async def snapshot(self, job_id: str) -> tuple[gateway_pb2.JobStatus, list[gateway_pb2.JobEvent]] | None:
        return await self._call(self._snapshot, job_id)

    def _snapshot(self, job_id: str) -> tuple[list[Note], tuple[gateway_pb2.JobStatus, list[gateway_pb2.JobEvent]] | None]:
        db = self._db
        assert db is not None
        db.execute("BEGIN")  # one read transaction: status and history agree
        try:
            status = self._status(db, job_id)
            if status is None:
                return [], None
            history = [
                gateway_pb2.JobEvent.FromString(data)
                for (data,) in db.execute("SELECT data FROM events WHERE job_id = ? ORDER BY idx", (job_id,))
            ]
            return [], (status, history)
        finally:
            db.execute("COMMIT")

    async def demand(self) -> dict[str, int]:
        return await self._call(self._demand)

    def _demand(self) -> tuple[list[Note], dict[str, int]]:
        db = self._db
        assert db is not None
        counts: dict[str, int] = {}
        for (needs,) in db.execute("SELECT needs FROM jobs WHERE state IN (?, ?)", (QUEUED, RUNNING)):
            for family in json.loads(needs):
                counts[family] = counts.get(family, 0) + 1
        return [], counts

    async def release_previous(self, gateway_id: str, owner: str) -> int:
        return await self._call(self._release_previous, gateway_id, owner)

    def _release_previous(self, gateway_id: str, owner: str) -> tuple[list[Note], int]:
        with self._tx() as db:
            released = db.execute(
                "UPDATE jobs SET lease_until = 0 WHERE state = ? AND owner LIKE ? ESCAPE '\\' AND owner != ?",
                (RUNNING, like_prefix(gateway_id + "/"), owner),
            ).rowcount
        return ([("work",)] if released else []), released

    async def set_limits(self, limits: dict[str, int]) -> None:
        self.config.limits = dict(limits)
        await self._call(self._admit_now)

    def _admit_now(self) -> list[Note]:
        with self._tx() as db:
            return self._admit(db)

    async def maintain(self) -> None:
        await self._call(self._purge)

    def _purge(self) -> list[Note]:
        """Forget jobs that ended more than the retention time ago."""
        with self._tx() as db:
            cutoff = time.time() - self.config.retention
            old = [r[0] for r in db.execute("SELECT id FROM jobs WHERE finished IS NOT NULL AND finished < ?", (cutoff,))]
            for job_id in old:
                db.execute("DELETE FROM events WHERE job_id = ?", (job_id,))
                db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
        return []


def like_prefix(prefix: str) -> str:
    escaped = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped + "%"
