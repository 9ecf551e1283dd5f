"""Device, dtype and tensor conversion for the model stages. Torch is imported here only, and
only by services that run models."""

from __future__ import annotations

import os
from typing import Any, Callable

import numpy as np
import torch


def device() -> torch.device:
    """CUDA when present (or TILECHAIN_DEVICE names a device), else the CPU."""
    name = os.environ.get("TILECHAIN_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def half_dtype(supports_half: bool, supports_bfloat16: bool) -> torch.dtype:
    """fp16 or bf16 on CUDA where the model allows; fp32 on the CPU."""
    if device().type != "cuda":
        return torch.float32
    if supports_half:
        return torch.float16
    if supports_bfloat16:
        return torch.bfloat16
    return torch.float32


def to_tensor(pixels: np.ndarray, dtype: torch.dtype, dev: torch.device) -> torch.Tensor:
    """(H, W, C) uint8 -> (1, C, H, W) in [0, 1]."""
    if not pixels.flags.writeable:  # a view of received bytes: torch wants memory it may write
        pixels = pixels.copy()
    tensor = torch.from_numpy(np.ascontiguousarray(pixels)).to(dev).permute(2, 0, 1).unsqueeze(0)
    return tensor.to(dtype) / 255.0


def to_pixels(tensor: torch.Tensor) -> np.ndarray:
    """(1, C, H, W) in [0, 1] -> (H, W, C) uint8."""
    array = tensor.squeeze(0).permute(1, 2, 0).float().clamp(0, 1).mul(255).round().byte()
    return array.cpu().numpy()


def is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def free_memory_bytes(dev: torch.device) -> int | None:
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        return int(free)
    return None


def peak_bytes_of(call: Callable[[], Any], module: torch.nn.Module, dev: torch.device, allocated: Callable[[], int] | None = None) -> int:
    """Device memory a call of module allocates at its peak, measured for this call alone:
    the allocator's level after every submodule's forward, less the level before the call.
    The process-wide peak statistics are only read, never reset (other streams of the
    service rely on them), and other streams' allocations in the meantime show as noise;
    temporaries inside one submodule are missed, so callers keep a margin. 0 off CUDA, where
    there is nothing to size tiles against."""
    if allocated is None:
        if dev.type != "cuda":
            return 0
        allocated = lambda: torch.cuda.memory_allocated(dev)  # noqa: E731
    base = peak = allocated()

    def observe(*_: Any) -> None:
        nonlocal peak
        peak = max(peak, allocated())

    handles = [m.register_forward_hook(observe) for m in module.modules()]
    try:
        call()
    finally:
        for handle in handles:
            handle.remove()
    return max(0, peak - base)


def empty_cache(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def describe_dtype(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")
