"""Preprocessors that are models (models.yaml `preprocessors:`): a transformers pipeline that
turns a picture into the control image a ControlNet was trained on, e.g. a depth map for a
depth ControlNet (`{hub: Intel/dpt-hybrid-midas, task: depth-estimation}`). Loaded once per
service, offline unless downloads are allowed."""

from __future__ import annotations

from typing import Any

import numpy as np

from .models import ModelCache, ModelEntry, hub_offline
from .params import ParamError

TASKS = ("depth-estimation",)
CACHE = ModelCache(max_models=2)


def load_preprocessor(entry: ModelEntry) -> Any:
    task = str(entry.options.get("task", "depth-estimation"))
    if task not in TASKS:
        raise ParamError("preprocessor", f"{entry.name!r} has task {task!r} in models.yaml; preprocessor models do: {', '.join(TASKS)}")

    def load() -> Any:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        source = str(entry.path) if entry.path is not None else entry.hub
        hub_offline()
        try:
            return transformers.pipeline(task, model=source, device="cpu")
        except Exception as exc:
            raise ParamError("preprocessor", f"{entry.name!r} ({entry.source}) does not load as a {task} pipeline: {type(exc).__name__}: {exc}") from None

    return CACHE.get((entry.source, task), load)


def run_preprocessor(entry: ModelEntry, pixels: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 picture -> (H, W, 3) uint8 control image. A depth map is normalised per
    picture by the pipeline (relative depth), so on a tiled canvas each tile's map is its own."""
    from PIL import Image

    result = load_preprocessor(entry)(Image.fromarray(np.ascontiguousarray(pixels[:, :, :3])))
    depth = np.asarray(result["depth"].convert("L").resize((pixels.shape[1], pixels.shape[0])))
    return np.repeat(depth[:, :, None], 3, axis=2)
