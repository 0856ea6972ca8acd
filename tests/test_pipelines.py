"""Which pipeline a model gets, and what it makes of a picture: auto-detection on each named pipeline's
stand-in, pipelines described by configs of any width, llava.json and the setting, each pipeline's
geometry, and LLaVA-1.6's slot counts against transformers' processor for any size."""

from __future__ import annotations

import json
import random

import pytest
from transformers import MistralConfig

from extensions.llava.families import family_of, max_slot_count, slot_count
from extensions.llava.families.llava_next import tiling_of
from extensions.llava.families.pipelines import CLIP_224, CLIP_336, NEXT_PINPOINTS, PIPELINES, PipelineError
from extensions.llava.families.recognise import choose_pipeline, detect_pipeline, pipeline_from_config
from testbed.tiny import END_ID, START_ID, BosEncoder, img_tag, make_tokenizer, picture
from testbed.tiny_next import PIPELINE, SIZES, reference_slot_count

# ---------------------------------------------------------------- geometry


def test_seed_geometry(v0):
    engine = v0.engine()
    prepared = v0.prepare(engine, img_tag(picture(300, 200)))
    assert prepared.input_ids.shape[1] == 1 + 258
    assert prepared.input_ids[0, 1].item() == START_ID and prepared.input_ids[0, -1].item() == END_ID
    vision = engine.features.vision_parts(engine.bind(v0.llm, v0.tokenizer).choice)
    assert engine.counters.loads == 1  # the parts the prompt used
    assert vision.tower.config.image_size == 224 and vision.tower.config.patch_size == 14
    # the tower keeps only the layers up to hidden_states[-2] of the 3-layer checkpoint
    assert vision.tower.config.num_hidden_layers == 2


def test_v15_layout_and_token_count(v15):
    engine = v15.engine()
    encode = BosEncoder(v15.tokenizer)
    prompt = "Hi " + img_tag(picture(seed=1)) + " bye"
    prepared = v15.prepare(engine, prompt)
    expected = len(encode("Hi  bye")[0]) + 576  # no start/end tokens around the 576 slots
    assert prepared.input_ids.shape[1] == expected
    assert engine.token_count(prompt, engine.bind(v15.llm, v15.tokenizer, encode=encode)) == expected
    vision = engine.features.vision_parts(engine.bind(v15.llm, v15.tokenizer).choice)
    assert vision.tower.config.image_size == 336 and engine.counters.loads == 1


# ---------------------------------------------------------------- auto-detection

V0_VOCAB = {"<im_patch>": 32000, "<im_start>": 32001, "<im_end>": 32002}
V0_7B_VOCAB = {"[PAD]": 32000, "<im_patch>": 32001, "<im_start>": 32002, "<im_end>": 32003}


def original_config(hidden, tower, **extra):
    from transformers import LlamaConfig
    return LlamaConfig(hidden_size=hidden, mm_vision_tower=tower, mm_hidden_size=1024, mm_vision_select_layer=-2,
                       **extra)


def siglip_so400m() -> dict:
    """SigLIP-so400m at 384 px as llava-hf's checkpoints hold it: 26 of its 27 layers, no pooling head."""
    from transformers import SiglipVisionConfig
    return SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26, num_attention_heads=16,
                              image_size=384, patch_size=14, vision_use_head=False).to_dict()


def onevision_config(hidden):
    """llava-hf's llava-onevision-qwen2-*-hf config: the defaults of LlavaOnevisionConfig, a Qwen2 text model."""
    from transformers import LlavaOnevisionConfig, Qwen2Config
    return LlavaOnevisionConfig(vision_config=siglip_so400m(), text_config=Qwen2Config(hidden_size=hidden).to_dict(),
                                image_grid_pinpoints=[list(p) for p in PIPELINES["llava-onevision-qwen2-7b-ov"]
                                                      .grid_pinpoints])


def interleave_config(hidden):
    """llava-hf's llava-interleave-qwen-*-hf config: a plain Llava with SigLIP, layer -1, strategy full."""
    from transformers import LlavaConfig, Qwen2Config
    return LlavaConfig(vision_config=siglip_so400m(), text_config=Qwen2Config(hidden_size=hidden).to_dict(),
                       image_token_index=151646, vision_feature_layer=-1, vision_feature_select_strategy="full")


def next_config(hidden, config_class=None):
    """An original LLaVA-1.6 config (the pinpoints as released, in the LLaVA repo's order)."""
    from transformers import LlamaConfig
    return (config_class or LlamaConfig)(
        hidden_size=hidden, mm_vision_tower=CLIP_336, mm_hidden_size=1024, mm_vision_select_layer=-2,
        mm_projector_type="mlp2x_gelu", mm_use_im_start_end=False, image_aspect_ratio="anyres",
        mm_patch_merge_type="spatial_unpad",
        image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]])


STAND_INS = {
    # the folder name as released (or as people name merged weights), its config and its tokenizer's image tokens
    "llava-v0-13b": ("LLaVA-13b-v0", lambda: original_config(5120, CLIP_224, mm_use_im_start_end=True), V0_VOCAB),
    "llava-v0-7b": ("LLaVA-7b-v0", lambda: original_config(4096, CLIP_224, mm_use_im_start_end=True), V0_7B_VOCAB),
    "llava-llama-2-13b": ("llava-llama-2-13b-chat-lightning-preview",
                          lambda: original_config(5120, CLIP_224, mm_use_im_start_end=False), {}),
    "llava-v1.5-7b": ("llava-v1.5-7b", lambda: original_config(4096, CLIP_336, mm_projector_type="mlp2x_gelu",
                                                               mm_use_im_start_end=False), {}),
    "llava-v1.5-13b": ("llava-v1.5-13b", lambda: original_config(5120, CLIP_336, mm_projector_type="mlp2x_gelu",
                                                                 mm_use_im_start_end=False), {}),
    "bakllava-1": ("BakLLaVA-1", lambda: MistralConfig(hidden_size=4096, mm_vision_tower=CLIP_336,
                                                       mm_projector_type="mlp2x_gelu"), {}),
    "llava-v1.6-vicuna-7b": ("llava-v1.6-vicuna-7b", lambda: next_config(4096), {}),
    "llava-v1.6-vicuna-13b": ("llava-v1.6-vicuna-13b", lambda: next_config(5120), {}),
    "llava-v1.6-mistral-7b": ("llava-v1.6-mistral-7b", lambda: next_config(4096, MistralConfig), {}),
    "llava-v1.6-34b": ("llava-v1.6-34b", lambda: next_config(7168), {}),
    **{f"llava-onevision-qwen2-{size}-{kind}": (f"llava-onevision-qwen2-{size}-{kind}-hf",
                                                lambda hidden=hidden: onevision_config(hidden), {})
       for size, hidden in (("0.5b", 896), ("7b", 3584), ("72b", 8192)) for kind in ("ov", "si")},
    "llava-interleave-qwen-0.5b": ("llava-interleave-qwen-0.5b-hf", lambda: interleave_config(1024), {}),
    "llava-interleave-qwen-7b": ("llava-interleave-qwen-7b-hf", lambda: interleave_config(4096), {}),
}
# pipelines that only a config describes (no folder name or width alone tells them)
FROM_CONFIGS_ONLY = ("v1.6", "onevision", "interleave")


@pytest.mark.parametrize("name", list(STAND_INS))
def test_auto_detects_each_pipeline(name, tmp_path):
    folder, config, vocab = STAND_INS[name]
    path = tmp_path / folder
    path.mkdir()
    choice = choose_pipeline("auto", config(), vocab, str(path))
    assert choice.pipeline.name == name and choice.reason == "read from the model's config"
    # a folder name that says nothing still works: the config is the evidence (OneVision's "si" release has
    # the "ov" one's config: without the name, the two are one pipeline)
    nameless = name.replace("-si", "-ov") if "onevision" in name else name
    assert choose_pipeline("auto", config(), vocab, str(tmp_path / "model")).pipeline.name == nameless
    if not any(family in name for family in FROM_CONFIGS_ONLY):  # the name-and-width evidence of plain folders
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
    (lambda: original_config(64, CLIP_336, mm_projector_type="mlp2x_gelu"),
     dict(image_size=336, feature_count=576, projector_type="mlp2x_gelu", preprocess="pad", image_token="<image>")),
    (lambda: next_config(2048), dict(image_size=336, preprocess="anyres", grid_pinpoints=NEXT_PINPOINTS)),
    (lambda: original_config(96, CLIP_224, mm_use_im_start_end=True, image_aspect_ratio="square"),
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
    layout = family_of(pipeline).token_layout(pipeline, tokenizer.get_vocab())
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
    (folder / "llava.json").write_text(json.dumps({"pipeline": "llava-v1.5-7b", "vision_tower": CLIP_336,
                                                   "projector": "mm_projector.safetensors"}))
    assert choose_pipeline("auto", None, {}, str(folder)).vision_source == CLIP_336


@pytest.mark.parametrize("config,vocab,folder,why", [
    (lambda: None, {"<image>": 32000}, "some-model", "<image>"),
    (lambda: None, {}, "some-model", "no image tokens"),
])
def test_auto_says_when_it_cannot_tell(config, vocab, folder, why, tmp_path):
    with pytest.raises(PipelineError) as error:
        choose_pipeline("auto", config(), vocab, str(tmp_path / folder))
    assert why in str(error.value) and "llava-pipeline" in str(error.value)


def test_every_pipeline_has_a_stand_in():
    # the demo is only ever found through its own llava.json (tests/test_demo.py)
    assert set(STAND_INS) == set(PIPELINES) - {"llava-demo"}


# ---------------------------------------------------------------- LLaVA-1.6: slots per picture size


def test_slot_count_is_the_reference_processors_for_any_size():
    rng = random.Random(5)
    sizes = [(rng.randint(1, 6000), rng.randint(1, 6000)) for _ in range(1500)] + list(SIZES.values())
    sizes += [(1, 1), (1, 5000), (5000, 1), (336, 336), (672, 336), (1008, 336)]
    counts = {size: slot_count(PIPELINE, *size) for size in sizes}
    assert counts == {size: reference_slot_count(*size) for size in sizes}
    assert slot_count(PIPELINE, 200, 150) == 1368 and slot_count(PIPELINE, 700, 300) == 1944
    assert max(counts.values()) <= max_slot_count(PIPELINE) == 2928


def test_the_sizes_pick_different_canvases():
    canvases = {name: tiling_of(PIPELINE).patches(*size) for name, size in SIZES.items()}
    assert canvases == {"wide": (24, 48), "tall": (48, 24), "square": (48, 48), "small": (24, 48),
                        "very-wide": (24, 72), "ceil-resize": (24, 72)}


# ---------------------------------------------------------------- families


def test_every_pipeline_has_its_family():
    """Each named pipeline is laid out by its family's module; a row's family is what recognition says."""
    families = {name: family_of(pipeline).name for name, pipeline in PIPELINES.items()}
    assert {families[n] for n in ("llava-v0-13b", "llava-llama-2-13b", "llava-v1.5-7b", "bakllava-1", "llava-demo")} \
        == {"llava"}
    assert {families[n] for n in PIPELINES if n.startswith("llava-v1.6")} == {"next"}
    assert {families[n] for n in PIPELINES if n.startswith("llava-onevision")} == {"onevision"}
    assert {families[n] for n in PIPELINES if n.startswith("llava-interleave")} == {"interleave"}


def test_a_row_written_by_an_earlier_converter_still_loads(tmp_path):
    """Earlier converters wrote how OneVision lays out several pictures into the row; the family decides
    that now, and such a row gives the same pipeline."""
    onevision = PIPELINES["llava-onevision-qwen2-0.5b-ov"]
    row = {**onevision.to_json(), "name": "an older conversion", "several_pictures": "pad",
           "view_processor": "LlavaOnevisionImageProcessor"}
    folder = tmp_path / "older"
    folder.mkdir()
    (folder / "llava.json").write_text(json.dumps({"pipeline": row}))
    pipeline = choose_pipeline("auto", None, {}, str(folder)).pipeline
    assert family_of(pipeline).name == "onevision"
    assert slot_count(pipeline, 1920, 1080) == 7269 and slot_count(pipeline, 1920, 1080, among=2) == 730
