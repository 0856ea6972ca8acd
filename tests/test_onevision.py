"""LLaVA-OneVision and llava-interleave: SigLIP towers, Qwen2 language models, ``anyres_max_9`` tiling and
the layout of several pictures in one prompt, equal to transformers' LlavaOnevisionForConditionalGeneration
and LlavaForConditionalGeneration (their PIL processors) on tiny random models at the real geometry, through
the converter: slot counts, spliced embeddings and logits."""

import copy
import json
import os
import random

import pytest
import torch

from extensions.llava.errors import LlavaError
from extensions.llava.families.pipelines import PIPELINES
from extensions.llava.families import max_slot_count, slot_count
from extensions.llava.vision.processors import load_image_processor
from testbed.reference import chatml_prompt, compare_onevision
from testbed.tiny import convert_and_load, img_tag, picture, quiet_engine
from testbed.tiny_onevision import (SIZES, build_interleave, interleave_processor, onevision_image_processor,
                                    onevision_processor, reference_slot_count, save_hf, save_onevision_original,
                                    save_siglip_tower)

ONEVISION = PIPELINES["llava-onevision-qwen2-0.5b-ov"]  # the released geometry the tiny model shares


def test_slot_counts_are_the_reference_processors():
    rng = random.Random(7)
    sizes = [(rng.randint(1, 4000), rng.randint(1, 4000)) for _ in range(400)] + list(SIZES.values())
    assert {size: slot_count(ONEVISION, *size) for size in sizes} == {size: reference_slot_count(*size) for size in sizes}
    counts = {name: slot_count(ONEVISION, *size) for name, size in SIZES.items()}
    assert counts == {"square": 1485, "ceil-resize": 1994, "small": 1317, "full-hd": 7269, "largest": 7371,
                      "floor-division": 7209, "just-under": 8468}  # 1600² scales 135 → 80 rows, not 81
    assert slot_count(ONEVISION, 700, 300, among=2) == 730  # one of several: 729 + one newline


def test_an_unseen_picture_is_counted_at_no_less_than_any_picture_takes():
    most = max(slot_count(ONEVISION, w, h) for w in range(10, 2700, 53) for h in range(10, 2700, 53))
    assert most <= max_slot_count(ONEVISION) == 8829 and max_slot_count(ONEVISION, among=2) == 730


@pytest.mark.parametrize("name", ["full-hd", "floor-division", "ceil-resize", "small"])
def test_one_picture_equals_the_reference(onevision_converted, onevision_reference, name):
    """Scaled down to the budget (1920×1080, 1600×1600), not (700×300), smaller than a tile (200×150)."""
    image = picture(*SIZES[name], seed=11)
    _, prepared = compare_onevision(onevision_converted, onevision_reference, [image])
    image_id = onevision_converted.tokenizer.convert_tokens_to_ids("<image>")
    assert int((prepared.input_ids == image_id).sum()) == reference_slot_count(*SIZES[name])


@pytest.mark.parametrize("embed_all", [True, False])
def test_two_pictures_are_laid_out_as_several(onevision_converted, onevision_reference, embed_all):
    images = [picture(*SIZES["full-hd"], seed=12), picture(*SIZES["ceil-resize"], seed=13)]
    engine, prepared = compare_onevision(onevision_converted, onevision_reference, images, embed_all=embed_all)
    image_id = onevision_converted.tokenizer.convert_tokens_to_ids("<image>")
    assert int((prepared.input_ids == image_id).sum()) == 2 * 730
    assert engine.counters.vision_forwards == (2 if embed_all else 1)


def test_the_webuis_length_of_a_two_picture_prompt(onevision_converted, onevision_reference):
    images = [picture(*SIZES["square"], seed=14), picture(*SIZES["small"], seed=15)]
    prompt = chatml_prompt(images)
    engine = quiet_engine()
    counted = onevision_converted.token_count(engine, prompt)
    reference = onevision_processor(onevision_reference[1])(
        text=prompt.replace(img_tag(images[0]), "<image>").replace(img_tag(images[1]), "<image>"),
        images=[images], return_tensors="pt")
    assert counted == reference["input_ids"].shape[1] == onevision_converted.prepare(engine, prompt).input_ids.shape[1]


def test_tiled_and_untiled_features_are_cached_apart(onevision_converted):
    engine = quiet_engine()
    photo, other = picture(*SIZES["ceil-resize"], seed=16), picture(*SIZES["small"], seed=17)
    alone = onevision_converted.prepare(engine, chatml_prompt([photo]))
    among_two = onevision_converted.prepare(engine, chatml_prompt([other, photo]))
    again = onevision_converted.prepare(engine, chatml_prompt([photo]))
    assert engine.counters.vision_forwards == 2 and len(engine.cache) == 2  # the tiled and the square form
    assert torch.equal(again.inputs_embeds, alone.inputs_embeds)
    assert among_two.inputs_embeds.shape[1] != alone.inputs_embeds.shape[1]


def test_a_second_picture_later_in_the_chat_lays_the_first_out_again(onevision_converted):
    """The count of a picture depends on how many the prompt holds: a chat's first picture is tiled until
    a second one arrives, then both are one padded view each (as transformers lays out that prompt)."""
    first, second = picture(*SIZES["full-hd"], seed=18), picture(*SIZES["square"], seed=19)
    engine = quiet_engine()
    turn_one = chatml_prompt([first], "What is it?")
    turn_three = turn_one + "It is noise.<|im_end|>\n" + chatml_prompt([second], "And this?")
    image_id = onevision_converted.tokenizer.convert_tokens_to_ids("<image>")
    assert int((onevision_converted.prepare(engine, turn_one).input_ids == image_id).sum()) == 7269
    assert int((onevision_converted.prepare(engine, turn_three, embed_all=True).input_ids == image_id).sum()) == 1460


def test_truncation_keeps_the_layout_of_the_prompt_as_it_came(onevision_converted):
    """Two pictures, the first cut off by the context: the second keeps the layout of a picture among
    several (730 slots), the one its prompt was counted with."""
    images = [picture(*SIZES["square"], seed=20), picture(*SIZES["square"], seed=21)]
    engine = quiet_engine()
    prepared = onevision_converted.prepare(engine, chatml_prompt(images), max_length=900)
    image_id = onevision_converted.tokenizer.convert_tokens_to_ids("<image>")
    assert prepared.items_dropped == 1 and int((prepared.input_ids == image_id).sum()) == 730


def test_the_converted_folder_is_a_qwen2_model_with_its_chat_template(onevision_converted):
    config = json.load(open(os.path.join(onevision_converted.folder, "config.json")))
    assert config["architectures"] == ["Qwen2ForCausalLM"]
    rendered = onevision_converted.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                                                 add_generation_prompt=True)
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_the_siglip_processors_own_mean_is_used(onevision_converted):
    """SigLIP towers use mean and std 0.5; OneVision's image processor class defaults to CLIP's."""
    processor = load_image_processor(os.path.join(onevision_converted.folder, "vision_tower"), "SiglipImageProcessor")
    assert list(processor.image_mean) == [0.5, 0.5, 0.5] and list(processor.image_std) == [0.5, 0.5, 0.5]


def test_the_original_lmms_lab_layout_converts_and_equals_the_reference(onevision_reference, tmp_path):
    """LlavaQwenForCausalLM with its tower named (a SigLIP with one more layer, cut at -2), anyres_max_9 and
    the pinpoints written "(1x1),...,(6x6)", a tokenizer without <image> (the converter adds it)."""
    model, tokenizer = onevision_reference
    tower = save_siglip_tower(str(tmp_path / "siglip-so400m-patch14-384"), model, extra_layer=True)
    src = save_onevision_original(str(tmp_path / "llava-onevision-qwen2-tiny-ov"), model, tokenizer, tower)
    result, loaded = convert_and_load(src, str(tmp_path / "converted"))
    assert list(result["added_tokens"]) == ["<image>"] and type(loaded.model).__name__ == "Qwen2ForCausalLM"
    row = json.load(open(os.path.join(loaded.folder, "llava.json")))["pipeline"]
    assert (row["tower"], row["max_tiles"], row["vision_feature_layer"], len(row["grid_pinpoints"])) == \
        ("siglip", 9, -2, 36)
    compare_onevision(loaded, onevision_reference, [picture(*SIZES["full-hd"], seed=22)], added_token="<image>")


@pytest.mark.parametrize("count", [1, 2])
def test_llava_interleave_equals_the_reference(tmp_path, count):
    """A plain LlavaForConditionalGeneration with a SigLIP tower: 729 slots a picture, squashed to 384, no tiles."""
    model, tokenizer = build_interleave()
    src = save_hf(str(tmp_path / "llava-interleave-qwen-tiny-hf"), model, tokenizer,
                  interleave_processor(tokenizer).image_processor)
    _, loaded = convert_and_load(src, str(tmp_path / "converted"))
    images = [picture(700, 300, seed=23), picture(100, 900, seed=24)][:count]
    _, prepared = compare_onevision(loaded, (model, tokenizer), images)
    assert int((prepared.input_ids == loaded.tokenizer.convert_tokens_to_ids("<image>")).sum()) == 729 * count


def test_a_siglip_checkpoint_whose_files_disagree_is_refused_naming_the_file(onevision_reference, tmp_path):
    """A projector that takes other features than the tower gives: a refusal that names the files, never a
    shape error from torch."""
    from safetensors.torch import load_file, save_file
    model, tokenizer = onevision_reference
    src = save_hf(str(tmp_path / "llava-onevision-qwen2-tiny-ov-hf"), model, tokenizer, onevision_image_processor())
    _, loaded = convert_and_load(src, str(tmp_path / "converted"))
    projector_file = os.path.join(loaded.folder, "mm_projector.safetensors")
    state = load_file(projector_file)
    state["model.mm_projector.0.weight"] = torch.zeros(state["model.mm_projector.0.weight"].shape[0], 48)
    save_file(state, projector_file)
    with pytest.raises(LlavaError) as error:
        loaded.prepare(quiet_engine(), chatml_prompt([picture(seed=25)]))
    message = str(error.value)
    assert projector_file in message and "the projector takes 48-wide features but the vision tower gives 32-wide" \
        in message


def test_a_processor_style_chat_template_is_replaced_by_chatml(onevision_reference, tmp_path):
    """llava-hf's templates expect a message's content as a list of parts; the webui sends text: the converted
    Qwen2 folder gets ChatML, Qwen2's own turns."""
    model, tokenizer = onevision_reference
    parts_only = ("{% for message in messages %}{% for part in message['content'] %}{{ part['text'] }}{% endfor %}"
                  "{% endfor %}")
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = parts_only
    src = save_hf(str(tmp_path / "llava-onevision-qwen2-tiny-ov-hf"), model, tokenizer, onevision_image_processor())
    result, loaded = convert_and_load(src, str(tmp_path / "converted"))
    assert "ChatML chat template" in result["written"]
    assert loaded.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == \
        "<|im_start|>user\nhi<|im_end|>\n"
