"""Reusing earlier prompts in the webui's own generation path: the tokenizer hook offers the prepared prompt
to ``reuse`` under the ``prefix_cache_mb`` setting, for loaders whose model reads our embeddings."""

from __future__ import annotations

from ..loaders import loader_sees_images
from .extension import browser_session, log, prefix_reuse, sessions, settings


def offer(model, loader: str | None, prepared) -> None:
    if loader_sees_images(loader, model):
        prefix_reuse.offer(model, prepared, sessions.owner(browser_session()), settings.current().prefix_cache_mb, log)
