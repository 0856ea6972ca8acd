"""The fake webui's chat page and generations: the LLaVA field and the webui's attach button, browser
sessions, "embed all" per session, the 2023 webui's input_hijack, other loaders, no model loaded, and a
bad picture refused where the user sees it."""

import pytest
import torch

from extensions.llava.errors import LlavaError
from extensions.llava.prompt.parse import parse_prompt
from testbed.tiny import PATCH_ID, data_url, embedded_line, img_tag, picture, two_pictures


def test_host_generates_end_to_end(host):
    prompt = "Describe " + img_tag(picture(seed=5)) + " please:"
    reply = host.generate(prompt, host.state(max_new_tokens=6))
    assert isinstance(reply, str) and len(host.shared.tokenizer.encode(reply, add_special_tokens=False)) >= 1
    assert host.last_reply_ids.shape[0] == 6  # greedy decoding ran its six steps
    assert reply == host.shared.tokenizer.decode(host.last_reply_ids, skip_special_tokens=True)
    # the host decodes after the ids it got back: those hold the 258 image tokens
    assert host.last_prompt_ids.shape[1] == len(host.encode("Describe  please:")[0]) + 258
    # greedy continuation equals greedy decoding of the spliced embeddings by hand
    state = host.state(max_new_tokens=6)
    ids = host.encode(prompt)
    _, ids, embeds = host.script.tokenizer_modifier(state, prompt, ids, None)
    with torch.no_grad():
        first = host.shared.model(inputs_embeds=embeds).logits[0, -1].argmax().item()
    assert int(host.last_reply_ids[0]) == first


def test_upload_goes_with_the_next_message_as_an_attachment(host):
    photo = picture(120, 90, seed=11)
    host.pick(photo, session="a")
    host.chat("What is this?", host.state(max_new_tokens=2, truncation_length=4096), session="a")
    assert host.internal[0][0] == "What is this?"  # no picture data in the message text
    [attachment] = host.attachments_of(0)
    assert attachment["type"] == "image" and attachment["image_id"] == 1
    assert attachment["image_data"].startswith("data:image/png;base64,")
    shown = parse_single_image(f'<img src="{attachment["image_data"]}">')
    assert shown.size == (120, 90) and shown.tobytes() == photo.convert("RGB").tobytes()  # the file as picked
    assert int((host.last_prompt_ids == PATCH_ID).sum()) == 256
    # the field was consumed: the next turn has no new picture, but the first stays in the history
    host.chat("And now?", host.state(max_new_tokens=2, truncation_length=4096), session="a")
    assert host.attachments_of(1) == []
    assert int((host.last_prompt_ids == PATCH_ID).sum()) == 256
    assert host.engine().counters.vision_forwards == 1


def parse_single_image(text):
    images = parse_prompt(text).items
    assert len(images) == 1
    return images[0].item.load().image


def test_clearing_the_field_cancels(host):
    host.pick(picture(seed=3), session="a")
    host.pick(None, session="a")
    host.chat("no picture", host.state(max_new_tokens=1), session="a")
    assert host.attachments_of(0) == [] and host.engine().counters.vision_forwards == 0


def test_the_picked_picture_is_shown_until_it_goes_or_is_cleared(host, tmp_path):
    """The preview is the picked file itself (the browser draws it: nothing is decoded for it); a file that
    is not a picture shows nothing."""
    path = tmp_path / "photo.png"
    picture(90, 60, seed=6).save(path)
    assert host.pick_file(str(path), session="a") == str(path)
    assert host.clear_field(session="a") is None
    not_a_picture = tmp_path / "notes.png"
    not_a_picture.write_bytes(b"not a picture at all")
    assert host.pick_file(str(not_a_picture), session="a") is None
    send = host.shared.gradio["Generate"].handlers["click"]
    assert [handler() for handler in send] == [(None, None)]  # sending empties the field and its preview


def test_a_picture_goes_only_with_its_own_sessions_message(host):
    host.pick(picture(seed=5), session="a")
    host.chat("from b", host.state(max_new_tokens=1), session="b")
    host.chat("over the API", host.state(max_new_tokens=1))  # no browser session at all
    assert host.attachments_of(0) == [] and host.attachments_of(1) == []
    host.chat("from a", host.state(max_new_tokens=1), session="a")
    assert len(host.attachments_of(2)) == 1


def test_embed_all_is_chosen_per_session(host):
    host.choose_embed_all(True, session="a")
    for session, embedded in (("a", 2), ("b", 1), (None, 1)):  # b and the API follow the setting: off
        with host.browser_session(session):
            host.generate(two_pictures(), host.state(max_new_tokens=1))
        assert embedded_line(2, embedded) in host.logged


def test_a_file_that_is_not_a_picture_is_refused_when_picked(host, tmp_path):
    path = tmp_path / "notes.png"
    path.write_bytes(b"not a picture at all")
    host.pick_file(str(path), session="a")
    host.chat("hello", host.state(max_new_tokens=1), session="a")
    assert host.attachments_of(0) == []
    assert host.warned == ["llava: the picture 'notes.png' picked in the LLaVA field: the data is not a picture in a "
                           "supported format (PNG, JPEG, GIF, WebP, BMP or TIFF)"]


def test_the_2023_webuis_input_hijack(v0, host_factory):
    """The 2023 webui: no browser sessions, the picture goes into the message text through input_hijack."""
    host = host_factory(model=v0.llm, tokenizer=v0.tokenizer, settings=v0.webui_settings(), gradio_sessions=False)
    host.pick(picture(seed=4))
    hijack = host.script.input_hijack
    assert hijack["state"] is True and callable(hijack["value"])
    hijack["state"] = False  # what the seed-era host does before calling it
    text, visible = hijack["value"]("Hello <image>", "Hello <image>")
    assert text.startswith("Hello <img src=\"data:image/png") and visible.startswith("Hello <img src=\"data:image/jpeg")
    text, visible = hijack["value"]("Again <image>", "Again <image>")
    assert (text, visible) == ("Again <image>", "Again <image>")  # the picture went with its message only
    text, visible = hijack["value"]("No <image> now", "No <image> now")
    assert (text, visible) == ("No <image> now", "No <image> now")


def test_webui_attachments_fill_media_placeholders_from_the_end(host):
    first, second = picture(seed=20), picture(seed=21)
    state = host.state(image_attachments=[{"type": "image", "image_data": data_url(first)},
                                          {"type": "text", "content": "notes"},
                                          {"type": "image", "image_data": data_url(second)}])
    # history trimming dropped the first message: only one placeholder is left
    prompt = "USER: <__media__>\nwhat now?\nASSISTANT:"
    ids = host.encode(prompt)
    _, ids, embeds = host.script.tokenizer_modifier(state, prompt, ids, None)
    assert int((ids == PATCH_ID).sum()) == 256
    alone = "USER: " + img_tag(second) + "\nwhat now?\nASSISTANT:"
    _, alone_ids, alone_embeds = host.script.tokenizer_modifier(host.state(), alone, host.encode(alone), None)
    assert torch.equal(ids, alone_ids) and torch.allclose(embeds, alone_embeds)


def test_bad_image_in_chat_is_a_visible_refusal_and_history_keeps_the_message(host):
    warnings = host.warned
    with pytest.raises(LlavaError) as error:
        host.chat('look <img src="data:image/png;base64,bm90IGFuIGltYWdl">', host.state(max_new_tokens=1))
    assert str(error.value) == "picture 1 in the prompt: the data is not a picture in a supported format " \
                               "(PNG, JPEG, GIF, WebP, BMP or TIFF)"
    assert warnings == [f"llava: {error.value}"]
    assert host.internal[-1][0].startswith("look <img")  # the user's message is still there


# ---------------------------------------------------------------- other loaders


def test_unsupported_loader_says_so(v0, host_factory):
    host = host_factory(model=object(), tokenizer=v0.tokenizer, settings=v0.webui_settings(), loader="llama.cpp")
    warnings = host.warned
    host.script.input_modifier("see " + img_tag(picture()), host.state(), is_chat=True)
    assert len(warnings) == 1 and "llama.cpp loader" in warnings[0] and "Transformers loader" in warnings[0]
    host.script.input_modifier("no picture here", host.state(), is_chat=True)
    assert len(warnings) == 1
    host.pick(picture(), session="a")  # llama.cpp reads the webui's attachments itself: no warning
    history = {"internal": [], "visible": []}
    with host.browser_session("a"):
        host.script.history_modifier(history)
        host.script.chat_input_modifier("and this?", "and this?", host.state())
        host.script.input_modifier("and this?", host.state(), is_chat=True)
    assert len(warnings) == 1 and len(history["metadata"]["user_0"]["attachments"]) == 1


@pytest.mark.parametrize("loader", ["ExLlamav3_HF", "TensorRT-LLM"])
def test_loaders_that_drop_the_embeddings_are_warned(v0, host_factory, loader):
    """ExLlamav3_HF calls the tokenizer hook, but its forward reads only input_ids."""
    host = host_factory(model=v0.llm, tokenizer=v0.tokenizer, settings=v0.webui_settings(), loader=loader)
    warnings = host.warned
    host.script.input_modifier("see " + img_tag(picture()), host.state(), is_chat=False)
    host.pick(picture(), session="a")
    host.script.chat_input_modifier("and this?", "and this?", host.state())  # outside a session: no picture
    with host.browser_session("a"):  # the webui runs the chat hooks in the message's own UI event
        host.script.history_modifier({"internal": [], "visible": []})
        host.script.chat_input_modifier("and this?", "and this?", host.state())
        host.script.input_modifier("and this?", host.state(), is_chat=True)
    assert len(warnings) == 2 and all(f"the {loader} loader does not give" in w for w in warnings)
    assert "1 picture(s)" in warnings[1]


def test_no_model_loaded_does_not_crash(v0, host_factory):
    host = host_factory(model=None, tokenizer=None, settings=v0.webui_settings())
    text = "x " + img_tag(picture())
    assert host.script.custom_tokenized_length(text) is None
    assert host.script.input_modifier(text, host.state(), is_chat=True) == text
    assert host.script.input_modifier(text, host.state(), is_chat=False) == 'x <img src="llava-ref:1">'
