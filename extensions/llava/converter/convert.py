"""``python -m extensions.llava convert SRC DST``: a LLaVA checkpoint → a folder the webui loads.

SRC is an original LLaVA checkpoint or a llava-hf one (see ``checkpoint``, which reads it).

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

import torch

from .checkpoint import (CAUSAL_LM, ConvertError, Source, choose, classify, load_tokenizer, parts_of, projector_io,
                         projector_state, read_projector, read_source)
from ..errors import LlavaError, first_line
from ..vision.checkpoint_rules import check
from ..families.pipelines import PIPELINES, Pipeline
from ..families.recognise import METADATA_FILE
from ..vision.processors import load_image_processor
from ..vision.projector import projector_type_of, split_image_newline
from ..vision.tower_kinds import TOWER_KINDS, tower_kind_of
from ..vision.towers import save_tower
from ..vision.weights import IMAGE_NEWLINE_KEYS, LazyTensor, WeightsError, lazy_tensors, write_safetensors

PROJECTOR_FILE = "mm_projector.safetensors"
VISION_FOLDER = "vision_tower"
# Qwen2's turns (LLaVA-OneVision and llava-interleave), for a converted folder whose tokenizer brings no
# template the webui can render
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


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
    projector, newline = split_image_newline(read_projector(source))
    projector = projector_state(source, projector)
    fix = f"pass --pipeline with the right one of: {', '.join(PIPELINES)}"
    check(parts_of(source, projector, newline, tokenizer), pipeline,
          {"parts": "the checkpoint is inconsistent", "pipeline": fix}, ConvertError)
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
    """The language model's tensors, one source file at a time and within it one tensor at a time, into
    temporary shards (so memory holds about one tensor, whatever the checkpoint's size); embedding rows
    for the added tokens; the tower tensors kept (llava-hf) or counted out (original)."""
    from huggingface_hub.utils import tqdm
    shards = _Shards()
    resized: list[str] = []
    for number, name in enumerate(tqdm(source.weight_files, desc="llava convert: language model shards",
                                       unit="shard")):
        with lazy_tensors(os.path.join(source.folder, name)) as tensors:
            planned = _plan_shard(source, name, tensors, vocabulary, shards, resized)
            if planned:
                temporary = f"part-{number:05d}.safetensors"
                shards.total_bytes += write_safetensors(os.path.join(dst, temporary), planned, {"format": "pt"})
                shards.parts.append((temporary, [tensor.name for tensor in planned]))
    names = shards.names
    if "model.embed_tokens.weight" not in names:
        raise ConvertError(f"no language model weights found in '{source.folder}' (no model.embed_tokens.weight)")
    if "lm_head.weight" not in names and not source.text.get("tie_word_embeddings", False):
        raise ConvertError(f"'{source.folder}' has no lm_head.weight and does not tie it to the embeddings")
    if vocabulary.resizes and len(resized) < 1 + ("lm_head.weight" in names):
        raise ConvertError("could not resize the embeddings for the added image tokens")
    return shards


def _plan_shard(source: Source, name: str, tensors: list[LazyTensor], vocabulary: _Vocabulary, shards: _Shards,
                resized: list[str]) -> list[LazyTensor]:
    """The language model's tensors of one source file under their new names (read when written);
    the tower's tensors go to ``shards``; a tensor of unknown kind is refused."""
    planned, unknown = [], []
    for tensor in tensors:
        kind, new_key = classify(source, tensor.name)
        if kind == "llm" and new_key in ("model.embed_tokens.weight", "lm_head.weight") and vocabulary.resizes:
            rows = max(vocabulary.new_size, tensor.shape[0])
            planned.append(LazyTensor(new_key, tensor.dtype, (rows, *tensor.shape[1:]),
                                      lambda tensor=tensor: _with_rows(tensor.load(), vocabulary)))
            resized.append(new_key)
        elif kind == "llm":
            planned.append(LazyTensor(new_key, tensor.dtype, tensor.shape, tensor.load))
        elif kind == "vision" and source.kind == "llava-hf":
            shards.vision_state[tensor.name] = tensor.load()
        elif kind == "vision":
            shards.dropped_vision += 1
        elif kind == "unknown":
            unknown.append(tensor.name)
    if unknown:
        raise ConvertError(f"'{name}' holds tensors the converter does not know, e.g. {unknown[:3]}; "
                           "is this another kind of multimodal checkpoint? LLaVA v0, llama-2, v1.5, v1.6 and "
                           "BakLLaVA checkpoints are supported")
    return planned


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
    if source.llm_type == "qwen2" and not _renders_plain_messages(tokenizer):
        tokenizer.chat_template = CHATML
        written.append("ChatML chat template")
    tokenizer.save_pretrained(dst)
    return written + ["tokenizer files"]


def _renders_plain_messages(tokenizer) -> bool:
    """Whether the tokenizer's chat template renders the webui's messages (text contents), as a plain
    language model's does; a LLaVA processor's template expects lists of parts."""
    try:
        shown = tokenizer.apply_chat_template([{"role": "user", "content": "Is it shown?"}], tokenize=False,
                                              add_generation_prompt=True)
    except Exception:
        return False
    return "Is it shown?" in shown


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
             f"  pipeline: {_pipeline_label(pipeline)}",
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


def _pipeline_label(pipeline: Pipeline) -> str:
    """A named pipeline by its name; one read from the checkpoint's config says so (its name is only the
    folder's, not one that ``--pipeline`` or ``llava-pipeline`` takes)."""
    if PIPELINES.get(pipeline.name) == pipeline:
        return pipeline.name
    return f"read from the checkpoint's config (family {pipeline.family})"


def _with_rows(tensor: torch.Tensor, vocabulary: _Vocabulary) -> torch.Tensor:
    """``tensor`` with a row per token of the new vocabulary; rows for the added tokens are the mean of
    the known tokens' rows."""
    mean = tensor[:min(vocabulary.known, tensor.shape[0])].double().mean(0).to(tensor.dtype)
    if vocabulary.new_size > tensor.shape[0]:
        tensor = torch.cat([tensor, mean.expand(vocabulary.new_size - tensor.shape[0], -1)])
    else:
        tensor = tensor.clone()
    for i in vocabulary.added_ids:
        tensor[i] = mean
    return tensor


def _llm_config(source: Source, vocab_size: int):
    import transformers
    config_class = getattr(transformers, CAUSAL_LM[source.llm_type].replace("ForCausalLM", "Config"))
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
    kind = TOWER_KINDS[tower_kind_of(source.vision)]
    try:
        processor = load_image_processor(source.folder, kind.processor_class)
    except WeightsError as error:
        raise ConvertError(str(error)) from None
    save_tower(folder, source.vision, state, processor, f"the llava-hf checkpoint '{source.folder}'")


def main(argv=None, prog: str = "python -m extensions.llava convert") -> int:
    parser = argparse.ArgumentParser(prog=prog, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                     description="Turn an original or llava-hf LLaVA checkpoint into a folder the "
                                                 "webui's Transformers loader loads, with the projector, the vision "
                                                 "tower (or its repo id) and a llava.json that picks the pipeline.")
    parser.add_argument("src", help="the checkpoint folder (original LLaVA or llava-hf)")
    parser.add_argument("dst", help="a new folder (it must not exist or be empty), e.g. user_data/models/NAME")
    parser.add_argument("--pipeline", default="auto", metavar="NAME",
                        help=f"auto (read from the checkpoint's config) or one of: {', '.join(PIPELINES)}")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        convert(args.src, args.dst, args.pipeline)
    except LlavaError as error:
        print(f"llava convert: {error}", file=sys.stderr)
        return 1
    except Exception as error:  # a checkpoint no check foresaw: one line, as for the refusals above
        print(f"llava convert: the checkpoint could not be converted ({type(error).__name__}: {first_line(error)})",
              file=sys.stderr)
        return 1
    return 0
