"""LLaVA-OneVision in the real webui: a converted tiny llava-hf OneVision (a SigLIP tower at 384 px, a Qwen2
language model, ``anyres_max_9``) in its models folder, loaded by its Transformers loader as a
Qwen2ForCausalLM with the model's own ChatML template, served over its APIs and its chat page; and ``ask``
on the same folder.

A picture alone in its prompt is tiled (700×300 takes 1994 tokens, 1920×1080 is scaled down to 7269);
two pictures in one prompt are one padded view each (730 tokens).
"""

import os
import re
import subprocess
import sys

import pytest
import torch

from extensions.llava.families.pipelines import PIPELINES
from testbed import tiny
from testbed.real_host import ROOT, WEBUI, is_current, needs_webui, post
from testbed.real_models import convert_into, serving
from testbed.tiny_onevision import build_onevision, onevision_image_processor, onevision_processor, save_hf

pytestmark = [needs_webui, pytest.mark.slow,
              pytest.mark.skipif(bool(WEBUI) and not is_current(WEBUI), reason="OneVision is for the current webui")]

ONEVISION = PIPELINES["llava-onevision-qwen2-0.5b-ov"]
MAX_NEW_TOKENS = 8
TEXT_ROOM = 200  # more than the template and text around the pictures in these prompts
WIDE, SQUARE, FULL_HD = (700, 300), (384, 384), (1920, 1080)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    reference, tokenizer = build_onevision()
    models = convert_into(tmp_path_factory.mktemp("ov-models"), "tiny-llava-onevision",
                          lambda folder: save_hf(folder, reference, tokenizer, onevision_image_processor()))
    return reference, tokenizer, models


@pytest.fixture(scope="module")
def server(model, tmp_path_factory):
    work = tmp_path_factory.mktemp("ov-server")
    with serving(model[2], "tiny-llava-onevision", work, max_new_tokens=MAX_NEW_TOKENS,
                 auto_max_new_tokens=False) as running:
        yield running


def contexts(server) -> list[int]:
    """The prompt length of each generation so far, pictures included (the webui's own log line)."""
    return [int(n) for n in re.findall(r"Output generated in [^,]*, \d+ tokens, context (\d+)",
                                       re.sub(r"\s+", " ", server.log_text()))]


def chatml(text_with_pictures: str) -> str:
    return f"<|im_start|>user\n{text_with_pictures}\nWhat is this?<|im_end|>\n<|im_start|>assistant\n"


def byte_tokens(tokenizer) -> list[int]:
    """The tokenizer's byte tokens: banned in these answers, as a random model's lone bytes do not decode
    (the webui's streamed routes hold such text back until it does)."""
    return [tokenizer.convert_tokens_to_ids(f"<0x{byte:02X}>") for byte in range(256)]


def reference_answer(model, picture, max_new_tokens: int) -> tuple[str, int]:
    """transformers' LlavaOnevisionForConditionalGeneration, greedy, on the ChatML prompt (no BOS: Qwen2 has
    none), byte tokens banned; its answer and the prompt's length."""
    reference, tokenizer, _ = model
    batch = onevision_processor(tokenizer)(text=chatml("<image>"), images=[picture], return_tensors="pt")
    with torch.no_grad():
        out = reference.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                 suppress_tokens=byte_tokens(tokenizer))
    ids = batch["input_ids"]
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True), ids.shape[1]


def test_completions_and_the_2023_route_answer_as_the_reference(server, model):
    picture = tiny.picture(*FULL_HD, seed=5)  # scaled down to the budget: 7269 tokens
    expected, length = reference_answer(model, picture, 6)
    assert length == len(model[1].encode(chatml(""), add_special_tokens=False)) + 7269
    prompt = chatml(tiny.img_tag(picture))
    bans = ",".join(map(str, byte_tokens(model[1])))
    status, body = post(server.api_base + "/v1/completions", {"prompt": prompt, "max_tokens": 6, "temperature": 0,
                                                              "custom_token_bans": bans})
    assert status == 200, body
    assert body["choices"][0]["text"] == expected and body["usage"]["prompt_tokens"] == length
    status, answer = post(server.api_base + "/api/v1/generate", {"prompt": prompt, "max_new_tokens": 6,
                                                                  "do_sample": False, "custom_token_bans": bans})
    assert status == 200 and answer["results"][0]["text"] == expected, answer
    assert contexts(server)[-2:] == [length, length]


def chat_turn(text: str, *urls: str) -> dict:
    return {"role": "user", "content": [{"type": "text", "text": text}] +
            [{"type": "image_url", "image_url": {"url": url}} for url in urls]}


def test_the_chat_api_counts_one_picture_tiled_and_two_as_one_view_each(server, model):
    """usage.prompt_tokens is the webui's own prompt (its ChatML rendering) with each picture at its count:
    alone, by its size; one of two, 730 whatever its size."""
    tokenizer = model[1]
    for sizes, counts in [((WIDE,), [1994]), ((SQUARE,), [1485]), ((WIDE, SQUARE), [730, 730]),
                          ((SQUARE, SQUARE), [730, 730])]:
        urls = [tiny.data_url(tiny.picture(*size, seed=7 + i)) for i, size in enumerate(sizes)]
        body = {"max_tokens": 2, "messages": [chat_turn("What is this?", *urls)]}
        status, answer = post(server.api_base + "/v1/chat/completions", body)
        assert status == 200, answer
        _, rendered = post(server.api_base + "/v1/internal/chat-prompt", body)
        assert rendered["prompt"].startswith("<|im_start|>user\n") and rendered["prompt"].count("<__media__>") == \
            len(sizes)
        text = len(tokenizer.encode(rendered["prompt"].replace("<__media__>", "<image>"), add_special_tokens=False))
        assert answer["usage"]["prompt_tokens"] == text - len(sizes) + sum(counts), (sizes, answer["usage"])


def test_the_chat_page_with_the_field_and_the_attach_button(server, model, open_page, tmp_path):
    """Turn 1 through the LLaVA field, turn 2 through the attach button, "Embed all" on: the webui renders
    the model's ChatML template, keeps both pictures in the history, and the second turn lays them out as
    two pictures of one prompt."""
    wide, square = str(tmp_path / "wide.png"), str(tmp_path / "square.png")
    tiny.picture(*WIDE, seed=30).save(wide)
    tiny.picture(*SQUARE, seed=31).save(square)
    page = open_page(server).in_new_chat()
    page.set_embed_all(True)
    page.pick(wide)
    page.send("What is this?", wait_for_reply=False)
    assert 1994 < contexts(server)[-1] <= 1994 + TEXT_ROOM
    page.attach(square)
    page.send("And this one?", wait_for_reply=False)
    assert 2 * 730 < contexts(server)[-1] <= 2 * 730 + TEXT_ROOM
    assert server.count("llava: 2 picture(s) in the prompt, 2 embedded") >= 1


def test_ask_answers_with_the_converted_folder(model, tmp_path):
    path = str(tmp_path / "wide.png")
    tiny.picture(*WIDE, seed=40).save(path)
    done = subprocess.run([sys.executable, "-m", "extensions.llava", "ask", "--model",
                           os.path.join(model[2], "tiny-llava-onevision"), "--image", path, "--max-new-tokens", "4",
                           "What is this?"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0 and done.stderr == "", done.stderr
