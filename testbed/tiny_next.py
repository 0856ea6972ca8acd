"""A tiny LLaVA-NeXT (1.6) at real geometry: 336 px views of 14 px patches (576 features each),
the released canvases, an mlp2x_gelu projector and a learned image_newline; widths are tiny.

It is transformers' ``LlavaNextForConditionalGeneration`` (the reference), saved as a llava-hf
checkpoint or in the original LLaVA layout, for the converter and the extension to read.
"""

from __future__ import annotations

import functools
import json
import os

import torch
from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

from extensions.llava.families.pipelines import PIPELINES
from testbed.tiny import (CLIP_MEAN, CLIP_STD, LLM_WIDTH, llama_config, make_tokenizer, vision_config, with_random_newline,
                         write_processor)
from testbed.tiny_family import IMAGE_ID, save_original

PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
PIPELINE = PIPELINES["llava-v1.6-vicuna-7b"]  # the named pipeline with the tiny model's vision side

# (width, height): different canvases, a picture smaller than a tile, a very wide one
SIZES = {"wide": (500, 300), "tall": (300, 520), "square": (900, 880), "small": (200, 150),
         "very-wide": (2400, 200), "ceil-resize": (700, 300)}


def build_next(seed: int = 51, mistral: bool = False, width: int = LLM_WIDTH,
               layers: int = 2) -> tuple[LlavaNextForConditionalGeneration, object]:
    """The reference model with random weights (a non-zero image_newline), and its tokenizer; with
    ``mistral`` its language model is a Mistral, as in llava-v1.6-mistral-7b-hf; the language model
    ``layers`` deep and ``width`` wide."""
    tokenizer = make_tokenizer(image_tokens=("<image>",))
    text = llama_config(len(tokenizer), width, layers).to_dict()
    if mistral:
        from transformers import MistralConfig
        keep = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings", "bos_token_id", "eos_token_id", "pad_token_id")
        text = MistralConfig(**{k: text[k] for k in keep}, rope_theta=1e6, sliding_window=None).to_dict()
    config = LlavaNextConfig(vision_config=vision_config(336).to_dict(), text_config=text, image_token_index=IMAGE_ID,
                             vision_feature_layer=-2, vision_feature_select_strategy="default",
                             projector_hidden_act="gelu", image_grid_pinpoints=PINPOINTS)
    torch.manual_seed(seed)
    return with_random_newline(LlavaNextForConditionalGeneration(config).eval()), tokenizer


def image_processor():
    """transformers' PIL LLaVA-NeXT processor with CLIP ViT-L/14-336's settings (the reference's pixels)."""
    from transformers import LlavaNextImageProcessorPil
    return LlavaNextImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                      image_mean=CLIP_MEAN, image_std=CLIP_STD, image_grid_pinpoints=PINPOINTS)


def processor(tokenizer):
    from transformers import LlavaNextProcessor
    return LlavaNextProcessor(image_processor=image_processor(), tokenizer=tokenizer, patch_size=14,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1)


@functools.lru_cache(maxsize=1)
def _reference_processor():
    return processor(make_tokenizer(image_tokens=("<image>",)))


def reference_slot_count(width: int, height: int) -> int:
    """The image tokens transformers' LlavaNextProcessor gives a picture of this size."""
    # its private helper: the public way (processing a picture of each size) is too slow for thousands of sizes
    return _reference_processor()._get_number_of_features(height, width, 336, 336) - 1  # "default" drops CLS


def save_next_hf(folder: str, reference, tokenizer) -> str:
    """``reference`` as a llava-hf ``llava-v1.6-*-hf`` checkpoint (sharded, with its processor)."""
    reference.save_pretrained(folder, max_shard_size="2MB")
    tokenizer.save_pretrained(folder)
    processor(tokenizer).save_pretrained(folder)
    return folder


def save_next_original(folder: str, reference, tokenizer, vision_tower: str) -> str:
    """``reference`` in the original LLaVA-1.6 layout: the LLM, model.mm_projector.*, model.image_newline
    and a config with mm_* keys, image_aspect_ratio anyres and the pinpoints; the tower by name."""
    from transformers import LlamaForCausalLM
    llm = LlamaForCausalLM(reference.config.text_config).eval()
    llm.model.load_state_dict(reference.model.language_model.state_dict())
    llm.lm_head.load_state_dict(reference.lm_head.state_dict())
    projector = reference.model.multi_modal_projector
    state = {"model.mm_projector.0.weight": projector.linear_1.weight, "model.mm_projector.0.bias": projector.linear_1.bias,
             "model.mm_projector.2.weight": projector.linear_2.weight, "model.mm_projector.2.bias": projector.linear_2.bias,
             "model.image_newline": reference.model.image_newline}
    save_original(folder, llm, {k: v.detach().clone() for k, v in state.items()}, tokenizer, vision_tower,
                  projector_type="mlp2x_gelu", start_end=False, fmt="safetensors", shards=2)
    path = os.path.join(folder, "config.json")
    config = json.load(open(path))
    config.update(image_aspect_ratio="anyres", image_grid_pinpoints=PINPOINTS, mm_patch_merge_type="spatial_unpad")
    with open(path, "w") as f:
        json.dump(config, f, indent=2)
    return folder


def save_tower(folder: str, reference) -> str:
    """The reference's vision tower as a CLIP vision checkpoint with its processor config (for the
    original layout, which names its tower)."""
    from transformers import CLIPVisionModel
    tower = CLIPVisionModel(reference.config.vision_config)
    tower.load_state_dict(reference.model.vision_tower.state_dict())
    tower.save_pretrained(folder)
    write_processor(folder, 336)
    return folder
