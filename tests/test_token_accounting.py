"""Counting tokens as the webui does: pictures at their full length without decoding them, placeholders
as their pictures, truncation that drops whole pictures, the webui's history trimming that never cuts
one, and a reply that ends at the context length."""

import pytest
import torch

from extensions.llava.errors import LlavaError
from extensions.llava.families import max_slot_count, slot_count
from extensions.llava.media import pictures
from extensions.llava.media.items import DataUrlItem
from extensions.llava.prompt.parse import parse_prompt
from testbed.photos import turned_jpeg
from testbed.tiny import PATCH_ID, bytes_url, data_url, img_tag, llama_config, picture, quiet_engine
from testbed.tiny_family import IMAGE_ID
from testbed.tiny_next import PIPELINE, SIZES
from testbed.watch import record_calls


def test_token_length_counts_images_without_decoding(host):
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


def test_truncation_through_an_image_drops_it_whole(v0):
    engine = v0.engine(add_all_images_to_prompt=True)
    pictures = [picture(seed=i) for i in range(3)]
    prompt = "A " + img_tag(pictures[0]) + " B " + img_tag(pictures[1]) + " C " + img_tag(pictures[2]) + " end"
    full = v0.prepare(engine, prompt)
    length = full.input_ids.shape[1]
    assert length == 1 + len("A  B  C  end") + 3 * 258
    # keep 300 tokens: the cut falls inside the second image, which goes whole
    cut = v0.prepare(engine, prompt, max_length=300)
    assert cut.items_dropped == 2 and cut.items_embedded == 1
    assert cut.input_ids.shape[1] == cut.inputs_embeds.shape[1] == len(" C ") + 258 + len(" end")
    assert torch.equal(cut.input_ids[0], full.input_ids[0, length - cut.input_ids.shape[1]:])
    assert int((cut.input_ids == PATCH_ID).sum()) == 256 and cut.input_ids[0, 0].item() != PATCH_ID
    assert cut.notes == ["the prompt is longer than the context allows: 2 picture(s) at its start were cut off "
                         "and dropped whole (1 kept)"]
    # the kept image's rows equal its rows in the untruncated splice: nothing shifted
    assert torch.allclose(cut.inputs_embeds[0], full.inputs_embeds[0, length - cut.input_ids.shape[1]:])
    # a cut right after the first image (BOS, "A", " ", 258 image tokens) keeps the two others
    between = v0.prepare(engine, prompt, max_length=length - 261)
    assert between.items_dropped == 1 and between.input_ids.shape[1] == length - 261
    # a cut before the first image drops none
    early = v0.prepare(engine, prompt, max_length=length - 2)
    assert early.items_dropped == 0 and early.items_embedded == 3 and early.input_ids.shape[1] == length - 2


def test_hundred_images_in_one_prompt(v0):
    engine = v0.engine(add_all_images_to_prompt=True)
    tags = [img_tag(picture(8, 8, seed=i % 5)) for i in range(100)]
    prepared = v0.prepare(engine, " ".join(tags))
    assert prepared.items_embedded == 100 and int((prepared.input_ids == PATCH_ID).sum()) == 25600
    assert prepared.input_ids.shape[1] == 1 + 99 + 100 * 258
    assert engine.counters.vision_forwards == 5  # five distinct pictures


def test_one_image_longer_than_the_context(v0):
    engine = v0.engine()
    prepared = v0.prepare(engine, "text " + img_tag(picture()) + " question?", max_length=100)
    assert prepared.items_dropped == 1 and prepared.items_embedded == 0
    assert int((prepared.input_ids >= 32000).sum()) == 0 and prepared.input_ids.shape[1] == len(" question?")
    with pytest.raises(LlavaError) as error:
        v0.prepare(engine, "text " + img_tag(picture()), max_length=100)
    assert "truncation_length" in str(error.value)


# ---------------------------------------------------------------- any resolution: each picture at its own size


def turned_jpeg_url(width, height):
    """A JPEG stored ``width`` × ``height`` whose EXIF says to show it turned 90°."""
    return bytes_url(turned_jpeg(picture(width, height, seed=81)), "image/jpeg")


def test_token_count_reads_headers_only_and_agrees_with_prepare(next_converted, monkeypatch):
    engine = quiet_engine()
    url = turned_jpeg_url(600, 300)  # shown 300 wide, 600 tall
    prompt = f'USER: <img src="{url}"> and {img_tag(picture(*SIZES["very-wide"], seed=82))} ASSISTANT:'
    decoded = record_calls(monkeypatch, pictures, "open_picture")
    counted = next_converted.token_count(engine, prompt)
    assert decoded == []
    prepared = next_converted.prepare(engine, prompt)
    assert counted == prepared.input_ids.shape[1] and len(decoded) == 1  # the last picture ("embed all" is off)
    assert int((prepared.input_ids == IMAGE_ID).sum()) == \
        slot_count(PIPELINE, 300, 600) + slot_count(PIPELINE, 2400, 200)


def test_placeholders_count_as_their_pictures(next_converted):
    """``<__media__>`` attachments count at their own sizes; unseen ones at the most a picture takes."""
    engine = quiet_engine()
    media = [DataUrlItem.from_url(turned_jpeg_url(600, 300)),
             DataUrlItem.from_url(data_url(picture(*SIZES["small"])))]
    prompt = "USER: <__media__><__media__>\nHi ASSISTANT:"
    text_only = len(next_converted.encode("USER: \nHi ASSISTANT:")[0])
    both = text_only + slot_count(PIPELINE, 300, 600) + slot_count(PIPELINE, 200, 150)
    assert next_converted.token_count(engine, prompt, media=media) == both
    assert next_converted.token_count(engine, prompt) == text_only + 2 * max_slot_count(PIPELINE)
    assert next_converted.prepare(engine, prompt, media=media).input_ids.shape[1] == both


def test_truncation_drops_whole_pictures_of_different_sizes(next_converted):
    engine = quiet_engine()
    pictures = [picture(*SIZES["very-wide"], seed=91), picture(*SIZES["small"], seed=92)]
    prompt = f"A {img_tag(pictures[0])} B {img_tag(pictures[1])} C"
    full = next_converted.prepare(engine, prompt)
    small = slot_count(PIPELINE, *SIZES["small"])
    for max_length in (small + 10, full.input_ids.shape[1] - 100):  # cuts inside the first picture
        prepared = next_converted.prepare(engine, prompt, max_length=max_length)
        assert prepared.items_dropped == 1 and prepared.input_ids.shape[1] == len(" B ") + small + len(" C")
        assert int((prepared.input_ids == IMAGE_ID).sum()) == small
        assert torch.equal(prepared.inputs_embeds[0, -prepared.input_ids.shape[1]:],
                           full.inputs_embeds[0, -prepared.input_ids.shape[1]:])


# ---------------------------------------------------------------- the webui's history trimming


def assert_the_prompt_fits(host, state, picture_tokens: int) -> None:
    """The last generation's ids are its prompt's text and ``picture_tokens`` for its pictures, nothing cut,
    and they fit the budget."""
    text = parse_prompt(host.last_prompt).text_only().replace("<__media__>", "")
    assert host.last_prompt_ids.shape[1] == len(host.encode(text)[0]) + picture_tokens
    assert host.last_prompt_ids.shape[1] <= state["truncation_length"] - state["max_new_tokens"]


def test_history_trimming_drops_an_early_image(host):
    state = host.state(max_new_tokens=1, truncation_length=600)
    host.chat("first " + img_tag(picture(seed=40)), state)
    host.chat("second " + img_tag(picture(seed=41)), state)
    host.chat("third, no picture", state)
    # the budget (599 tokens) holds one picture turn: the host's count, through custom_tokenized_length,
    # dropped the first turn rather than cutting into a picture
    assert int((host.last_prompt_ids == PATCH_ID).sum()) == 256
    assert host.last_prompt.startswith("USER: second <img")
    assert_the_prompt_fits(host, state, 258)


def test_history_trimming_keeps_whole_pictures_of_different_sizes(next_converted, host_factory):
    """Three chat turns with attached pictures of different sizes fill the context: the host drops the
    oldest turns by the length the extension reports (each picture at its own slot count) until the
    prompt fits, so the tokenizer hook never has to cut a picture."""
    host = host_factory(**next_converted.in_the_webui())
    sizes = [SIZES["small"], SIZES["very-wide"], SIZES["square"]]
    counts = [slot_count(PIPELINE, *size) for size in sizes]
    assert counts == [1368, 1014, 2830]
    # room for the last two turns' pictures, not for all three
    state = host.state(truncation_length=counts[1] + counts[2] + 600, max_new_tokens=8)
    for turn, size in enumerate(sizes):
        host.chat(f"Turn {turn}: what is this?", dict(state), attachments=[picture(*size, seed=100 + turn)])
        slots = int((host.last_prompt_ids == IMAGE_ID).sum())
        expected = {0: [counts[0]], 1: [counts[0], counts[1]], 2: [counts[1], counts[2]]}[turn]
        assert slots == sum(expected), (turn, slots, expected)
        assert_the_prompt_fits(host, state, sum(expected))
    assert host.last_prompt.startswith("USER: <__media__>\n\nTurn 1: what is this?")
    assert not host.warned, host.warned  # nothing was cut by the hook
    assert host.engine().counters.vision_forwards == 3  # the earlier pictures came from the cache


# ---------------------------------------------------------------- replies sized by the webui


def test_a_reply_ends_at_the_context_length():
    from transformers import LlamaForCausalLM

    from extensions.llava.tokens.context_limit import EndAtContextLength, reply_limit
    torch.manual_seed(0)
    llm = LlamaForCausalLM(llama_config(300)).eval()
    prompt = torch.randint(3, 300, (1, 10))
    with torch.no_grad():
        unlimited = llm.generate(prompt, max_new_tokens=40, do_sample=False, eos_token_id=2, pad_token_id=0)
        limited = llm.generate(prompt, max_new_tokens=40, do_sample=False, eos_token_id=2, pad_token_id=0,
                               logits_processor=[EndAtContextLength(25, [2])])
    assert unlimited.shape[1] == 50 and 2 not in unlimited[0, 10:].tolist()
    assert limited.shape[1] == 25 and limited[0, -1].item() == 2
    assert torch.equal(limited[0, :24], unlimited[0, :24])  # nothing else changed
    state = {"auto_max_new_tokens": True, "truncation_length": 4096}
    assert reply_limit(state, prompt_grew=True) == 4096
    assert reply_limit(state, prompt_grew=False) is None
    assert reply_limit({**state, "auto_max_new_tokens": False}, prompt_grew=True) is None
