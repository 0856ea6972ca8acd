"""Tiny LLaVA-OneVision and llava-interleave models at real geometry: a SigLIP tower of 384 px views in
14 px patches (729 features each, no CLS), OneVision's 36 canvases up to 2304 px with ``anyres_max_9``,
an mlp2x_gelu projector, a learned image_newline and a Qwen2 language model; widths are tiny.

They are transformers' ``LlavaOnevisionForConditionalGeneration`` and ``LlavaForConditionalGeneration``
(the references), saved as llava-hf checkpoints or in the original lmms-lab layout, with a Qwen2-style
tokenizer (no BOS, ChatML turns, ``<image>`` and ``<video>`` as added tokens).
"""

from __future__ import annotations

import functools
import json
import os

import torch
from tokenizers import AddedToken
from transformers import PreTrainedTokenizerFast, Qwen2Config, SiglipVisionConfig

from extensions.llava.converter.convert import CHATML
from testbed.tiny import byte_tokenizer, with_random_newline

SIGLIP_MEAN = SIGLIP_STD = [0.5, 0.5, 0.5]
PINPOINTS = [[384 * rows, 384 * columns] for rows in range(1, 7) for columns in range(1, 7)]
PINPOINTS_AS_WRITTEN = "(1x1),...,(6x6)"  # how lmms-lab's training scripts write them
VISION_WIDTH = 32
LLM_WIDTH = 64
# (width, height): one picture alone is tiled; a wide or large one is downsampled (anyres_max_9)
SIZES = {"square": (384, 384), "ceil-resize": (700, 300), "small": (200, 150), "full-hd": (1920, 1080),
         "largest": (2000, 2000), "floor-division": (1600, 1600), "just-under": (1536, 1000)}


def make_qwen_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level vocabulary with Qwen2's special tokens: no BOS, ``<|im_end|>`` ends a turn, and the
    image and video tokens after the vocabulary."""
    tokenizer = byte_tokenizer({"<unk>": 0}, "\n\t")
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token="<unk>", chat_template=CHATML)
    fast.add_tokens([AddedToken(t, special=True, normalized=False)
                     for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>")])
    return fast


def siglip_config(layers: int = 3) -> SiglipVisionConfig:
    return SiglipVisionConfig(hidden_size=VISION_WIDTH, intermediate_size=2 * VISION_WIDTH, num_hidden_layers=layers,
                              num_attention_heads=2, image_size=384, patch_size=14, vision_use_head=False)


def qwen2_config(vocab_size: int) -> Qwen2Config:
    return Qwen2Config(vocab_size=vocab_size, hidden_size=LLM_WIDTH, intermediate_size=2 * LLM_WIDTH,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32768,
                       tie_word_embeddings=False, use_sliding_window=False)


def build_onevision(seed: int = 61):
    """transformers' LlavaOnevisionForConditionalGeneration with random weights (a non-zero image_newline),
    and its tokenizer."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration
    tokenizer = make_qwen_tokenizer()
    config = LlavaOnevisionConfig(
        vision_config=siglip_config().to_dict(), text_config=qwen2_config(len(tokenizer)).to_dict(),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"), vision_feature_layer=-1,
        vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9", image_grid_pinpoints=PINPOINTS)
    torch.manual_seed(seed)
    return with_random_newline(LlavaOnevisionForConditionalGeneration(config).eval()), tokenizer


def build_interleave(seed: int = 62):
    """transformers' LlavaForConditionalGeneration with a SigLIP tower (llava-interleave), and its tokenizer."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration
    tokenizer = make_qwen_tokenizer()
    config = LlavaConfig(vision_config=siglip_config().to_dict(), text_config=qwen2_config(len(tokenizer)).to_dict(),
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-1,
                         vision_feature_select_strategy="full", projector_hidden_act="gelu")
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(config).eval(), tokenizer


def onevision_image_processor():
    """transformers' PIL OneVision image processor with SigLIP's settings (the reference's pixels)."""
    from transformers import LlavaOnevisionImageProcessorPil
    return LlavaOnevisionImageProcessorPil(size={"height": 384, "width": 384}, image_mean=SIGLIP_MEAN,
                                           image_std=SIGLIP_STD, resample=3, image_grid_pinpoints=PINPOINTS)


def onevision_processor(tokenizer):
    """transformers' LlavaOnevisionProcessor for pictures. Its video processor needs torchvision, which the
    webui's environment (and this one) lacks: pictures never use it, so it is left out."""
    from transformers import LlavaOnevisionProcessor

    class PicturesOnly(LlavaOnevisionProcessor):
        def check_argument_for_proper_class(self, name, argument):
            if not (name == "video_processor" and argument is None):
                super().check_argument_for_proper_class(name, argument)

    return PicturesOnly(image_processor=onevision_image_processor(), tokenizer=tokenizer, num_image_tokens=729,
                        vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9")


def interleave_processor(tokenizer):
    from transformers import LlavaProcessor, SiglipImageProcessorPil
    image_processor = SiglipImageProcessorPil(size={"height": 384, "width": 384}, image_mean=SIGLIP_MEAN,
                                              image_std=SIGLIP_STD, resample=3)
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                          vision_feature_select_strategy="full", num_additional_image_tokens=0)


@functools.lru_cache(maxsize=1)
def _reference_processor():
    return onevision_processor(make_qwen_tokenizer())


def reference_slot_count(width: int, height: int) -> int:
    """The image tokens transformers' LlavaOnevisionProcessor gives one picture of this size alone."""
    # its private helper: the public way (processing a picture of each size) is too slow for many sizes
    return _reference_processor()._get_number_of_features(height, width, 384, 384)


def save_hf(folder: str, reference, tokenizer, image_processor) -> str:
    """``reference`` as a llava-hf checkpoint (sharded), with its tokenizer and image processor."""
    reference.save_pretrained(folder, max_shard_size="2MB")
    tokenizer.save_pretrained(folder)
    image_processor.save_pretrained(folder)
    return folder


def save_siglip_tower(folder: str, reference, extra_layer: bool = False) -> str:
    """The reference's SigLIP tower as a tower checkpoint with its processor config. With ``extra_layer`` one
    more (random) encoder layer follows, as in the released SigLIP that lmms-lab's configs name: their
    feature layer -2 is then the reference's last."""
    from transformers import SiglipImageProcessorPil, SiglipVisionModel
    config = siglip_config(reference.config.vision_config.num_hidden_layers + extra_layer)
    tower = SiglipVisionModel(config)
    tower.load_state_dict(reference.model.vision_tower.state_dict(), strict=False)
    tower.save_pretrained(folder)
    SiglipImageProcessorPil(size={"height": 384, "width": 384}, image_mean=SIGLIP_MEAN, image_std=SIGLIP_STD,
                            resample=3).save_pretrained(folder)
    return folder


def save_onevision_original(folder: str, reference, tokenizer, vision_tower: str) -> str:
    """``reference`` in lmms-lab's original layout (``LlavaQwenForCausalLM``): the Qwen2 LLM,
    model.mm_projector.*, model.image_newline, the tower's tensors under model.vision_tower.vision_tower.*,
    a config with mm_* keys naming the tower, anyres_max_9 and the pinpoints as the training scripts write
    them; a tokenizer without ``<image>`` (the original code splices at a sentinel id instead)."""
    from safetensors.torch import save_file
    state = {f"model.{k}": v for k, v in reference.model.language_model.state_dict().items()}
    state["lm_head.weight"] = reference.lm_head.weight
    projector = reference.model.multi_modal_projector
    state.update({"model.mm_projector.0.weight": projector.linear_1.weight, "model.mm_projector.0.bias": projector.linear_1.bias,
                  "model.mm_projector.2.weight": projector.linear_2.weight, "model.mm_projector.2.bias": projector.linear_2.bias,
                  "model.image_newline": reference.model.image_newline})
    state.update({f"model.vision_tower.vision_tower.vision_model.{k}": v
                  for k, v in reference.model.vision_tower.state_dict().items()})
    os.makedirs(folder, exist_ok=True)
    save_file({k: v.detach().clone().contiguous() for k, v in state.items()}, os.path.join(folder, "model.safetensors"),
              metadata={"format": "pt"})
    text = reference.config.text_config.to_dict()
    config = {k: v for k, v in text.items() if k not in ("architectures", "transformers_version", "_name_or_path")}
    config.update(model_type="llava_qwen", architectures=["LlavaQwenForCausalLM"], mm_vision_tower=vision_tower,
                  mm_hidden_size=VISION_WIDTH, mm_projector_type="mlp2x_gelu", mm_vision_select_layer=-2,
                  mm_vision_select_feature="patch", mm_patch_merge_type="spatial_unpad",
                  image_aspect_ratio="anyres_max_9", image_grid_pinpoints=PINPOINTS_AS_WRITTEN,
                  mm_use_im_start_end=False, mm_use_im_patch_token=False, mm_newline_position="one_token")
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    plain = make_qwen_tokenizer()
    plain.save_pretrained(folder)
    _without_image_tokens(folder)
    return folder


def _without_image_tokens(folder: str) -> None:
    """The saved tokenizer as lmms-lab ships it: no ``<image>`` or ``<video>`` token."""
    for name in ("tokenizer.json", "tokenizer_config.json"):
        path = os.path.join(folder, name)
        with open(path) as f:
            data = json.load(f)
        if "added_tokens" in data:
            data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] not in ("<image>", "<video>")]
        if "added_tokens_decoder" in data:
            data["added_tokens_decoder"] = {k: v for k, v in data["added_tokens_decoder"].items()
                                            if v["content"] not in ("<image>", "<video>")}
        with open(path, "w") as f:
            json.dump(data, f)
