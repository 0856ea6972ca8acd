"""Reusing earlier prompts in the webui's own generation path: ``generate`` of the loaded model, wrapped
once, starts from the cache the tokenizer hook left for its inputs_embeds; the store is bound by the
``prefix_cache_mb`` setting (the device decides when it is unset)."""

from __future__ import annotations

from ..loaders import loader_sees_images
from ..reuse.prefixes import default_megabytes, reusing_generate
from .extension import browser_session, log, sessions, settings


def offer(model, loader: str | None, prepared) -> None:
    """Leave the cache ``prepared``'s generation starts from (the longest prefix it shares with an earlier
    generation of its owner) for the model's ``generate``. Loaders whose model does not read our
    embeddings are left alone."""
    megabytes = settings.current().prefix_cache_mb
    store = sessions.prefixes
    store.resize(int((default_megabytes(model) if megabytes is None else megabytes) * 2**20))
    if store.max_bytes <= 0 or prepared.positions is None or not loader_sees_images(loader, model):
        return
    try:
        from ..reuse.kv_cache import RoomyCache
    except ImportError:  # a transformers without its Cache classes (the 2023 webui's): nothing is reused
        return
    store.bind(model)
    if getattr(model.generate, "handoffs", None) is not sessions.handoffs:  # not yet, or by an earlier load
        original = getattr(model.generate, "original", model.generate)
        model.generate = reusing_generate(original, sessions.handoffs, store, log)
    reuse = store.take(sessions.owner(browser_session()), prepared.positions, RoomyCache)
    sessions.handoffs.leave(prepared.inputs_embeds, reuse)
