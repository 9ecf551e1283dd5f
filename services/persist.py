"""Persist stages: write images out while passing their tiles on, so that a persist stage can sit
anywhere in a chain.

A job's outputs are staged, not written in place: each image goes to a staging folder under the
output root (with a small record of where it will go), or, for persist-s3, into an S3 multipart
upload that is left open (its record in the same folder). Only when the whole job has succeeded
does the gateway's Finish(commit) publish them: files linked into place, uploads completed. A
failed or cancelled job's Finish(abort) deletes the files and aborts the uploads, and so does a
persist service starting up for what a service that died had staged (docs/design.md,
"persist-disk" and "persist-s3")."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import socket
import string
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, Callable, Iterator, Protocol

import grpc
import numpy as np
from google.protobuf import json_format

from tilechain.v1 import stage_pb2, tiles_pb2

from .core.codecs import CONTENT_TYPES, png_writer, read_metadata, write_image
from .core.config import Settings
from .core.params import Param, ParamError, struct_to_dict
from .core.png import PngWriter
from .core.stage import IMAGE, KEEP_CANVAS, KEEP_ROWS, Cancelled, OutputPlan, PassThroughStage, Stage, StageError, register

log = logging.getLogger("tilechain.persist")

FORMATS = ("png", "jpeg", "webp")
EXTENSION = {"png": "png", "jpeg": "jpg", "webp": "webp"}  # what {ext} gives
FORMAT_OF_SUFFIX = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}
TEMPLATE_FIELDS = ("job", "stage", "index", "ext", "date", "time")
FIELD_LIST = ", ".join("{%s}" % f for f in TEMPLATE_FIELDS)
# Linux's limits: a path component of at most NAME_MAX bytes, a whole path under PATH_MAX.
NAME_MAX, PATH_MAX = 255, 4096
# Staged files and their records, under the output root; no template may name it.
STAGING = PurePosixPath(".tilechain", "staging")
STALE_SECONDS = 24 * 3600  # staged files of another host's job are cleaned after this long


def template_parts(param: str, template: str) -> list[tuple[str, str | None]]:
    """A file name or object key template as (literal text, field or None) pairs; ParamError
    naming param for anything but the documented fields: no format specs ({index:>9} would
    allocate as wide as asked), no conversions, no attribute or index access, no positional {}."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ParamError(param, f"{exc}; write {{{{ and }}}} for literal braces") from None
    parts = []
    for literal, field, spec, conversion in parsed:
        if field is not None:
            shown = "{" + field + (f"!{conversion}" if conversion else "") + (f":{spec[:20]}" if spec else "") + "}"
            if field not in TEMPLATE_FIELDS:
                what = "an empty field {}" if not field else f"unknown field {shown}"
                raise ParamError(param, f"{what}; use {FIELD_LIST}")
            if spec or conversion:
                raise ParamError(param, f"{shown}: fields take no format spec or conversion; use {FIELD_LIST}")
        parts.append((literal, field))
    return parts


class NameTemplate:
    """persist-disk's file name and persist-s3's object key: the documented fields only, pasted
    in (never str.format), and a format that agrees with the name's extension."""

    def __init__(self, stage: Stage, param: str, requested_format: str) -> None:
        self.stage, self.param = stage, param
        self.parts = template_parts(param, stage.p[param])
        self.started = time.localtime()
        self.format = self._file_format(requested_format)

    def render(self, index: int, ext: str | None = None) -> str:
        values = {
            "job": self.stage.context.job_id or "job",
            "stage": self.stage.name,
            "index": str(index),
            "ext": ext or EXTENSION[self.format],
            "date": time.strftime("%Y%m%d", self.started),
            "time": time.strftime("%H%M%S", self.started),
        }
        return "".join(literal + (values[field] if field else "") for literal, field in self.parts)

    def _file_format(self, requested: str) -> str:
        """The format to write: the param's, or with 'auto' the name's extension's. The name's
        extension must agree with it: no PNG bytes in a file called .jpg."""
        name = self.render(0, EXTENSION["png" if requested == "auto" else requested])
        suffix = PurePosixPath(name).suffix.lower()
        named = FORMAT_OF_SUFFIX.get(suffix)
        if requested == "auto":
            if named is None:
                raise ParamError(self.param, f"cannot tell the format from the extension of {name[-60:]!r}: end the name with .png, .jpg, .webp or {{ext}}, or set format")
            return named
        if named != requested:
            suffixes = " or ".join(s for s, f in FORMAT_OF_SUFFIX.items() if f == requested)
            raise ParamError(self.param, f"the extension {suffix or '(none)'!r} does not match format {requested!r}: end the name with {suffixes} or {{ext}}, or leave format at 'auto'")
        return requested

    def relative(self, index: int, where: str, part_bytes: int) -> PurePosixPath:
        """The rendered name of one image, checked: relative, no '..', no backslash or NUL, each
        '/'-separated part at most part_bytes long."""
        name = self.render(index)
        path = PurePosixPath(name)
        if not name or path.is_absolute() or ".." in path.parts or "\\" in name or "\0" in name:
            raise ParamError(self.param, f"{name[:200]!r} must be a relative path inside {where} (no '..', no absolute path)")
        for part in path.parts:
            if len(part.encode()) > part_bytes:
                raise ParamError(self.param, f"{part[:40]!r}... is {len(part.encode())} bytes long; a name part holds at most {part_bytes}")
        return path


FORMAT_PARAM = Param(
    "format", str, "auto", "Image format; 'auto' takes it from the name's extension ({ext}: png).",
    choices=("auto", *FORMATS),
)


class Sink(Protocol):
    """Where one image's file goes as it is encoded: write() takes its bytes in order, seal()
    makes the file whole (and gives the artifacts to report now), discard() leaves nothing of
    it. Failures are raised as the errors to report (StageError, ParamError, Cancelled)."""

    def write(self, data: Any) -> int: ...

    def seal(self) -> list[stage_pb2.Artifact]: ...

    def discard(self) -> None: ...


class PersistStage(PassThroughStage):
    """What persist-disk and persist-s3 share. Tiles pass straight through as they come (a
    streaming stage: it holds no input), and each image is encoded into the stage's Sink
    (open_sink) as it goes: a PNG band by band as its rows complete (the engine gives them in
    order and holds only the bands not yet complete; core/png.py encodes them), never the whole
    canvas; JPEG and WebP once the canvas is whole, since Pillow encodes those only from a whole
    image. Masks pass through and are not written."""

    format: str  # png, jpeg or webp (the subclass's NameTemplate decides)

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._encoding: dict[int, tuple[Sink, PngWriter]] = {}  # output canvas id -> its PNG so far
        self._lock = threading.Lock()  # a discard may come from another thread while rows are written

    def open_sink(self, canvas: tiles_pb2.Canvas) -> Sink:
        raise NotImplementedError

    def keeps(self, output: OutputPlan) -> str:
        if output.canvas.role != IMAGE:
            return ""
        return KEEP_ROWS if self.format == "png" else KEEP_CANVAS

    def metadata(self, canvas: tiles_pb2.Canvas) -> dict[str, Any]:
        return {"job": self.context.job_id, **struct_to_dict(canvas.provenance)}

    def write_rows(self, output: OutputPlan, y: int, pixels: np.ndarray) -> None:
        canvas = output.canvas
        with self._lock:
            self.context.check_cancelled()
            if canvas.id not in self._encoding:
                sink = self.open_sink(canvas)
                writer = png_writer(sink, canvas.width, canvas.height, pixels.shape[2], self.metadata(canvas))
                self._encoding[canvas.id] = (sink, writer)
            sink, writer = self._encoding[canvas.id]
            with self._discarding_on_error(canvas.id, sink):
                writer.write_rows(pixels)

    def finish(self, output: OutputPlan, pixels: np.ndarray | None) -> list[stage_pb2.Artifact]:
        """Seal the image's file: a PNG whose rows are all written (pixels None), or a JPEG or
        WebP encoded now from its whole canvas."""
        canvas = output.canvas
        with self._lock:
            self.context.check_cancelled()
            if pixels is None:
                sink, writer = self._encoding.pop(canvas.id)
                with self._discarding_on_error(canvas.id, sink):
                    writer.close()
                    return sink.seal()
            sink = self.open_sink(canvas)
            with self._discarding_on_error(canvas.id, sink):
                write_image(sink, pixels, self.format, self.metadata(canvas), self.p["quality"])
                return sink.seal()

    def discard(self, output: OutputPlan) -> None:
        with self._lock:  # waits for rows being written to end (at the next cancel check)
            entry = self._encoding.pop(output.canvas.id, None)
            if entry is not None:
                entry[0].discard()

    @classmethod
    def finish_job(cls, settings: Settings, job_id: str, attempt: int, commit: bool) -> list[stage_pb2.Artifact]:
        """The job's end: publish or discard everything it staged, files and uploads alike."""
        return finish_job(settings, job_id, attempt, commit)

    @classmethod
    def start_up(cls, settings: Settings) -> None:
        clean_stale(settings)

    @contextmanager
    def _discarding_on_error(self, canvas_id: int, sink: Sink) -> Iterator[None]:
        try:
            yield
        except BaseException:
            self._encoding.pop(canvas_id, None)
            try:
                sink.discard()
            except Exception:  # the error that stopped the writing is the one to report
                log.exception("%s: discarding a file half written", self.label)
            raise


@register
class PersistDisk(PersistStage):
    type = "persist-disk"
    family = "persist"
    doc = (
        "Write each image to a file under the service's output root (PNG with the chain's params "
        "in a 'tilechain' text chunk; JPEG and WebP with them in EXIF ImageDescription). Tiles "
        "pass through unchanged. A PNG is written band by band as its rows come, never held "
        "whole; JPEG and WebP are encoded from the whole image (held until written): use PNG "
        "for big canvases. Files appear only when the whole job has succeeded."
    )
    params = (
        Param(
            "filename",
            str,
            "{job}-{stage}-{index}.{ext}",
            f"File name template, relative to the output root; fields: {FIELD_LIST}. It must end "
            "in the format's extension (.png; .jpg or .jpeg; .webp), or in {ext}.",
        ),
        FORMAT_PARAM,
        Param("quality", int, 95, "JPEG and WebP quality.", min=1, max=100),
        Param("overwrite", bool, False, "Replace an existing file instead of failing."),
    )

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.name_template = NameTemplate(self, "filename", self.p["format"])
        self.format = self.name_template.format

    def relative_path(self, index: int) -> PurePosixPath:
        path = self.name_template.relative(index, "the output root", NAME_MAX)
        if path.parts[0] == STAGING.parts[0]:
            raise ParamError("filename", f"{STAGING.parts[0]}/ under the output root is reserved for staged files")
        full = len(str(self.context.settings.output_root / path).encode())
        if full >= PATH_MAX:
            raise ParamError("filename", f"the path under the output root is {full} bytes long; a path holds at most {PATH_MAX - 1}")
        return path

    def target(self, index: int) -> Path:
        root = self.context.settings.output_root
        relative = self.relative_path(index)
        try:
            path = (root / relative).resolve()
        except OSError as exc:  # a symlink loop, or a component the filesystem refuses
            raise ParamError("filename", f"{str(relative)[:200]!r} cannot be resolved: {os.strerror(exc.errno or 0)}") from None
        if not path.is_relative_to(root):  # a symlink inside the root pointing out of it
            raise ParamError("filename", f"{str(relative)[:200]!r} resolves outside the output root")
        return path

    def plan(self, inputs: list[tiles_pb2.Canvas]) -> list[OutputPlan]:
        # Every canvas passes through; images are written, masks only carried on.
        outputs = [OutputPlan(self.derived(c, c.width, c.height), {"image": c}) for c in inputs if not c.attached]
        images = [o.canvas.index for o in outputs if o.canvas.role == IMAGE]
        targets = [self.target(i) for i in images]
        if len(set(targets)) != len(targets):
            raise ParamError("filename", "gives the same file for several images; add {index}")
        if not self.p["overwrite"]:
            root = self.context.settings.output_root
            for path in targets:
                if taken(path, self.context.job_id):
                    raise StageError(
                        grpc.StatusCode.ALREADY_EXISTS,
                        f"{self.label}: param 'filename': {path.relative_to(root)} exists under the output root; "
                        "choose another name or set overwrite",
                    )
        return outputs

    def open_sink(self, canvas: tiles_pb2.Canvas) -> Sink:
        """The image's staged file; Finish(commit) publishes it and reports its artifact."""
        settings = self.context.settings
        final = self.target(canvas.index)
        artifact = stage_pb2.Artifact(
            stage=self.name,
            uri=final.as_uri(),
            path=str(final.relative_to(settings.output_root)),
            format=self.format,
            width=canvas.width,
            height=canvas.height,
            index=canvas.index,
        )
        staged = Staged.create(settings, self.context.job_id, self.context.attempt, self.name, canvas.index, EXTENSION[self.format])
        return StagedFile(staged, artifact, self.p["overwrite"], self.context.cancel_event)


def taken(path: Path, job_id: str) -> bool:
    """Whether publishing to path would replace someone else's file. A file this same job
    wrote (an earlier attempt of a retried job) is not taken: the new attempt replaces it."""
    if not path.exists():
        return False
    return not job_id or written_by(path) != job_id


def written_by(path: Path) -> str | None:
    """The job id in a file's tilechain metadata, or None. PNG and JPEG keep it near the start;
    WebP's EXIF follows the pixels, so the whole file is read when the start is not enough."""
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 20)
        try:
            metadata = read_metadata(head)
        except Exception:
            metadata = read_metadata(path.read_bytes())
        return (metadata or {}).get("job")
    except Exception:  # not an image we wrote: someone else's
        return None


# --- staging ----------------------------------------------------------------------------------


def _key(text: str, length: int) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def job_folder(settings: Settings, job_id: str) -> Path:
    return settings.output_root / STAGING / _key(job_id, 24)


@dataclass
class Staged:
    """One staged image: its record (where it goes) at file + '.json', and its bytes at file, or
    for an S3 object the open multipart upload the record names (nothing at file)."""

    file: Path
    attempt: int = 0

    @property
    def record(self) -> Path:
        return self.file.with_name(self.file.name + ".json")

    @classmethod
    def create(cls, settings: Settings, job_id: str, attempt: int, stage: str, index: int, ext: str) -> Staged:
        # short fixed-length names: a final name of NAME_MAX bytes still stages
        return cls(job_folder(settings, job_id) / f"{attempt}-{_key(stage, 12)}-{index}.{ext}", attempt)

    def open(self) -> BinaryIO:
        self.file.parent.mkdir(parents=True, exist_ok=True)
        return open(self.file, "wb")

    def seal(self, out: BinaryIO, artifact: stage_pb2.Artifact, overwrite: bool) -> None:
        """The file written through out (from open) is complete: sync it to disk, then write
        its record; only a file with a record is ever published."""
        out.flush()
        os.fsync(out.fileno())
        out.close()
        self.write_record(artifact, overwrite)

    def write_record(self, artifact: stage_pb2.Artifact, overwrite: bool, upload: dict | None = None) -> None:
        """The record of where the output goes (and, for an S3 object, its open upload)."""
        self.record.parent.mkdir(parents=True, exist_ok=True)
        record = {
            "attempt": self.attempt,
            "overwrite": overwrite,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "artifact": json_format.MessageToDict(artifact),
        }
        if upload is not None:
            record["upload"] = upload
        _write_synced(self.record, json.dumps(record).encode())

    def load(self) -> dict:
        return json.loads(self.record.read_text())

    def discard(self) -> None:
        self.record.unlink(missing_ok=True)
        self.file.unlink(missing_ok=True)
        try:
            self.file.parent.rmdir()
        except OSError:  # other files of the job are still there
            pass


class StagedFile:
    """persist-disk's Sink: a staged file written as the image is encoded, its size and sha256
    counted as it goes; seal() syncs it and writes its record. A job cancelled meanwhile gets
    nothing: its Finish(abort) may have run already."""

    def __init__(self, staged: Staged, artifact: stage_pb2.Artifact, overwrite: bool, cancelled: threading.Event) -> None:
        self.staged, self.artifact, self.overwrite, self.cancelled = staged, artifact, overwrite, cancelled
        self.out = staged.open()
        self.size = 0
        self.sha256 = hashlib.sha256()

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.out.write(view)
        self.size += len(view)
        self.sha256.update(view)
        return len(view)

    def seal(self) -> list[stage_pb2.Artifact]:
        self.artifact.size_bytes, self.artifact.sha256 = self.size, self.sha256.hexdigest()
        self.staged.seal(self.out, self.artifact, self.overwrite)
        if self.cancelled.is_set():
            self.staged.discard()
        return []  # reported when Finish(commit) publishes it

    def discard(self) -> None:
        self.out.close()
        self.staged.discard()


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def finish_job(settings: Settings, job_id: str, attempt: int, commit: bool) -> list[stage_pb2.Artifact]:
    """Publish (commit) the given attempt's staged outputs, or discard them (abort); every other
    attempt's are discarded either way. A commit checks every target before it publishes any,
    and takes back what it published if one fails, so a job's outputs appear all or none:
    files are linked into place first (local, and checked), then S3 uploads completed."""
    folder = job_folder(settings, job_id)
    if not folder.exists():
        return []
    staged = [Staged(r.with_name(r.name[: -len(".json")])) for r in sorted(folder.glob("*.json"))]
    records = [(s, s.load()) for s in staged]
    uploads = [record for _, record in records if "upload" in record]
    completed: list[dict] = []
    try:
        if not commit:
            return []
        ours = [(s, r) for s, r in records if r["attempt"] == attempt]
        objects = [r for _, r in ours if "upload" in r]
        moves = _file_moves(settings, job_id, [(s, r) for s, r in ours if "upload" not in r and s.file.exists()])
        for record in objects:
            _check_object(settings, record)
        linked = _link(moves)
        try:
            for record in objects:
                _complete_upload(settings, record)
                completed.append(record)
        except BaseException:
            for path in linked:
                path.unlink(missing_ok=True)
            for record in completed:
                _delete_object(settings, record)
            raise
        return [artifact for _, _, _, artifact in moves] + [_artifact(r) for r in objects]
    finally:
        for record in uploads:
            if record not in completed:
                _abort_upload(settings, record)
        shutil.rmtree(folder, ignore_errors=True)


def _artifact(record: dict) -> stage_pb2.Artifact:
    return json_format.ParseDict(record["artifact"], stage_pb2.Artifact())


def _file_moves(settings: Settings, job_id: str, records: list[tuple[Staged, dict]]) -> list[tuple[Path, Path, bool, stage_pb2.Artifact]]:
    """(staged file, final path, replace, artifact) per staged file; a StageError if any target
    is now outside the root or someone else's."""
    root = settings.output_root
    moves = []
    for item, record in records:
        artifact = _artifact(record)
        final = (root / artifact.path).resolve()
        if not final.is_relative_to(root):
            raise StageError(grpc.StatusCode.FAILED_PRECONDITION, f"stage '{artifact.stage}' (persist-disk): param 'filename': {artifact.path} now resolves outside the output root")
        replace = record["overwrite"] or (final.exists() and not taken(final, job_id))
        if final.exists() and not replace:
            raise _exists(artifact)
        moves.append((item.file, final, replace, artifact))
    return moves


def _link(moves: list[tuple[Path, Path, bool, stage_pb2.Artifact]]) -> list[Path]:
    """Put each staged file in place; the paths linked (new names, none replaced), or on a name
    that appeared meanwhile: those taken back and ALREADY_EXISTS."""
    linked: list[Path] = []
    try:
        for source, final, replace, artifact in sorted(moves, key=lambda m: m[2]):  # links (can fail) first
            final.parent.mkdir(parents=True, exist_ok=True)
            if replace:
                os.replace(source, final)
            else:
                os.link(source, final)  # fails if the name appeared meanwhile: nothing replaced
                linked.append(final)
    except FileExistsError:
        for path in linked:
            path.unlink(missing_ok=True)
        raise _exists(artifact) from None
    return linked


def _exists(artifact: stage_pb2.Artifact) -> StageError:
    return StageError(
        grpc.StatusCode.ALREADY_EXISTS,
        f"stage '{artifact.stage}' (persist-disk): param 'filename': {artifact.path} appeared under the output "
        "root while the job ran; nothing of the job was published",
    )


def clean_stale(settings: Settings) -> None:
    """At start-up: delete what jobs of a persist service that is gone had staged (this host's
    processes that no longer run, or this process's predecessor in a container that restarted),
    and anything staged more than a day ago."""
    base = settings.output_root / STAGING
    if not base.is_dir():
        return
    host, now = socket.gethostname(), time.time()
    for folder in base.iterdir():
        for path in sorted(folder.iterdir()) if folder.is_dir() else [folder]:
            try:
                old = now - path.stat().st_mtime > STALE_SECONDS
                if path.suffix == ".json":
                    record = json.loads(path.read_text())
                    gone = record.get("host") == host and not _running(record.get("pid", 0))
                    if gone or old:
                        if "upload" in record:
                            _abort_upload(settings, record)
                        Path(str(path)[: -len(".json")]).unlink(missing_ok=True)
                        path.unlink()
                elif old and not path.with_name(path.name + ".json").exists():
                    path.unlink()  # a staged file whose record was never written
            except (OSError, ValueError) as exc:
                log.warning("cleaning staged %s: %s", path.name, exc)
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


def _running(pid: int) -> bool:
    if pid <= 0 or pid == os.getpid():  # our own pid: a predecessor's (a restarted container)
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --- S3 ---------------------------------------------------------------------------------------

PART_BYTES = 8 * 1024 * 1024  # S3's parts are 5 MiB at least, but the last
S3_KEY_BYTES = 1024  # S3's limit on a key


class MultipartUpload(io.RawIOBase):
    """A write-only file whose bytes go to S3 as a multipart upload, one part as soon as a
    part's worth has been written: the encoder writes into it, so no more than a part of the
    encoded file is ever held. `complete()` makes the object; `abort()` (or leaving a with block
    by an exception) deletes every part, so a failed or cancelled upload leaves nothing.
    `check` runs before each part is sent (the stage's cancel check)."""

    def __init__(self, s3: Any, bucket: str, key: str, content_type: str, check: Callable[[], None] = lambda: None, part_bytes: int = PART_BYTES) -> None:
        super().__init__()
        self.s3, self.bucket, self.key = s3, bucket, key
        self.check = check
        self.part_bytes = part_bytes
        self.buffer = bytearray()
        self.parts: list[dict[str, Any]] = []
        self.size = 0
        self.sha256 = hashlib.sha256()
        self.upload_id = s3.create_multipart_upload(Bucket=bucket, Key=key, ContentType=content_type)["UploadId"]
        self.finished = False

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.buffer += view
        self.size += len(view)
        self.sha256.update(view)
        while len(self.buffer) >= self.part_bytes:
            self._send(bytes(self.buffer[: self.part_bytes]))
            del self.buffer[: self.part_bytes]
        return len(view)

    def _send(self, body: bytes) -> None:
        self.check()
        number = len(self.parts) + 1
        reply = self.s3.upload_part(Bucket=self.bucket, Key=self.key, UploadId=self.upload_id, PartNumber=number, Body=body)
        self.parts.append({"PartNumber": number, "ETag": reply["ETag"]})

    def send_rest(self) -> None:
        """Send what is buffered as the last part (it may be short, or the only one, empty)."""
        if self.buffer or not self.parts:
            self._send(bytes(self.buffer))
            self.buffer.clear()

    def complete(self) -> None:
        self.send_rest()
        self.check()
        self.s3.complete_multipart_upload(Bucket=self.bucket, Key=self.key, UploadId=self.upload_id, MultipartUpload={"Parts": self.parts})
        self.finished = True

    def state(self) -> dict[str, Any]:
        """What a staging record keeps of the upload, to complete or abort it later."""
        return {"bucket": self.bucket, "key": self.key, "upload_id": self.upload_id, "parts": self.parts}

    def leave_open(self) -> None:
        """Every part sent and recorded: the upload stays open for Finish to complete or abort
        (no object exists until then); leaving the with block no longer aborts it."""
        self.finished = True

    def abort(self) -> None:
        if not self.finished:
            self.finished = True
            self.s3.abort_multipart_upload(Bucket=self.bucket, Key=self.key, UploadId=self.upload_id)

    def __exit__(self, kind: Any, value: Any, traceback: Any) -> None:
        if kind is not None:
            try:
                self.abort()
            except Exception:
                log.exception("could not abort the upload of s3://%s/%s", self.bucket, self.key)
        super().__exit__(kind, value, traceback)


@register
class PersistS3(PersistStage):
    type = "persist-s3"
    family = "persist"
    doc = (
        "Upload each image to an S3 bucket (AWS or any S3-compatible endpoint the service allows) "
        "as it is encoded, in a multipart upload, with the chain's params in the file as "
        "persist-disk writes them; a PNG band by band as its rows come, JPEG and WebP from the "
        "whole image, as persist-disk. The upload is completed (the object appears) only when "
        "the whole job has succeeded, and aborted otherwise. Credentials are the service's "
        "(boto3's chain). Tiles pass through unchanged."
    )
    params = (
        Param("bucket", str, doc="The bucket (it must exist)."),
        Param(
            "key",
            str,
            "{job}-{stage}-{index}.{ext}",
            f"Object key template; fields: {FIELD_LIST}. It must end in the format's extension (.png; .jpg or .jpeg; .webp), or in {{ext}}.",
        ),
        FORMAT_PARAM,
        Param("quality", int, 95, "JPEG and WebP quality.", min=1, max=100),
        Param("overwrite", bool, False, "Replace an existing object instead of failing."),
        Param("endpoint_url", str, "", "The S3 endpoint; '' is the service's (TILECHAIN_S3_ENDPOINT, else AWS); others must be in the service's TILECHAIN_S3_ENDPOINTS."),
        Param("profile_name", str, "", "A profile of the service's AWS config whose credentials to use; '' is boto3's default chain."),
        Param("region", str, "", "The bucket's region; '' is boto3's (AWS_REGION, the profile's)."),
    )

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.name_template = NameTemplate(self, "key", self.p["format"])
        self.format = self.name_template.format

    def key(self, index: int) -> str:
        key = str(self.name_template.relative(index, "the bucket", S3_KEY_BYTES))
        if len(key.encode()) > S3_KEY_BYTES:
            raise ParamError("key", f"{key[:60]!r}... is {len(key.encode())} bytes long; an S3 key holds at most {S3_KEY_BYTES}")
        return key

    def connect(self) -> Any:
        from .core import s3

        self.endpoint = s3.resolve_endpoint(self.context.settings, self.p["endpoint_url"]).describe()
        return s3.client(self.context.settings, self.p["endpoint_url"], self.p["profile_name"], self.p["region"])

    def plan(self, inputs: list[tiles_pb2.Canvas]) -> list[OutputPlan]:
        from .core import s3

        outputs = [OutputPlan(self.derived(c, c.width, c.height), {"image": c}) for c in inputs if not c.attached]
        keys = [self.key(o.canvas.index) for o in outputs if o.canvas.role == IMAGE]
        if len(set(keys)) != len(keys):
            raise ParamError("key", "gives the same key for several images; add {index}")
        client = self.connect()
        s3.check_bucket(client, self.p["bucket"], self.label, self.endpoint)
        if not self.p["overwrite"]:
            for key in keys:
                self.refuse_existing(client, key)
        return outputs

    def refuse_existing(self, client: Any, key: str) -> None:
        from .core import s3

        try:
            client.head_object(Bucket=self.p["bucket"], Key=key)
        except Exception as exc:
            error = s3.s3_error(self.label, "key", f"s3://{self.p['bucket']}/{key}", exc)
            if isinstance(error, ParamError):
                return  # not there: free to write
            raise error from None
        raise StageError(
            grpc.StatusCode.ALREADY_EXISTS,
            f"{self.label}: param 'key': s3://{self.p['bucket']}/{key} exists; choose another key or set overwrite",
        )

    def open_sink(self, canvas: tiles_pb2.Canvas) -> Sink:
        return S3Upload(self, canvas)


class S3Upload:
    """persist-s3's Sink: the image's multipart upload (MultipartUpload), begun with the first
    band of rows (or the whole canvas), left open and recorded by seal(); boto3's failures
    raised as the stage's errors."""

    def __init__(self, stage: PersistS3, canvas: tiles_pb2.Canvas) -> None:
        self.stage, self.canvas = stage, canvas
        self.bucket, self.key = stage.p["bucket"], stage.key(canvas.index)
        context = stage.context
        self.staged = Staged.create(context.settings, context.job_id, context.attempt, stage.name, canvas.index, "s3")
        with self._reporting():
            client = stage.connect()
            if not stage.p["overwrite"]:
                stage.refuse_existing(client, self.key)
            self.upload = MultipartUpload(client, self.bucket, self.key, CONTENT_TYPES[stage.format], stage.context.check_cancelled)

    def write(self, data: Any) -> int:
        with self._reporting():
            return self.upload.write(data)

    def seal(self) -> list[stage_pb2.Artifact]:
        """Every part sent; the upload is recorded in the job's staging folder and left open
        for Finish(commit) to complete (the object appears only then) or Finish(abort) to
        abort. A failure before it is recorded aborts it (discard)."""
        upload, stage, canvas = self.upload, self.stage, self.canvas
        with self._reporting():
            upload.send_rest()
        artifact = stage_pb2.Artifact(
            stage=stage.name,
            uri=f"s3://{self.bucket}/{self.key}",
            path=self.key,
            format=stage.format,
            width=canvas.width,
            height=canvas.height,
            index=canvas.index,
            size_bytes=upload.size,
            sha256=upload.sha256.hexdigest(),
        )
        where = {"endpoint_url": stage.p["endpoint_url"], "profile_name": stage.p["profile_name"], "region": stage.p["region"]}
        self.staged.write_record(artifact, stage.p["overwrite"], {**where, **upload.state()})
        upload.leave_open()
        log.info("job %s: %s staged s3://%s/%s (%d bytes, %d parts)", stage.context.job_id, stage.label, self.bucket, self.key, upload.size, len(upload.parts))
        if stage.context.cancel_event.is_set():  # cancelled while uploading: Finish(abort) may have run
            _abort_upload(stage.context.settings, self.staged.load())
            self.staged.discard()
        return []  # reported when Finish(commit) completes it

    def discard(self) -> None:
        self.staged.record.unlink(missing_ok=True)
        with self._reporting():
            self.upload.abort()

    @contextmanager
    def _reporting(self) -> Iterator[None]:
        from .core import s3

        try:
            yield
        except (StageError, ParamError, Cancelled):
            raise
        except Exception as exc:
            raise s3.s3_error(self.stage.label, "bucket", f"uploading s3://{self.bucket}/{self.key}", exc) from None


# --- publishing staged uploads (Finish) -------------------------------------------------------


def _upload_client(settings: Settings, record: dict) -> Any:
    from .core import s3

    upload = record["upload"]
    return s3.client(settings, upload["endpoint_url"], upload["profile_name"], upload["region"])


def _s3_failure(record: dict, what: str, exc: BaseException) -> StageError:
    """A failure while publishing or discarding an upload, as a StageError naming the stage."""
    from .core import s3

    label = f"stage '{record['artifact'].get('stage', '?')}' (persist-s3)"
    error = s3.s3_error(label, "key", what, exc)
    if isinstance(error, ParamError):  # the bucket or the upload went away while the job ran
        return StageError(grpc.StatusCode.FAILED_PRECONDITION, f"{label}: param '{error.param}': {error.message}")
    return error if isinstance(error, StageError) else StageError(grpc.StatusCode.UNAVAILABLE, f"{label}: {error}")


def _check_object(settings: Settings, record: dict) -> None:
    """Before a commit publishes anything: the key must still be free unless overwrite is set."""
    upload = record["upload"]
    if record["overwrite"]:
        return
    where = f"s3://{upload['bucket']}/{upload['key']}"
    try:
        _upload_client(settings, record).head_object(Bucket=upload["bucket"], Key=upload["key"])
    except Exception as exc:
        error = _s3_failure(record, where, exc)
        if error.code == grpc.StatusCode.FAILED_PRECONDITION:  # not found: free
            return
        raise error from None
    raise StageError(
        grpc.StatusCode.ALREADY_EXISTS,
        f"stage '{record['artifact'].get('stage', '?')}' (persist-s3): param 'key': {where} appeared while the job ran; "
        "nothing of the job was published",
    )


def _complete_upload(settings: Settings, record: dict) -> None:
    upload = record["upload"]
    try:
        _upload_client(settings, record).complete_multipart_upload(
            Bucket=upload["bucket"], Key=upload["key"], UploadId=upload["upload_id"], MultipartUpload={"Parts": upload["parts"]},
        )
    except Exception as exc:
        raise _s3_failure(record, f"completing s3://{upload['bucket']}/{upload['key']}", exc) from None


def _abort_upload(settings: Settings, record: dict) -> None:
    """Abort a staged upload, deleting its parts; a failure is logged (the bucket's lifecycle
    rule for incomplete uploads is the backstop, docs/deploy.md)."""
    upload = record["upload"]
    try:
        _upload_client(settings, record).abort_multipart_upload(Bucket=upload["bucket"], Key=upload["key"], UploadId=upload["upload_id"])
    except Exception as exc:
        log.warning("could not abort the upload of s3://%s/%s: %s", upload["bucket"], upload["key"], exc)


def _delete_object(settings: Settings, record: dict) -> None:
    """Take back an object this commit completed, when a later one of the same job failed."""
    upload = record["upload"]
    try:
        _upload_client(settings, record).delete_object(Bucket=upload["bucket"], Key=upload["key"])
    except Exception as exc:
        log.warning("could not take back s3://%s/%s: %s", upload["bucket"], upload["key"], exc)
