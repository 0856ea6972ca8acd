"""The extension's HTTP layer wired into a stand-in of the webui's API server by ``setup()`` itself.

The stand-in has what the real one (modules/api/script.py) has around the extension: a key check as a
route dependency, CORS for every origin, a host check middleware, its error handler, streamed answers as
server-sent events, and a completion endpoint that tokenizes the whole prompt for its usage count. The
same cases run against the real webui in test_real_webui.py.
"""

import json
import types

import pytest

from extensions.llava import images
from testbed.fake_webui_api import AUTH
from testbed.tiny import PATCH_ID, bytes_url, data_url, header_only_png, img_tag, picture

@pytest.fixture
def served(v0, host_factory):
    host = host_factory(model=v0.llm, tokenizer=v0.tokenizer, settings=v0.webui_settings(), api=True)
    return types.SimpleNamespace(host=host, client=host.api.client(), calls=host.api.calls)


def chat_body(*urls, text="What is this?"):
    return {"messages": [{"role": "user", "content": [{"type": "text", "text": text}] +
                          [{"type": "image_url", "image_url": {"url": u}} for u in urls]}]}


@pytest.fixture
def no_decoding(monkeypatch):
    """Fail on any decode or header read of a picture (``header`` is the check's only work)."""
    seen = []
    real_open, real_sniff = images.open_picture, images.sniff_header
    monkeypatch.setattr(images, "open_picture", lambda data, source: seen.append("decode") or real_open(data, source))
    monkeypatch.setattr(images, "sniff_header", lambda data, source: seen.append("header") or real_sniff(data, source))
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
    assert seen.startswith('Look: <img src="llava-ref:1">') and len(seen) <= len("Look:  what is it?") + 100
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
    for url, reason in [(cut, "image 1 in the request: the picture's data is damaged or cut short"),
                        ("http://example.com/a.png", "never fetches web addresses")]:
        response = served.client.post("/v1/completions", json={"prompt": "<__media__> x", **chat_body(url)},
                                      headers=AUTH)
        assert response.status_code == 400 and reason in response.json()["error"]["message"], response.text
    response = served.client.post("/v1/completions", json={"prompt": "x", **chat_body(data_url(picture()))},
                                  headers=AUTH)
    assert response.status_code == 400  # a picture with no place in the prompt is not silently dropped
    assert "carry 1 picture(s) and its prompt has 0 '<__media__>' placeholder(s)" in response.json()["error"]["message"]
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
    assert error["message"] == "image 1 in the prompt: the picture's data is damaged or cut short"


def test_typed_image_tokens_stay_text_without_a_picture(served):
    host = served.host
    prompt = "I typed <im_patch> and <im_start> myself"
    ids = host.encode(prompt)
    assert int((ids == PATCH_ID).sum()) == 1  # what the webui's encode makes of it
    _, ids, embeds = host.script.tokenizer_modifier(host.state(), prompt, ids, None)
    assert int((ids == PATCH_ID).sum()) == 0 and embeds is None
    assert int((ids == PATCH_ID + 1).sum()) == 0
    plain = "nothing special here"
    same = host.encode(plain)
    assert host.script.tokenizer_modifier(host.state(), plain, same, None)[1] is same


def test_a_streamed_completion_reports_the_true_usage(served):
    prompt = "Look: " + img_tag(picture(200, 100, seed=9)) + " what is it?"
    response = served.client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 2, "stream": True},
                                  headers=AUTH)
    assert response.status_code == 200
    last = [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: {")][-1]
    assert last["usage"]["prompt_tokens"] == served.host.last_prompt_ids.shape[1] > 256
    assert last["usage"]["total_tokens"] == last["usage"]["prompt_tokens"] + last["usage"]["completion_tokens"]


def test_a_bad_picture_that_will_not_be_embedded_is_not_opened(served):
    """As in generation: with "embed all" off only the last picture is opened; web addresses are refused
    wherever they stand (the webui would fetch them)."""
    broken = "data:image/png;base64,bm90IGFuIGltYWdl"
    served.host.script.params["add_all_images_to_prompt"] = False
    response = served.client.post("/v1/chat/completions", json=chat_body(broken, data_url(picture())), headers=AUTH)
    assert response.status_code == 200, response.text
    response = served.client.post("/v1/chat/completions", json=chat_body("http://example.com/a.png",
                                                                         data_url(picture())), headers=AUTH)
    assert response.status_code == 400 and "never fetches" in response.json()["error"]["message"]
    served.host.script.params["add_all_images_to_prompt"] = True
    response = served.client.post("/v1/chat/completions", json=chat_body(broken, data_url(picture())), headers=AUTH)
    assert response.status_code == 400
    assert response.json()["error"]["message"].startswith("image 1 in the request: the data is not a picture")
