"""Persist stages: write images out while passing their tiles on, so that a persist stage can sit
anywhere in a chain."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import string
import tempfile
import time
from pathlib import Path, PurePosixPath
from typing import Any, Callable

import grpc
import numpy as np

from tilechain.v1 import stage_pb2, tiles_pb2

from .core.codecs import CONTENT_TYPES, encode_image, write_image
from .core.params import Param, ParamError, struct_to_dict
from .core.stage import IMAGE, Cancelled, OutputPlan, Stage, StageError, TileWork, register

log = logging.getLogger("tilechain.persist")

EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}
TEMPLATE_FIELDS = ("job", "stage", "index", "ext", "date", "time")


def check_template(param: str, template: str) -> None:
    """A file name or key template uses only TEMPLATE_FIELDS (ParamError naming param)."""
    for _, field, _, _ in string.Formatter().parse(template):
        if field is not None and field not in TEMPLATE_FIELDS:
            raise ParamError(param, f"unknown field {{{field}}}; use {', '.join('{%s}' % f for f in TEMPLATE_FIELDS)}")


def render_template(
    param: str, template: str, stage: Stage, index: int, fmt: str, started: time.struct_time, where: str = "the output root"
) -> PurePosixPath:
    """The relative path a template gives for one image, checked: no absolute path, no '..'
    segment, no backslash or NUL (persist-disk's file names and persist-s3's keys alike)."""
    name = template.format(
        job=stage.context.job_id or "job",
        stage=stage.name,
        index=index,
        ext=EXTENSIONS[fmt],
        date=time.strftime("%Y%m%d", started),
        time=time.strftime("%H%M%S", started),
    )
    path = PurePosixPath(name)
    if not name or path.is_absolute() or ".." in path.parts or "\\" in name or "\0" in name:
        raise ParamError(param, f"{name!r} must be a relative path inside {where} (no '..', no absolute path)")
    return path


def write_atomically(path: Path, data: bytes, overwrite: bool) -> None:
    """Write to a temporary file beside path, flush it to disk, then move it into place in one
    step, so a reader never sees half a file and a failure leaves nothing behind. Without
    overwrite, an existing file is never replaced (a hard link fails if the name exists)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@register
class PersistDisk(Stage):
    type = "persist-disk"
    family = "persist"
    doc = (
        "Write each image to a file under the service's output root (PNG with the chain's params "
        "in a 'tilechain' text chunk; JPEG and WebP with them in EXIF ImageDescription). Tiles "
        "pass through unchanged."
    )
    params = (
        Param(
            "filename",
            str,
            "{job}-{stage}-{index}.{ext}",
            "File name template, relative to the output root; fields: " + ", ".join("{%s}" % f for f in TEMPLATE_FIELDS) + ".",
        ),
        Param("format", str, "png", "Image format.", choices=tuple(EXTENSIONS)),
        Param("quality", int, 95, "JPEG and WebP quality.", min=1, max=100),
        Param("overwrite", bool, False, "Replace an existing file instead of failing."),
    )
    keeps_output = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        check_template("filename", self.p["filename"])
        self.started = time.localtime()

    def relative_path(self, index: int) -> PurePosixPath:
        return render_template("filename", self.p["filename"], self, index, self.p["format"], self.started)

    def target(self, index: int) -> Path:
        root = self.context.settings.output_root
        path = (root / self.relative_path(index)).resolve()
        if not path.is_relative_to(root):  # a symlink inside the root pointing out of it
            raise ParamError("filename", f"{str(self.relative_path(index))!r} resolves outside the output root")
        return path

    def plan(self, inputs: list[tiles_pb2.Canvas]) -> list[OutputPlan]:
        # Every canvas passes through; images are written, masks only carried on.
        outputs = [OutputPlan(self.derived(c, c.width, c.height), {"image": c}) for c in inputs if not c.attached]
        images = [o.canvas.index for o in outputs if o.canvas.role == IMAGE]
        targets = [self.target(i) for i in images]
        if len(set(targets)) != len(targets):
            raise ParamError("filename", "gives the same file for several images; add {index}")
        if not self.p["overwrite"]:
            for path in targets:
                if path.exists():
                    raise StageError(
                        grpc.StatusCode.ALREADY_EXISTS,
                        f"stage '{self.name}' (persist-disk): param 'filename': {path.name} exists "
                        "under the output root; choose another name or set overwrite",
                    )
        return outputs

    def process_tile(self, work: TileWork) -> np.ndarray:
        return work.pixels()

    def finish(self, output: OutputPlan, pixels: np.ndarray) -> list[stage_pb2.Artifact]:
        canvas = output.canvas
        if canvas.role != IMAGE:
            return []
        self.context.check_cancelled()
        metadata = {"job": self.context.job_id, **struct_to_dict(canvas.provenance)}
        data = encode_image(pixels, self.p["format"], metadata, self.p["quality"])
        path = self.target(canvas.index)
        try:
            write_atomically(path, data, self.p["overwrite"])
        except FileExistsError:
            raise StageError(
                grpc.StatusCode.ALREADY_EXISTS,
                f"stage '{self.name}' (persist-disk): param 'filename': {path.name} appeared while writing",
            ) from None
        return [
            stage_pb2.Artifact(
                stage=self.name,
                uri=path.as_uri(),
                path=str(path.relative_to(self.context.settings.output_root)),
                format=self.p["format"],
                width=canvas.width,
                height=canvas.height,
                index=canvas.index,
                size_bytes=len(data),
                sha256=hashlib.sha256(data).hexdigest(),
            )
        ]


# --- S3 ---------------------------------------------------------------------------------------

PART_BYTES = 8 * 1024 * 1024  # S3's parts are 5 MiB at least, but the last


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

    def complete(self) -> None:
        if self.buffer or not self.parts:  # the last part may be short (or the only one, empty)
            self._send(bytes(self.buffer))
            self.buffer.clear()
        self.check()
        self.s3.complete_multipart_upload(Bucket=self.bucket, Key=self.key, UploadId=self.upload_id, MultipartUpload={"Parts": self.parts})
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
class PersistS3(Stage):
    type = "persist-s3"
    family = "persist"
    doc = (
        "Upload each image to an S3 bucket (AWS or any S3-compatible endpoint the service allows) "
        "as it is encoded, in a multipart upload that is aborted if anything fails, with the "
        "chain's params in the file as persist-disk writes them. Credentials are the service's "
        "(boto3's chain). Tiles pass through unchanged."
    )
    params = (
        Param("bucket", str, doc="The bucket (it must exist)."),
        Param(
            "key",
            str,
            "{job}-{stage}-{index}.{ext}",
            "Object key template; fields: " + ", ".join("{%s}" % f for f in TEMPLATE_FIELDS) + ".",
        ),
        Param("format", str, "png", "Image format.", choices=tuple(EXTENSIONS)),
        Param("quality", int, 95, "JPEG and WebP quality.", min=1, max=100),
        Param("overwrite", bool, False, "Replace an existing object instead of failing."),
        Param("endpoint_url", str, "", "The S3 endpoint; '' is the service's (TILECHAIN_S3_ENDPOINT, else AWS); others must be in the service's TILECHAIN_S3_ENDPOINTS."),
        Param("profile_name", str, "", "A profile of the service's AWS config whose credentials to use; '' is boto3's default chain."),
        Param("region", str, "", "The bucket's region; '' is boto3's (AWS_REGION, the profile's)."),
    )
    keeps_output = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        check_template("key", self.p["key"])
        self.started = time.localtime()

    def key(self, index: int) -> str:
        return str(render_template("key", self.p["key"], self, index, self.p["format"], self.started, where="the bucket"))

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

    def process_tile(self, work: TileWork) -> np.ndarray:
        return work.pixels()

    def finish(self, output: OutputPlan, pixels: np.ndarray) -> list[stage_pb2.Artifact]:
        from .core import s3

        canvas = output.canvas
        if canvas.role != IMAGE:
            return []
        self.context.check_cancelled()
        metadata = {"job": self.context.job_id, **struct_to_dict(canvas.provenance)}
        bucket, key, fmt = self.p["bucket"], self.key(canvas.index), self.p["format"]
        client = self.connect()
        try:
            if not self.p["overwrite"]:
                self.refuse_existing(client, key)
            with MultipartUpload(client, bucket, key, CONTENT_TYPES[fmt], self.context.check_cancelled) as upload:
                write_image(upload, pixels, fmt, metadata, self.p["quality"])
                upload.complete()
        except (StageError, ParamError, Cancelled):
            raise
        except Exception as exc:
            raise s3.s3_error(self.label, "bucket", f"uploading s3://{bucket}/{key}", exc) from None
        log.info("job %s: %s wrote s3://%s/%s (%d bytes, %d parts)", self.context.job_id, self.label, bucket, key, upload.size, len(upload.parts))
        return [
            stage_pb2.Artifact(
                stage=self.name,
                uri=f"s3://{bucket}/{key}",
                path=key,
                format=fmt,
                width=canvas.width,
                height=canvas.height,
                index=canvas.index,
                size_bytes=upload.size,
                sha256=upload.sha256.hexdigest(),
            )
        ]
