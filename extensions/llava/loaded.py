"""The model the host has loaded, with what belongs to it: its tokenizer, its folder, the host's way to
encode a text, and, worked out once per loaded model, its pipeline and family, its vocabulary and the
ids of its image tokens.

It holds the model and the tokenizer weakly: when the host unloads a model, nothing here keeps it in
memory.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from typing import Callable

import torch

from .errors import CONVERT_COMMAND, LlavaError
from .families import Family, family_of
from .families.pipelines import PIPELINES, PipelineError
from .families.recognise import Choice, choose_pipeline
from .families.base import TokenLayout

# Image tokens a typed prompt may hold whatever the model: those of every named pipeline.
NAMED_IMAGE_TOKENS = frozenset(token for pipeline in PIPELINES.values() for token in pipeline.special_tokens)


def model_path_of(model) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "_name_or_path", None) or None


class LoadedModel:
    """One loaded model under one ``llava-pipeline`` setting. ``encode(text, **options)`` is the host's:
    text → ids [1, n] (or [n]) with the host's BOS handling, no truncation."""

    def __init__(self, model, tokenizer, folder: str | None, encode: Callable[..., torch.Tensor], setting: str,
                 log: Callable[[str], None]):
        self._model, self._tokenizer = weakref.ref(model), weakref.ref(tokenizer)
        self.folder = folder or model_path_of(model)
        self.encode = encode
        self.setting = setting
        self.log = log
        self._choice: Choice | None = None
        self._vocab: dict | None = None
        self._layout: TokenLayout | None = None
        self._image_tokens: list[str] | None = None

    @property
    def model(self):
        return self._model()

    @property
    def tokenizer(self):
        return self._tokenizer()

    def encoder(self, **options) -> Callable[[str], torch.Tensor]:
        """The host's encode with ``options`` (e.g. its BOS setting for one generation)."""
        return (lambda text: self.encode(text, **options)) if options else self.encode

    @property
    def vocab(self) -> dict:
        if self._vocab is None:
            tokenizer = self.tokenizer
            self._vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
        return self._vocab

    @property
    def choice(self) -> Choice:
        """The pipeline this model needs (a wrong one raises its PipelineError, asked again next time)."""
        if self._choice is None:
            choice = choose_pipeline(self.setting, getattr(self.model, "config", None), self.vocab, self.folder)
            self.log(f"llava: pipeline {choice.pipeline.name} ({choice.reason})")
            self._choice = choice
        return self._choice

    @property
    def family(self) -> Family:
        return family_of(self.choice.pipeline)

    @property
    def layout(self) -> TokenLayout:
        """The ids of the pipeline's image tokens in the loaded tokenizer."""
        if self._layout is None:
            pipeline = self.choice.pipeline
            missing = [t for t in pipeline.special_tokens if t not in self.vocab]
            if missing:
                raise PipelineError(f"the loaded tokenizer has no {', '.join(missing)} token(s), which pipeline "
                                    f"{pipeline.name} needs: wrong model or wrong pipeline (set llava-pipeline, or "
                                    f"convert the checkpoint with {CONVERT_COMMAND})")
            self._layout = self.family.token_layout(pipeline, self.vocab)
        return self._layout

    @property
    def image_tokens(self) -> list[str]:
        """The image tokens of the loaded tokenizer that only the extension may place: those of the model's
        pipeline and of every named one."""
        if self._image_tokens is None:
            tokens = set(NAMED_IMAGE_TOKENS)
            try:
                tokens.update(self.choice.pipeline.special_tokens)
            except LlavaError:
                pass  # not a LLaVA model: only the named tokens its tokenizer knows can matter
            vocab = self.vocab if hasattr(self.tokenizer, "get_vocab") else None
            self._image_tokens = sorted(t for t in tokens if vocab is None or t in vocab)
        return self._image_tokens

    def embeddings(self):
        return self.model.get_input_embeddings()


class LoadedModels:
    """The few models bound lately, so that each is bound once (the webui loads one at a time)."""

    LIMIT = 4

    def __init__(self, log: Callable[[str], None]):
        self.log = log
        self._bound: OrderedDict[tuple, LoadedModel] = OrderedDict()
        self._lock = threading.Lock()

    def bind(self, model, tokenizer, folder: str | None, encode, setting: str) -> LoadedModel:
        key = (id(model), id(tokenizer), folder, setting)
        with self._lock:
            loaded = self._bound.get(key)
            if loaded is None or loaded.model is not model or loaded.tokenizer is not tokenizer:
                loaded = self._bound[key] = LoadedModel(model, tokenizer, folder, encode, setting, self.log)
            loaded.encode = encode
            self._bound.move_to_end(key)
            while len(self._bound) > self.LIMIT:
                self._bound.popitem(last=False)
            return loaded

    def clear(self) -> None:
        with self._lock:
            self._bound.clear()
