"""The extension's core: from a prompt with pictures to ids and spliced embeddings.

Nothing here knows the webui. The host binds its model, tokenizer, folder and ``encode`` function
(text → ids with the host's BOS handling, no truncation) once (``bind``: a ``loaded.LoadedModel``) and
receives ids and embeddings of equal length. Pictures become features in ``vision.features``; how
they are laid out is their family's (``families``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from .errors import LlavaError
from .loaded import LoadedModel, LoadedModels
from .media.items import MediaItem
from .prompt.parse import escape_special_tokens, parse_prompt
from .reuse.positions import PositionKey, position_key
from .settings import Settings
from .stores import FeatureCache
from .tokens.counting import Encode, prompt_length, slot_counts, stand_in_ids, unknown_items
from .tokens.splice import find_images, shift_spans, splice, truncation_cut, widen_image_slots
from .features import Counters, PictureFeatures

logger = logging.getLogger("llava")


@dataclass
class Prepared:
    """What the tokenizer hook gives back to the host."""

    prompt: str
    input_ids: torch.Tensor  # [1, length]
    inputs_embeds: torch.Tensor | None  # [1, length, hidden]
    notes: list[str] = field(default_factory=list)  # things the user should be told
    items_dropped: int = 0
    items_embedded: int = 0
    positions: PositionKey | None = None  # what stands at each position (for reusing an earlier prefix)


class LlavaEngine:
    def __init__(self, settings: Settings | None = None, log: Callable[[str], None] | None = None):
        self.settings = settings or Settings.from_params({})
        self.log = log or logger.info
        self.features = PictureFeatures(self.settings, self.log)
        self.models = LoadedModels(self.log)

    def configure(self, settings: Settings) -> None:
        """New settings: vision parts reload on the next picture if their sources or placement changed."""
        if settings == self.settings:
            return
        self.settings = settings
        self.features.configure(settings)
        self.models.clear()

    def bind(self, model, tokenizer, folder: str | None = None, encode: Encode | None = None) -> LoadedModel:
        """The loaded model's context under the current settings, made once per loaded model.
        ``encode(text, **options)`` is the host's (without it, the tokenizer's ids as they come)."""
        return self.models.bind(model, tokenizer, folder, encode or _plain_encode(tokenizer), self.settings.pipeline)

    def token_count(self, prompt: str, loaded: LoadedModel, media: Sequence[MediaItem] | None = None,
                    references: dict | None = None) -> int | None:
        """Tokens ``prompt`` takes, each image counted at its full length; None without images.
        ``media`` are the pictures of the ``<__media__>`` placeholders; without them every placeholder
        stands for a picture of unknown size."""
        parsed = parse_prompt(prompt, unknown_items(prompt) if media is None else media, references)
        if not parsed.items:
            return None
        return prompt_length(parsed, loaded.choice.pipeline, loaded.encode)

    # ------------------------------------------------------------ the tokenizer hook

    def prepare(self, prompt: str, loaded: LoadedModel, *, max_length: int | None = None,
                media: Sequence[MediaItem] | None = None, embed_all: bool | None = None,
                references: dict | None = None, encode_options: dict | None = None,
                cache_scope: str | None = None) -> Prepared | None:
        """ids and embeddings for ``prompt``; None when the host's ids stand as they are. ``cache_scope``
        keeps the items' cached features apart from other scopes' (an API client's ``cache_salt``)."""
        encode = loaded.encoder(**(encode_options or {}))
        parsed = parse_prompt(prompt, media, references)
        if not parsed.items:
            return self._without_images(prompt, loaded, encode, max_length)
        choice = loaded.choice
        # the layout of each picture was chosen for the prompt as it came, however many truncation drops
        layouts = loaded.family.arrange(choice.pipeline, len(parsed.items))
        ids, spans, dropped, notes = self._widened_ids(parsed, loaded, encode, max_length)
        kept, layouts = parsed.items[dropped:], layouts[dropped:]
        embed_all = self.settings.embed_all if embed_all is None else embed_all
        chosen = list(range(len(kept))) if embed_all else list(range(len(kept)))[-1:]
        embeddings = loaded.embeddings()
        features = self.features.features_for([kept[i] for i in chosen], [layouts[i] for i in chosen], choice,
                                              embeddings.weight.shape[-1], notes, scope=cache_scope)
        for i, feature, slots in zip(chosen, features, spans.counts[chosen].tolist()):
            if feature.shape[0] != slots:  # the header and the pixels disagree: refused, never spliced
                raise kept[i].item.error(f"its pixels give {feature.shape[0]} features for the {slots} places its "
                                           "header gives it; save the picture again with another program")
        with torch.no_grad():
            embeds = embeddings(ids.to(embeddings.weight.device))
            if chosen:
                embeds = splice(embeds, spans.slots_of(chosen), torch.cat(features))
        self.log(f"llava: {len(parsed.items)} picture(s) in the prompt, {len(chosen)} embedded")
        for note in notes:
            self.log(f"llava: {note}")
        identities = [(image.item.digest(), layout) if i in chosen else None
                      for i, (image, layout) in enumerate(zip(kept, layouts))]
        positions = position_key(ids, spans, identities)
        return Prepared(prompt, ids.to(embeds.device), embeds, notes, dropped, len(chosen), positions)

    def _widened_ids(self, parsed, loaded: LoadedModel, encode: Encode, max_length: int | None):
        """The prompt's ids with each picture widened to its slots, cut on the left to ``max_length``
        without cutting into a picture; (ids, the pictures' spans, pictures dropped, notes)."""
        pipeline, layout = loaded.choice.pipeline, loaded.layout
        # Each picture is tokenized as one slot and widened to its full length in the ids: the
        # tokenizer reads a few characters per picture, never hundreds of image tokens as text.
        ids = stand_in_ids(parsed, pipeline, encode)
        counts = slot_counts(parsed.items, pipeline)
        ids = widen_image_slots(ids, layout, counts)
        spans = find_images(ids[0], layout, counts)
        cut, dropped = truncation_cut(ids.shape[1], max_length, spans)
        notes = []
        if cut:
            ids = ids[:, cut:]
            spans = shift_spans(spans, cut, dropped)
            if dropped:
                notes.append(f"the prompt is longer than the context allows: {dropped} picture(s) at its start "
                             f"were cut off and dropped whole ({len(parsed.items) - dropped} kept)")
        if ids.shape[1] == 0:
            raise LlavaError(f"the context is too short for this prompt's last picture: it takes "
                             f"{int(counts[-1]) + layout.extra_tokens} tokens and the prompt may only use {max_length}; "
                             "raise truncation_length or lower max_new_tokens")
        return ids, spans, dropped, notes

    @staticmethod
    def _without_images(prompt: str, loaded: LoadedModel, encode: Encode, max_length: int | None) -> Prepared | None:
        """A prompt without pictures keeps the host's ids, unless the user typed an image token:
        that stays text, as it does beside pictures, so that no image slot appears out of nothing."""
        typed = [token for token in loaded.image_tokens if token in prompt]
        if not typed:
            return None
        ids = encode(escape_special_tokens(prompt, typed))
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
        if max_length:
            ids = ids[:, -max_length:]
        return Prepared(prompt, ids, None)

    # ------------------------------------------------------------ what the vision side did

    @property
    def cache(self) -> FeatureCache:
        return self.features.cache

    @property
    def counters(self) -> Counters:
        return self.features.counters


def _plain_encode(tokenizer) -> Encode:
    def encode(text: str, **options) -> torch.Tensor:
        return torch.tensor([tokenizer.encode(text, add_special_tokens=False)])
    return encode


def items_in(prompt: str, media: Sequence[MediaItem] | None = None, references: dict | None = None) -> bool:
    """Whether ``prompt`` holds pictures (``<img>`` tags, or placeholders with ``media`` behind them)."""
    return "<" in prompt and bool(parse_prompt(prompt, media, references).items)
