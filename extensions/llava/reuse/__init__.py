"""Reusing an earlier generation's keys and values, so that a follow-up question costs only its new tokens:
the one home of prefix reuse.

Each generation with pictures leaves an entry in the store (``prefixes``): the language model's cache of
its prompt and reply, keyed by what stood at each position (``positions``). A later prompt of the same
owner (a browser session, or the API's) starts ``generate`` (wrapped once, ``generate``) from the longest
prefix it shares with an entry, cut back to it; transformers computes the uncached positions from
``inputs_embeds``, so new pictures in the new part land as they should. The cache handed over keeps room
to spare (``kv_cache``).
"""

from __future__ import annotations

from typing import Callable

from .generate import Handoffs, reusing_generate
from .prefixes import PrefixStore, default_megabytes


class PrefixReuse:
    """The store of earlier prompts, and the caches waiting for the ``generate`` call they were made for."""

    def __init__(self, max_bytes: int = 0):
        self.store = PrefixStore(max_bytes)
        self.handoffs = Handoffs()

    def offer(self, model, prepared, owner, megabytes: float | None, log: Callable = lambda *a, **k: None) -> None:
        """Leave the cache ``prepared``'s generation starts from (the longest prefix it shares with an earlier
        generation of ``owner``) for the model's ``generate``, wrapped on first use. ``megabytes`` bounds the
        store (None: as the device allows; 0: no reuse)."""
        store = self.store
        store.resize(int((default_megabytes(model) if megabytes is None else megabytes) * 2**20))
        if store.max_bytes <= 0 or prepared.positions is None:
            return
        try:
            from .kv_cache import RoomyCache
        except ImportError:  # a transformers without its Cache classes (the 2023 webui's): nothing is reused
            return
        store.bind(model)
        if getattr(model.generate, "handoffs", None) is not self.handoffs:  # not yet, or by an earlier load
            original = getattr(model.generate, "original", model.generate)
            model.generate = reusing_generate(original, self.handoffs, store, log)
        self.handoffs.leave(prepared.inputs_embeds, store.take(owner, prepared.positions, RoomyCache))

    def forget(self, owner) -> tuple[int, int]:
        """Every entry of ``owner`` goes (a browser session that ended): how many, and their bytes."""
        return self.store.forget(owner)
