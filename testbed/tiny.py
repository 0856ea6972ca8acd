"""Tiny random models of the real LLaVA architectures, built in-process for the tests.

Geometry is real (224 px / patch 14 → 256 features for v0, 336 px → 576 for v1.5);
widths are tiny so that everything runs in seconds on a CPU.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import NamedTuple

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models
from transformers import (CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig, LlamaConfig,
                          LlamaForCausalLM, LlavaConfig, LlavaForConditionalGeneration,
                          PreTrainedTokenizerFast)

from extensions.llava.engine import LlavaEngine
from extensions.llava.media.items import data_url  # noqa: F401  (the one way to build a data URL)
from extensions.llava.settings import Settings

VISION_WIDTH = 32
LLM_WIDTH = 64
BASE_VOCAB = 32000
PATCH_ID, START_ID, END_ID = 32000, 32001, 32002  # the seed's image tokens, after the LLaMA vocabulary
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def byte_tokenizer(vocab: dict, characters: str, size: int = 0) -> Tokenizer:
    """A tokenizer of single characters with byte fallback: ``vocab`` first, then the 256 bytes, printable
    ASCII and ``characters``, then filler entries up to ``size``."""
    vocab = dict(vocab)
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    for ch in [chr(code) for code in range(32, 127)] + list(characters):
        vocab.setdefault(ch, len(vocab))
    while len(vocab) < size:
        vocab[f"<filler_{len(vocab)}>"] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    tokenizer.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    return tokenizer


def with_random_newline(model):
    """``model`` (a LLaVA-NeXT or OneVision) with a non-zero image_newline, so that a misplaced one shows."""
    with torch.no_grad():
        model.model.image_newline.copy_(torch.randn_like(model.model.image_newline))
    return model


def make_tokenizer(image_tokens=("<im_patch>", "<im_start>", "<im_end>")) -> PreTrainedTokenizerFast:
    """A LLaMA-sized vocabulary (32000) of single characters and bytes, plus the image tokens.

    With the default order the ids are <im_patch>=32000, <im_start>=32001, <im_end>=32002.
    """
    tokenizer = byte_tokenizer({"<unk>": 0, "<s>": 1, "</s>": 2}, "\n\téèàüöäßçñ€£°—“”’", BASE_VOCAB)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")
    if image_tokens:
        fast.add_tokens([AddedToken(t, special=True, normalized=False) for t in image_tokens])
    return fast


class BosEncoder:
    """The host's encode: the tokenizer's ids with one BOS in front, as a [1, n] tensor."""

    def __init__(self, tokenizer, add_bos_token: bool = True):
        self.tokenizer = tokenizer
        self.add_bos_token = add_bos_token

    def __call__(self, text: str, add_bos_token: bool | None = None) -> torch.Tensor:
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        add_bos = self.add_bos_token if add_bos_token is None else add_bos_token
        if add_bos and self.tokenizer.bos_token_id is not None:  # a Qwen2 tokenizer has no BOS
            ids = [self.tokenizer.bos_token_id] + ids
        return torch.tensor([ids], dtype=torch.long)


CPU = {"clip_device": "cpu", "projector_device": "cpu"}
CPU_SETTINGS = {f"llava-{key}": value for key, value in CPU.items()}  # as the webui's settings file holds them


def quiet_engine(**params) -> LlavaEngine:
    """An engine under these settings (the vision parts on the CPU unless they say otherwise) that logs nothing."""
    return LlavaEngine(Settings.from_params({**CPU, **params}), log=lambda message: None)


def prepare(engine: LlavaEngine, prompt: str, model, tokenizer, folder: str | None = None, **kwargs):
    """``engine.prepare`` with the host's BOS encoding and, unless ``kwargs`` say otherwise, no truncation."""
    return engine.prepare(prompt, engine.bind(model, tokenizer, folder, BosEncoder(tokenizer)), **kwargs)


class Loaded(NamedTuple):
    """A model folder as the webui's Transformers loader gives it to the extension."""

    model: object
    tokenizer: object
    folder: str

    def prepare(self, engine: LlavaEngine, prompt: str, **kwargs):
        return prepare(engine, prompt, self.model, self.tokenizer, self.folder, **kwargs)

    def bound(self, engine: LlavaEngine):
        """The folder's model context in ``engine``."""
        return engine.bind(self.model, self.tokenizer, self.folder, BosEncoder(self.tokenizer))

    def token_count(self, engine: LlavaEngine, prompt: str, **kwargs) -> int | None:
        return engine.token_count(prompt, self.bound(engine), **kwargs)

    def encode(self, text: str):
        return BosEncoder(self.tokenizer)(text)

    def in_the_webui(self, **settings) -> dict:
        """The fake webui's arguments for this folder loaded by its Transformers loader (vision on the CPU)."""
        models, name = os.path.split(self.folder)
        return {"model": self.model, "tokenizer": self.tokenizer, "model_dir": models, "model_name": name,
                "settings": {**CPU_SETTINGS, **settings}}


def load_folder(folder: str) -> Loaded:
    """A converted model folder, loaded as the webui loads it; every tensor is where the config wants it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return Loaded(model.eval(), AutoTokenizer.from_pretrained(folder), folder)


def convert_and_load(src: str, dst: str, **kwargs) -> tuple[dict, Loaded]:
    """``extensions.llava.converter.convert.convert`` without its report, then the written folder loaded."""
    from extensions.llava.converter.convert import convert
    result = convert(src, dst, log=lambda line: None, **kwargs)
    return result, load_folder(dst)


def llama_config(vocab_size: int, width: int = LLM_WIDTH, layers: int = 2) -> LlamaConfig:
    return LlamaConfig(vocab_size=vocab_size, hidden_size=width, intermediate_size=2 * width,
                       num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                       max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def make_llm(vocab_size: int, seed: int = 0, width: int = LLM_WIDTH, layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(llama_config(vocab_size, width, layers)).eval()


def vision_config(image_size: int = 224, layers: int = 3) -> CLIPVisionConfig:
    return CLIPVisionConfig(hidden_size=VISION_WIDTH, intermediate_size=2 * VISION_WIDTH, num_hidden_layers=layers,
                            num_attention_heads=2, image_size=image_size, patch_size=14, projection_dim=16)


def processor_config(image_size: int) -> dict:
    return {"crop_size": {"height": image_size, "width": image_size}, "do_center_crop": True,
            "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
            "image_mean": CLIP_MEAN, "image_std": CLIP_STD, "resample": 3, "rescale_factor": 1 / 255,
            "size": {"shortest_edge": image_size}, "image_processor_type": "CLIPImageProcessor"}


def write_processor(folder: str, image_size: int) -> None:
    """CLIP's preprocessor_config.json at ``image_size`` into ``folder``."""
    with open(os.path.join(folder, "preprocessor_config.json"), "w") as f:
        json.dump(processor_config(image_size), f)


def save_clip(folder: str, image_size: int = 224, seed: int = 1) -> CLIPVisionConfig:
    """A full CLIP checkpoint (text and vision), like openai/clip-vit-large-patch14."""
    torch.manual_seed(seed)
    vision = vision_config(image_size)
    text = CLIPTextConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                          vocab_size=100, max_position_embeddings=16, projection_dim=16)
    model = CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=16))
    model.save_pretrained(folder)
    write_processor(folder, image_size)
    return vision


def save_projector(path: str, projector_type: str = "linear", seed: int = 2, prefix: str = "model.mm_projector.",
                   in_width: int = VISION_WIDTH, out_width: int = LLM_WIDTH) -> dict:
    """Random projector weights in the original LLaVA naming, saved as .bin or .safetensors."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=generator) * 0.2

    if projector_type == "linear":
        state = {"weight": rand(out_width, in_width), "bias": rand(out_width)}
    else:
        state = {"0.weight": rand(out_width, in_width), "0.bias": rand(out_width),
                 "2.weight": rand(out_width, out_width), "2.bias": rand(out_width)}
    state = {prefix + k: v for k, v in state.items()}
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    if path.endswith(".safetensors"):
        from safetensors.torch import save_file
        save_file(state, path)
    else:
        torch.save(state, path)
    return state


@dataclass
class TinyLlava:
    """Everything one pipeline needs, on disk and in memory."""

    folder: str
    clip_dir: str
    projector_dir: str
    tokenizer: PreTrainedTokenizerFast
    llm: LlamaForCausalLM
    projector_state: dict
    pipeline: str

    @property
    def settings_params(self) -> dict:
        return {"clip_repo": self.clip_dir, "projector_repo": self.projector_dir,
                "projector_filename": "mm_projector.bin", "clip_device": "cpu", "projector_device": "cpu",
                "pipeline": self.pipeline}

    def webui_settings(self, **extra) -> dict:
        """The same settings as the webui's settings file holds them (``llava-`` keys)."""
        return {f"llava-{k}": v for k, v in {**self.settings_params, **extra}.items()}

    def engine(self, **extra) -> LlavaEngine:
        """A quiet engine under this model's settings and ``extra`` ones."""
        return quiet_engine(**{**self.settings_params, **extra})

    def prepare(self, engine, prompt: str, **kwargs):
        """``engine.prepare`` with this model, its tokenizer and the host's BOS encoding; no truncation."""
        return prepare(engine, prompt, self.llm, self.tokenizer, **kwargs)


def build_v0(folder: str) -> TinyLlava:
    clip_dir = os.path.join(folder, "clip")
    projector_dir = os.path.join(folder, "projector")
    save_clip(clip_dir, 224)
    state = save_projector(os.path.join(projector_dir, "mm_projector.bin"))
    tokenizer = make_tokenizer()
    llm = make_llm(len(tokenizer))
    return TinyLlava(folder, clip_dir, projector_dir, tokenizer, llm, state, "llava-v0-13b")


def reference_llava(clip_dir: str, llm: LlamaForCausalLM, projector_state: dict, image_token_id: int,
                    projector_type: str = "linear") -> LlavaForConditionalGeneration:
    """transformers' LLaVA with the same weights.

    A v0 linear projector is linear_1 with an identity activation and linear_2 = identity.
    """
    from transformers import CLIPVisionModel
    tower = CLIPVisionModel.from_pretrained(clip_dir)
    config = LlavaConfig(vision_config=tower.config.to_dict(), text_config=llm.config.to_dict(),
                         image_token_id=image_token_id, vision_feature_layer=-2,
                         vision_feature_select_strategy="default",
                         projector_hidden_act="linear" if projector_type == "linear" else "gelu")
    reference = LlavaForConditionalGeneration(config).eval()
    reference.model.vision_tower.load_state_dict(tower.state_dict())
    reference.model.language_model.load_state_dict(llm.model.state_dict())
    reference.lm_head.load_state_dict(llm.lm_head.state_dict())
    state = {k.split("mm_projector.", 1)[-1]: v for k, v in projector_state.items()}
    projector = reference.model.multi_modal_projector
    with torch.no_grad():
        if projector_type == "linear":
            projector.linear_1.weight.copy_(state["weight"])
            projector.linear_1.bias.copy_(state["bias"])
            projector.linear_2.weight.copy_(torch.eye(projector.linear_2.weight.shape[0]))
            projector.linear_2.bias.zero_()
        else:
            projector.linear_1.weight.copy_(state["0.weight"])
            projector.linear_1.bias.copy_(state["0.bias"])
            projector.linear_2.weight.copy_(state["2.weight"])
            projector.linear_2.bias.copy_(state["2.bias"])
    return reference


def picture(width: int = 64, height: int = 48, seed: int = 0, mode: str = "RGB"):
    """A random picture."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    channels = len(mode) if mode in ("RGB", "RGBA", "LA") else 1
    data = rng.integers(0, 256, size=(height, width, channels), dtype=np.uint8)
    return Image.fromarray(data.squeeze(-1) if channels == 1 else data, mode=mode)


def bytes_url(data: bytes, media: str = "image/png") -> str:
    """A data URL of raw bytes, whatever they hold."""
    import base64
    return f"data:{media};base64," + base64.b64encode(data).decode()


def file_url(path: str) -> str:
    """A file's bytes as a data URL (PNG or JPEG by the name)."""
    with open(path, "rb") as f:
        return bytes_url(f.read(), "image/jpeg" if path.lower().endswith((".jpg", ".jpeg")) else "image/png")


def header_only_png(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` × ``height`` while its pixel data is a 1×1 stub."""
    import io
    import zlib
    from PIL import Image
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
    return bytes(data)


def img_tag(image, fmt: str = "PNG") -> str:
    return f'<img src="{data_url(image, fmt)}">'


def two_pictures() -> str:
    """A prompt with two different pictures (what "embed all" decides about)."""
    return "first " + img_tag(picture(seed=1)) + " second " + img_tag(picture(seed=2))


def embedded_line(count: int, embedded: int) -> str:
    """The log line of a generation with ``count`` pictures of which ``embedded`` got features."""
    return f"llava: {count} picture(s) in the prompt, {embedded} embedded"


def reference_run(reference, ids, pixels, earlier_images_as=None, **inputs):
    """transformers' LLaVA (or LLaVA-NeXT) on ``ids`` and ``pixels`` (and ``inputs`` such as NeXT's
    image_sizes): the spliced inputs_embeds its language model receives, and the logits.
    ``earlier_images_as`` (an embedding row) stands in for the features of every picture but the
    last, as "embed all" off leaves them."""
    captured = {}
    hook = reference.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: captured.update(embeds=kwargs["inputs_embeds"]), with_kwargs=True)
    original = reference.model.get_image_features
    if earlier_images_as is not None:
        def last_only(*args, **kwargs):
            out = original(*args, **kwargs)
            features = list(out.pooler_output)
            for i in range(len(features) - 1):
                features[i] = earlier_images_as.expand_as(features[i]).clone()
            out.pooler_output = features
            return out
        reference.model.get_image_features = last_only
    try:
        with torch.no_grad():
            logits = reference(input_ids=ids, pixel_values=pixels, **inputs).logits
    finally:
        hook.remove()
        reference.model.get_image_features = original
    return captured["embeds"], logits
