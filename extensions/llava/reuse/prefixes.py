"""The store of earlier generations' caches: each entry is the language model's cache (a transformers
``DynamicCache``, see kv_cache.py) of a prompt and its reply, with what stood at each cached position
(``positions.PositionKey``) and who owns it. A later prompt of the same owner takes the entry that
shares the longest prefix with it, as a copy of those positions: the entry stays for its owner, and the
longer entry its generation leaves replaces it. API requests share one owner unless they bring a
``cache_salt``, whose requests own entries only they reuse. Bounded in bytes, least recently used first.
"""

from __future__ import annotations

import os
import threading
import weakref
from dataclasses import dataclass

import torch

from ..stores import BoundedStore
from .positions import PositionKey

# Below this many reusable positions a reuse is not worth its bookkeeping.
MIN_REUSED_POSITIONS = 16


@dataclass(eq=False)
class Entry:
    owner: object
    key: PositionKey
    cache: object  # the language model's cache of ``key``'s positions

    @property
    def nbytes(self) -> int:
        return kv_bytes(self.cache)


def kv_bytes(cache) -> int:
    """The bytes a transformers cache holds in keys and values (with any room to spare its storage has)."""
    storages = {}
    for layer in getattr(cache, "layers", ()):
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor) and tensor.numel():
                storage = tensor.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def copy_positions(cache, length: int, copy):
    """``copy`` (an empty cache) filled with the first ``length`` positions of ``cache``, layer by layer."""
    for index, layer in enumerate(cache.layers):
        copy.update(layer.keys[..., :length, :], layer.values[..., :length, :], index)
    return copy


def cache_length(cache) -> int:
    return int(cache.get_seq_length()) if cache is not None else 0


@dataclass
class Reuse:
    """One generation's use of the store: the cache it starts from (cut back to what it shares with an
    earlier generation, or empty), and what its positions are."""

    owner: object
    key: PositionKey
    cache: object
    reused: int  # positions the cache holds at the start
    copied_from: "Entry | None" = None  # the entry whose first positions the cache copies


@dataclass
class Stats:
    """Positions not computed again (reused) and computed (prefilled), in all."""

    reused_positions: int = 0
    prefilled_positions: int = 0


class PrefixStore:
    """The entries of every owner, in one store bounded in bytes (least recently used first)."""

    def __init__(self, max_bytes: int):
        self._entries = BoundedStore(max_bytes, lambda entry: entry.nbytes)
        self._lock = threading.Lock()  # a take is a search and a removal
        self._model = None
        self.stats = Stats()

    @property
    def max_bytes(self) -> int:
        return self._entries.max_bytes

    def bind(self, model) -> None:
        """The entries are caches of ``model``: another model loaded makes them worthless."""
        if self._model is None or self._model() is not model:
            self.clear()
            self._model = weakref.ref(model)

    def resize(self, max_bytes: int) -> None:
        self._entries.resize(max_bytes)

    def take(self, owner, key: PositionKey, new_cache) -> Reuse:
        """The cache a generation of ``key`` starts from: a copy of the positions it shares with the entry of
        ``owner`` that shares the longest prefix (at most all positions but the last: ``generate`` needs
        one to feed); else ``new_cache()``, empty. The entry stays for its owner's other generations."""
        with self._lock:
            best, common = None, 0
            for entry in self._entries.values():
                shared = min(entry.key.common_length(key), len(key.ids) - 1) if entry.owner == owner else 0
                if shared > common:
                    best, common = entry, shared
            if best is None or common < MIN_REUSED_POSITIONS:
                return Reuse(owner, key, new_cache(), 0)
        return Reuse(owner, key, copy_positions(best.cache, common, new_cache()), common, best)

    def put(self, reuse: Reuse, sequence: torch.Tensor) -> int:
        """What a generation left in its cache: the prompt and the reply up to the last token fed
        (``sequence`` is the prompt with the tokens generated). Returns the entry's size in bytes, 0 when
        it held nothing, negative when it is larger than the bound (not kept)."""
        length = cache_length(reuse.cache)
        prompt = len(reuse.key.ids)
        self.stats.reused_positions += reuse.reused
        self.stats.prefilled_positions += prompt - reuse.reused
        if not length:
            return 0
        ids = torch.cat([reuse.key.ids, sequence.reshape(-1)[prompt:].to(reuse.key.ids.device)])[:length]
        entry = Entry(reuse.owner, PositionKey(ids, reuse.key.cut(min(length, prompt)).pictures), reuse.cache)
        kept = self._keep(entry)
        old = reuse.copied_from
        if kept and old is not None and old.key.common_length(entry.key) == len(old.key.ids):
            self._entries.pop(id(old))  # the new entry holds all of it and more
        return entry.nbytes if kept else -entry.nbytes

    def _keep(self, entry: Entry) -> bool:
        return self._entries.put(id(entry), entry)

    @property
    def evictions(self) -> int:
        """Entries dropped for room, in all."""
        return self._entries.stats.evictions

    def keys(self) -> list[PositionKey]:
        """What each entry holds, least recently used first."""
        return [entry.key for entry in self._entries.values()]

    def owners(self) -> set:
        return {entry.owner for entry in self._entries.values()}

    def forget(self, owner) -> tuple[int, int]:
        """Drop every entry of ``owner`` (a browser session that went); how many went and their bytes."""
        return self._entries.remove_where(lambda entry: entry.owner == owner)

    def clear(self) -> None:
        self._entries.remove_where(lambda entry: True)

    @property
    def nbytes(self) -> int:
        return self._entries.nbytes

    def __len__(self) -> int:
        return len(self._entries)


def default_megabytes(model) -> int:
    """The store's bound when the setting leaves it to the device: a tenth of the memory of the device the
    language model runs on (the machine's for the CPU), at most 8 GB. A 7B model's cache takes 0.5 MB a
    position in 16 bits, 1 MB in 32."""
    device = getattr(model, "device", torch.device("cpu"))
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
    else:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return min(8192, total // 10 // 2**20)


def megabytes(size: int) -> str:
    return f"{size / 2**20:.1f} MB" if size < 10 * 2**20 else f"{size / 2**20:.0f} MB"
