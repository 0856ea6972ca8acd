"""The extension inside a real text-generation-webui checkout (optional; skipped without one).

    LLAVA_WEBUI_PATH=/path/to/text-generation-webui \\
    LLAVA_WEBUI_PYTHON=/path/to/the/webui/venv/bin/python \\
    python -m pytest -q tests/test_real_api_routes.py

The test writes a tiny LLaVA v0 model (with its own vision tower and projector and a
``llava.json``, so no setting is needed) into a temporary models folder, installs this
extension as ``testbed/real_host.py`` describes, starts ``server.py`` on the CPU with the
API on, and talks to it over HTTP. A second server
serves the bundled demo, which must answer about the example picture in a chat.
The current webui runs API-only (``--nowebui``); the 2023 one starts its UI and serves the
seed API from its own ``api`` extension on port 5000.
"""

import json
import os

import pytest

from extensions.llava.cli_ask import DEMO_MODEL
from testbed import tiny
from testbed.real_host import EXTENSION, ROOT, WEBUI, is_current, needs_webui, post, request, running_webui
from testbed.real_models import picture_url, v0_prompt_tokens, write_model

pytestmark = [needs_webui, pytest.mark.slow]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    current = is_current(WEBUI)
    models = tmp_path_factory.mktemp("models")
    v0 = write_model(os.path.join(models, "tiny-llava"), current)
    with running_webui(str(models), "tiny-llava", str(tmp_path_factory.mktemp("tiny-server"))) as running:
        running.tokenizer = v0.tokenizer
        yield running


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory):
    if not is_current(WEBUI):
        pytest.skip("the 2023 webui loads every LLaMA with a sentencepiece tokenizer, which the demo does not have")
    # the README's way: --model-dir the extension's models folder, --model demo
    models, model = os.path.join(EXTENSION, "models"), "demo"
    with running_webui(models, model, str(tmp_path_factory.mktemp("demo"))) as running:
        yield running


def server_log(server) -> str:
    return server.log_text()


def test_the_2023_route_answers_with_a_picture(server):
    prompt = "### Human: What is this?\n<img src=\"" + picture_url(1) + "\">\n### Assistant: "
    status, body = post(server["base"] + "/api/v1/generate",
                        {"prompt": prompt, "max_new_tokens": 4, "stopping_strings": ["\n###"], "do_sample": False})
    assert status == 200, body
    assert "llava: vision tower from" in server_log(server)
    assert "llava: 1 picture(s) in the prompt, 1 embedded" in server_log(server)
    if server["current"]:  # the 2023 route answers as the completion endpoint does, greedily the same text
        status, same = post(server["base"] + "/v1/completions",
                            {"prompt": prompt, "max_tokens": 4, "stop": ["\n###"], "do_sample": False})
        assert status == 200 and body["results"][0]["text"] == same["choices"][0]["text"], (body, same)


def test_completions_with_a_picture(server):
    if not server["current"]:
        pytest.skip("the 2023 webui has no OpenAI API in this configuration")
    before = server.count("llava: 1 picture(s) in the prompt, 1 embedded")
    status, body = post(server["base"] + "/v1/completions",
                        {"prompt": "Look: <img src=\"" + picture_url(2) + "\"> says", "max_tokens": 4})
    assert status == 200, body
    assert server.count("llava: 1 picture(s) in the prompt, 1 embedded") == before + 1
    assert body["usage"]["prompt_tokens"] == v0_prompt_tokens(server.tokenizer, "Look: <picture> says")


def test_chat_completions_with_image_url(server):
    if not server["current"]:
        pytest.skip("the 2023 webui has no OpenAI API in this configuration")
    before = server_log(server).count("llava: 1 picture(s) in the prompt, 1 embedded")
    status, body = post(server["base"] + "/v1/chat/completions", {"max_tokens": 4, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                     {"type": "image_url", "image_url": {"url": picture_url(3)}}]}]})
    assert status == 200 and body["choices"][0]["message"]["role"] == "assistant"
    assert server_log(server).count("llava: 1 picture(s) in the prompt, 1 embedded") == before + 1


def test_bad_picture_is_a_400_and_the_server_keeps_serving(server):
    if not server["current"]:
        pytest.skip("the 2023 api extension has sent its 200 status before generation starts; "
                    "a refused picture shows as a warning in its log and an empty answer")
    bad = '<img src="data:image/png;base64,bm90IGFuIGltYWdl">'
    for path, body in [("/v1/completions", {"prompt": "x " + bad, "max_tokens": 2}),
                       ("/v1/completions", {"prompt": "x " + bad, "max_tokens": 2, "stream": True}),
                       ("/api/v1/generate", {"prompt": "x " + bad, "max_new_tokens": 2})]:
        status, answer = post(server["base"] + path, body)
        assert status == 400, (path, status, answer)
        assert "picture 1 in the prompt: the data is not a picture" in answer["error"]["message"]
    status, _ = post(server["base"] + "/v1/completions", {"prompt": "still there?", "max_tokens": 2})
    assert status == 200


def test_the_demo_folder_lists_only_the_demo(demo_server):
    status, _, raw = request(demo_server["base"] + "/v1/internal/model/list")
    assert status == 200 and json.loads(raw)["model_names"] == ["demo"], raw
    assert os.path.samefile(os.path.join(EXTENSION, "models", "demo"), DEMO_MODEL)


def test_the_demo_answers_in_a_chat(demo_server):
    """No setting and no template given: the webui renders the demo's own chat template."""
    url = tiny.file_url(os.path.join(ROOT, "examples", "red-circle.png"))
    question = {"role": "user", "content": [{"type": "text", "text": "What shape is in the picture?"},
                                            {"type": "image_url", "image_url": {"url": url}}]}
    status, body = post(demo_server["base"] + "/v1/chat/completions",
                        {"max_tokens": 20, "temperature": 0, "messages": [question]})
    assert status == 200, body
    assert body["choices"][0]["message"]["content"].strip() == "A red circle."
    assert "llava: pipeline llava-demo (named in llava.json)" in server_log(demo_server)
    follow_up = [question, {"role": "assistant", "content": "A red circle."},
                 {"role": "user", "content": "What colour is the shape?"}]
    status, body = post(demo_server["base"] + "/v1/chat/completions",
                        {"max_tokens": 20, "temperature": 0, "messages": follow_up})
    assert status == 200, body
    assert body["choices"][0]["message"]["content"].strip() == "Red."
    # the webui's own defaults: no max_tokens (512), no temperature (the Top-P preset samples)
    status, body = post(demo_server["base"] + "/v1/chat/completions", {"messages": [question]})
    assert status == 200, body
    assert body["choices"][0]["message"]["content"].strip() == "A red circle."
