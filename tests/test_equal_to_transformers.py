"""Our embeddings and logits equal transformers' own: LlavaForConditionalGeneration for v0 (through the
webui's hooks) and v1.5 (with LLaVA's padding colour), LlavaNextForConditionalGeneration for 1.6 at
pictures of every canvas, one picture or two."""

import pytest
import torch
from PIL import Image

from extensions.llava.families import slot_count
from extensions.llava.families.pipelines import get_pipeline
from extensions.llava.vision.processors import fixed_views, load_image_processor
from testbed.reference import assert_matches, compare_next, logits_of, ours, reference_pixels
from testbed.tiny import END_ID, PATCH_ID, START_ID, img_tag, picture, reference_run
from testbed.tiny_family import IMAGE_ID, llava_mean_colour
from testbed.tiny_next import PIPELINE, SIZES, reference_slot_count


@pytest.mark.parametrize("count", [1, 3])
@pytest.mark.parametrize("embed_all", [True, False])
def test_hooks_equal_reference(v0, v0_reference, host_factory, count, embed_all):
    host = host_factory(model=v0.llm, tokenizer=v0.tokenizer,
                        settings=v0.webui_settings(add_all_images_to_prompt=embed_all))
    images = [picture(80 + 10 * i, 60, seed=i) for i in range(count)]
    prompt = "Look: " + " and ".join(img_tag(im) for im in images) + "\nWhat do you see?"
    state = host.state()
    ids = host.encode(prompt, truncation_length=state["truncation_length"] - state["max_new_tokens"])
    _, ids, embeds = host.script.tokenizer_modifier(state, prompt, ids, None)
    text = "Look: " + " and " * (count - 1) + "\nWhat do you see?"  # the prompt without its pictures
    assert ids.shape[1] == embeds.shape[1] == len(host.encode(text)[0]) + 258 * count
    assert int((ids == PATCH_ID).sum()) == 256 * count
    assert int((ids == START_ID).sum()) == count and int((ids == END_ID).sum()) == count
    pixels = load_image_processor(v0.clip_dir)(images=images, return_tensors="pt")["pixel_values"]
    patch_embedding = v0.llm.get_input_embeddings().weight[PATCH_ID]
    ref_embeds, ref_logits = reference_run(v0_reference, ids, pixels,
                                           earlier_images_as=None if embed_all else patch_embedding)
    assert_matches(f"count={count} embed_all={embed_all}", embeds, ref_embeds, logits_of(v0.llm, embeds), ref_logits)
    # with "embed all" off, earlier images keep their patch-token embeddings
    first = embeds[0, (ids[0] == PATCH_ID).nonzero().flatten()[0]]
    assert torch.equal(first, patch_embedding) == (count > 1 and not embed_all)


def test_padding_is_the_truncated_mean_colour(v15):
    """LLaVA fills with int(mean * 255), not round(): (122, 116, 104) for CLIP's mean."""
    processor = load_image_processor(v15.clip_dir)
    assert llava_mean_colour(processor.image_mean) == (122, 116, 104)
    pixels = fixed_views([Image.new("RGB", (64, 16), (0, 0, 0))], processor, pad=get_pipeline("llava-v1.5-7b").preprocess == "pad")
    expected = (torch.tensor([122, 116, 104]) / 255 - torch.tensor(processor.image_mean)) / torch.tensor(processor.image_std)
    assert torch.allclose(pixels[0, :, 0, 0], expected.float(), atol=1e-6)  # a corner lies in the padding


def wide_square_and_tall():
    return [picture(90, 40, seed=21), picture(50, 50, seed=22), picture(30, 70, seed=23)]


@pytest.mark.parametrize("which", [[0], [0, 1, 2]], ids=["wide", "wide+square+tall"])
def test_v15_equals_reference(v15, v15_reference, which):
    images = [wide_square_and_tall()[i] for i in which]
    prompt = "USER: " + " ".join(img_tag(image) for image in images) + "\nWhat is shown? ASSISTANT:"
    prepared, logits = ours(v15.engine(), prompt, v15.llm, v15.tokenizer)
    ids = prepared.input_ids
    assert int((ids == IMAGE_ID).sum()) == 576 * len(images)
    ref_embeds, ref_logits = reference_run(v15_reference, ids, reference_pixels(v15.clip_dir, images, pad=True))
    assert_matches(f"v1.5 {len(images)} image(s)", prepared.inputs_embeds, ref_embeds, logits, ref_logits)
    if len(images) > 1:
        return
    # the check is sensitive to the padding and to its exact colour
    unpadded, _ = reference_run(v15_reference, ids, reference_pixels(v15.clip_dir, images, pad=False))
    assert (unpadded - prepared.inputs_embeds).abs().max().item() > 1e-3
    rounded = tuple(round(x * 255) for x in load_image_processor(v15.clip_dir).image_mean)
    assert rounded != (122, 116, 104)
    off_colour, _ = reference_run(v15_reference, ids, reference_pixels(v15.clip_dir, images, pad=True, colour=rounded))
    assert (off_colour - prepared.inputs_embeds).abs().max().item() > 1e-6


@pytest.mark.parametrize("name", list(SIZES))
def test_next_equals_reference(next_converted, next_reference, name):
    width, height = SIZES[name]
    image = picture(width, height, seed=100 + list(SIZES).index(name))
    engine, prepared = compare_next(next_converted, next_reference, [image])
    assert int((prepared.input_ids == IMAGE_ID).sum()) == reference_slot_count(width, height) \
        == slot_count(PIPELINE, width, height)
    assert engine.counters.vision_forwards == 1


@pytest.mark.parametrize("embed_all", [True, False], ids=["embed-all", "last-only"])
def test_two_pictures(next_converted, next_reference, embed_all):
    images = [picture(*SIZES["wide"], seed=61), picture(*SIZES["tall"], seed=62)]
    engine, prepared = compare_next(next_converted, next_reference, images, embed_all=embed_all)
    assert prepared.items_embedded == (2 if embed_all else 1)
    assert int((prepared.input_ids == IMAGE_ID).sum()) == sum(reference_slot_count(*image.size) for image in images)
    # all new pictures' tiles go through the tower together
    assert engine.counters.vision_batches == 1 and engine.counters.vision_forwards == (2 if embed_all else 1)


@pytest.mark.parametrize("preprocess,padded", [("as_trained", True), ("as_processor", False)])
def test_v15_preprocess_setting(v15, v15_reference, preprocess, padded):
    """``llava-preprocess``: as trained, a wide picture is padded to a square (transformers'
    LlavaImageProcessor with do_pad); as the checkpoint's processor says, it is resized and centre-cropped
    by its CLIPImageProcessor, as transformers' LlavaProcessor and vLLM feed a llava-hf v1.5."""
    images = [picture(90, 40, seed=21)]
    prompt = "USER: " + img_tag(images[0]) + "\nWhat is shown? ASSISTANT:"
    prepared, logits = ours(v15.engine(preprocess=preprocess), prompt, v15.llm, v15.tokenizer)
    ids = prepared.input_ids
    assert int((ids == IMAGE_ID).sum()) == 576  # the same slots either way
    ref_embeds, ref_logits = reference_run(v15_reference, ids, reference_pixels(v15.clip_dir, images, pad=padded))
    assert_matches(f"v1.5 {preprocess}", prepared.inputs_embeds, ref_embeds, logits, ref_logits)
    other_embeds, other_logits = reference_run(v15_reference, ids,
                                               reference_pixels(v15.clip_dir, images, pad=not padded))
    assert (other_logits - logits).abs().max().item() > 1e-3  # the two ways differ on this picture
