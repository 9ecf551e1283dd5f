"""The model registry shared by every service: models.yaml names the models (upscalers, face
restorers, face detectors, diffusion bases, LoRAs, ControlNets and their preprocessors, safety
checkers, prompt models), each a local path or a hub id; loaded
models are cached per (model, device, dtype) and evicted least-recently-used.

Nothing here downloads anything: a hub id is passed to the loader, which is expected to run
with HF_HUB_OFFLINE set unless the operator allows downloads."""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from .params import ParamError

KINDS = ("upscalers", "faces", "detectors", "base", "loras", "controlnets", "preprocessors", "safety", "prompts")


def stay_offline_unless_allowed() -> None:
    """Set HF_HUB_OFFLINE unless TILECHAIN_ALLOW_DOWNLOADS=1, so that nothing is fetched from
    the hub: the hub library reads it when it is imported, so services call this at start-up,
    before any model library is imported (they are, lazily, with the first model)."""
    if os.environ.get("TILECHAIN_ALLOW_DOWNLOADS", "") != "1":
        os.environ.setdefault("HF_HUB_OFFLINE", "1")


@dataclass(frozen=True)
class ModelEntry:
    name: str
    kind: str
    path: Path | None = None       # a local file or directory
    hub: str | None = None         # a hub id, for loaders that accept one
    options: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def source(self) -> str:
        return str(self.path) if self.path is not None else f"hub:{self.hub}"


class ModelRegistry:
    def __init__(self, config: Path | None, models_root: Path) -> None:
        self.models_root = models_root.resolve()
        self.entries: dict[str, dict[str, ModelEntry]] = {kind: {} for kind in KINDS}
        self.preload: list[str] = []  # models to load at start-up (models.yaml `preload:`)
        # other names of an entry (`aliases: [...]`), e.g. onnx-web's model names: name -> entry name
        self.aliases: dict[str, dict[str, str]] = {kind: {} for kind in KINDS}
        if config is not None and config.exists():
            document = yaml.safe_load(config.read_text()) or {}
            for kind in KINDS:
                for name, spec in (document.get(kind) or {}).items():
                    self.entries[kind][name] = self._entry(name, kind, spec or {})
                    for alias in self._aliases(kind, name, (spec or {}).get("aliases", [])):
                        self.aliases[kind][alias] = name
            for kind in KINDS:
                clash = set(self.aliases[kind]) & set(self.entries[kind])
                if clash:
                    raise ValueError(f"models.yaml: {kind}: {sorted(clash)} is both a model and another model's alias")
            preload = document.get("preload") or []
            if not isinstance(preload, list) or not all(isinstance(n, str) for n in preload):
                raise ValueError(f"{config}: preload must be a list of model names")
            self.preload = preload

    def _aliases(self, kind: str, name: str, aliases: Any) -> list[str]:
        if not isinstance(aliases, list) or not all(isinstance(a, str) and a for a in aliases):
            raise ValueError(f"models.yaml: {kind}.{name}: aliases must be a list of names")
        for alias in aliases:
            if alias in self.aliases[kind]:
                raise ValueError(f"models.yaml: {kind}: alias {alias!r} names both {self.aliases[kind][alias]} and {name}")
        return aliases

    def _entry(self, name: str, kind: str, spec: dict[str, Any]) -> ModelEntry:
        options = {k: v for k, v in spec.items() if k not in ("path", "hub", "aliases")}
        if "builtin" in spec:  # a resource a package ships (e.g. OpenCV's cascades)
            return ModelEntry(name, kind, None, None, options)
        if "path" in spec:
            path = Path(os.path.expandvars(str(spec["path"])))
            return ModelEntry(name, kind, path if path.is_absolute() else self.models_root / path, None, options)
        if "hub" in spec:
            return ModelEntry(name, kind, None, str(spec["hub"]), options)
        raise ValueError(f"models.yaml: {kind}.{name} needs a path, a hub id or a builtin")

    def knows(self, name: str) -> bool:
        """Whether name is a model of any kind in models.yaml, or a file or folder under the
        models root."""
        if any(name in entries for entries in self.entries.values()) or any(name in a for a in self.aliases.values()):
            return True
        path = (self.models_root / name).resolve()
        return path.is_relative_to(self.models_root) and path.exists()

    def names(self, kind: str) -> list[str]:
        return sorted(self.entries[kind])

    def resolve(self, kind: str, value: str, param: str = "model") -> ModelEntry:
        """A model by its models.yaml name, or a file or folder under the models root."""
        if value in self.entries[kind]:
            return self.entries[kind][value]
        if value in self.aliases[kind]:
            return self.entries[kind][self.aliases[kind][value]]
        path = Path(value)
        resolved = (path if path.is_absolute() else self.models_root / path).resolve()
        if not resolved.is_relative_to(self.models_root):
            raise ParamError(param, f"{value!r} is outside the models root; name a model from models.yaml or a path under it")
        if not resolved.exists():
            known = ", ".join(self.names(kind)) or "none"
            raise ParamError(param, f"unknown model {value!r} (models.yaml {kind}: {known}; or a path under the models root)")
        return ModelEntry(value, kind, resolved)


def hub_offline() -> bool:
    """Whether the hub must stay offline (it does unless TILECHAIN_ALLOW_DOWNLOADS=1); sets
    HF_HUB_OFFLINE for the libraries that read it, before a loader runs."""
    offline = os.environ.get("TILECHAIN_ALLOW_DOWNLOADS", "") != "1"
    if offline:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return offline


class ModelCache:
    """Loaded models by key, least-recently-used first out. A model is loaded once even when
    several requests ask for it at the same time."""

    def __init__(self, max_models: int = 4) -> None:
        self.max_models = max_models
        self._models: OrderedDict[tuple, Any] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[tuple, threading.Lock] = {}
        self.loads = 0

    def get(self, key: tuple, load: Callable[[], Any]) -> Any:
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
            key_lock = self._loading.setdefault(key, threading.Lock())
        with key_lock:
            with self._lock:
                if key in self._models:
                    return self._models[key]
            model = load()
            with self._lock:
                self.loads += 1
                self._models[key] = model
                while len(self._models) > self.max_models:
                    self._models.popitem(last=False)
                self._loading.pop(key, None)
            return model

    def evict_one(self) -> bool:
        """Drop the least-recently-used model (on out-of-memory); False if none is cached."""
        with self._lock:
            if not self._models:
                return False
            self._models.popitem(last=False)
            return True
