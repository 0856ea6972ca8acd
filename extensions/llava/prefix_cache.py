"""Reusing an earlier generation's keys and values, so that a follow-up question costs only its new tokens.

Each generation with pictures leaves an entry: the language model's cache (a transformers
``DynamicCache``, see kv_cache.py) of its prompt and reply, with what stood at each cached position: the token ids and,
at image slots, which picture's features in which layout, or the plain image-token embedding where a
picture was not embedded. A later prompt reuses the longest prefix it shares with an entry of its own
conversation, position for position (the same pictures at the same places, not just the same ids): the
cache is cut back to that prefix and handed to ``generate``, which then feeds only the rest. transformers
computes the uncached positions from ``inputs_embeds``, so new pictures in the new part land as they
should.

Entries belong to their owner (a browser session; API requests share one owner unless they bring a
``cache_salt``, whose requests own entries only they reuse: an entry is only ever reused for the very
same prefix, which the client sent itself). A reused entry stays in the store: the generation works on a
copy of the shared positions, and its longer entry replaces the one it extends. They are bounded in MB,
least recently used first; a browser session's entries go when the session does.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass

import torch

from .cache import BoundedStore

# Below this many reusable positions a reuse is not worth its bookkeeping.
MIN_REUSED_POSITIONS = 16


@dataclass(frozen=True)
class PositionKey:
    """What stood at each position of a prompt: its token ids, and the pictures whose slots it holds."""

    ids: torch.Tensor  # [length]
    # per picture: (first slot, one past the last, identity); identity is ("plain",) for a picture whose
    # slots keep the image-token embedding, else (its data's digest, its layout)
    pictures: tuple[tuple[int, int, tuple], ...] = ()

    def common_length(self, other: "PositionKey") -> int:
        """How many first positions the two share exactly."""
        n = min(len(self.ids), len(other.ids))
        differing = torch.nonzero(self.ids[:n] != other.ids[:n])
        common = int(differing[0]) if len(differing) else n
        theirs = {start: (end, identity) for start, end, identity in other.pictures}
        for start, end, identity in self.pictures:
            if start >= common:
                break
            if theirs.get(start) != (end, identity):
                return start  # another picture (or the same one laid out otherwise) under the same ids
        return common

    def cut(self, length: int) -> "PositionKey":
        return PositionKey(self.ids[:length], tuple(p for p in self.pictures if p[1] <= length))


@dataclass(eq=False)
class Entry:
    owner: object
    key: PositionKey
    cache: object  # the language model's cache of ``key``'s positions

    @property
    def nbytes(self) -> int:
        return cache_bytes(self.cache)


def cache_bytes(cache) -> int:
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


class Handoffs:
    """Reuses waiting for the ``generate`` call they were made for, found by the inputs_embeds tensor that
    the tokenizer hook returned (the webui hands that very tensor to ``generate``, maybe in another
    thread). A few at most wait: one whose generation never came is dropped with its cache."""

    LIMIT = 4

    def __init__(self):
        self._waiting: OrderedDict[int, tuple] = OrderedDict()
        self._lock = threading.Lock()

    def leave(self, embeds: torch.Tensor, reuse: Reuse) -> None:
        with self._lock:
            self._waiting[id(embeds)] = (embeds, reuse)
            while len(self._waiting) > self.LIMIT:
                self._waiting.popitem(last=False)

    def claim(self, embeds) -> Reuse | None:
        if embeds is None:
            return None
        with self._lock:
            waiting = self._waiting.pop(id(embeds), None)
        return waiting[1] if waiting is not None and waiting[0] is embeds else None


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


def can_reuse(generate_kwargs: dict) -> bool:
    """Whether a ``generate`` call may start from a cache of ours: not with a cache of the webui's own
    kind (its static cache), nor with decoding that reads the prompt again or keeps several sequences
    (prompt lookup, beams, contrastive search), nor without a cache at all."""
    return not (generate_kwargs.get("cache_implementation") or generate_kwargs.get("prompt_lookup_num_tokens")
                or (generate_kwargs.get("num_beams") or 1) > 1 or generate_kwargs.get("penalty_alpha")
                or generate_kwargs.get("use_cache") is False)


class _LastSequence:
    """A stopping criterion that never stops: it keeps the sequence generated so far."""

    def __init__(self):
        self.sequence = None

    def __call__(self, input_ids, scores, **kwargs):
        self.sequence = input_ids
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def consistent(cache) -> bool:
    """Whether every layer of ``cache`` holds the same positions (a generation stopped between two steps
    leaves it so; one that failed inside a step may not)."""
    lengths = {layer.keys.shape[-2] for layer in getattr(cache, "layers", ()) if getattr(layer, "keys", None) is not None}
    return len(lengths) <= 1


def megabytes(size: int) -> str:
    return f"{size / 2**20:.1f} MB" if size < 10 * 2**20 else f"{size / 2**20:.0f} MB"


def reusing_generate(original, handoffs: Handoffs, store: PrefixStore, log=lambda message, level="info": None):
    """``original`` (a model's ``generate``) starting from the cache the tokenizer hook left for its
    inputs_embeds, and leaving what it computed in ``store`` for the next prompt. Another call (no cache
    left for it: a text-only prompt, another extension's embeddings) runs ``original`` as it was."""
    def generate(*args, **kwargs):
        reuse = handoffs.claim(kwargs.get("inputs_embeds"))
        if reuse is None or not can_reuse(kwargs):
            return original(*args, **kwargs)  # a reused entry stayed in the store: nothing to give back
        from transformers import StoppingCriteriaList
        recorder = _LastSequence()
        kwargs["past_key_values"] = reuse.cache
        kwargs["stopping_criteria"] = StoppingCriteriaList([*(kwargs.get("stopping_criteria") or []), recorder])
        output = None
        try:
            output = original(*args, **kwargs)
            return output
        finally:
            sequence = getattr(output, "sequences", output)
            sequence = sequence if isinstance(sequence, torch.Tensor) else recorder.sequence
            if sequence is not None and consistent(reuse.cache):
                size = store.put(reuse, sequence[0] if sequence.dim() == 2 else sequence)
                log(f"llava: {reuse.reused} of {len(reuse.key.ids)} prompt positions came from an earlier prompt; "
                    f"earlier prompts kept: {len(store)} ({megabytes(store.nbytes)} of at most {megabytes(store.max_bytes)})")
                if size < 0:
                    log(f"llava: this prompt's cache ({megabytes(-size)}) is larger than llava-prefix_cache_mb "
                        "allows: the next turn computes it again", "warning")

    generate.original, generate.handoffs = original, handoffs
    return generate
