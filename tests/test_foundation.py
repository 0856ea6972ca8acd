"""Issue 2: the seed pipeline through the webui hooks, equal to transformers' LLaVA."""

import pytest
import torch

from extensions.llava.engine import LlavaEngine
from extensions.llava.errors import LlavaError
from extensions.llava.settings import Settings, SettingsError
from extensions.llava.preprocess import load_image_processor
from testbed.tiny import END_ID, PATCH_ID, START_ID, BosEncoder, reference_run, img_tag, make_llm, make_tokenizer, picture



def engine_for(v0, **extra):
    return LlavaEngine(Settings.from_params({**v0.settings_params, **extra}), log=lambda m: None)


@pytest.mark.parametrize("count", [1, 3])
@pytest.mark.parametrize("embed_all", [True, False])
def test_hooks_equal_reference(v0, v0_reference, host_factory, count, embed_all):
    host = host_factory(model=v0.llm, tokenizer=v0.tokenizer,
                        settings=v0.webui_settings()
                        | {"llava-add_all_images_to_prompt": embed_all})
    images = [picture(80 + 10 * i, 60, seed=i) for i in range(count)]
    prompt = "Look: " + " and ".join(img_tag(im) for im in images) + "\nWhat do you see?"
    state = host.state()
    ids = host.encode(prompt, truncation_length=state["truncation_length"] - state["max_new_tokens"])
    _, ids, embeds = host.script.tokenizer_modifier(state, prompt, ids, None)
    assert ids.shape[1] == embeds.shape[1]
    assert int((ids == PATCH_ID).sum()) == 256 * count
    assert int((ids == START_ID).sum()) == count and int((ids == END_ID).sum()) == count
    processor = load_image_processor(v0.clip_dir)
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    features_instead = None if embed_all else v0.llm.get_input_embeddings().weight[PATCH_ID]
    ref_embeds, ref_logits = reference_run(v0_reference, ids, pixels, earlier_images_as=features_instead)
    with torch.no_grad():
        logits = v0.llm(inputs_embeds=embeds).logits
    embed_diff = (ref_embeds - embeds).abs().max().item()
    logit_diff = (ref_logits - logits).abs().max().item()
    print(f"count={count} embed_all={embed_all}: max embed diff {embed_diff:.3g}, max logit diff {logit_diff:.3g}")
    assert embed_diff <= 1e-6
    assert logit_diff <= 1e-4
    # with "embed all" off, earlier images keep their patch-token embeddings
    patch_rows = (ids[0] == PATCH_ID).nonzero().flatten()
    first = embeds[0, patch_rows[0]]
    patch_embedding = v0.llm.get_input_embeddings().weight[PATCH_ID]
    if count > 1 and not embed_all:
        assert torch.equal(first, patch_embedding)
    else:
        assert not torch.equal(first, patch_embedding)


def test_host_generates_end_to_end(v0, host_factory):
    host = host_factory(model=v0.llm, tokenizer=v0.tokenizer,
                        settings=v0.webui_settings())
    prompt = "Describe " + img_tag(picture(seed=5)) + " please:"
    reply = host.generate(prompt, host.state(max_new_tokens=6))
    assert isinstance(reply, str) and len(host.shared.tokenizer.encode(reply, add_special_tokens=False)) >= 1
    # the host decodes after the ids it got back: those hold the 258 image tokens
    assert host.last_prompt_ids.shape[1] == len(host.encode("Describe  please:")[0]) + 258
    # greedy continuation equals greedy decoding of the spliced embeddings by hand
    state = host.state(max_new_tokens=6)
    ids = host.encode(prompt)
    _, ids, embeds = host.script.tokenizer_modifier(state, prompt, ids, None)
    with torch.no_grad():
        first = v0.llm(inputs_embeds=embeds).logits[0, -1].argmax().item()
    assert int(host.last_reply_ids[0]) == first


def test_prompt_without_image_passes_untouched(v0, host_factory):
    host = host_factory(model=v0.llm, tokenizer=v0.tokenizer,
                        settings=v0.webui_settings())
    ids = host.encode("no pictures here <b>bold</b>")
    prompt, same_ids, embeds = host.script.tokenizer_modifier(host.state(), "no pictures here <b>bold</b>", ids, None)
    assert same_ids is ids and embeds is None and prompt == "no pictures here <b>bold</b>"
    assert host.engine().counters.loads == 0  # nothing loaded for a text-only prompt


def test_vision_loads_lazily_once(v0):
    engine = engine_for(v0)
    assert engine.counters.loads == 0
    for seed in range(2):
        v0.prepare(engine, "x " + img_tag(picture(seed=seed)))
    assert engine.counters.loads == 1 and engine.counters.vision_forwards == 2


def test_truncation_through_an_image_drops_it_whole(v0):
    engine = engine_for(v0, add_all_images_to_prompt=True)
    images = [picture(seed=i) for i in range(3)]
    prompt = "A " + img_tag(images[0]) + " B " + img_tag(images[1]) + " C " + img_tag(images[2]) + " end"
    full = v0.prepare(engine, prompt)
    length = full.input_ids.shape[1]
    # keep 300 tokens: the cut falls inside the second image
    cut = v0.prepare(engine, prompt,
                         max_length=300)
    assert cut.images_dropped == 2 and cut.images_embedded == 1
    assert cut.input_ids.shape[1] < 300 and cut.inputs_embeds.shape[1] == cut.input_ids.shape[1]
    assert torch.equal(cut.input_ids[0], full.input_ids[0, length - cut.input_ids.shape[1]:])
    assert int((cut.input_ids == PATCH_ID).sum()) == 256 and cut.input_ids[0, 0].item() != PATCH_ID
    assert any("2 image(s)" in note for note in cut.notes)
    # the kept image's rows equal its rows in the untruncated splice: nothing shifted
    assert torch.allclose(cut.inputs_embeds[0], full.inputs_embeds[0, length - cut.input_ids.shape[1]:])
    # a cut right after the first image (BOS, "A", " ", 258 image tokens) keeps the two others
    between = v0.prepare(engine, prompt,
                             max_length=length - 261)
    assert between.images_dropped == 1 and between.input_ids.shape[1] == length - 261
    # a cut before the first image drops none
    early = v0.prepare(engine, prompt,
                           max_length=length - 2)
    assert early.images_dropped == 0 and early.images_embedded == 3 and early.input_ids.shape[1] == length - 2


def test_token_length_counts_images_without_decoding(v0, host_factory):
    host = host_factory(model=v0.llm, tokenizer=v0.tokenizer,
                        settings=v0.webui_settings())
    prompt = "Hi " + img_tag(picture(seed=1)) + " and " + img_tag(picture(seed=2)) + " bye"
    expected = len(host.encode("Hi  and  bye")[0]) + 2 * 258
    assert host.script.custom_tokenized_length(prompt) == expected
    # the same number as the ids the hook builds
    _, ids, _ = host.script.tokenizer_modifier(host.state(), prompt, host.encode(prompt), None)
    assert ids.shape[1] == expected
    # an undecodable image counts the same: its data is never looked at
    broken = "Hi " + '<img src="data:image/png;base64,!!!not base64!!!">' + " bye"
    assert host.script.custom_tokenized_length(broken) == len(host.encode("Hi  bye")[0]) + 258
    assert host.script.custom_tokenized_length("plain text") is None


@pytest.mark.parametrize("key,value,allowed", [
    ("clip_bits", 8, "16 or 32"), ("projector_bits", "x", "16 or 32"),
    ("clip_device", "tpu:7", "allowed on this machine: cpu"), ("projector_device", "cuda:99", "cpu"),
    ("add_all_images_to_prompt", "maybe", "true or false"), ("cache_size_mb", -1, "0 or more"),
])
def test_bad_settings_name_the_setting(key, value, allowed):
    with pytest.raises(SettingsError) as error:
        Settings.from_params({key: value})
    assert f"llava-{key}" in str(error.value) and allowed in str(error.value)


def test_bad_setting_in_host_does_not_crash_and_reports_on_use(v0, host_factory, caplog):
    host = host_factory(model=v0.llm, tokenizer=v0.tokenizer,
                        settings=v0.webui_settings(clip_bits=8))
    with pytest.raises(LlavaError) as error:
        host.generate("x " + img_tag(picture()))
    assert "llava-clip_bits" in str(error.value)
    # text-only generation is untouched by the bad setting: the same reply as with good settings
    reply = host.generate("text only", host.state(max_new_tokens=4))
    clean = host_factory(model=v0.llm, tokenizer=v0.tokenizer,
                         settings=v0.webui_settings())
    assert reply == clean.generate("text only", clean.state(max_new_tokens=4))


def test_projector_width_mismatch_is_one_clear_error(v0):
    wide_llm = make_llm(len(v0.tokenizer), width=96)
    engine = engine_for(v0)
    with pytest.raises(LlavaError) as error:
        v0.prepare(engine, "x " + img_tag(picture()), model=wide_llm, tokenizer=v0.tokenizer,
                       encode=BosEncoder(v0.tokenizer), max_length=None)
    assert "64-wide" in str(error.value) and "96 wide" in str(error.value) and "wrong model" in str(error.value)


def test_tokenizer_without_image_tokens_is_one_clear_error(v0):
    plain = make_tokenizer(image_tokens=())
    engine = engine_for(v0)
    with pytest.raises(LlavaError) as error:
        engine.prepare("x " + img_tag(picture()), model=v0.llm, tokenizer=plain, encode=BosEncoder(plain),
                       max_length=None)
    assert "<im_patch>" in str(error.value) and "llava-v0-13b" in str(error.value)


def test_seed_geometry(v0):
    engine = engine_for(v0)
    prepared = v0.prepare(engine, img_tag(picture(300, 200)))
    assert prepared.input_ids.shape[1] == 1 + 258
    assert prepared.input_ids[0, 1].item() == START_ID and prepared.input_ids[0, -1].item() == END_ID
    vision = engine.vision_parts(engine.choice_for(v0.llm, v0.tokenizer))
    assert engine.counters.loads == 1  # the parts the prompt used
    assert vision.tower.config.image_size == 224 and vision.tower.config.patch_size == 14
    # the tower keeps only the layers up to hidden_states[-2] of the 3-layer checkpoint
    assert vision.tower.config.num_hidden_layers == 2


def test_settings_defaults_match_template():
    import json
    import os
    from extensions.llava.settings import DEFAULTS
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "settings-template.json")) as f:
        template = json.load(f)
    assert template == {f"llava-{k}": v for k, v in DEFAULTS.items()}
