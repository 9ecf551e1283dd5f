"""What `tilechain run` shows while a chain runs: a progress bar per stage and unit (tiles,
steps) with its rate and time left on a terminal (rich), plain lines elsewhere (a log, a pipe,
CI); and the preview file, the final image rewritten as its tiles arrive."""

from __future__ import annotations

import os
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import IO, Protocol

import numpy as np
from PIL import Image
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TaskID, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.text import Text

from tilechain.services.core.codecs import canvas_layout
from tilechain.v1 import gateway_pb2, tiles_pb2

STARTED = gateway_pb2.StageEvent.KIND_STARTED


def stage_line(event: gateway_pb2.StageEvent) -> str:
    verb = "started" if event.kind == STARTED else "finished"
    return f"[stage {event.stage_index + 1}] {event.name} ({event.type}) {verb}"


def queue_line(event: gateway_pb2.QueueEvent) -> str:
    retry = f" (attempt {event.attempt})" if event.attempt > 1 else ""
    return f"queued{retry}: {event.position} of {event.length}"


def notice_line(event: gateway_pb2.NoticeEvent) -> str:
    return f"  {event.name or 'job'}: {event.message}"


class Display(Protocol):
    def event(self, event: gateway_pb2.JobEvent) -> None: ...
    def close(self) -> None: ...


class PlainLines:
    """One line per stage start and finish, per notice, and per quarter of each stage's
    progress: readable in a log, and the same lines for the same job every time."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self.started: dict[tuple[int, str], tuple[float, int]] = {}  # (stage, unit) -> first (time, done)
        self.quarter: dict[tuple[int, str], int] = {}

    def write(self, line: str) -> None:
        self.stream.write(line + "\n")
        self.stream.flush()

    def event(self, event: gateway_pb2.JobEvent) -> None:
        kind = event.WhichOneof("kind")
        if kind == "stage":
            self.write(stage_line(event.stage))
        elif kind == "progress":
            p, key = event.progress.progress, (event.progress.stage_index, event.progress.progress.unit)
            first_time, first_done = self.started.setdefault(key, (time.monotonic(), p.done))
            quarter = 4 * p.done // max(1, p.total)
            if quarter > self.quarter.get(key, 0):
                self.quarter[key] = quarter
                line = f"  {event.progress.name}: {p.done}/{p.total} {p.unit}"
                elapsed = time.monotonic() - first_time
                if p.done >= p.total and elapsed > 0 and p.done > first_done:
                    line += f", {(p.done - first_done) / elapsed:.1f} {p.unit}/s"
                self.write(line)
        elif kind == "notice":
            self.write(notice_line(event.notice))
        elif kind == "queue":
            self.write(queue_line(event.queue))

    def close(self) -> None:
        pass


class RateColumn(ProgressColumn):
    """Units per second ("12.3 tiles/s"), from rich's own speed estimate."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:.1f} {task.fields['unit']}/s" if speed else "", style="progress.data.speed")


class Bars:
    """A bar per (stage, unit) on the terminal, with done/total, rate, elapsed and time left;
    stage starts, finishes and notices print above the bars."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(bar_width=30),
            MofNCompleteColumn(),
            TextColumn("{task.fields[unit]}"),
            RateColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=console,
            transient=False,
            refresh_per_second=8,
        )
        self.tasks: dict[tuple[int, str], TaskID] = {}
        self.progress.start()

    def event(self, event: gateway_pb2.JobEvent) -> None:
        kind = event.WhichOneof("kind")
        if kind == "stage":
            self.console.print(stage_line(event.stage), markup=False, highlight=False)
            if event.stage.kind != STARTED:
                for (index, _), task in self.tasks.items():
                    if index == event.stage.stage_index:
                        self.progress.update(task, completed=self.progress.tasks[task].total)
        elif kind == "progress":
            p = event.progress.progress
            key = (event.progress.stage_index, p.unit)
            if key not in self.tasks:
                label = f"{event.progress.stage_index + 1}. {event.progress.name}"
                self.tasks[key] = self.progress.add_task(label, total=p.total, unit=p.unit)
            self.progress.update(self.tasks[key], completed=p.done, total=p.total)
        elif kind == "notice":
            self.console.print(notice_line(event.notice), markup=False, highlight=False)
        elif kind == "queue":
            self.console.print(queue_line(event.queue), markup=False, highlight=False)

    def close(self) -> None:
        self.progress.stop()


def display(mode: str, stream: IO[str] = sys.stderr) -> Display | None:
    """mode: "bars", "plain", "off", or "auto" (bars when the stream is a terminal)."""
    if mode == "off":
        return None
    console = Console(file=stream)
    if mode == "bars" or (mode == "auto" and console.is_terminal and not console.is_dumb_terminal):
        return Bars(Console(file=stream, force_terminal=True) if mode == "bars" else console)
    return PlainLines(stream)


class PreviewWriter:
    """The final image, rewritten as its tiles arrive, and once more at the end. The first image
    canvas (index 0) of the last stage, held in memory at full size.

    A rewrite encodes a copy of the pixels on a background thread, so that reading the job's
    events never waits on an encode (the job would wait with it); while one is being written,
    newer tiles wait for the next. At most one every `interval` seconds. Each goes to a
    temporary file beside the preview, then replaces it: a viewer never reads half a file."""

    def __init__(self, path: Path, interval: float = 0.5) -> None:
        self.path = path
        self.interval = interval
        self.format = Image.registered_extensions().get(path.suffix.lower())
        if self.format is None:
            raise SystemExit(f"--preview {path}: unknown image type {path.suffix!r} (use .png, .jpg or .webp)")
        self.canvas: tiles_pb2.Canvas | None = None
        self.pixels: np.ndarray | None = None
        self.dirty = False
        self.last_write = 0.0
        self.writes = 0
        self.writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="preview")
        self.pending: Future[None] | None = None

    def add(self, event: gateway_pb2.TileEvent) -> None:
        canvas, tile = event.canvas, event.tile
        if canvas.index != 0 or canvas.role == tiles_pb2.CANVAS_ROLE_MASK or canvas.format == tiles_pb2.PIXEL_FORMAT_LATENT_F32:
            return
        if self.canvas is None:
            channels, dtype = canvas_layout(canvas)
            self.canvas = canvas
            self.pixels = np.zeros((canvas.height, canvas.width, channels), dtype=dtype)
        elif canvas.id != self.canvas.id:
            return
        channels = self.pixels.shape[2]
        region = np.frombuffer(tile.pixels, np.uint8).reshape(tile.height, tile.width, channels)
        self.pixels[tile.y : tile.y + tile.height, tile.x : tile.x + tile.width] = region
        self.dirty = True
        busy = self.pending is not None and not self.pending.done()
        if not busy and time.monotonic() - self.last_write >= self.interval:
            self._start_write()

    def _start_write(self) -> None:
        if self.pending is not None:
            self.pending.result()  # a failed write (disk full, ...) surfaces here
        self.pending = self.writer.submit(self._write, self.pixels.copy())
        self.dirty = False

    def _write(self, pixels: np.ndarray) -> None:
        image = Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels)
        if self.format == "JPEG" and image.mode == "RGBA":
            image = image.convert("RGB")
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        # quick to encode: previews are rewritten often; the persisted file is the real output
        options = {"compress_level": 1} if self.format == "PNG" else {"quality": 90} if self.format in ("JPEG", "WEBP") else {}
        image.save(temporary, format=self.format, **options)
        os.replace(temporary, self.path)
        self.writes += 1
        self.last_write = time.monotonic()

    def finish(self) -> None:
        """The last write, with every tile that arrived; returns once it is on disk."""
        if self.pixels is not None and self.dirty:
            self._start_write()
        if self.pending is not None:
            self.pending.result()
        self.writer.shutdown()
