"""``python -m extensions.llava convert SRC DST``: a LLaVA checkpoint → a folder the webui loads.

SRC is either an original LLaVA checkpoint (config with ``mm_*`` keys, model type
``llava``/``llava_llama``/``llava_mistral``, weights with ``model.mm_projector.*``) or a
llava-hf one (``LlavaForConditionalGeneration``; language model under
``model.language_model.*`` + ``lm_head.*`` in transformers 5.x, under
``language_model.model.*`` + ``language_model.lm_head.*`` before).

DST receives:

- the language model as a plain ``LlamaForCausalLM`` / ``MistralForCausalLM``: config and
  safetensors weights, written one source shard at a time;
- the tokenizer, with the pipeline's image tokens (``<image>`` is added when the original
  lacks it; its embedding and lm_head rows are the mean of the existing rows);
- ``mm_projector.safetensors`` in the original naming (``model.mm_projector.weight`` for a
  linear projector, ``model.mm_projector.0.*`` / ``.2.*`` for mlp2x_gelu). A llava-hf
  projector whose activation is ``linear`` is two affine maps in a row: it is written as
  the single linear map they compose to, so it is a ``linear`` projector for the pipeline
  check (v0 and llava-llama-2 pipelines);
- ``vision_tower/`` (a CLIPVisionModel and its preprocessor config) when SRC holds the
  tower (llava-hf); otherwise the tower's repo id from the original config is recorded;
- ``llava.json``: the pipeline, the vision tower and the projector file, read by ``auto``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch

from .detect import METADATA_FILE, detect_pipeline, pipeline_from_config
from .errors import LlavaError
from .pipelines import PIPELINES, Pipeline, PipelineError, get_pipeline
from .projector import normalise_projector_keys, projector_type_of, split_image_newline
from .vision import clip_vision_from_state
from .weights import IMAGE_NEWLINE_KEYS, WeightsError, iter_tensors, load_image_processor, quiet_transformers, read_projector_tensors
from .weights import weight_files as checkpoint_files

PROJECTOR_FILE = "mm_projector.safetensors"
VISION_FOLDER = "vision_tower"
ORIGINAL_TYPES = {"llava": "llama", "llava_llama": "llama", "llava_mistral": "mistral"}
CAUSAL_LM = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}
# Keys of an original LLaVA config that describe the vision side or the training run, not the LLM.
_ORIGINAL_ONLY = {"image_aspect_ratio", "image_grid_pinpoints", "tune_mm_mlp_adapter", "freeze_mm_mlp_adapter",
                  "tune_mm_vision_resampler", "freeze_mm_vision_resampler", "unfreeze_mm_vision_tower",
                  "use_mm_proj", "tokenizer_model_max_length", "tokenizer_padding_side", "model_type",
                  "architectures", "transformers_version", "_name_or_path", "mm_patch_merge_type"}


class ConvertError(LlavaError):
    """The source cannot be converted; the message says why and what to do."""


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
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        raise ConvertError(f"'{folder}' has no config.json: give the folder of a downloaded LLaVA checkpoint")
    with open(config_path) as f:
        raw = json.load(f)
    model_type = raw.get("model_type", "")
    try:
        files = checkpoint_files(folder)
    except WeightsError as error:
        raise ConvertError(str(error)) from None
    if "text_config" in raw and "vision_config" in raw:
        if model_type not in ("llava", "llava_next"):
            raise ConvertError(f"'{folder}' is a {model_type!r} checkpoint; only llava and llava_next "
                               "(LlavaForConditionalGeneration, LlavaNextForConditionalGeneration) and original "
                               "LLaVA checkpoints can be converted")
        text = dict(raw["text_config"])
        llm_type = text.get("model_type", "llama")
        if llm_type not in CAUSAL_LM:
            raise ConvertError(f"the language model of '{folder}' is {llm_type!r}; supported: llama, mistral")
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


def classify(source: Source, key: str) -> tuple[str, str]:
    """('llm', new name) | ('projector', key) | ('vision', key) for one source tensor name."""
    if source.kind == "original":
        if key.startswith("model.vision_resampler."):
            return "unknown", key  # resampler variants: not a pipeline here
        if key in IMAGE_NEWLINE_KEYS or key.startswith(("model.mm_projector.", "mm_projector.")):
            return "projector", key
        if key.startswith(("model.vision_tower.", "vision_tower.")):
            return "vision", key
        if key.startswith(("model.", "lm_head.")):
            return "llm", key
        return "unknown", key
    if key in IMAGE_NEWLINE_KEYS:
        return "projector", key
    for prefix in ("model.multi_modal_projector.", "multi_modal_projector."):
        if key.startswith(prefix):
            return "projector", key
    for prefix in ("model.vision_tower.", "vision_tower."):
        if key.startswith(prefix):
            return "vision", key
    for old, new in (("model.language_model.", "model."), ("language_model.model.", "model."),
                     ("language_model.lm_head.", "lm_head."), ("lm_head.", "lm_head.")):
        if key.startswith(old):
            return "llm", new + key[len(old):]
    return "unknown", key


def load_tokenizer(folder: str):
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(folder)
    except Exception as error:
        raise ConvertError(f"could not load the tokenizer of '{folder}' ({type(error).__name__}: "
                           f"{str(error).splitlines()[0] if str(error) else ''}); copy the tokenizer files of the "
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


# ---------------------------------------------------------------- checks


def check(source: Source, pipeline: Pipeline, projector: dict, newline, tokenizer) -> None:
    """The checkpoint and the pipeline belong together, or one error saying what to do."""
    fix = f"pass --pipeline with the right one of: {', '.join(PIPELINES)}"
    found_type = projector_type_of(projector)
    if found_type != pipeline.projector_type:
        raise ConvertError(f"the checkpoint's projector is {found_type} but pipeline {pipeline.name} uses "
                           f"{pipeline.projector_type}; {fix}")
    projector_in, projector_out = projector_io(projector)
    hidden = source.text.get("hidden_size")
    if hidden is not None and projector_out != hidden:
        raise ConvertError(f"the projector gives {projector_out}-wide features but the language model is {hidden} "
                           f"wide: the checkpoint is inconsistent (pipeline {pipeline.name})")
    layer = source.raw.get("vision_feature_layer" if source.kind == "llava-hf" else "mm_vision_select_layer", -2)
    if layer != pipeline.vision_feature_layer:
        raise ConvertError(f"the checkpoint takes vision features from layer {layer} but pipeline {pipeline.name} "
                           f"uses layer {pipeline.vision_feature_layer}; {fix}")
    strategy = source.raw.get("vision_feature_select_strategy" if source.kind == "llava-hf"
                              else "mm_vision_select_feature", "default")
    keeps_cls = strategy in ("full", "cls_patch")
    if keeps_cls != pipeline.keeps_cls:
        raise ConvertError(f"the checkpoint {'keeps' if keeps_cls else 'drops'} the CLS feature (select strategy "
                           f"{strategy!r}) but pipeline {pipeline.name} {'keeps' if pipeline.keeps_cls else 'drops'} "
                           f"it; {fix}")
    if pipeline.anyres and newline is None:
        raise ConvertError(f"pipeline {pipeline.name} tiles pictures (LLaVA-1.6), but the checkpoint has no "
                           f"image_newline tensor; {fix}")
    if newline is not None and not pipeline.anyres:
        raise ConvertError(f"the checkpoint is a LLaVA-1.6 one (it has an image_newline tensor) but pipeline "
                           f"{pipeline.name} does not tile pictures; {fix}")
    if newline is not None and tuple(newline.shape) != (projector_out,):
        raise ConvertError(f"the checkpoint's image_newline has shape {tuple(newline.shape)}; the projector gives "
                           f"{projector_out}-wide features")
    if source.kind == "llava-hf":
        act = source.raw.get("projector_hidden_act", "gelu")
        if act not in ("gelu", "linear", "identity"):
            raise ConvertError(f"the checkpoint's projector uses the activation {act!r}; pipeline {pipeline.name} "
                               "(like every LLaVA release) uses exact GELU; it cannot be converted faithfully")
        width = source.vision.get("hidden_size")
        grid = (source.vision.get("image_size", 224) // source.vision.get("patch_size", 14)) ** 2
        if width is not None and projector_in != width:
            raise ConvertError(f"the projector takes {projector_in}-wide features but the vision tower gives {width}: "
                               f"the checkpoint is inconsistent (pipeline {pipeline.name})")
        if grid != pipeline.feature_count:
            raise ConvertError(f"the checkpoint's vision tower gives {grid} features per image but pipeline "
                               f"{pipeline.name} has {pipeline.feature_count} image slots; {fix}")
        index = source.raw.get("image_token_index", source.raw.get("image_token_id"))
        if index is not None and index < len(tokenizer):
            token = tokenizer.convert_ids_to_tokens(index)
            if token != pipeline.image_token:
                raise ConvertError(f"the checkpoint puts image features at token {index} ({token!r}) but pipeline "
                                   f"{pipeline.name} uses {pipeline.image_token!r}; {fix}")
    else:
        width = source.raw.get("mm_hidden_size")
        if width is not None and projector_in != width:
            raise ConvertError(f"the projector takes {projector_in}-wide features but mm_hidden_size is {width}: "
                               f"the checkpoint is inconsistent (pipeline {pipeline.name})")
        start_end = bool(source.raw.get("mm_use_im_start_end", False))
        if "mm_use_im_start_end" in source.raw and start_end != (pipeline.start_token is not None):
            raise ConvertError(f"the checkpoint {'uses' if start_end else 'does not use'} image start/end tokens but "
                               f"pipeline {pipeline.name} {'does not' if start_end else 'does'}; {fix}")


# ---------------------------------------------------------------- writing


def convert(src: str, dst: str, pipeline: str = "auto", log=print) -> dict:
    """Convert ``src`` into the new folder ``dst``; returns what was written (also logged)."""
    src, dst = os.path.abspath(src), os.path.abspath(dst)
    if os.path.isdir(dst) and os.listdir(dst):
        raise ConvertError(f"'{dst}' already exists and is not empty; give a new folder (nothing was overwritten)")
    if os.path.exists(dst) and not os.path.isdir(dst):
        raise ConvertError(f"'{dst}' exists and is not a folder; give a new folder")
    source = read_source(src)
    tokenizer = load_tokenizer(src)
    chosen = choose(source, tokenizer, pipeline)
    created = not os.path.exists(dst)
    os.makedirs(dst, exist_ok=True)
    try:
        return _write(source, chosen, tokenizer, dst, log)
    except BaseException:
        if created:
            shutil.rmtree(dst, ignore_errors=True)
        else:  # it was an empty folder: leave it empty again
            for name in os.listdir(dst):
                path = os.path.join(dst, name)
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        raise


@dataclass
class _Vocabulary:
    """The image tokens the converter added to the tokenizer, and what that did to the vocabulary."""

    added: list[str]
    added_ids: list[int]
    known: int  # tokens before the addition
    old_size: int
    new_size: int

    @property
    def resizes(self) -> bool:
        return bool(self.added) or self.new_size != self.old_size


@dataclass
class _Shards:
    """The language model's tensors as written: temporary shard names with their tensor names."""

    parts: list[tuple[str, list[str]]] = field(default_factory=list)
    total_bytes: int = 0
    vision_state: dict = field(default_factory=dict)  # llava-hf tower tensors, for the tower folder
    dropped_vision: int = 0  # an original checkpoint's tower tensors (its tower is loaded by name)

    @property
    def names(self) -> list[str]:
        return [k for _, keys in self.parts for k in keys]


def _write(source: Source, pipeline: Pipeline, tokenizer, dst: str, log) -> dict:
    # the projector first: it is small, and the checks need it before anything big is written
    projector, newline = split_image_newline(_read_projector(source))
    projector = projector_state(source, projector)
    check(source, pipeline, projector, newline, tokenizer)
    vocabulary = _add_image_tokens(source, pipeline, tokenizer)
    shards = _copy_language_model(source, dst, vocabulary)
    written = _name_shards(dst, shards)
    written += _write_config_and_tokenizer(source, tokenizer, vocabulary, dst)
    written += _write_projector(projector, newline, dst)
    if source.kind == "llava-hf":
        vision_tower = VISION_FOLDER
        _write_vision_tower(source, shards.vision_state, os.path.join(dst, VISION_FOLDER))
        written.append(f"{VISION_FOLDER}/")
    else:
        vision_tower = source.raw.get("mm_vision_tower") or pipeline.vision_repo
    shards.vision_state.clear()
    named = PIPELINES.get(pipeline.name) == pipeline
    metadata = {"pipeline": pipeline.name if named else pipeline.to_json(), "vision_tower": vision_tower, "projector": PROJECTOR_FILE,
                "image_token": pipeline.image_token, "source": os.path.basename(source.folder),
                "source_format": source.kind, "added_tokens": vocabulary.added}
    with open(os.path.join(dst, METADATA_FILE), "w") as f:
        json.dump(metadata, f, indent=2)
    written.append(METADATA_FILE)
    _report(source, pipeline, projector, vocabulary, shards, vision_tower, written, dst, log)
    return {"pipeline": pipeline.name, "written": written,
            "added_tokens": dict(zip(vocabulary.added, vocabulary.added_ids)), "vocab_size": vocabulary.new_size,
            "vision_tower": vision_tower, "tensors": len(shards.names), "shards": len(shards.parts)}


def _add_image_tokens(source: Source, pipeline: Pipeline, tokenizer) -> _Vocabulary:
    """Image tokens the tokenizer lacks are added after its vocabulary."""
    from tokenizers import AddedToken
    known = len(tokenizer)
    missing = [t for t in pipeline.special_tokens if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
    old_size = int(source.text.get("vocab_size") or known)
    return _Vocabulary(missing, [tokenizer.convert_tokens_to_ids(t) for t in missing], known, old_size,
                       max(old_size, len(tokenizer)))


def _copy_language_model(source: Source, dst: str, vocabulary: _Vocabulary) -> _Shards:
    """The language model's tensors, one source file at a time, into temporary shards; embedding rows for
    the added tokens; the tower tensors kept (llava-hf) or counted out (original)."""
    from safetensors.torch import save_file
    shards = _Shards()
    unknown: list[str] = []
    resized: list[str] = []
    for number, name in enumerate(source.weight_files):
        out: dict = {}
        for key, tensor in iter_tensors(os.path.join(source.folder, name)):
            kind, new_key = classify(source, key)
            if kind == "llm":
                if new_key in ("model.embed_tokens.weight", "lm_head.weight") and vocabulary.resizes:
                    tensor = _with_rows(tensor, vocabulary.known, vocabulary.new_size, vocabulary.added_ids)
                    resized.append(new_key)
                out[new_key] = tensor.contiguous()
            elif kind == "vision":
                if source.kind == "llava-hf":
                    shards.vision_state[key] = tensor
                else:
                    shards.dropped_vision += 1
            elif kind == "unknown":
                unknown.append(key)
        if unknown:
            raise ConvertError(f"'{name}' holds tensors the converter does not know, e.g. {unknown[:3]}; "
                               "is this another kind of multimodal checkpoint? LLaVA v0, llama-2, v1.5, v1.6 and "
                               "BakLLaVA checkpoints are supported")
        if out:
            temporary = f"part-{number:05d}.safetensors"
            save_file(out, os.path.join(dst, temporary), metadata={"format": "pt"})
            shards.total_bytes += sum(t.numel() * t.element_size() for t in out.values())
            shards.parts.append((temporary, list(out)))
        del out
    names = shards.names
    if "model.embed_tokens.weight" not in names:
        raise ConvertError(f"no language model weights found in '{source.folder}' (no model.embed_tokens.weight)")
    if "lm_head.weight" not in names and not source.text.get("tie_word_embeddings", False):
        raise ConvertError(f"'{source.folder}' has no lm_head.weight and does not tie it to the embeddings")
    if vocabulary.resizes and len(resized) < 1 + ("lm_head.weight" in names):
        raise ConvertError("could not resize the embeddings for the added image tokens")
    return shards


def _name_shards(dst: str, shards: _Shards) -> list[str]:
    """Final shard names, and the index when there is more than one."""
    if len(shards.parts) == 1:
        os.replace(os.path.join(dst, shards.parts[0][0]), os.path.join(dst, "model.safetensors"))
        return ["model.safetensors"]
    written, weight_map = [], {}
    for i, (temporary, keys) in enumerate(shards.parts, 1):
        final = f"model-{i:05d}-of-{len(shards.parts):05d}.safetensors"
        os.replace(os.path.join(dst, temporary), os.path.join(dst, final))
        weight_map.update({k: final for k in keys})
        written.append(final)
    with open(os.path.join(dst, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": shards.total_bytes}, "weight_map": weight_map}, f, indent=2)
    return written + ["model.safetensors.index.json"]


def _write_config_and_tokenizer(source: Source, tokenizer, vocabulary: _Vocabulary, dst: str) -> list[str]:
    written = []
    _llm_config(source, vocabulary.new_size).save_pretrained(dst)
    written.append("config.json")
    if os.path.isfile(os.path.join(source.folder, "generation_config.json")):
        shutil.copyfile(os.path.join(source.folder, "generation_config.json"), os.path.join(dst, "generation_config.json"))
        written.append("generation_config.json")
    # the folder holds a causal LM, not a LLaVA processor
    tokenizer.init_kwargs.pop("processor_class", None)
    if getattr(tokenizer, "_processor_class", None) is not None:
        tokenizer._processor_class = None
    tokenizer.save_pretrained(dst)
    return written + ["tokenizer files"]


def _write_projector(projector: dict, newline, dst: str) -> list[str]:
    from safetensors.torch import save_file
    prefixed = {f"model.mm_projector.{k}": v.contiguous() for k, v in projector.items()}
    if newline is not None:
        prefixed[IMAGE_NEWLINE_KEYS[0]] = newline.contiguous()
    save_file(prefixed, os.path.join(dst, PROJECTOR_FILE), metadata={"format": "pt"})
    return [PROJECTOR_FILE]


def _report(source: Source, pipeline: Pipeline, projector: dict, vocabulary: _Vocabulary, shards: _Shards,
            vision_tower: str, written: list[str], dst: str, log) -> None:
    projector_in, projector_out = projector_io(projector)
    vocab = f"vocabulary {vocabulary.old_size}" + (f" → {vocabulary.new_size}" if vocabulary.new_size != vocabulary.old_size
                                                  else "")
    lines = [f"converted {source.kind} checkpoint '{source.folder}' → '{dst}'",
             f"  pipeline: {pipeline.name}",
             f"  language model: {CAUSAL_LM[source.llm_type]}, {len(shards.names)} tensors in {len(shards.parts)} "
             f"shard(s), {vocab}",
             f"  projector: {projector_type_of(projector)} {projector_in}→{projector_out} in {PROJECTOR_FILE}",
             f"  vision tower: {vision_tower}"]
    if vocabulary.added:
        lines.append(f"  added token(s) {', '.join(f'{t}={i}' for t, i in zip(vocabulary.added, vocabulary.added_ids))} "
                     "(embedding and lm_head rows: the mean of the existing rows)")
    if shards.dropped_vision:
        lines.append(f"  left out {shards.dropped_vision} vision tower tensor(s) of the checkpoint: the tower is loaded "
                     f"from '{vision_tower}'")
    lines.append(f"  wrote: {', '.join(written)}")
    for line in lines:
        log(line)


def _read_projector(source: Source) -> dict:
    """The projector's tensors: only those are read, only from the files that hold them."""
    try:
        state, _ = read_projector_tensors(source.folder, wanted=lambda key: classify(source, key)[0] == "projector")
    except WeightsError as error:
        raise ConvertError(str(error)) from None
    return state


def _with_rows(tensor: torch.Tensor, known: int, rows: int, new_ids: list[int]) -> torch.Tensor:
    """``tensor`` with ``rows`` rows; rows for the new tokens are the mean of the known tokens' rows."""
    mean = tensor[:min(known, tensor.shape[0])].double().mean(0).to(tensor.dtype)
    if rows > tensor.shape[0]:
        tensor = torch.cat([tensor, mean.expand(rows - tensor.shape[0], -1)])
    else:
        tensor = tensor.clone()
    for i in new_ids:
        tensor[i] = mean
    return tensor


def _llm_config(source: Source, vocab_size: int):
    from transformers import LlamaConfig, MistralConfig
    config_class = {"llama": LlamaConfig, "mistral": MistralConfig}[source.llm_type]
    values = {k: v for k, v in source.text.items() if k not in ("model_type", "architectures", "transformers_version",
                                                                 "_name_or_path")}
    dtype = values.pop("torch_dtype", None) or values.pop("dtype", None) or source.raw.get("dtype") \
        or source.raw.get("torch_dtype")
    values["vocab_size"] = vocab_size
    config = config_class(**values)
    config.architectures = [CAUSAL_LM[source.llm_type]]
    if dtype:
        config.dtype = dtype
    return config


def _write_vision_tower(source: Source, state: dict, folder: str) -> None:
    model = clip_vision_from_state(source.vision, state, f"the llava-hf checkpoint '{source.folder}'")
    dtype = next(iter(state.values())).dtype if state else torch.float32
    with quiet_transformers():
        model.to(dtype).save_pretrained(folder)
    try:
        processor = load_image_processor(source.folder)
    except WeightsError as error:
        raise ConvertError(str(error)) from None
    processor.save_pretrained(folder)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m extensions.llava convert",
                                     description="Turn an original or llava-hf LLaVA checkpoint into a folder the "
                                                 "webui's Transformers loader loads, with the projector, the vision "
                                                 "tower (or its repo id) and a llava.json that picks the pipeline.")
    parser.add_argument("src", help="the checkpoint folder (original LLaVA or llava-hf)")
    parser.add_argument("dst", help="a new folder (it must not exist or be empty), e.g. models/NAME")
    parser.add_argument("--pipeline", default="auto",
                        help=f"auto (default: detected from the checkpoint) or one of: {', '.join(PIPELINES)}")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        convert(args.src, args.dst, args.pipeline)
    except LlavaError as error:
        print(f"llava convert: {error}", file=sys.stderr)
        return 1
    return 0
