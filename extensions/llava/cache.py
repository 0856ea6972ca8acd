"""Projected image features, kept between turns so that no picture is encoded twice."""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    stored_bytes: int = 0
    entries: int = 0


class FeatureCache:
    """Least-recently-used features, bounded by their total size in bytes; thread-safe."""

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self._entries: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.stats = CacheStats()

    @staticmethod
    def size_of(tensor: torch.Tensor) -> int:
        return tensor.numel() * tensor.element_size()

    def get(self, key: tuple) -> torch.Tensor | None:
        with self._lock:
            tensor = self._entries.get(key)
            if tensor is None:
                self.stats.misses += 1
                return None
            self._entries.move_to_end(key)
            self.stats.hits += 1
            return tensor

    def put(self, key: tuple, tensor: torch.Tensor) -> None:
        size = self.size_of(tensor)
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= self.size_of(old)
            self._entries[key] = tensor
            self._bytes += size
            self._evict()

    def resize(self, max_bytes: int) -> None:
        with self._lock:
            self.max_bytes = int(max_bytes)
            self._evict()

    def _evict(self) -> None:
        while self._bytes > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self._bytes -= self.size_of(evicted)
            self.stats.evictions += 1
        self.stats.stored_bytes = self._bytes
        self.stats.entries = len(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: tuple) -> bool:
        return key in self._entries
