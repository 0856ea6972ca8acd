"""Tiny stand-ins of the LLaVA family for the tests: v1.5 in memory, and checkpoints on disk
in the original and the llava-hf layouts.

Geometry is real (336 px / patch 14 → 576 features, mlp2x_gelu); widths are tiny.
"""

from __future__ import annotations

import json
import os
import shutil

import torch
from transformers import LlamaForCausalLM, LlavaForConditionalGeneration

from testbed.tiny import (LLM_WIDTH, VISION_WIDTH, TinyLlava, llama_config, make_llm, make_tokenizer,
                        reference_llava, save_clip, save_projector)

IMAGE_ID = 32000  # <image> right after the LLaMA vocabulary


def build_v15(folder: str, width: int = LLM_WIDTH, layers: int = 2) -> TinyLlava:
    """A v1.5 model: 336 px CLIP (named like the real one), mlp2x_gelu projector, <image> = 32000; its
    language model ``layers`` deep and ``width`` wide."""
    clip_dir = os.path.join(folder, "clip-vit-large-patch14-336")
    projector_dir = os.path.join(folder, "projector")
    save_clip(clip_dir, 336, seed=11)
    state = save_projector(os.path.join(projector_dir, "mm_projector.bin"), "mlp2x_gelu", seed=12, out_width=width)
    tokenizer = make_tokenizer(image_tokens=("<image>",))
    llm = make_llm(len(tokenizer), seed=13, width=width, layers=layers)
    return TinyLlava(folder, clip_dir, projector_dir, tokenizer, llm, state, "llava-v1.5-7b")


def reference_v15(v15: TinyLlava) -> LlavaForConditionalGeneration:
    return reference_llava(v15.clip_dir, v15.llm, v15.projector_state, IMAGE_ID, projector_type="mlp2x_gelu")


def llava_mean_colour(image_mean) -> tuple[int, ...]:
    """How LLaVA turns the processor's mean into a fill colour: int(), which truncates."""
    return tuple(int(x * 255) for x in image_mean)


# ---------------------------------------------------------------- llava-hf on disk

# transformers 5.x module paths ↔ the older flat layout, for the parts of LlavaForConditionalGeneration
_NEW_TO_OLD = (("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
               ("model.vision_tower.", "vision_tower."), ("model.multi_modal_projector.", "multi_modal_projector."))


def _renamed(key: str, prefixes) -> str:
    """``key`` with the first of its (from, to) ``prefixes`` that it starts with replaced."""
    for before, after in prefixes:
        if key.startswith(before):
            return after + key[len(before):]
    return key


def _to_new(key: str) -> str:
    return _renamed(key, [(old, new) for new, old in _NEW_TO_OLD])


def _to_old(key: str) -> str:
    """The names of llava-hf checkpoints saved with transformers 4.x (the tower nested in vision_model)."""
    key = _to_new(key)
    if not key.startswith("model.vision_tower.vision_model."):
        key = _renamed(key, [("model.vision_tower.", "model.vision_tower.vision_model.")])
    return _renamed(key, _NEW_TO_OLD)


def rewrite_keys(folder: str, rename) -> None:
    """Rename every tensor of a safetensors checkpoint on disk (and its index)."""
    from safetensors.torch import load_file, save_file
    index_path = os.path.join(folder, "model.safetensors.index.json")
    files = sorted(set(json.load(open(index_path))["weight_map"].values())) if os.path.isfile(index_path) \
        else ["model.safetensors"]
    weight_map = {}
    for name in files:
        path = os.path.join(folder, name)
        state = {rename(k): v for k, v in load_file(path).items()}
        save_file(state, path, metadata={"format": "pt"})
        weight_map.update({k: name for k in state})
    if os.path.isfile(index_path):
        index = json.load(open(index_path))
        index["weight_map"] = weight_map
        with open(index_path, "w") as f:
            json.dump(index, f)


def save_llava_hf(folder: str, reference: LlavaForConditionalGeneration, tokenizer, clip_dir: str,
                  style: str = "new", max_shard_size: str | None = "2MB") -> str:
    """``reference`` saved as a llava-hf checkpoint.

    style "new": transformers 5.x names (model.language_model.*, lm_head.*) and processor_config.json;
    style "old": the earlier names (language_model.model.*, language_model.lm_head.*, vision_tower.*)
    and a preprocessor_config.json.
    """
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    reference.save_pretrained(folder, **kwargs)
    rewrite_keys(folder, _to_new if style == "new" else _to_old)
    tokenizer.save_pretrained(folder)
    if style == "new":
        from transformers import LlavaProcessor
        from extensions.llava.vision.processors import load_image_processor
        processor = LlavaProcessor(image_processor=load_image_processor(clip_dir), tokenizer=tokenizer,
                                   patch_size=14, vision_feature_select_strategy="default")
        processor.save_pretrained(folder)
    else:
        shutil.copyfile(os.path.join(clip_dir, "preprocessor_config.json"),
                        os.path.join(folder, "preprocessor_config.json"))
    return folder


# ---------------------------------------------------------------- original LLaVA on disk


def save_original(folder: str, llm: LlamaForCausalLM, projector_state: dict, tokenizer, vision_tower: str, *,
                  projector_type: str, start_end: bool, fmt: str = "bin", shards: int = 2,
                  model_type: str = "llava_llama") -> str:
    """An original LLaVA checkpoint: the LLM's tensors plus model.mm_projector.*, in ``shards`` files."""
    os.makedirs(folder, exist_ok=True)
    config = llm.config.to_dict()
    config.update(model_type=model_type,
                  architectures=["LlavaMistralForCausalLM" if "mistral" in model_type else "LlavaLlamaForCausalLM"], mm_vision_tower=vision_tower,
                  mm_hidden_size=VISION_WIDTH, mm_projector_type=projector_type, mm_vision_select_layer=-2,
                  mm_vision_select_feature="patch", mm_use_im_start_end=start_end, mm_use_im_patch_token=start_end,
                  image_aspect_ratio="pad" if projector_type != "linear" else "square", use_mm_proj=True,
                  tune_mm_mlp_adapter=False, freeze_mm_mlp_adapter=False)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    state = {k: v.clone() for k, v in llm.state_dict().items()}
    state.update(projector_state)
    keys = list(state)
    groups = [keys[i::shards] for i in range(shards)]
    weight_map = {}
    suffix = "bin" if fmt == "bin" else "safetensors"
    stem = "pytorch_model" if fmt == "bin" else "model"
    for i, group in enumerate(groups, 1):
        name = f"{stem}-{i:05d}-of-{shards:05d}.{suffix}"
        part = {k: state[k].contiguous() for k in group}
        if fmt == "bin":
            torch.save(part, os.path.join(folder, name))
        else:
            from safetensors.torch import save_file
            save_file(part, os.path.join(folder, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in group})
    with open(os.path.join(folder, f"{stem}.{suffix}.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)
    tokenizer.save_pretrained(folder)
    return folder


def with_vocab(llm: LlamaForCausalLM, vocab_size: int) -> LlamaForCausalLM:
    """A copy of ``llm`` with zero rows appended to its embeddings and lm_head."""
    bigger = LlamaForCausalLM(llama_config(vocab_size, llm.config.hidden_size)).eval()
    state = {}
    for key, tensor in llm.state_dict().items():
        if key in ("model.embed_tokens.weight", "lm_head.weight") and tensor.shape[0] < vocab_size:
            tensor = torch.cat([tensor, tensor.new_zeros(vocab_size - tensor.shape[0], tensor.shape[1])])
        state[key] = tensor
    bigger.load_state_dict(state)
    return bigger
