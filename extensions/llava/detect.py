"""Choosing the pipeline that belongs to a loaded model, and where its vision parts are.

Evidence, strongest first: the metadata file the converter writes into a model folder;
the original LLaVA config keys (``mm_*``); the tokenizer's image tokens together with the
model's type, width and folder name.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

from .pipelines import DEFAULT_PIPELINE, PIPELINES, Pipeline, PipelineError, get_pipeline

METADATA_FILE = "llava.json"


@dataclass(frozen=True)
class Choice:
    pipeline: Pipeline
    reason: str
    vision_source: str | None = None  # from the model folder's metadata
    projector_repo: str | None = None
    projector_filename: str | None = None


def read_metadata(model_path: str | None) -> dict | None:
    if not model_path:
        return None
    path = os.path.join(model_path, METADATA_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as error:
        raise PipelineError(f"{path} cannot be read as JSON: {error}") from None
    if not isinstance(data, dict) or data.get("pipeline") not in PIPELINES:
        raise PipelineError(f"{path} names no known pipeline; known: {', '.join(PIPELINES)}")
    return data


def choose_pipeline(setting: str, config, tokenizer_vocab, model_path: str | None) -> Choice:
    """The pipeline for a model: the setting's, unless it is ``auto``."""
    metadata = read_metadata(model_path)
    sources = {}
    if metadata:
        sources = {"vision_source": _inside(model_path, metadata.get("vision_tower")),
                   "projector_repo": model_path if metadata.get("projector") else None,
                   "projector_filename": metadata.get("projector")}
    if setting != "auto":
        return Choice(get_pipeline(setting), "set by llava-pipeline", **sources)
    if metadata:
        return Choice(get_pipeline(metadata["pipeline"]), f"named in {METADATA_FILE}", **sources)
    name = detect_pipeline(config, tokenizer_vocab, model_path)
    return Choice(get_pipeline(name), "detected from the model")


def _inside(folder: str, relative: str | None) -> str | None:
    """A path in the metadata is relative to the model folder; anything else (a Hub repo id) stands as is."""
    if not relative:
        return None
    if os.path.isabs(relative):
        return relative
    inside = os.path.join(folder, relative)
    return inside if os.path.exists(inside) else relative


def _size_of(hidden_size: int | None, name: str) -> str | None:
    if hidden_size == 4096 or re.search(r"(?<![\d.])7b", name):
        return "7b"
    if hidden_size == 5120 or re.search(r"(?<![\d.])13b", name):
        return "13b"
    return None


def detect_pipeline(config, vocab, model_path: str | None) -> str:
    """Name the pipeline of a model from its config, tokenizer vocabulary and folder name."""
    get = (lambda key, default=None: getattr(config, key, default)) if config is not None else (lambda key, default=None: default)
    name = os.path.basename(os.path.normpath(model_path)).lower() if model_path else ""
    name = name or str(get("_name_or_path", "") or "").lower()
    hidden = get("hidden_size")
    model_type = str(get("model_type", "") or "")
    vocab = vocab or {}
    tower = str(get("mm_vision_tower", "") or "")
    size = _size_of(hidden, name)
    unsure = ("cannot tell which LLaVA pipeline this model needs{why}; set llava-pipeline to one of: "
              + ", ".join(PIPELINES))

    if "mistral" in model_type or "bakllava" in name:
        if tower and "336" not in tower:
            raise PipelineError(unsure.format(why=f" (a Mistral model with vision tower {tower})"))
        return "bakllava-1"
    if tower:  # an original LLaVA checkpoint says what it was trained with
        if "336" in tower or str(get("mm_projector_type", "")).startswith("mlp"):
            if size is None:
                raise PipelineError(unsure.format(why=" (a v1.5-style model of unknown size)"))
            return f"llava-v1.5-{size}"
        if "<im_patch>" in vocab or get("mm_use_im_start_end", False):
            return f"llava-v0-{size or '13b'}"
        return "llava-llama-2-13b"
    if "<im_patch>" in vocab:
        return f"llava-v0-{size}" if size else DEFAULT_PIPELINE
    if "<image>" in vocab:
        if "llama-2" in name or "llama2" in name:
            return "llava-llama-2-13b"
        if size and ("1.5" in name or "v15" in name):
            return f"llava-v1.5-{size}"
        raise PipelineError(unsure.format(why=" (its tokenizer has <image>, used by llava-llama-2, v1.5 and bakllava)"))
    raise PipelineError("the loaded model's tokenizer has no image tokens (<im_patch> or <image>): it is not a "
                        "LLaVA model the extension can feed. Load a LLaVA checkpoint (convert an original or "
                        "llava-hf one with `python -m extensions.llava convert SRC DST`), or set llava-pipeline")
