"""The model's ``generate``, wrapped once, starting from the cache the tokenizer hook left for its
inputs_embeds (a ``Handoffs`` entry) and leaving what it computed in the store for the next prompt."""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch

from .prefixes import PrefixStore, Reuse, megabytes


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
