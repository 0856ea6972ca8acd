"""What is kept between turns, bounded in bytes, least recently used first: the projected features of
pictures (so that no picture is encoded twice), and the language model's caches of earlier prompts
(``prefix_cache`` keeps its entries in one of these)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Callable

import torch


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    stored_bytes: int = 0  # as the store holds now
    entries: int = 0


def tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class BoundedStore:
    """Values by key, least recently used first, bounded by their total size in bytes (``size_of`` measures
    a value once, when it is put); thread-safe. A value larger than the bound is not kept."""

    def __init__(self, max_bytes: int, size_of: Callable[[object], int]):
        self.max_bytes = int(max_bytes)
        self.size_of = size_of
        self._entries: OrderedDict = OrderedDict()  # key → (value, its size)
        self._bytes = 0
        self._lock = threading.Lock()
        self._counts = CacheStats()  # hits, misses and evictions so far

    @property
    def stats(self) -> CacheStats:
        return replace(self._counts, stored_bytes=self._bytes, entries=len(self._entries))

    def get(self, key):
        with self._lock:
            found = self._entries.get(key)
            if found is None:
                self._counts.misses += 1
                return None
            self._entries.move_to_end(key)
            self._counts.hits += 1
            return found[0]

    def put(self, key, value) -> bool:
        """Keep ``value`` under ``key``; False when it is larger than the bound (it is not kept)."""
        size = self.size_of(value)
        if size > self.max_bytes:
            return False
        with self._lock:
            self._drop(key)
            self._entries[key] = (value, size)
            self._bytes += size
            self._evict()
        return True

    def pop(self, key):
        """The value of ``key``, taken out of the store; None when it is not there."""
        with self._lock:
            return self._drop(key)

    def values(self) -> list:
        with self._lock:
            return [value for value, _ in self._entries.values()]

    def remove_where(self, doomed: Callable[[object], bool]) -> tuple[int, int]:
        """Remove the values ``doomed`` picks; how many went and their bytes."""
        with self._lock:
            before = self._bytes
            keys = [key for key, (value, _) in self._entries.items() if doomed(value)]
            for key in keys:
                self._drop(key)
            return len(keys), before - self._bytes

    def resize(self, max_bytes: int) -> None:
        with self._lock:
            self.max_bytes = int(max_bytes)
            self._evict()

    def _drop(self, key):
        found = self._entries.pop(key, None)
        if found is None:
            return None
        self._bytes -= found[1]
        return found[0]

    def _evict(self) -> None:
        while self._bytes > self.max_bytes:
            _, (_, size) = self._entries.popitem(last=False)
            self._bytes -= size
            self._counts.evictions += 1

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key) -> bool:
        return key in self._entries


class FeatureCache(BoundedStore):
    """Projected features of pictures, by picture, layout and vision parts."""

    def __init__(self, max_bytes: int):
        super().__init__(max_bytes, tensor_bytes)

    size_of = staticmethod(tensor_bytes)  # a picture's features measured as the cache measures them
