"""Loading image models through spandrel, by registry name or path, cached per (file, device,
dtype). Shared by the upscale and correct services.

A loaded model is one torch module shared by every stream of the service: `model_lock` gives
its lock, held around each call, so two streams never run one module at the same time (a
module's forward is not safe to call concurrently: some architectures keep state on the
module, and on CUDA two calls would also compete for the memory one was sized for)."""

from __future__ import annotations

import threading
import weakref
from typing import Any

from .models import ModelCache, ModelRegistry
from .params import ParamError

CACHE = ModelCache(max_models=4)
_LOCKS: weakref.WeakKeyDictionary[Any, threading.Lock] = weakref.WeakKeyDictionary()
_LOCKS_LOCK = threading.Lock()


def model_lock(descriptor: Any) -> threading.Lock:
    """The lock that every call of this loaded model holds."""
    with _LOCKS_LOCK:
        lock = _LOCKS.get(descriptor)
        if lock is None:
            lock = _LOCKS[descriptor] = threading.Lock()
        return lock


def load_descriptor(registry: ModelRegistry, kind: str, name: str, half: bool, purposes: tuple[str, ...], what: str) -> Any:
    """The spandrel ImageModelDescriptor for a model, on the service's device, or ParamError
    naming 'model' when it is unknown, not a model, or not of the purposes this stage takes."""
    import spandrel

    _install_extra_arches()
    entry = registry.resolve(kind, name)
    if entry.path is None:
        raise ParamError("model", f"{name!r} is a hub id; spandrel models must be local files")
    from .torch_runtime import device, half_dtype

    dev = device()

    def load() -> Any:
        try:
            descriptor = spandrel.ModelLoader(dev).load_from_file(entry.path)
        except Exception as exc:
            raise ParamError("model", f"{name!r} ({entry.path.name}) is not a model spandrel can load: {type(exc).__name__}: {exc}") from None
        if not isinstance(descriptor, spandrel.ImageModelDescriptor):
            raise ParamError("model", f"{name!r} is not an image-to-image model")
        dtype = half_dtype(descriptor.supports_half, descriptor.supports_bfloat16) if half else None
        if dtype is not None:
            descriptor.to(dtype)
        return descriptor.eval()

    key = (str(entry.path), str(dev), half)
    descriptor = CACHE.get(key, load)
    if descriptor.purpose not in purposes:
        raise ParamError(
            "model",
            f"{name!r} is a {descriptor.purpose} model ({descriptor.architecture.name}); {what} takes "
            + " or ".join(purposes) + " models",
        )
    return descriptor


_EXTRA_INSTALLED = False


def _install_extra_arches() -> None:
    """CodeFormer and other non-commercially licensed architectures live in the optional
    spandrel-extra-arches package; register them when it is installed."""
    global _EXTRA_INSTALLED
    if _EXTRA_INSTALLED:
        return
    try:
        import spandrel_extra_arches

        spandrel_extra_arches.install()
    except ImportError:
        pass
    _EXTRA_INSTALLED = True


def extra_arches_available() -> bool:
    try:
        import spandrel_extra_arches  # noqa: F401
    except ImportError:
        return False
    return True
