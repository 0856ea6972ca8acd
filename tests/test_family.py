"""Issue 4: the LLaVA family — v1.5 against transformers' LLaVA, the converter's round trips,
auto-detection on each pipeline's stand-in, and the mismatch errors."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlavaForConditionalGeneration, MistralConfig

from extensions.llava import convert as converter
from extensions.llava.detect import choose_pipeline, detect_pipeline, pipeline_from_config
from extensions.llava.engine import LlavaEngine
from extensions.llava.errors import LlavaError
from extensions.llava.pipelines import NEXT_PINPOINTS, PIPELINES, PipelineError
from extensions.llava.settings import Settings
from extensions.llava.preprocess import load_image_processor
from testbed.tiny import BosEncoder, img_tag, reference_run, make_llm, make_tokenizer, picture, save_projector
from testbed.tiny_family import (IMAGE_ID, build_v15, llava_mean_colour, reference_v15,
                               save_llava_hf, save_original, with_vocab)

CPU = {"clip_device": "cpu", "projector_device": "cpu"}


@pytest.fixture(scope="module")
def v15(tmp_path_factory):
    return build_v15(str(tmp_path_factory.mktemp("v15")))


@pytest.fixture(scope="module")
def v15_reference(v15):
    return reference_v15(v15)


def pictures():
    """A wide, a square and a tall picture."""
    return [picture(90, 40, seed=21), picture(50, 50, seed=22), picture(30, 70, seed=23)]


def reference_pixels(clip_dir, images, pad: bool, colour=None):
    """What LLaVA feeds its tower, by transformers' own processors: LlavaImageProcessor pads to a square
    of the mean colour (v1.5), CLIPImageProcessor does not; ``colour`` pads with another one."""
    import numpy as np
    from transformers import CLIPImageProcessor, LlavaImageProcessorPil
    if not pad:
        return CLIPImageProcessor.from_pretrained(clip_dir)(images=images, return_tensors="pt")["pixel_values"]
    processor = LlavaImageProcessorPil.from_pretrained(clip_dir, do_pad=True)
    if colour is not None:
        from PIL import Image
        images = [Image.fromarray(processor.pad_to_square(np.asarray(image).transpose(2, 0, 1),
                                                          background_color=colour).transpose(1, 2, 0))
                  for image in images]
    return processor(images=images, return_tensors="pt")["pixel_values"]


def ours(engine, prompt, model, tokenizer):
    prepared = engine.prepare(prompt, model=model, tokenizer=tokenizer, encode=BosEncoder(tokenizer),
                              max_length=None, embed_all=True)
    with torch.no_grad():
        logits = model(inputs_embeds=prepared.inputs_embeds).logits
    return prepared, logits


def compare(label, embeds, ref_embeds, logits, ref_logits):
    embed_diff = (embeds - ref_embeds).abs().max().item()
    logit_diff = (logits - ref_logits).abs().max().item()
    print(f"{label}: max embed diff {embed_diff:.3g}, max logit diff {logit_diff:.3g}")
    assert embed_diff <= 1e-6
    assert logit_diff <= 1e-4
    return embed_diff, logit_diff


# ---------------------------------------------------------------- v1.5 equality


def test_padding_is_the_truncated_mean_colour(v15):
    """LLaVA fills with int(mean * 255), not round(): (122, 116, 104) for CLIP's mean."""
    from PIL import Image
    from extensions.llava.pipelines import get_pipeline
    from extensions.llava.preprocess import one_view_each as preprocess
    processor = load_image_processor(v15.clip_dir)
    assert llava_mean_colour(processor.image_mean) == (122, 116, 104)
    pixels = preprocess([Image.new("RGB", (64, 16), (0, 0, 0))], processor, get_pipeline("llava-v1.5-7b"))
    expected = (torch.tensor([122, 116, 104]) / 255 - torch.tensor(processor.image_mean)) / torch.tensor(processor.image_std)
    assert torch.allclose(pixels[0, :, 0, 0], expected.float(), atol=1e-6)  # a corner lies in the padding


@pytest.mark.parametrize("which", [[0], [0, 1, 2]], ids=["wide", "wide+square+tall"])
def test_v15_equals_reference(v15, v15_reference, which):
    images = [pictures()[i] for i in which]
    engine = LlavaEngine(Settings.from_params(v15.settings_params), log=lambda m: None)
    prompt = "USER: " + " ".join(img_tag(image) for image in images) + "\nWhat is shown? ASSISTANT:"
    prepared, logits = ours(engine, prompt, v15.llm, v15.tokenizer)
    ids = prepared.input_ids
    assert int((ids == IMAGE_ID).sum()) == 576 * len(images)
    ref_embeds, ref_logits = reference_run(v15_reference, ids, reference_pixels(v15.clip_dir, images, pad=True))
    compare(f"v1.5 {len(images)} image(s)", prepared.inputs_embeds, ref_embeds, logits, ref_logits)
    if len(images) > 1:
        return
    # the check is sensitive to the padding and to its exact colour
    unpadded, _ = reference_run(v15_reference, ids, reference_pixels(v15.clip_dir, images, pad=False))
    assert (unpadded - prepared.inputs_embeds).abs().max().item() > 1e-3
    rounded = tuple(round(x * 255) for x in load_image_processor(v15.clip_dir).image_mean)
    assert rounded != (122, 116, 104)
    off_colour, _ = reference_run(v15_reference, ids, reference_pixels(v15.clip_dir, images, pad=True, colour=rounded))
    assert (off_colour - prepared.inputs_embeds).abs().max().item() > 1e-6


def test_v15_layout_and_token_count(v15):
    engine = LlavaEngine(Settings.from_params(v15.settings_params), log=lambda m: None)
    encode = BosEncoder(v15.tokenizer)
    prompt = "Hi " + img_tag(picture(seed=1)) + " bye"
    prepared = engine.prepare(prompt, model=v15.llm, tokenizer=v15.tokenizer, encode=encode, max_length=None)
    expected = len(encode("Hi  bye")[0]) + 576  # no start/end tokens around the 576 slots
    assert prepared.input_ids.shape[1] == expected
    assert engine.token_count(prompt, v15.llm, v15.tokenizer, encode) == expected
    vision = engine.vision_parts(engine.choice_for(v15.llm, v15.tokenizer))
    assert vision.tower.config.image_size == 336 and engine.counters.loads == 1


# ---------------------------------------------------------------- converter round trips


VISION_SIDE = ("image_size", "patch_size", "feature_count", "projector_type", "image_token", "start_token", "end_token",
               "preprocess", "vision_feature_layer", "keeps_cls", "grid_pinpoints")


def described_as(pipeline, name: str, width: int = 64) -> bool:
    """A tiny checkpoint's pipeline is read from its config (no named pipeline is 64 wide): it has the
    vision side of the named pipeline ``name`` and the tiny width."""
    named = PIPELINES[name]
    return pipeline.name.endswith("(from its config)") and pipeline.llm_hidden_size == width \
        and all(getattr(pipeline, k) == getattr(named, k) for k in VISION_SIDE)


def converted_pipeline(dst):
    from extensions.llava.detect import read_metadata
    return read_metadata(dst)["pipeline"]


def load_converted(dst):
    model, info = AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval(), AutoTokenizer.from_pretrained(dst)


def auto_engine():
    return LlavaEngine(Settings.from_params(CPU), log=lambda m: None)  # pipeline "auto" by default


@pytest.mark.parametrize("style", ["new", "old"])
def test_llava_hf_round_trip(v15, v15_reference, tmp_path, style, capsys):
    src = save_llava_hf(str(tmp_path / "llava-1.5-7b-hf"), v15_reference, v15.tokenizer, v15.clip_dir, style=style)
    keys = json.load(open(os.path.join(src, "model.safetensors.index.json")))["weight_map"]
    assert any(k.startswith({"new": "model.language_model.", "old": "language_model.model."}[style]) for k in keys)
    assert any(k.startswith({"new": "model.vision_tower.", "old": "vision_tower.vision_model."}[style]) for k in keys)
    dst = str(tmp_path / "converted")
    assert converter.main([src, dst]) == 0
    out = capsys.readouterr().out
    assert "pipeline: llava-1.5-7b-hf (from its config)" in out and "mm_projector.safetensors" in out and "vision_tower/" in out
    metadata = json.load(open(os.path.join(dst, "llava.json")))
    assert described_as(converted_pipeline(dst), "llava-v1.5-7b") and metadata["vision_tower"] == "vision_tower"
    assert metadata["projector"] == "mm_projector.safetensors" and metadata["added_tokens"] == []
    assert os.path.isfile(os.path.join(dst, "vision_tower", "preprocessor_config.json"))
    config = json.load(open(os.path.join(dst, "config.json")))
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert "processor_class" not in json.load(open(os.path.join(dst, "tokenizer_config.json")))
    assert len([f for f in os.listdir(dst) if f.startswith("model-")]) > 1  # shard by shard

    model, tokenizer = load_converted(dst)
    assert tokenizer.convert_tokens_to_ids("<image>") == IMAGE_ID
    engine = auto_engine()
    images = pictures()[:2]
    prompt = "USER: " + img_tag(images[0]) + " and " + img_tag(images[1]) + " differ how? ASSISTANT:"
    prepared, logits = ours(engine, prompt, model, tokenizer)
    assert described_as(engine.choice_for(model, tokenizer).pipeline, "llava-v1.5-7b")
    original = LlavaForConditionalGeneration.from_pretrained(src, dtype=torch.float32).eval()
    ref_embeds, ref_logits = reference_run(original, prepared.input_ids, reference_pixels(v15.clip_dir, images, True))
    compare(f"llava-hf ({style} names) → converted", prepared.inputs_embeds, ref_embeds, logits, ref_logits)


def test_llava_hf_linear_projector_round_trip(v0, v0_reference, tmp_path):
    """A v0 model in the llava-hf layout (projector_hidden_act linear, identity linear_2): the two
    linears are composed into one linear projector, which the v0 pipeline check accepts."""
    src = save_llava_hf(str(tmp_path / "llava-13b-v0-hf"), v0_reference, v0.tokenizer, v0.clip_dir, style="new",
                        max_shard_size=None)
    dst = str(tmp_path / "converted")
    result = converter.convert(src, dst, log=lambda line: None)
    assert described_as(converted_pipeline(dst), "llava-v0-13b") and result["shards"] == 1
    model, tokenizer = load_converted(dst)
    engine = auto_engine()
    images = [picture(80, 60, seed=3)]
    prepared, logits = ours(engine, "Look " + img_tag(images[0]) + " now", model, tokenizer)
    vision = engine.vision_parts(engine.choice_for(model, tokenizer, dst))
    assert vision.parts.projector_type == "linear" and engine.counters.loads == 1
    ref_embeds, ref_logits = reference_run(v0_reference, prepared.input_ids, reference_pixels(v0.clip_dir, images, False))
    compare("llava-hf linear → converted", prepared.inputs_embeds, ref_embeds, logits, ref_logits)


def test_original_v15_round_trip(v15, tmp_path):
    """Original layout, sharded .bin, tokenizer without <image>: the converter adds it."""
    plain = make_tokenizer(image_tokens=())
    llm = make_llm(len(plain), seed=31)
    src = save_original(str(tmp_path / "llava-v1.5-7b"), llm, v15.projector_state, plain, v15.clip_dir,
                        projector_type="mlp2x_gelu", start_end=False, fmt="bin", shards=3)
    dst = str(tmp_path / "converted")
    result = converter.convert(src, dst, log=lambda line: None)
    assert described_as(converted_pipeline(dst), "llava-v1.5-7b") and result["added_tokens"] == {"<image>": IMAGE_ID}
    assert result["vocab_size"] == IMAGE_ID + 1 and result["shards"] == 3
    assert json.load(open(os.path.join(dst, "llava.json")))["vision_tower"] == v15.clip_dir
    # shard by shard: each written shard holds exactly the language model tensors of one source shard
    source_map = json.load(open(os.path.join(src, "pytorch_model.bin.index.json")))["weight_map"]
    written_map = json.load(open(os.path.join(dst, "model.safetensors.index.json")))["weight_map"]
    groups = lambda mapping: sorted(sorted(k for k in mapping if mapping[k] == f and "mm_projector" not in k)
                                    for f in set(mapping.values()))
    assert groups(written_map) == [g for g in groups(source_map) if g]

    model, tokenizer = load_converted(dst)
    assert tokenizer.convert_tokens_to_ids("<image>") == IMAGE_ID and model.config.vocab_size == IMAGE_ID + 1
    for converted, original in ((model.model.embed_tokens.weight, llm.model.embed_tokens.weight),
                                (model.lm_head.weight, llm.lm_head.weight)):
        assert torch.equal(converted[:IMAGE_ID], original)
        assert torch.allclose(converted[IMAGE_ID], original.double().mean(0).float(), atol=1e-7)
    engine = auto_engine()
    images = [pictures()[2]]
    prepared, logits = ours(engine, "USER: " + img_tag(images[0]) + "\nDescribe. ASSISTANT:", model, tokenizer)
    reference = reference_v15(SimpleNamespace(clip_dir=v15.clip_dir, llm=with_vocab(llm, IMAGE_ID + 1),
                                              projector_state=v15.projector_state))
    ref_embeds, ref_logits = reference_run(reference, prepared.input_ids, reference_pixels(v15.clip_dir, images, True))
    # the original model has no <image> row: compare over its own vocabulary
    compare("original v1.5 (.bin shards) → converted", prepared.inputs_embeds, ref_embeds,
            logits[..., :IMAGE_ID], ref_logits[..., :IMAGE_ID])


def test_original_v0_round_trip(v0, v0_reference, tmp_path):
    """Original layout, sharded safetensors, start/end tokens already in the tokenizer."""
    src = save_original(str(tmp_path / "LLaVA-13b-v0"), v0.llm, v0.projector_state, v0.tokenizer, v0.clip_dir,
                        projector_type="linear", start_end=True, fmt="safetensors", shards=2, model_type="llava")
    dst = str(tmp_path / "converted")
    result = converter.convert(src, dst, log=lambda line: None)
    assert described_as(converted_pipeline(dst), "llava-v0-13b")
    assert result["added_tokens"] == {} and result["vocab_size"] == 32003
    model, tokenizer = load_converted(dst)
    engine = auto_engine()
    images = [picture(70, 90, seed=4)]
    prepared, logits = ours(engine, "What is " + img_tag(images[0]) + "?", model, tokenizer)
    ref_embeds, ref_logits = reference_run(v0_reference, prepared.input_ids, reference_pixels(v0.clip_dir, images, False))
    compare("original v0 (safetensors shards) → converted", prepared.inputs_embeds, ref_embeds, logits, ref_logits)


def test_original_mistral_round_trip(v15, tmp_path):
    """BakLLaVA's layout (llava_mistral): a MistralForCausalLM comes out, with the same logits."""
    from transformers import MistralForCausalLM
    torch.manual_seed(41)
    mistral = MistralForCausalLM(MistralConfig(vocab_size=len(v15.tokenizer), hidden_size=64, intermediate_size=128,
                                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                               rope_theta=1e6, sliding_window=None)).eval()
    src = save_original(str(tmp_path / "BakLLaVA-1"), mistral, v15.projector_state, v15.tokenizer, CLIP336,
                        projector_type="mlp2x_gelu", start_end=False, fmt="safetensors", shards=2,
                        model_type="llava_mistral")
    dst = str(tmp_path / "converted")
    result = converter.convert(src, dst, log=lambda line: None)
    assert described_as(converted_pipeline(dst), "bakllava-1") and result["vision_tower"] == CLIP336
    model, tokenizer = load_converted(dst)
    assert type(model).__name__ == "MistralForCausalLM" and model.config.rope_parameters["rope_theta"] == 1e6
    ids = BosEncoder(tokenizer)("a short text")
    with torch.no_grad():
        assert (model(ids).logits - mistral(ids).logits).abs().max().item() <= 1e-6
    choice = auto_engine().choice_for(model, tokenizer)
    assert described_as(choice.pipeline, "bakllava-1") and choice.vision_source == CLIP336


def test_converter_refuses_to_overwrite(v0, tmp_path, capsys):
    dst = tmp_path / "taken"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    src = save_original(str(tmp_path / "LLaVA-13b-v0"), v0.llm, v0.projector_state, v0.tokenizer, v0.clip_dir,
                        projector_type="linear", start_end=True, fmt="safetensors", shards=1)
    assert converter.main([src, str(dst)]) == 1
    assert "not empty" in capsys.readouterr().err
    assert os.listdir(dst) == ["keep.txt"] and (dst / "keep.txt").read_text() == "mine"


def test_converter_pipeline_mismatch_and_non_llava(v0, tmp_path, capsys):
    src = save_original(str(tmp_path / "LLaVA-13b-v0"), v0.llm, v0.projector_state, v0.tokenizer, v0.clip_dir,
                        projector_type="linear", start_end=True, fmt="safetensors", shards=1)
    dst = tmp_path / "out"
    assert converter.main([src, str(dst), "--pipeline", "no-such-pipeline"]) == 1
    assert "unknown pipeline" in capsys.readouterr().err
    assert converter.main([src, str(dst), "--pipeline", "llava-v1.5-7b"]) == 1
    err = capsys.readouterr().err
    assert "llava-v1.5-7b" in err and "--pipeline" in err and "linear" in err
    assert not dst.exists()  # nothing half-written is left behind
    plain = tmp_path / "plain"
    v0.llm.save_pretrained(str(plain))
    assert converter.main([str(plain), str(dst)]) == 1
    assert "not a LLaVA checkpoint" in capsys.readouterr().err


# ---------------------------------------------------------------- auto-detection

V0_VOCAB = {"<im_patch>": 32000, "<im_start>": 32001, "<im_end>": 32002}
V0_7B_VOCAB = {"[PAD]": 32000, "<im_patch>": 32001, "<im_start>": 32002, "<im_end>": 32003}
CLIP224, CLIP336 = "openai/clip-vit-large-patch14", "openai/clip-vit-large-patch14-336"


def original_config(hidden, tower, **extra):
    from transformers import LlamaConfig
    return LlamaConfig(hidden_size=hidden, mm_vision_tower=tower, mm_hidden_size=1024, mm_vision_select_layer=-2,
                       **extra)


def next_config(hidden, config_class=None):
    """An original LLaVA-1.6 config (the pinpoints as released, in the LLaVA repo's order)."""
    from transformers import LlamaConfig
    return (config_class or LlamaConfig)(
        hidden_size=hidden, mm_vision_tower=CLIP336, mm_hidden_size=1024, mm_vision_select_layer=-2,
        mm_projector_type="mlp2x_gelu", mm_use_im_start_end=False, image_aspect_ratio="anyres",
        mm_patch_merge_type="spatial_unpad",
        image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]])


STAND_INS = {
    # the folder name as released (or as people name merged weights), its config and its tokenizer's image tokens
    "llava-v0-13b": ("LLaVA-13b-v0", lambda: original_config(5120, CLIP224, mm_use_im_start_end=True), V0_VOCAB),
    "llava-v0-7b": ("LLaVA-7b-v0", lambda: original_config(4096, CLIP224, mm_use_im_start_end=True), V0_7B_VOCAB),
    "llava-llama-2-13b": ("llava-llama-2-13b-chat-lightning-preview",
                          lambda: original_config(5120, CLIP224, mm_use_im_start_end=False), {}),
    "llava-v1.5-7b": ("llava-v1.5-7b", lambda: original_config(4096, CLIP336, mm_projector_type="mlp2x_gelu",
                                                               mm_use_im_start_end=False), {}),
    "llava-v1.5-13b": ("llava-v1.5-13b", lambda: original_config(5120, CLIP336, mm_projector_type="mlp2x_gelu",
                                                                 mm_use_im_start_end=False), {}),
    "bakllava-1": ("BakLLaVA-1", lambda: MistralConfig(hidden_size=4096, mm_vision_tower=CLIP336,
                                                       mm_projector_type="mlp2x_gelu"), {}),
    "llava-v1.6-vicuna-7b": ("llava-v1.6-vicuna-7b", lambda: next_config(4096), {}),
    "llava-v1.6-vicuna-13b": ("llava-v1.6-vicuna-13b", lambda: next_config(5120), {}),
    "llava-v1.6-mistral-7b": ("llava-v1.6-mistral-7b", lambda: next_config(4096, MistralConfig), {}),
    "llava-v1.6-34b": ("llava-v1.6-34b", lambda: next_config(7168), {}),
}


@pytest.mark.parametrize("name", list(STAND_INS))
def test_auto_detects_each_pipeline(name, tmp_path):
    folder, config, vocab = STAND_INS[name]
    path = tmp_path / folder
    path.mkdir()
    choice = choose_pipeline("auto", config(), vocab, str(path))
    assert choice.pipeline.name == name and choice.reason == "read from the model's config"
    # a folder name that says nothing still works: the config is the evidence
    assert choose_pipeline("auto", config(), vocab, str(tmp_path / "model")).pipeline.name == name
    if "v1.6" not in name:  # the name-and-width evidence of folders without a LLaVA config
        assert detect_pipeline(config(), vocab, str(tmp_path / "model")) == name


# llava-hf's llava-v1.6-*-hf configs: LlavaNextConfig's default vision side (CLIP ViT-L/14 at 336 px,
# layer -2, CLS dropped, gelu projector), the released canvases, the text model's own config
# ("<image>" is 32000 after a 32000-token vocabulary, 64000 after the 34b's 64000)
HF_NEXT = {
    "llava-v1.6-vicuna-7b": (4096, None, 32000),
    "llava-v1.6-vicuna-13b": (5120, None, 32000),
    "llava-v1.6-mistral-7b": (4096, MistralConfig, 32000),
    "llava-v1.6-34b": (7168, None, 64000),
}


@pytest.mark.parametrize("name", list(HF_NEXT))
def test_llava_hf_next_configs_are_the_named_pipelines(name):
    from transformers import LlamaConfig, LlavaNextConfig
    hidden, text_class, image_id = HF_NEXT[name]
    text = (text_class or LlamaConfig)(hidden_size=hidden, vocab_size=image_id + 64)
    config = LlavaNextConfig(text_config=text.to_dict(), image_token_index=image_id,
                             image_grid_pinpoints=[list(p) for p in next_config(64).image_grid_pinpoints])
    assert pipeline_from_config(config, f"/models/{name}-hf", image_token="<image>", llm_hidden_size=hidden) \
        is PIPELINES[name]


@pytest.mark.parametrize("config,expected", [
    (lambda: original_config(64, CLIP336, mm_projector_type="mlp2x_gelu"),
     dict(image_size=336, feature_count=576, projector_type="mlp2x_gelu", preprocess="pad", image_token="<image>")),
    (lambda: next_config(2048), dict(image_size=336, preprocess="anyres", grid_pinpoints=NEXT_PINPOINTS)),
    (lambda: original_config(96, CLIP224, mm_use_im_start_end=True, image_aspect_ratio="square"),
     dict(image_size=224, feature_count=256, projector_type="linear", preprocess="crop", start_token="<im_start>")),
])
def test_a_config_of_any_width_describes_its_pipeline(config, expected, tmp_path):
    """No named pipeline has these widths: the row is read from the config itself."""
    choice = choose_pipeline("auto", config(), {}, str(tmp_path / "my-llava"))
    assert choice.reason == "read from the model's config" and choice.pipeline.name == "my-llava (from its config)"
    assert choice.pipeline.llm_hidden_size == config().hidden_size
    assert {k: getattr(choice.pipeline, k) for k in expected} == expected


def test_v0_7b_image_ids_come_from_its_tokenizer():
    """llava-v0-7b's tokenizer has a pad token before the image tokens: the ids are looked up, not assumed."""
    tokenizer = make_tokenizer(image_tokens=("[PAD]", "<im_patch>", "<im_start>", "<im_end>"))
    folder, config, _ = STAND_INS["llava-v0-7b"]
    pipeline = choose_pipeline("auto", config(), tokenizer.get_vocab(), folder).pipeline
    layout = LlavaEngine.token_layout(tokenizer, pipeline)
    assert pipeline.name == "llava-v0-7b" and (layout.image_id, layout.start_id, layout.end_id) == (32001, 32002, 32003)
    assert pipeline.feature_count + layout.extra_tokens == 258


@pytest.mark.parametrize("folder,hidden,vocab,expected", [
    # converted / llava-hf style folders that lost their llava.json: tokenizer + name + width
    ("llava-1.5-13b-hf", 5120, {"<image>": 32000}, "llava-v1.5-13b"),
    ("llava-v1.5-7b", 4096, {"<image>": 32000}, "llava-v1.5-7b"),
    ("llava-llama-2-13b-chat", 5120, {"<image>": 32000}, "llava-llama-2-13b"),
    ("vicuna-with-llava", 4096, V0_7B_VOCAB, "llava-v0-7b"),
    ("anything", 5120, V0_VOCAB, "llava-v0-13b"),
])
def test_auto_detects_plain_loaded_models(folder, hidden, vocab, expected, tmp_path):
    from transformers import LlamaConfig
    assert detect_pipeline(LlamaConfig(hidden_size=hidden), vocab, str(tmp_path / folder)) == expected


def test_auto_reads_llava_json_and_setting_overrides(tmp_path):
    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "vision_tower").mkdir()
    (folder / "llava.json").write_text(json.dumps({"pipeline": "bakllava-1", "vision_tower": "vision_tower",
                                                   "projector": "mm_projector.safetensors"}))
    choice = choose_pipeline("auto", None, {}, str(folder))
    assert choice.pipeline.name == "bakllava-1" and choice.vision_source == str(folder / "vision_tower")
    assert choice.projector_repo == str(folder) and choice.projector_filename == "mm_projector.safetensors"
    assert choose_pipeline("llava-v1.5-13b", None, {}, str(folder)).pipeline.name == "llava-v1.5-13b"
    # a repo id stays a repo id
    (folder / "llava.json").write_text(json.dumps({"pipeline": "llava-v1.5-7b", "vision_tower": CLIP336,
                                                   "projector": "mm_projector.safetensors"}))
    assert choose_pipeline("auto", None, {}, str(folder)).vision_source == CLIP336


@pytest.mark.parametrize("config,vocab,folder,why", [
    (lambda: None, {"<image>": 32000}, "some-model", "<image>"),
    (lambda: None, {}, "some-model", "no image tokens"),
])
def test_auto_says_when_it_cannot_tell(config, vocab, folder, why, tmp_path):
    with pytest.raises(PipelineError) as error:
        choose_pipeline("auto", config(), vocab, str(tmp_path / folder))
    assert why in str(error.value) and "llava-pipeline" in str(error.value)


# ---------------------------------------------------------------- mismatch errors


def v15_engine(v15, **extra):
    return LlavaEngine(Settings.from_params({**v15.settings_params, **extra}), log=lambda m: None)


def test_mismatch_projector_width(v15):
    wide = make_llm(len(v15.tokenizer), width=96)
    with pytest.raises(LlavaError) as error:
        v15_engine(v15).prepare("x " + img_tag(picture()), model=wide, tokenizer=v15.tokenizer,
                                encode=BosEncoder(v15.tokenizer), max_length=None)
    message = str(error.value)
    assert "64-wide" in message and "96 wide" in message and "llava-v1.5-7b" in message
    assert "set llava-pipeline" in message


def test_mismatch_missing_image_token(v15):
    plain = make_tokenizer(image_tokens=())
    with pytest.raises(LlavaError) as error:
        v15_engine(v15).prepare("x " + img_tag(picture()), model=v15.llm, tokenizer=plain, encode=BosEncoder(plain),
                                max_length=None)
    message = str(error.value)
    assert "<image>" in message and "llava-v1.5-7b" in message
    assert "llava-pipeline" in message and "extensions.llava convert" in message


def test_mismatch_feature_count(v15, v0):
    """A 224 px tower (256 features) under a v1.5 pipeline (576 slots)."""
    with pytest.raises(LlavaError) as error:
        v15_engine(v15, clip_repo=v0.clip_dir).prepare("x " + img_tag(picture()), model=v15.llm,
                                                       tokenizer=v15.tokenizer, encode=BosEncoder(v15.tokenizer),
                                                       max_length=None)
    message = str(error.value)
    assert "256 patches" in message and "576 image slots" in message and "llava-v1.5-7b" in message
    assert "llava-clip_repo" in message and "llava-pipeline" in message


def test_mismatch_projector_type(v15, tmp_path):
    """A linear (v0-style) projector under v1.5."""
    save_projector(str(tmp_path / "mm_projector.bin"), "linear")
    with pytest.raises(LlavaError) as error:
        v15_engine(v15, projector_repo=str(tmp_path)).prepare(
            "x " + img_tag(picture()), model=v15.llm, tokenizer=v15.tokenizer, encode=BosEncoder(v15.tokenizer),
            max_length=None)
    message = str(error.value)
    assert "linear" in message and "mlp2x_gelu" in message and "llava-v1.5-7b" in message
    assert "llava-pipeline" in message


def test_every_pipeline_has_a_stand_in():
    # the demo is only ever found through its own llava.json (tests/test_demo.py)
    assert set(STAND_INS) == set(PIPELINES) - {"llava-demo"}
