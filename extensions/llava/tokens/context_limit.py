"""Ending a reply where the context ends.

With "auto max_new_tokens" the webui allows a reply of (context length − prompt length) tokens,
but it measures the prompt before the pictures are widened to their slots, so a picture of 2000
slots would let the reply run 2000 tokens past the context. The webui reads that number before
any hook can change it; a logits processor added after the hook ends the reply in time instead.
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor


class EndAtContextLength(LogitsProcessor):
    """Leaves only the end-of-sequence token(s) once the sequence is one token short of ``limit``,
    so the generated sequence, prompt included, never holds more than ``limit`` tokens."""

    def __init__(self, limit: int, eos_token_ids: list[int]):
        if not eos_token_ids:
            raise ValueError("a model without an end-of-sequence token cannot be stopped this way")
        self.limit = limit
        self.eos_token_ids = list(eos_token_ids)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if input_ids.shape[-1] < self.limit - 1:
            return scores
        ended = torch.full_like(scores, float("-inf"))
        ended[:, self.eos_token_ids] = 0.0
        return ended


def reply_limit(state: dict, prompt_grew: bool) -> int | None:
    """The length the sequence must end at, when the webui sized the reply on a shorter prompt."""
    if not prompt_grew or not state.get("auto_max_new_tokens"):
        return None
    limit = int(state.get("truncation_length") or 0)
    return limit if limit > 0 else None
