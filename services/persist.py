"""Persist stages: write images out while passing their tiles on, so that a persist stage can sit
anywhere in a chain."""

from __future__ import annotations

import hashlib
import os
import string
import tempfile
import time
from pathlib import Path, PurePosixPath

import grpc
import numpy as np

from tilechain.v1 import stage_pb2, tiles_pb2

from .core.codecs import encode_image, read_metadata
from .core.params import Param, ParamError, struct_to_dict
from .core.stage import IMAGE, OutputPlan, Stage, StageError, TileWork, register

EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}
TEMPLATE_FIELDS = ("job", "stage", "index", "ext", "date", "time")


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
        for _, field, _, _ in string.Formatter().parse(self.p["filename"]):
            if field is not None and field not in TEMPLATE_FIELDS:
                raise ParamError("filename", f"unknown field {{{field}}}; use {', '.join('{%s}' % f for f in TEMPLATE_FIELDS)}")
        self.started = time.localtime()

    def relative_path(self, index: int) -> PurePosixPath:
        name = self.p["filename"].format(
            job=self.context.job_id or "job",
            stage=self.name,
            index=index,
            ext=EXTENSIONS[self.p["format"]],
            date=time.strftime("%Y%m%d", self.started),
            time=time.strftime("%H%M%S", self.started),
        )
        path = PurePosixPath(name)
        if not name or path.is_absolute() or ".." in path.parts or "\\" in name or "\0" in name:
            raise ParamError("filename", f"{name!r} must be a relative path inside the output root (no '..', no absolute path)")
        return path

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
                if path.exists() and not self.written_by_earlier_attempt(path):
                    raise StageError(
                        grpc.StatusCode.ALREADY_EXISTS,
                        f"stage '{self.name}' (persist-disk): param 'filename': {path.name} exists "
                        "under the output root; choose another name or set overwrite",
                    )
        return outputs

    def written_by_earlier_attempt(self, path: Path) -> bool:
        """When the gateway runs a job again (attempt 2 or more), the files an earlier run of the
        same job wrote are replaced, not refused and not duplicated: the file's metadata names its
        job. A file of any other job is still refused."""
        if self.context.attempt <= 1 or not self.context.job_id or not path.is_file():
            return False
        try:
            metadata = read_metadata(path.read_bytes())
        except Exception:  # unreadable or not an image: not ours to replace
            return False
        return isinstance(metadata, dict) and metadata.get("job") == self.context.job_id

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
            write_atomically(path, data, self.p["overwrite"] or self.written_by_earlier_attempt(path))
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
