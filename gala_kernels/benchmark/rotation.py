"""Cache busting: same-shape tensors handed out in turn, together larger than the last-level cache.

A step that reads logits still in cache would be timed on a bandwidth no training run sees, so
every benchmark reads the next of several buffers whose total is at least twice the CPU's L3 or
the GPU's L2.
"""

from __future__ import annotations

import math
from typing import List

import torch


def last_level_cache_bytes(device: torch.device) -> int:
    """GPU L2 or CPU L3 size; 64 MiB when it cannot be read."""
    fallback = 64 << 20
    if device.type == "cuda":
        size = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)
        return int(size) or fallback
    best = 0
    for index in range(8):
        try:
            with open(f"/sys/devices/system/cpu/cpu0/cache/index{index}/size") as size_file:
                text = size_file.read().strip()
        except OSError:
            continue
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        best = max(best, int(text.rstrip("KMG")) * scale)
    return best or fallback


def rotation_count(buffer_bytes: int, cache_bytes: int, max_buffers: int = 64) -> int:
    """How many buffers to cycle so that, together, they are at least twice the cache."""
    return max(2, min(max_buffers, math.ceil(2 * cache_bytes / max(1, buffer_bytes))))


class Rotation:
    """Hands out the next of several same-shape tensors on each call."""

    def __init__(self, buffers: List[torch.Tensor]):
        self.buffers = buffers
        self.position = 0

    def next(self) -> torch.Tensor:
        tensor = self.buffers[self.position]
        self.position = (self.position + 1) % len(self.buffers)
        return tensor


def logits_rotation(batch: int, classes: int, dtype: torch.dtype, device: torch.device, *, seed: int = 0,
                    scale: float = 2.0, requires_grad: bool = True, count: int = 0) -> Rotation:
    """``(batch, classes)`` logits drawn N(0, scale^2) on the device, as many buffers as
    :func:`rotation_count` asks for (or ``count``)."""
    if count <= 0:
        count = rotation_count(batch * classes * dtype.itemsize, last_level_cache_bytes(device))
    generator = torch.Generator(device=device).manual_seed(seed)
    buffers = []
    for _ in range(count):
        logits = torch.randn(batch, classes, generator=generator, device=device) * scale
        buffers.append(logits.to(dtype).requires_grad_(requires_grad))
    return Rotation(buffers)
