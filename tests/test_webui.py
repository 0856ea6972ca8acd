"""Issue 3: what a webui user does — chat uploads, attachments, the APIs, other loaders."""


import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient

from extensions.llava.api.generate_route import add_generate_route, completion_body
from extensions.llava.errors import LlavaError
from testbed.tiny import PATCH_ID, data_url, img_tag, picture



@pytest.fixture
def host(v0, host_factory):
    return host_factory(model=v0.llm, tokenizer=v0.tokenizer, settings=v0.webui_settings())


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
    from extensions.llava.prompt import parse_prompt
    images = parse_prompt(text).images
    assert len(images) == 1
    return images[0].source.load().image


def test_clearing_the_field_cancels(host):
    host.pick(picture(seed=3), session="a")
    host.pick(None, session="a")
    host.chat("no picture", host.state(max_new_tokens=1), session="a")
    assert host.attachments_of(0) == [] and host.engine().counters.vision_forwards == 0


def test_a_picture_goes_only_with_its_own_sessions_message(host):
    host.pick(picture(seed=5), session="a")
    host.chat("from b", host.state(max_new_tokens=1), session="b")
    host.chat("over the API", host.state(max_new_tokens=1))  # no browser session at all
    assert host.attachments_of(0) == [] and host.attachments_of(1) == []
    host.chat("from a", host.state(max_new_tokens=1), session="a")
    assert len(host.attachments_of(2)) == 1


def test_embed_all_is_chosen_per_session(host):
    host.choose_embed_all(True, session="a")
    two = "first " + img_tag(picture(seed=1)) + " second " + img_tag(picture(seed=2))
    for session, embedded in (("a", 2), ("b", 1), (None, 1)):  # b and the API follow the setting: off
        with host.browser_session(session):
            host.generate(two, host.state(max_new_tokens=1))
        assert f"llava: 2 image(s) in the prompt, {embedded} embedded" in host.logged


def test_a_file_that_is_not_a_picture_is_refused_when_picked(host, tmp_path, caplog):
    path = tmp_path / "notes.png"
    path.write_bytes(b"not a picture at all")
    host.pick_file(str(path), session="a")
    host.chat("hello", host.state(max_new_tokens=1), session="a")
    assert host.attachments_of(0) == []
    assert "the picture 'notes.png' picked in the LLaVA field: the data is not a picture" in caplog.text


def test_seed_era_input_hijack(v0, host_factory):
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


def test_chat_api_raw_images(host):
    photo = picture(seed=30)
    state = host.state(raw_images=[photo])
    prompt = "<__media__>\n\nWhat is in the picture?"
    _, ids, embeds = host.script.tokenizer_modifier(state, prompt, host.encode(prompt), None)
    assert int((ids == PATCH_ID).sum()) == 256 and embeds.shape[1] == ids.shape[1]
    reference = img_tag(photo) + "\n\nWhat is in the picture?"
    _, _, same = host.script.tokenizer_modifier(host.state(), reference, host.encode(reference), None)
    assert torch.allclose(embeds, same, atol=1e-6)


def test_chat_completions_history_messages(host):
    """/v1/chat/completions: placeholders in the prompt, the pictures only in state['history']['messages']."""
    first, second = picture(seed=31), picture(seed=32)
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(first)}},
                                             {"type": "text", "text": "first"}]},
                {"role": "assistant", "content": "ok"},
                {"role": "user", "content": [{"type": "text", "text": "second"},
                                             {"type": "image_url", "image_url": {"url": data_url(second)}}]}]
    state = host.state(history={"internal": [], "visible": [], "messages": messages})
    prompt = "### Instruction:\n<__media__>\n\nfirst\n### Response:\nok\n### Instruction:\n<__media__>\n\nsecond"
    _, ids, embeds = host.script.tokenizer_modifier(state, prompt, host.encode(prompt), None)
    expected = prompt.replace("<__media__>", img_tag(first), 1).replace("<__media__>", img_tag(second), 1)
    _, same_ids, same = host.script.tokenizer_modifier(host.state(), expected, host.encode(expected), None)
    assert torch.equal(ids, same_ids) and torch.allclose(embeds, same, atol=1e-6)
    web = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}]
    with pytest.raises(LlavaError) as error:
        host.script.tokenizer_modifier(host.state(history={"messages": web}), "<__media__>\nx", host.encode("x"), None)
    assert "image 1 in the request" in str(error.value) and "never fetches" in str(error.value)
    # the webui rejects a bare string as image_url; so do we, instead of dropping the picture
    bare = [{"role": "user", "content": [{"type": "image_url", "image_url": data_url(second)}]}]
    with pytest.raises(LlavaError) as error:
        host.script.tokenizer_modifier(host.state(history={"messages": bare}), "<__media__>\nx", host.encode("x"), None)
    assert "message 1 has an image_url part without a text 'url'" in str(error.value)


def test_history_trimming_drops_an_early_image(host):
    state = host.state(max_new_tokens=1, truncation_length=600)
    host.chat("first " + img_tag(picture(seed=40)), state)
    host.chat("second " + img_tag(picture(seed=41)), state)
    host.chat("third, no picture", state)
    # the budget (599 tokens) holds one picture turn: the host's count, through custom_tokenized_length,
    # dropped the first turn rather than cutting into a picture
    assert int((host.last_prompt_ids == PATCH_ID).sum()) == 256
    assert host.last_prompt_ids.shape[1] <= 599


def test_bad_image_in_chat_is_a_visible_refusal_and_history_keeps_the_message(host):
    warnings = host.warned
    with pytest.raises(LlavaError) as error:
        host.chat('look <img src="data:image/png;base64,bm90IGFuIGltYWdl">', host.state(max_new_tokens=1))
    assert "image 1 in the prompt: the data is not a picture" in str(error.value)
    assert warnings and "image 1 in the prompt" in warnings[0]
    assert host.internal[-1][0].startswith("look <img")  # the user's message is still there


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


# ---------------------------------------------------------------- HTTP


def seed_app(host, fail_with=None):
    app = FastAPI()

    def complete(body, stop_event):
        if fail_with is not None:
            raise fail_with
        state = host.state(max_new_tokens=body["max_tokens"])
        return {"choices": [{"text": host.generate(body["prompt"], state)}]}

    add_generate_route(app, complete)
    return app


def test_seed_generate_contract(host):
    client = TestClient(seed_app(host))
    response = client.post("/api/v1/generate", json={
        "prompt": "Describe " + img_tag(picture(seed=50)) + " briefly:", "max_new_tokens": 3,
        "stopping_strings": ["\n"], "temperature": 0.7, "do_sample": False})
    assert response.status_code == 200
    results = response.json()["results"]
    assert len(results) == 1 and isinstance(results[0]["text"], str)
    assert completion_body({"prompt": "p", "max_new_tokens": 3, "stopping_strings": ["a"], "top_p": 0.5}) == \
        {"prompt": "p", "stream": False, "max_tokens": 3, "stop": ["a"], "top_p": 0.5}
    # both stop lists count, neither replaces the other
    assert completion_body({"prompt": "p", "stopping_strings": ["a", "b"], "custom_stopping_strings": ["c", "a"]}) \
        == {"prompt": "p", "stream": False, "stop": ["a", "b", "c"], "max_tokens": 200}


def test_seed_generate_bad_image_is_400_and_server_keeps_serving(host):
    client = TestClient(seed_app(host), raise_server_exceptions=False)
    bad = client.post("/api/v1/generate", json={"prompt": 'x <img src="data:image/png;base64,@@@">',
                                                 "max_new_tokens": 2})
    assert bad.status_code == 400
    assert bad.json()["error"]["message"] == "image 1 in the prompt: the data after 'base64,' is not valid base64"
    assert client.post("/api/v1/generate", json={"prompt": "hello", "max_new_tokens": 2}).status_code == 200
    not_json = client.post("/api/v1/generate", content=b"{not json", headers={"content-type": "application/json"})
    assert not_json.status_code == 400 and not_json.json()["error"]["message"] == "the request body is not valid JSON"
    assert client.post("/api/v1/generate", json={"no": "prompt"}).status_code == 400
    # a cross-site form or text/plain POST (no CORS preflight) is refused before any work
    plain = client.post("/api/v1/generate", content=b'{"prompt": "hello"}', headers={"content-type": "text/plain"})
    assert plain.status_code == 415 and "as JSON" in plain.json()["error"]["message"]


def test_host_request_errors_keep_their_status(host):
    class InvalidRequest(Exception):
        code = 400
        message = "image 2 in the request: SVG is a vector format"

    client = TestClient(seed_app(host, fail_with=InvalidRequest()))
    response = client.post("/api/v1/generate", json={"prompt": "x", "max_new_tokens": 1})
    assert response.status_code == 400 and "SVG" in response.json()["error"]["message"]


def test_notebook_prompt_reaches_the_webuis_tokenizer_without_picture_data(host, monkeypatch):
    """Default and Notebook tabs: the webui encodes the prompt before the tokenizer hook runs."""
    seen = []
    real = host.encode
    monkeypatch.setattr(host, "encode", lambda prompt, *a, **k: seen.append(prompt) or real(prompt, *a, **k))
    photo = picture(200, 150, seed=70)
    prompt = "Describe " + img_tag(photo) + " in a word:"
    host.generate(prompt, host.state(max_new_tokens=1))
    assert seen == ['Describe <img src="llava-ref:1"> in a word:']
    assert int((host.last_prompt_ids == PATCH_ID).sum()) == 256
    alone = host.script.tokenizer_modifier(host.state(), prompt, real(prompt), None)
    assert torch.equal(alone[1], host.last_prompt_ids)  # the same ids as from the full data URL


@pytest.mark.parametrize("value,expected", [("false", False), ("true", True), (True, True), (False, False)])
def test_embed_all_setting_is_read_as_validated(v0, host_factory, value, expected):
    """A settings file may hold the text "false": it must not count as a true value."""
    host = host_factory(model=v0.llm, tokenizer=v0.tokenizer,
                        settings=v0.webui_settings(add_all_images_to_prompt=value))
    two = "first " + img_tag(picture(seed=1)) + " second " + img_tag(picture(seed=2))
    host.generate(two, host.state(max_new_tokens=1))
    assert f"llava: 2 image(s) in the prompt, {2 if expected else 1} embedded" in host.logged
