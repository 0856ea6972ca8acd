"""Issue 3: what a webui user does — chat uploads, attachments, the APIs, other loaders."""

import base64

import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient

from extensions.llava import api
from extensions.llava.errors import LlavaError
from tests.tiny import data_url, img_tag, picture

PATCH_ID = 32000


def settings_for(v0, **extra):
    return {f"llava-{k}": v for k, v in {**v0.settings_params, **extra}.items()}


@pytest.fixture
def host(v0, host_factory):
    return host_factory(model=v0.llm, tokenizer=v0.tokenizer, settings=settings_for(v0))


def test_upload_goes_with_the_next_message_and_persists(host):
    photo = picture(120, 90, seed=11)
    host.script._pick(photo)
    host.chat("What is this?", host.state(max_new_tokens=2, truncation_length=4096))
    internal, visible = host.internal[0][0], host.visible[0][0]
    assert internal.startswith("What is this?\n<img src=\"data:image/png;base64,")
    assert "data:image/jpeg;base64," in visible and len(visible) < len(internal)  # a thumbnail is shown
    shown = parse_single_image(visible)
    assert max(shown.size) <= 300
    assert parse_single_image(internal).size == (120, 90)  # the model gets the full picture
    assert int((host.last_prompt_ids == PATCH_ID).sum()) == 256
    # the field was consumed: the next turn has no new picture, but the first stays in the history
    host.chat("And now?", host.state(max_new_tokens=2, truncation_length=4096))
    assert "<img" not in host.internal[1][0]
    assert int((host.last_prompt_ids == PATCH_ID).sum()) == 256
    assert host.script.engine().counters.vision_forwards == 1


def parse_single_image(text):
    from extensions.llava.prompt import parse_prompt
    images = parse_prompt(text).images
    assert len(images) == 1
    return images[0].source.load().image


def test_image_marker_places_the_picture(host):
    host.script._pick(picture(seed=2))
    host.chat("Compare <image> with the sky.", host.state(max_new_tokens=1))
    assert host.internal[0][0].startswith("Compare <img src=") and host.internal[0][0].endswith("> with the sky.")
    assert host.visible[0][0].startswith("Compare <img src=") and "&lt;image&gt;" not in host.visible[0][0]


def test_clearing_the_field_cancels(host):
    host.script._pick(picture(seed=3))
    host.script._pick(None)
    host.chat("no picture", host.state(max_new_tokens=1))
    assert "<img" not in host.internal[0][0] and host.script.engine().counters.vision_forwards == 0


def test_seed_era_input_hijack(host):
    host.script._pick(picture(seed=4))
    hijack = host.script.input_hijack
    assert hijack["state"] is True and callable(hijack["value"])
    hijack["state"] = False  # what the seed-era host does before calling it
    text, visible = hijack["value"]("Hello <image>", "Hello <image>")
    assert text.startswith("Hello <img src=\"data:image/png") and visible.startswith("Hello <img src=\"data:image/jpeg")
    assert host.script.uploads.take() is None


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
                                             {"type": "image_url", "image_url": data_url(second)}]}]
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


def test_history_trimming_drops_an_early_image(host):
    state = host.state(max_new_tokens=1, truncation_length=600)
    host.chat("first " + img_tag(picture(seed=40)), state)
    host.chat("second " + img_tag(picture(seed=41)), state)
    host.chat("third, no picture", state)
    # the budget (599 tokens) holds one picture turn: the host's count, through custom_tokenized_length,
    # dropped the first turn rather than cutting into a picture
    assert int((host.last_prompt_ids == PATCH_ID).sum()) == 256
    assert host.last_prompt_ids.shape[1] <= 599


def test_bad_image_in_chat_is_a_visible_refusal_and_history_keeps_the_message(host, monkeypatch):
    warnings = []
    monkeypatch.setattr(host.script, "_warn", warnings.append)
    with pytest.raises(LlavaError) as error:
        host.chat('look <img src="data:image/png;base64,bm90IGFuIGltYWdl">', host.state(max_new_tokens=1))
    assert "image 1 in the prompt: the data is not a picture" in str(error.value)
    assert warnings and "image 1 in the prompt" in warnings[0]
    assert host.internal[-1][0].startswith("look <img")  # the user's message is still there


def test_unsupported_loader_says_so(v0, host_factory):
    warnings = []
    host = host_factory(model=object(), tokenizer=v0.tokenizer, settings=settings_for(v0), loader="llama.cpp")
    host.script._warn = warnings.append
    host.script.input_modifier("see " + img_tag(picture()), host.state(), is_chat=True)
    assert len(warnings) == 1 and "llama.cpp loader" in warnings[0] and "Transformers loader" in warnings[0]
    host.script.input_modifier("no picture here", host.state(), is_chat=True)
    assert len(warnings) == 1


def test_no_model_loaded_does_not_crash(v0, host_factory):
    host = host_factory(model=None, tokenizer=None, settings=settings_for(v0))
    assert host.script.custom_tokenized_length("x " + img_tag(picture())) is None
    host.script.input_modifier("x " + img_tag(picture()), host.state(), is_chat=False)


# ---------------------------------------------------------------- HTTP


def seed_app(host, fail_with=None):
    app = FastAPI()

    def complete(body):
        if fail_with is not None:
            raise fail_with
        state = host.state(max_new_tokens=body["max_tokens"])
        return {"choices": [{"text": host.generate(body["prompt"], state)}]}

    api.add_generate_route(app, complete)
    return app


def test_seed_generate_contract(host):
    client = TestClient(seed_app(host))
    response = client.post("/api/v1/generate", json={
        "prompt": "Describe " + img_tag(picture(seed=50)) + " briefly:", "max_new_tokens": 3,
        "stopping_strings": ["\n"], "temperature": 0.7, "do_sample": False})
    assert response.status_code == 200
    results = response.json()["results"]
    assert len(results) == 1 and isinstance(results[0]["text"], str)
    assert api.completion_body({"prompt": "p", "max_new_tokens": 3, "stopping_strings": ["a"], "top_p": 0.5}) == \
        {"prompt": "p", "stream": False, "max_tokens": 3, "stop": ["a"], "top_p": 0.5}


def test_seed_generate_bad_image_is_400_and_server_keeps_serving(host):
    client = TestClient(seed_app(host), raise_server_exceptions=False)
    bad = client.post("/api/v1/generate", json={"prompt": 'x <img src="data:image/png;base64,@@@">',
                                                 "max_new_tokens": 2})
    assert bad.status_code == 400
    assert bad.json()["error"]["message"] == "image 1 in the prompt: the data after 'base64,' is not valid base64"
    assert client.post("/api/v1/generate", json={"prompt": "hello", "max_new_tokens": 2}).status_code == 200
    assert client.post("/api/v1/generate", content=b"{not json").status_code == 400
    assert client.post("/api/v1/generate", json={"no": "prompt"}).status_code == 400


def test_host_request_errors_keep_their_status(host):
    class InvalidRequest(Exception):
        code = 400
        message = "image 2 in the request: SVG is a vector format"

    client = TestClient(seed_app(host, fail_with=InvalidRequest()))
    response = client.post("/api/v1/generate", json={"prompt": "x", "max_new_tokens": 1})
    assert response.status_code == 400 and "SVG" in response.json()["error"]["message"]


def test_image_check_refuses_bad_streamed_requests_before_the_endpoint():
    from fastapi.responses import StreamingResponse
    app = FastAPI()
    reached = []

    @app.post("/v1/chat/completions")
    async def chat(body: dict):
        reached.append(body)
        return StreamingResponse(iter([b"data: ok\n\n"]), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(body: dict):
        reached.append(body)
        return {"choices": [{"text": "fine"}]}

    from extensions.llava.engine import LlavaEngine
    app.add_middleware(api.ImageCheckMiddleware, check=LlavaEngine(log=lambda m: None).request_problem,
                       paths=("/v1/completions", "/v1/chat/completions"))
    client = TestClient(app)
    svg = "data:image/svg+xml;base64," + base64.b64encode(b"<svg/>").decode()
    bad = client.post("/v1/chat/completions", json={"stream": True, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "what?"}, {"type": "image_url", "image_url": {"url": svg}}]}]})
    assert bad.status_code == 400 and bad.json()["error"]["message"].startswith("image 1 in the request: SVG")
    assert reached == []
    good = client.post("/v1/chat/completions", json={"stream": True, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(picture())}}]}]})
    assert good.status_code == 200 and good.text == "data: ok\n\n" and len(reached) == 1
    bad_prompt = client.post("/v1/completions", json={"prompt": 'a <img src="data:image/png;base64,AAAA">'})
    assert bad_prompt.status_code == 400 and "image 1 in the prompt" in bad_prompt.json()["error"]["message"]
    assert client.post("/v1/completions", json={"prompt": "text only"}).json() == {"choices": [{"text": "fine"}]}
