"""The extension inside a real text-generation-webui checkout (optional; skipped without one).

    LLAVA_WEBUI_PATH=/path/to/text-generation-webui \\
    LLAVA_WEBUI_PYTHON=/path/to/the/webui/venv/bin/python \\
    python -m pytest -q tests/test_real_webui.py

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
import shutil

import pytest

from extensions.llava.cli_ask import DEMO_MODEL
from testbed import tiny
from testbed.real_host import ROOT, WEBUI, is_current, needs_webui, post, running_webui

pytestmark = [needs_webui, pytest.mark.slow]


def write_model(folder: str, current: bool):
    """The tiny v0 model as a webui model folder; returns its parts (tokenizer included)."""
    v0 = tiny.build_v0(folder + "-parts")
    if current:
        v0.llm.save_pretrained(folder)
    else:
        # The 2023 webui loads every LlamaForCausalLM with a sentencepiece LlamaTokenizer, which a
        # tiny test tokenizer cannot provide; a tiny GPT-2 goes through its AutoTokenizer path instead.
        import torch
        from transformers import GPT2Config, GPT2LMHeadModel
        torch.manual_seed(0)
        GPT2LMHeadModel(GPT2Config(vocab_size=len(v0.tokenizer), n_embd=64, n_layer=2, n_head=4,
                                   n_positions=2048, bos_token_id=1, eos_token_id=2)).save_pretrained(folder)
    v0.tokenizer.save_pretrained(folder)
    if not current:  # a tokenizer class name the 2023 transformers knows
        config_path = os.path.join(folder, "tokenizer_config.json")
        with open(config_path) as f:
            config = json.load(f)
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        with open(config_path, "w") as f:
            json.dump(config, f)
    shutil.copytree(v0.clip_dir, os.path.join(folder, "vision_tower"))
    shutil.copy(os.path.join(v0.projector_dir, "mm_projector.bin"), folder)
    with open(os.path.join(folder, "llava.json"), "w") as f:
        json.dump({"pipeline": "llava-v0-13b", "vision_tower": "vision_tower", "projector": "mm_projector.bin"}, f)
    return v0


def picture_url(seed: int) -> str:
    return tiny.data_url(tiny.picture(64, 48, seed=seed))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    current = is_current(WEBUI)
    models = tmp_path_factory.mktemp("models")
    write_model(os.path.join(models, "tiny-llava"), current)
    with running_webui(str(models), "tiny-llava", str(tmp_path_factory.mktemp("tiny-server"))) as running:
        yield running


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory):
    if not is_current(WEBUI):
        pytest.skip("the 2023 webui loads every LLaMA with a sentencepiece tokenizer, which the demo does not have")
    models, model = os.path.split(DEMO_MODEL)
    with running_webui(models, model, str(tmp_path_factory.mktemp("demo"))) as running:
        yield running


def server_log(server) -> str:
    return server.log_text()


def test_seed_generate_with_a_picture(server):
    prompt = "### Human: What is this?\n<img src=\"" + picture_url(1) + "\">\n### Assistant: "
    status, body = post(server["base"] + "/api/v1/generate",
                        {"prompt": prompt, "max_new_tokens": 4, "stopping_strings": ["\n###"], "do_sample": False})
    assert status == 200, body
    assert "llava: vision tower from" in server_log(server)
    assert "llava: 1 image(s) in the prompt, 1 embedded" in server_log(server)
    if server["current"]:  # the seed route answers as the completion endpoint does, greedily the same text
        status, same = post(server["base"] + "/v1/completions",
                            {"prompt": prompt, "max_tokens": 4, "stop": ["\n###"], "do_sample": False})
        assert status == 200 and body["results"][0]["text"] == same["choices"][0]["text"], (body, same)


def test_completions_with_a_picture(server):
    if not server["current"]:
        pytest.skip("the 2023 webui has no OpenAI API in this configuration")
    before = server.count("llava: 1 image(s) in the prompt, 1 embedded")
    status, body = post(server["base"] + "/v1/completions",
                        {"prompt": "Look: <img src=\"" + picture_url(2) + "\"> says", "max_tokens": 4})
    assert status == 200, body
    assert server.count("llava: 1 image(s) in the prompt, 1 embedded") == before + 1
    assert body["usage"]["prompt_tokens"] > 258  # the picture counted at its 258 tokens


def test_chat_completions_with_image_url(server):
    if not server["current"]:
        pytest.skip("the 2023 webui has no OpenAI API in this configuration")
    before = server_log(server).count("llava: 1 image(s) in the prompt, 1 embedded")
    status, body = post(server["base"] + "/v1/chat/completions", {"max_tokens": 4, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                     {"type": "image_url", "image_url": {"url": picture_url(3)}}]}]})
    assert status == 200 and body["choices"][0]["message"]["role"] == "assistant"
    assert server_log(server).count("llava: 1 image(s) in the prompt, 1 embedded") == before + 1


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
        assert "image 1 in the prompt: the data is not a picture" in answer["error"]["message"]
    status, _ = post(server["base"] + "/v1/completions", {"prompt": "still there?", "max_tokens": 2})
    assert status == 200


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
