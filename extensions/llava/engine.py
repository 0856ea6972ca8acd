"""The extension's core: from a prompt with pictures to ids and spliced embeddings.

Nothing here knows the webui. The host hands over its model, tokenizer and an ``encode``
function (text → ids with the host's BOS handling, no truncation) and receives ids and
embeddings of equal length. Pictures become features in ``features.PictureFeatures``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from .cache import FeatureCache
from .counting import Encode, prompt_length, slot_counts, stand_in_ids, unseen_pictures
from .detect import Choice, choose_pipeline
from .errors import LlavaError
from .features import Counters, PictureFeatures
from .images import ImageSource
from .pipelines import PIPELINES, Pipeline, PipelineError
from .prefix_cache import PositionKey
from .preprocess import tiled
from .prompt import escape_special_tokens, parse_prompt
from .settings import Settings
from .splice import TokenLayout, find_images, shift_spans, splice, truncation_cut, widen_image_slots

logger = logging.getLogger("llava")

# Image tokens a typed prompt may hold whatever the model: those of every named pipeline.
NAMED_IMAGE_TOKENS = frozenset(token for pipeline in PIPELINES.values() for token in pipeline.special_tokens)


@dataclass
class Prepared:
    """What the tokenizer hook gives back to the host."""

    prompt: str
    input_ids: torch.Tensor  # [1, length]
    inputs_embeds: torch.Tensor | None  # [1, length, hidden]
    notes: list[str] = field(default_factory=list)  # things the user should be told
    images_dropped: int = 0
    images_embedded: int = 0
    positions: PositionKey | None = None  # what stands at each position (for reusing an earlier prefix)


def model_path_of(model) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "_name_or_path", None) or None


class LlavaEngine:
    def __init__(self, settings: Settings | None = None, log: Callable[[str], None] | None = None):
        self.settings = settings or Settings.from_params({})
        self.log = log or logger.info
        self.features = PictureFeatures(self.settings, self.log)
        self._choices: dict[tuple, Choice] = {}
        self._image_tokens: dict[tuple, list[str]] = {}

    def configure(self, settings: Settings) -> None:
        """New settings: vision parts reload on the next picture if their sources or placement changed."""
        if settings == self.settings:
            return
        self.settings = settings
        self.features.configure(settings)
        self._choices.clear()
        self._image_tokens.clear()

    # ------------------------------------------------------------ pipeline and tokens

    def choice_for(self, model, tokenizer, model_path: str | None = None) -> Choice:
        model_path = model_path or model_path_of(model)
        key = (id(model), id(tokenizer), model_path, self.settings.pipeline)
        choice = self._choices.get(key)
        if choice is None:
            vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
            choice = choose_pipeline(self.settings.pipeline, getattr(model, "config", None), vocab, model_path)
            self.log(f"llava: pipeline {choice.pipeline.name} ({choice.reason})")
            self._choices[key] = choice
        return choice

    @staticmethod
    def token_layout(tokenizer, pipeline: Pipeline) -> TokenLayout:
        vocab = tokenizer.get_vocab()
        missing = [t for t in pipeline.special_tokens if t not in vocab]
        if missing:
            raise PipelineError(f"the loaded tokenizer has no {', '.join(missing)} token(s), which pipeline "
                                f"{pipeline.name} needs: wrong model or wrong pipeline (set llava-pipeline, or "
                                "convert the checkpoint with `python -m extensions.llava convert`)")
        ids = {t: vocab[t] for t in pipeline.special_tokens}
        return TokenLayout(image_id=ids[pipeline.image_token],
                           start_id=ids.get(pipeline.start_token) if pipeline.start_token else None,
                           end_id=ids.get(pipeline.end_token) if pipeline.end_token else None)

    def token_count(self, prompt: str, model, tokenizer, encode: Encode, media: Sequence[ImageSource] | None = None,
                    model_path: str | None = None, references: dict | None = None) -> int | None:
        """Tokens ``prompt`` takes, each image counted at its full length; None without images.
        ``media`` are the pictures of the ``<__media__>`` placeholders; without them every placeholder
        stands for a picture of unknown size."""
        parsed = parse_prompt(prompt, unseen_pictures(prompt) if media is None else media, references)
        if not parsed.images:
            return None
        return prompt_length(parsed, self.choice_for(model, tokenizer, model_path).pipeline, encode)

    # ------------------------------------------------------------ the tokenizer hook

    def prepare(self, prompt: str, *, model, tokenizer, encode: Encode, max_length: int | None,
                media: Sequence[ImageSource] | None = None, embed_all: bool | None = None,
                model_path: str | None = None, references: dict | None = None,
                cache_scope: str | None = None) -> Prepared | None:
        """ids and embeddings for ``prompt``; None when the host's ids stand as they are. ``cache_scope``
        keeps the pictures' cached features apart from other scopes' (an API client's ``cache_salt``)."""
        parsed = parse_prompt(prompt, media, references)
        if not parsed.images:
            return self._without_images(prompt, model, tokenizer, encode, max_length, model_path)
        choice = self.choice_for(model, tokenizer, model_path)
        ids, spans, dropped, notes = self._widened_ids(parsed, choice.pipeline, tokenizer, encode, max_length)
        kept = parsed.images[dropped:]
        embed_all = self.settings.embed_all if embed_all is None else embed_all
        chosen = list(range(len(kept))) if embed_all else list(range(len(kept)))[-1:]
        embeddings = model.get_input_embeddings()
        # the layout of each picture was chosen for the prompt as it came, however many truncation dropped
        features = self.features.features_for([kept[i] for i in chosen], choice, embeddings.weight.shape[-1], notes,
                                              alone=len(parsed.images) == 1, scope=cache_scope)
        for i, feature, slots in zip(chosen, features, spans.counts[chosen].tolist()):
            if feature.shape[0] != slots:  # the header and the pixels disagree: refused, never spliced
                raise kept[i].source.error(f"its pixels give {feature.shape[0]} features for the {slots} places its "
                                           "header gives it; save the picture again with another program")
        with torch.no_grad():
            embeds = embeddings(ids.to(embeddings.weight.device))
            if chosen:
                embeds = splice(embeds, spans.slots_of(chosen), torch.cat(features))
        self.log(f"llava: {len(parsed.images)} image(s) in the prompt, {len(chosen)} embedded")
        for note in notes:
            self.log(f"llava: {note}")
        positions = position_key(ids, spans, [(image.source.digest() if i in chosen else None)
                                              for i, image in enumerate(kept)], tiled(choice.pipeline, len(parsed.images) == 1))
        return Prepared(prompt, ids.to(embeds.device), embeds, notes, dropped, len(chosen), positions)

    def _widened_ids(self, parsed, pipeline: Pipeline, tokenizer, encode: Encode, max_length: int | None):
        """The prompt's ids with each picture widened to its slots, cut on the left to ``max_length``
        without cutting into a picture; (ids, the pictures' spans, pictures dropped, notes)."""
        layout = self.token_layout(tokenizer, pipeline)
        # Each picture is tokenized as one slot and widened to its full length in the ids: the
        # tokenizer reads a few characters per picture, never hundreds of image tokens as text.
        ids = stand_in_ids(parsed, pipeline, encode)
        counts = slot_counts(parsed.images, pipeline)
        ids = widen_image_slots(ids, layout, counts)
        spans = find_images(ids[0], layout, counts)
        cut, dropped = truncation_cut(ids.shape[1], max_length, spans)
        notes = []
        if cut:
            ids = ids[:, cut:]
            spans = shift_spans(spans, cut, dropped)
            if dropped:
                notes.append(f"the prompt is longer than the context allows: {dropped} image(s) at its start "
                             f"were cut off and dropped whole ({len(parsed.images) - dropped} kept)")
        if ids.shape[1] == 0:
            raise LlavaError(f"the context is too short for this prompt's last image: it takes "
                             f"{int(counts[-1]) + layout.extra_tokens} tokens and the prompt may only use {max_length}; "
                             "raise truncation_length or lower max_new_tokens")
        return ids, spans, dropped, notes

    def _without_images(self, prompt: str, model, tokenizer, encode: Encode, max_length: int | None,
                        model_path: str | None) -> Prepared | None:
        """A prompt without pictures keeps the host's ids, unless the user typed an image token:
        that stays text, as it does beside pictures, so that no image slot appears out of nothing."""
        typed = [token for token in self.image_tokens(model, tokenizer, model_path) if token in prompt]
        if not typed:
            return None
        ids = encode(escape_special_tokens(prompt, typed))
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
        if max_length:
            ids = ids[:, -max_length:]
        return Prepared(prompt, ids, None)

    def image_tokens(self, model, tokenizer, model_path: str | None = None) -> list[str]:
        """The image tokens of the loaded tokenizer that only the extension may place: those of the
        model's pipeline (named, from its llava.json or from its config) and of every named one."""
        key = (id(model), id(tokenizer), model_path or model_path_of(model), self.settings.pipeline)
        known = self._image_tokens.get(key)
        if known is None:
            tokens = set(NAMED_IMAGE_TOKENS)
            try:
                tokens.update(self.choice_for(model, tokenizer, model_path).pipeline.special_tokens)
            except LlavaError:
                pass  # not a LLaVA model: only the named tokens its tokenizer knows can matter
            vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else None
            known = self._image_tokens[key] = sorted(t for t in tokens if vocab is None or t in vocab)
        return known

    # ------------------------------------------------------------ what the vision side did

    @property
    def cache(self) -> FeatureCache:
        return self.features.cache

    @property
    def counters(self) -> Counters:
        return self.features.counters


def position_key(ids: torch.Tensor, spans, digests: list[str | None], tiled_layout: bool) -> PositionKey:
    """What stands at each position of ``ids``: the ids, and each picture's slots with the picture (by
    its data's digest and its layout) or, where it was not embedded (``None``), the plain embedding."""
    firsts = spans.slots[torch.cumsum(spans.counts, 0) - spans.counts].tolist() if len(spans.counts) else []
    pictures = tuple((first, first + int(count), ("plain",) if digest is None else (digest, tiled_layout))
                     for first, count, digest in zip(firsts, spans.counts.tolist(), digests))
    return PositionKey(ids[0].detach().cpu(), pictures)


def pictures_in(prompt: str, media: Sequence[ImageSource] | None = None, references: dict | None = None) -> bool:
    """Whether ``prompt`` holds pictures (``<img>`` tags, or placeholders with ``media`` behind them)."""
    return "<" in prompt and bool(parse_prompt(prompt, media, references).images)
