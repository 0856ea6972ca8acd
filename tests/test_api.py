"""The extension's parts of the webui's API server, wired into a stand-in of it (``testbed.fake_webui_api``)
by ``setup()`` itself: the webui's key and host checks before any work, JSON only, pictures checked from
their headers, true usage counts, refusals as 400s or streamed error events; pictures of the chat API's
raw images and history messages; the 2023 ``/api/v1/generate`` route; and the Default and Notebook tabs,
whose prompt the webui tokenizes without the pictures' data. The same cases run against the real webui
in the ``test_real_*`` tests."""

import json
import types

import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient

from extensions.llava.api.generate_route import add_generate_route, completion_body
from extensions.llava.errors import LlavaError
from extensions.llava.media import pictures
from testbed.fake_webui_api import AUTH
from testbed.tiny import PATCH_ID, bytes_url, data_url, header_only_png, img_tag, picture
from testbed.watch import record_calls


@pytest.fixture
def served(v0, host_factory):
    host = host_factory(model=v0.llm, tokenizer=v0.tokenizer, settings=v0.webui_settings(), api=True)
    return types.SimpleNamespace(host=host, client=host.api.client(), calls=host.api.calls)


def chat_body(*urls, text="What is this?"):
    return {"messages": [{"role": "user", "content": [{"type": "text", "text": text}] +
                          [{"type": "image_url", "image_url": {"url": u}} for u in urls]}]}


@pytest.fixture
def no_decoding(monkeypatch):
    """Every decode ("decode") and header read ("header") of a picture from now on, in order."""
    seen = record_calls(monkeypatch, pictures, "open_picture", note=lambda *args, **kwargs: "decode")
    record_calls(monkeypatch, pictures, "sniff_header", note=lambda *args, **kwargs: seen.append("header"))
    return seen


def test_every_route_needs_the_webuis_key_and_no_work_is_done_without_it(served, no_decoding):
    bomb = bytes_url(header_only_png(7000, 7000))
    for path, body in [("/api/v1/generate", {"prompt": "x <img src=\"" + bomb + "\">"}),
                       ("/v1/completions", {"prompt": "x <img src=\"" + bomb + "\">"}),
                       ("/v1/chat/completions", chat_body(bomb))]:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            response = served.client.post(path, json=body, headers=headers)
            assert response.status_code == 401, (path, response.text)
    assert no_decoding == []  # not even a header was read for a request that failed the key check
    assert served.calls.prompts == []


def test_generate_takes_json_only_and_answers_with_the_key(served):
    plain = served.client.post("/api/v1/generate", content=b'{"prompt": "hi"}',
                               headers={**AUTH, "content-type": "text/plain"})
    assert plain.status_code == 415  # a page on another site cannot send JSON without a preflight
    ok = served.client.post("/api/v1/generate", json={"prompt": "Describe " + img_tag(picture(seed=1)),
                                                      "max_new_tokens": 2}, headers=AUTH)
    assert ok.status_code == 200 and isinstance(ok.json()["results"][0]["text"], str)
    assert int((served.host.last_prompt_ids == PATCH_ID).sum()) == 256


def test_the_host_check_still_applies(served):
    response = served.client.post("/v1/completions", json={"prompt": "x"}, headers={**AUTH, "host": "evil.example"})
    assert response.status_code == 400 and response.json() == {"detail": "Invalid host header"}


def test_the_webuis_tokenizer_never_sees_picture_data(served):
    photo = picture(300, 200, seed=3)
    prompt = "Look: " + img_tag(photo) + " what is it?"
    response = served.client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 2}, headers=AUTH)
    assert response.status_code == 200, response.text
    [seen] = served.calls.prompts
    assert seen == 'Look: <img src="llava-ref:1"> what is it?'
    assert int((served.host.last_prompt_ids == PATCH_ID).sum()) == 256  # the reference was the picture
    usage = response.json()["usage"]
    assert usage["prompt_tokens"] == served.host.last_prompt_ids.shape[1]  # pictures at their token length
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert response.json()["choices"][0]["finish_reason"] == "length"  # max_tokens 2 was reached


@pytest.mark.parametrize("url", [123, None, {}, ""])
def test_an_image_url_that_is_not_a_text_url_is_refused(served, url):
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"},
                                                       {"type": "image_url", "image_url": {"url": url}}]}]}
    response = served.client.post("/v1/chat/completions", json=body, headers=AUTH)
    assert response.status_code == 400
    assert "message 1 has an image_url part without a text 'url'" in response.json()["error"]["message"]


def test_malformed_messages_are_a_400(served):
    response = served.client.post("/v1/chat/completions", json={"messages": 5}, headers=AUTH)
    assert response.status_code == 400 and response.json()["error"]["message"] == "'messages' must be a list of messages"
    response = served.client.post("/v1/chat/completions", json={"messages": [5]}, headers=AUTH)
    assert response.status_code == 400 and "message 1 of 'messages' is not an object" in response.text


def test_completions_with_messages_are_checked_too(served):
    cut = data_url(picture(seed=4))[:-200]  # its header is whole: it fails when it is decoded
    for url, reason in [(cut, "picture 1 in the request: the picture's data is damaged or cut short"),
                        ("http://example.com/a.png", "never fetches web addresses")]:
        response = served.client.post("/v1/completions", json={"prompt": "<__media__> x", **chat_body(url)},
                                      headers=AUTH)
        assert response.status_code == 400 and reason in response.json()["error"]["message"], response.text
    response = served.client.post("/v1/completions", json={"prompt": "x", **chat_body(data_url(picture()))},
                                  headers=AUTH)
    assert response.status_code == 400  # a picture with no place in the prompt is not silently dropped
    assert "carry 1 item(s) and its prompt has 0 '<__media__>' placeholder(s)" in response.json()["error"]["message"]
    assert served.calls.prompts == ["<__media__> x"]  # the web address never reached the webui


def test_a_bomb_is_refused_from_its_header(served, no_decoding):
    bomb = bytes_url(header_only_png(10000, 10000))
    response = served.client.post("/v1/completions", json={"prompt": f'x <img src="{bomb}">'}, headers=AUTH)
    assert response.status_code == 400
    assert "larger than 50,000,000 pixels" in response.json()["error"]["message"]
    assert "decode" not in no_decoding


def test_pixels_to_embed_are_bounded_per_request(served):
    big = bytes_url(header_only_png(7000, 7000))
    served.host.script.params["add_all_images_to_prompt"] = True
    response = served.client.post("/v1/chat/completions", json=chat_body(big, big, big), headers=AUTH)
    assert response.status_code == 400 and "one request may hold 100,000,000" in response.json()["error"]["message"]
    served.host.script.params["add_all_images_to_prompt"] = False  # only the last is decoded: allowed
    response = served.client.post("/v1/chat/completions", json=chat_body(big, big, data_url(picture())), headers=AUTH)
    assert response.status_code == 200, response.text


def test_a_cache_hit_decodes_nothing(served, no_decoding):
    url = data_url(picture(seed=7))
    for _ in range(2):
        assert served.client.post("/v1/chat/completions", json=chat_body(url), headers=AUTH).status_code == 200
    assert no_decoding.count("decode") == 1 and served.host.engine().counters.vision_forwards == 1


def test_a_refusal_after_a_stream_started_is_an_error_event(served):
    served.host.script.params["add_all_images_to_prompt"] = False
    cut = data_url(picture(seed=8))[:-300]  # its header is whole: it fails when it is decoded
    response = served.client.post("/v1/completions", json={"prompt": f'x <img src="{cut}">', "stream": True},
                                  headers=AUTH)
    assert response.status_code == 200
    events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["message"] == "picture 1 in the prompt: the picture's data is damaged or cut short"


def test_a_streamed_completion_reports_the_true_usage(served):
    prompt = "Look: " + img_tag(picture(200, 100, seed=9)) + " what is it?"
    response = served.client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 2, "stream": True},
                                  headers=AUTH)
    assert response.status_code == 200
    last = [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: {")][-1]
    assert last["usage"]["prompt_tokens"] == served.host.last_prompt_ids.shape[1] \
        == len(served.host.encode("Look:  what is it?")[0]) + 258
    assert last["usage"]["total_tokens"] == last["usage"]["prompt_tokens"] + last["usage"]["completion_tokens"]


def test_a_bad_picture_that_will_not_be_embedded_is_not_opened(served, no_decoding):
    """As in generation: with "embed all" off only the last picture is opened; of the others only the first
    bytes are read: a format not named and web addresses are refused wherever they stand (the webui would
    open or fetch them)."""
    cut_short = data_url(picture(300, 200, seed=4))[:-400]  # a PNG whose data ends early: known when decoded
    not_a_picture = "data:image/png;base64,bm90IGFuIGltYWdl"
    served.host.script.params["add_all_images_to_prompt"] = False
    response = served.client.post("/v1/chat/completions", json=chat_body(cut_short, data_url(picture())), headers=AUTH)
    assert response.status_code == 200, response.text
    assert no_decoding.count("header") == 1  # the last picture's; the first was neither decoded nor opened
    for unusable, reason in [("http://example.com/a.png", "never fetches"), (not_a_picture, "not a picture in a supported")]:
        response = served.client.post("/v1/chat/completions", json=chat_body(unusable, data_url(picture())), headers=AUTH)
        assert response.status_code == 400 and reason in response.json()["error"]["message"]
    served.host.script.params["add_all_images_to_prompt"] = True
    response = served.client.post("/v1/chat/completions", json=chat_body(not_a_picture, data_url(picture())), headers=AUTH)
    assert response.status_code == 400
    assert response.json()["error"]["message"].startswith("picture 1 in the request: the data is not a picture")


# ---------------------------------------------------------------- the chat API's pictures beside the prompt


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
    assert "picture 1 in the request" in str(error.value) and "never fetches" in str(error.value)
    # the webui rejects a bare string as image_url; so do we, instead of dropping the picture
    bare = [{"role": "user", "content": [{"type": "image_url", "image_url": data_url(second)}]}]
    with pytest.raises(LlavaError) as error:
        host.script.tokenizer_modifier(host.state(history={"messages": bare}), "<__media__>\nx", host.encode("x"), None)
    assert "message 1 has an image_url part without a text 'url'" in str(error.value)


# ---------------------------------------------------------------- the 2023 route /api/v1/generate


def seed_app(host, fail_with=None):
    app = FastAPI()

    def complete(body, stop_event):
        if fail_with is not None:
            raise fail_with
        state = host.state(max_new_tokens=body["max_tokens"])
        return {"choices": [{"text": host.generate(body["prompt"], state)}]}

    add_generate_route(app, complete)
    return app


def test_the_2023_generate_route_contract(host):
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


def test_the_2023_generate_route_refuses_a_bad_picture_and_keeps_serving(host):
    client = TestClient(seed_app(host), raise_server_exceptions=False)
    bad = client.post("/api/v1/generate", json={"prompt": 'x <img src="data:image/png;base64,@@@">',
                                                 "max_new_tokens": 2})
    assert bad.status_code == 400
    assert bad.json()["error"]["message"] == "picture 1 in the prompt: the data after 'base64,' is not valid base64"
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
        message = "picture 2 in the request: SVG is a vector format"

    client = TestClient(seed_app(host, fail_with=InvalidRequest()))
    response = client.post("/api/v1/generate", json={"prompt": "x", "max_new_tokens": 1})
    assert response.status_code == 400 and "SVG" in response.json()["error"]["message"]


# ---------------------------------------------------------------- the Default and Notebook tabs


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


# ---------------------------------------------------------------- every body the webui reads as JSON


def test_a_body_without_content_type_is_checked_as_the_webui_reads_it(served):
    """FastAPI reads a body with no Content-Type as JSON: so does the check, else the webui would
    tokenize the picture's base64."""
    raw = json.dumps({"prompt": "Look: " + img_tag(picture(seed=11)) + " what?", "max_tokens": 2}).encode()
    response = served.client.post("/v1/completions", content=raw, headers={**AUTH, "content-type": ""})
    assert response.status_code == 200, response.text
    assert served.calls.prompts == ['Look: <img src="llava-ref:1"> what?']
    bad = json.dumps({"prompt": 'x <img src="data:image/png;base64,@@@">'}).encode()
    response = served.client.post("/v1/completions", content=bad, headers={**AUTH, "content-type": ""})
    assert response.status_code == 400
    assert response.json()["error"]["message"] == "picture 1 in the prompt: the data after 'base64,' is not valid base64"


def test_json_nested_too_deep_is_left_to_the_webui(served):
    deep = b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    response = served.client.post("/v1/completions", content=deep, headers={**AUTH, "content-type": "application/json"})
    assert 400 <= response.status_code < 500, response.text  # the webui's own answer, not a crash of the check


@pytest.mark.parametrize("field,value", [("stopping_strings", 5), ("stopping_strings", True), ("stop", 7),
                                         ("custom_stopping_strings", ["a", 3])])
def test_stop_fields_of_the_generate_route_must_be_texts(served, field, value):
    response = served.client.post("/api/v1/generate", json={"prompt": "hi", field: value}, headers=AUTH)
    assert response.status_code == 400
    assert response.json()["error"]["message"] == f"'{field}' must be a text or a list of texts"


@pytest.mark.parametrize("stream", [False, True])
def test_echo_gives_back_the_clients_own_prompt(served, stream):
    prompt = "Look: " + img_tag(picture(seed=12)) + " what?"
    response = served.client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 2, "echo": True,
                                                           "stream": stream}, headers=AUTH)
    assert response.status_code == 200, response.text
    if stream:
        texts = [json.loads(line[6:])["choices"][0]["text"] for line in response.text.splitlines()
                 if line.startswith("data: {") and '"choices"' in line]
    else:
        texts = [response.json()["choices"][0]["text"]]
    assert texts[-1].startswith(prompt) and "llava-ref:" not in texts[-1]


def anthropic_body(*blocks, text="What is this?"):
    return {"max_tokens": 2, "messages": [{"role": "user", "content": [*blocks, {"type": "text", "text": text}]}]}


def image_block(url: str) -> dict:
    media, data = url[5:].split(";base64,")
    return {"type": "image", "source": {"type": "base64", "media_type": media, "data": data}}


def test_the_anthropic_route_takes_its_own_key_and_the_same_checks(served, no_decoding):
    key = {"x-api-key": "secret"}
    bomb = image_block(bytes_url(header_only_png(10000, 10000)))
    for headers in ({}, AUTH, {"x-api-key": "wrong"}):  # its key is x-api-key, as the webui checks it
        assert served.client.post("/v1/messages", json=anthropic_body(bomb), headers=headers).status_code == 401
    assert no_decoding == []
    response = served.client.post("/v1/messages", json=anthropic_body(bomb), headers=key)
    assert response.status_code == 400
    assert response.json() == {"type": "error", "error": {"type": "invalid_request_error", "message":
                               "picture 1 in the request: the picture is larger than 50,000,000 pixels"}}
    web = {"type": "image", "source": {"type": "url", "url": "http://127.0.0.1:9/a.png"}}
    response = served.client.post("/v1/messages", json=anthropic_body(web), headers=key)
    assert response.status_code == 400 and "never fetches web addresses" in response.json()["error"]["message"]
    response = served.client.post("/v1/messages", json=anthropic_body(image_block(data_url(picture(seed=13)))),
                                  headers=key)
    assert response.status_code == 200, response.text
    assert int((served.host.last_prompt_ids == PATCH_ID).sum()) == 256
    assert response.json()["usage"]["input_tokens"] == served.host.last_prompt_ids.shape[1]


def test_the_items_of_one_request_are_bounded_by_a_setting(v0, host_factory, no_decoding):
    host = host_factory(model=v0.llm, tokenizer=v0.tokenizer, settings=v0.webui_settings(max_items=2), api=True)
    tiny_url = data_url(picture(2, 2))
    response = host.api.client().post("/v1/chat/completions", json=chat_body(*[tiny_url] * 3), headers=AUTH)
    assert response.status_code == 400
    assert response.json()["error"]["message"] == \
        "the request holds 3 pictures; one request may hold 2 (the setting llava-max_items)"
    assert no_decoding == [] and host.api.calls.prompts == []
    assert host.api.client().post("/v1/chat/completions", json={**chat_body(*[tiny_url] * 2), "max_tokens": 1},
                                  headers=AUTH).status_code == 200


def test_every_picture_the_webui_renders_is_found_in_the_body():
    from extensions.llava.prompt.messages import item_groups, reference_messages
    first, second, third = (data_url(picture(seed=seed)) for seed in (1, 2, 3))
    chat = {"messages": [{"role": "system", "content": f'Rules <img src="{first}">'},
                         {"role": "user", "content": [{"type": "image_url", "image_url": {"url": second}},
                                                      {"type": "text", "text": f'and <img src="{third}">'}]}]}
    [group] = item_groups("/v1/chat/completions", chat)
    assert [source.text[source.start:source.end] for source in group] == [first, second, third]
    references = {}
    rewritten = reference_messages(chat, references)
    assert rewritten["messages"][0]["content"] == 'Rules <img src="llava-ref:1">'
    assert rewritten["messages"][1]["content"][1]["text"] == 'and <img src="llava-ref:2">' and len(references) == 2
    anthropic = {"system": f'<img src="{first}">', "messages": [{"role": "user", "content": [
        {"type": "text", "text": f'<img src="{third}">'}]}]}
    assert len(item_groups("/v1/messages", anthropic)[0]) == 2
    prompts = {"prompt": [f'a <img src="{first}">', "no picture", f'b <img src="{second}"> <img src="{third}">']}
    assert [len(group) for group in item_groups("/v1/completions", prompts)] == [1, 2]
