"""A LLaVA checkpoint as the converter reads it: its kind (original or llava-hf), its configs, which
tensor is which part, its tokenizer, the pipeline it describes, its projector in one naming, and what
its parts are (``Parts``, for the consistency rules).

An original checkpoint has a config with ``mm_*`` keys (model type ``llava``/``llava_llama``/
``llava_mistral``) and ``model.mm_projector.*`` tensors. A llava-hf one is a
``LlavaForConditionalGeneration`` (or ``LlavaNextForConditionalGeneration``): its language model is
under ``model.language_model.*`` + ``lm_head.*`` in transformers 5.x, under
``language_model.model.*`` + ``language_model.lm_head.*`` before.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch

from ..vision.checkpoint_rules import Parts
from ..families.recognise import detect_pipeline, pipeline_from_config
from ..errors import LlavaError, first_line
from ..families.pipelines import Pipeline, PipelineError, get_pipeline
from ..vision.tower_kinds import TOWER_KINDS, tower_kind_of
from ..vision.projector import normalise_projector_keys, projector_type_of
from ..vision.weights import IMAGE_NEWLINE_KEYS, PROJECTOR_PREFIXES, TOWER_PREFIXES, WeightsError, read_projector_tensors
from ..vision.weights import weight_files as checkpoint_files

ORIGINAL_TYPES = {"llava": "llama", "llava_llama": "llama", "llava_mistral": "mistral", "llava_qwen": "qwen2"}
CAUSAL_LM = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
LLAVA_HF_TYPES = {"llava": "LlavaForConditionalGeneration", "llava_next": "LlavaNextForConditionalGeneration",
                  "llava_onevision": "LlavaOnevisionForConditionalGeneration"}
# Keys of an original LLaVA config that describe the vision side or the training run, not the LLM.
_ORIGINAL_ONLY = {"image_aspect_ratio", "image_grid_pinpoints", "tune_mm_mlp_adapter", "freeze_mm_mlp_adapter",
                  "tune_mm_vision_resampler", "freeze_mm_vision_resampler", "unfreeze_mm_vision_tower",
                  "use_mm_proj", "tokenizer_model_max_length", "tokenizer_padding_side", "model_type",
                  "architectures", "transformers_version", "_name_or_path", "mm_patch_merge_type",
                  "image_crop_resolution", "image_split_resolution", "mm_spatial_pool_mode", "mm_spatial_pool_stride",
                  "mm_newline_position", "mm_use_im_patch_token", "mm_resampler_type", "mm_mask_drop_mode",
                  "add_faster_video", "faster_token_stride", "force_sample", "vision_tower_pretrained",
                  "pos_skipping_range", "mm_tunable_parts", "use_pos_skipping", "add_time_instruction"}


class ConvertError(LlavaError):
    """The source cannot be converted; the message says why and what to do."""


# The sizes a config gives, and the most any real checkpoint has of each (several times the largest
# released): a config beyond them describes no model that can load.
SIZE_LIMITS = {"vocab_size": 2**22, "num_hidden_layers": 1024, "hidden_size": 2**16, "intermediate_size": 2**18,
               "num_attention_heads": 1024, "num_key_value_heads": 1024, "max_position_embeddings": 2**24,
               "mm_hidden_size": 2**16, "image_size": 2**14, "patch_size": 2**10, "projection_dim": 2**16}


def check_sizes(config: dict, where: str) -> None:
    """Refuse, naming the key, a size in ``config`` (or its text and vision parts) that is not a whole
    number from 1 to its limit."""
    for part, values in [("", config), ("text_config.", config.get("text_config")),
                         ("vision_config.", config.get("vision_config"))]:
        for key, limit in SIZE_LIMITS.items():
            value = values.get(key) if isinstance(values, dict) else None
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
                raise ConvertError(f"{where}: '{part}{key}' is {value!r}; expected a whole number from 1 to {limit:,}")


def read_config(folder: str) -> dict:
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        raise ConvertError(f"'{folder}' has no config.json: give the folder of a downloaded LLaVA checkpoint")
    try:
        with open(config_path) as f:
            raw = json.load(f)
    except (ValueError, UnicodeDecodeError) as error:
        raise ConvertError(f"'{config_path}' is not valid JSON ({first_line(error)})") from None
    if not isinstance(raw, dict):
        raise ConvertError(f"'{config_path}' is not a JSON object")
    check_sizes(raw, config_path)
    return raw


@dataclass
class Source:
    folder: str
    kind: str  # "original" or "llava-hf"
    raw: dict  # config.json as read
    text: dict  # the language model's config
    llm_type: str  # "llama" or "mistral"
    weight_files: list[str]
    vision: dict | None = None  # llava-hf vision_config
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- reading the source


def read_source(folder: str) -> Source:
    raw = read_config(folder)
    model_type = raw.get("model_type", "")
    try:
        files = checkpoint_files(folder)
    except WeightsError as error:
        raise ConvertError(str(error)) from None
    if "text_config" in raw and "vision_config" in raw:
        if model_type not in LLAVA_HF_TYPES:
            raise ConvertError(f"'{folder}' is a {model_type!r} checkpoint; only {', '.join(LLAVA_HF_TYPES)} "
                               f"({', '.join(LLAVA_HF_TYPES.values())}) and original LLaVA checkpoints can be converted")
        text = dict(raw["text_config"])
        llm_type = text.get("model_type", "llama")
        if llm_type not in CAUSAL_LM:
            raise ConvertError(f"the language model of '{folder}' is {llm_type!r}; supported: {', '.join(CAUSAL_LM)}")
        if "tie_word_embeddings" not in text and "tie_word_embeddings" in raw:
            text["tie_word_embeddings"] = raw["tie_word_embeddings"]
        return Source(folder, "llava-hf", raw, text, llm_type, files, vision=dict(raw["vision_config"]))
    if model_type in ORIGINAL_TYPES or any(k.startswith("mm_") for k in raw):
        llm_type = ORIGINAL_TYPES.get(model_type) or ("mistral" if "mistral" in model_type else "llama")
        if model_type not in ORIGINAL_TYPES and model_type not in CAUSAL_LM:
            raise ConvertError(f"'{folder}' is an original LLaVA checkpoint of type {model_type!r}; supported: "
                               f"{', '.join(ORIGINAL_TYPES)} (and llama/mistral configs with mm_* keys)")
        text = {k: v for k, v in raw.items() if not k.startswith("mm_") and k not in _ORIGINAL_ONLY}
        return Source(folder, "original", raw, text, llm_type, files)
    raise ConvertError(f"'{folder}' is not a LLaVA checkpoint: its config has neither mm_* keys nor a "
                       "llava vision_config/text_config")


# Where each kind of checkpoint keeps its language model's tensors, and their names in a plain causal LM.
LLM_NAMES = {"original": (("model.", "model."), ("lm_head.", "lm_head.")),
             "llava-hf": (("model.language_model.", "model."), ("language_model.model.", "model."),
                          ("language_model.lm_head.", "lm_head."), ("lm_head.", "lm_head."))}


def classify(source: Source, key: str) -> tuple[str, str]:
    """('llm', new name) | ('projector', key) | ('vision', key) | ('unknown', key) for one tensor name."""
    if key in IMAGE_NEWLINE_KEYS or key.startswith(PROJECTOR_PREFIXES):
        return "projector", key
    if key.startswith(TOWER_PREFIXES):
        return "vision", key
    if key.startswith("model.vision_resampler."):
        return "unknown", key  # resampler variants: not a pipeline here
    for old, new in LLM_NAMES[source.kind]:
        if key.startswith(old):
            return "llm", new + key[len(old):]
    return "unknown", key


def load_tokenizer(folder: str):
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(folder)
    except Exception as error:
        raise ConvertError(f"could not load the tokenizer of '{folder}' ({type(error).__name__}: "
                           f"{first_line(error)}); copy the tokenizer files of the "
                           "checkpoint's base model into it") from None


# ---------------------------------------------------------------- choosing the pipeline


def choose(source: Source, tokenizer, name: str) -> Pipeline:
    """The named pipeline when given; else the one the checkpoint's own config describes (a llava-hf
    config always does, an original one when it names its tower); else the named one that the
    checkpoint's type, width, tokenizer and folder name point to."""
    if name != "auto":
        return get_pipeline(name)
    try:
        image_token = _image_token_text(source, tokenizer)
        start_end = image_token == "<im_patch>" and "<im_start>" in tokenizer.get_vocab()
        described = pipeline_from_config(source.raw, source.folder, image_token, source.text.get("hidden_size"),
                                         start_end)
        if described is not None:
            return described
        vocab = tokenizer.get_vocab()
        return get_pipeline(detect_pipeline(SimpleNamespace(**source.raw), vocab, source.folder))
    except PipelineError as error:
        raise ConvertError(f"{error} — for the converter: pass --pipeline NAME") from None


def _image_token_text(source: Source, tokenizer) -> str | None:
    """The text of a llava-hf checkpoint's image token (``<image>`` when the tokenizer lacks it)."""
    if source.kind != "llava-hf":
        return None
    index = source.raw.get("image_token_index", source.raw.get("image_token_id"))
    if index is None or index >= len(tokenizer):
        return "<image>"
    return tokenizer.convert_ids_to_tokens(index)


# ---------------------------------------------------------------- the projector


def projector_state(source: Source, tensors: dict) -> dict:
    """The projector in the original naming, without prefix: 'weight'/'bias' or '0.*', '2.*'."""
    state = normalise_projector_keys(tensors)
    if source.kind == "llava-hf":
        state = _fill_biases(state)
        if source.raw.get("projector_hidden_act") in ("linear", "identity"):
            state = _compose_linear(state)
    if set(state) == {"0.weight", "0.bias"}:
        state = {"weight": state["0.weight"], "bias": state["0.bias"]}
    return state


def _fill_biases(state: dict) -> dict:
    """llava-hf may have a projector without biases; the original layout always has them."""
    state = dict(state)
    for key in [k for k in state if k.endswith(".weight")]:
        bias = key[:-len("weight")] + "bias"
        if bias not in state:
            state[bias] = torch.zeros(state[key].shape[0], dtype=state[key].dtype)
    return state


def _compose_linear(state: dict) -> dict:
    """Linear · identity · Linear is one Linear: W = W2 W1, b = W2 b1 + b2 (computed in float64)."""
    w1, b1 = state["0.weight"].double(), state["0.bias"].double()
    w2, b2 = state["2.weight"].double(), state["2.bias"].double()
    dtype = state["0.weight"].dtype
    return {"weight": (w2 @ w1).to(dtype), "bias": (w2 @ b1 + b2).to(dtype)}


def projector_io(state: dict) -> tuple[int, int]:
    if "weight" in state:
        return state["weight"].shape[1], state["weight"].shape[0]
    indices = sorted(int(k.split(".")[0]) for k in state if k.endswith(".weight"))
    return state[f"{indices[0]}.weight"].shape[1], state[f"{indices[-1]}.weight"].shape[0]


def read_projector(source: Source) -> dict:
    """The projector's tensors: only those are read, only from the files that hold them."""
    try:
        state, _ = read_projector_tensors(source.folder, wanted=lambda key: classify(source, key)[0] == "projector")
    except WeightsError as error:
        raise ConvertError(str(error)) from None
    return state


def parts_of(source: Source, projector: dict, newline, tokenizer) -> Parts:
    """What the checkpoint's files and config say about its vision side."""
    raw, hf = source.raw, source.kind == "llava-hf"
    projector_in, projector_out = projector_io(projector)
    strategy = raw.get("vision_feature_select_strategy" if hf else "mm_vision_select_feature", "default")
    has_cls = TOWER_KINDS[tower_kind_of(source.vision) if hf else tower_kind_of(name=raw.get("mm_vision_tower", ""))].has_cls
    common = dict(newline_shape=tuple(newline.shape) if newline is not None else None,
                  llm_width=source.text.get("hidden_size"), keeps_cls=strategy in ("full", "cls_patch") and has_cls,
                  feature_layer=raw.get("vision_feature_layer" if hf else "mm_vision_select_layer", -2))
    if not hf:
        start_end = bool(raw["mm_use_im_start_end"]) if "mm_use_im_start_end" in raw else None
        return Parts(projector_type_of(projector), projector_in, projector_out, config_width=raw.get("mm_hidden_size"),
                     start_end=start_end, **common)
    vision = source.vision
    index = raw.get("image_token_index", raw.get("image_token_id"))
    image_token = tokenizer.convert_ids_to_tokens(index) if index is not None and index < len(tokenizer) else None
    return Parts(projector_type_of(projector), projector_in, projector_out, tower_width=vision.get("hidden_size"),
                 tower_grid=(vision.get("image_size", 224) // vision.get("patch_size", 14)) ** 2,
                 activation=raw.get("projector_hidden_act", "gelu"), image_token=image_token, **common)
