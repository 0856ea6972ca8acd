"""Reusing earlier prompts in the real webui: two servers on the same converted tiny LLaVA-1.5, one with
``llava-prefix_cache_mb`` left to the device and one with 0, take the same chats; their replies must
be the same, and only the first must say that it reused what it computed before.

Needs a webui checkout with its Python (``LLAVA_WEBUI_PATH`` / ``LLAVA_WEBUI_PYTHON``); the browser test
also needs Chromium and selenium (the hosts' ``prepare.sh DIR --browser``).
"""

import contextlib
import os
import re

import pytest

from testbed import tiny
from testbed.real_host import WEBUI, is_current, needs_webui, post
from testbed.real_models import convert_into, serving

pytestmark = [needs_webui, pytest.mark.slow,
              pytest.mark.skipif(bool(WEBUI) and not is_current(WEBUI), reason="the current webui's generation path")]

REUSED = re.compile(r"llava: (\d+) of (\d+) prompt positions came from an earlier prompt")
MODEL = "tiny-llava-v15"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from testbed.tiny_family import build_v15, reference_v15, save_llava_hf
    v15 = build_v15(str(tmp_path_factory.mktemp("v15-parts")))
    return convert_into(tmp_path_factory.mktemp("reuse-models"), MODEL,
                        lambda folder: save_llava_hf(folder, reference_v15(v15), v15.tokenizer, v15.clip_dir))


@pytest.fixture(scope="module")
def servers(models, tmp_path_factory):
    """{"on": a server reusing, "off": one with reuse off}, both greedy, 16 new tokens a reply."""
    with contextlib.ExitStack() as stack:
        started = {}
        for name, extra in (("on", {}), ("off", {"llava-prefix_cache_mb": 0})):
            work = tmp_path_factory.mktemp(f"reuse-{name}")
            started[name] = stack.enter_context(serving(
                models, MODEL, work, max_new_tokens=16, auto_max_new_tokens=False, preset="Deterministic",
                do_sample=False, top_p=1, top_k=1, **extra))
        yield started


def reuse_lines(server) -> list[tuple[int, int]]:
    """(reused, prompt length) of each generation the extension logged (the webui's log wraps lines)."""
    text = re.sub(r"\s*\n\s+", " ", server.log_text())
    return [(int(reused), int(total)) for reused, total in REUSED.findall(text)]


def api_chat(server, turns) -> tuple[list[str], list[int]]:
    """A chat over /v1/chat/completions, the whole history sent each turn; the replies and prompt lengths."""
    messages, replies, prompts = [], [], []
    for text, urls in turns:
        messages.append({"role": "user", "content": [{"type": "text", "text": text}] +
                         [{"type": "image_url", "image_url": {"url": url}} for url in urls]})
        status, body = post(server.api_base + "/v1/chat/completions",
                            {"messages": messages, "max_tokens": 16, "temperature": 0})
        assert status == 200, body
        replies.append(body["choices"][0]["message"]["content"])
        prompts.append(body["usage"]["prompt_tokens"])
        messages.append({"role": "assistant", "content": replies[-1]})
    return replies, prompts


def test_an_api_chat_with_a_new_picture_in_turn_three_answers_alike_with_reuse_on_and_off(servers):
    first, second, third = (tiny.data_url(tiny.picture(320, 240, seed=seed)) for seed in (61, 62, 63))
    turns = [("What is in these?", [first, second]), ("And the colour?", []), ("And this one?", [third])]
    before = len(reuse_lines(servers["on"]))
    on = api_chat(servers["on"], turns)
    off = api_chat(servers["off"], turns)
    assert on == off
    lines = reuse_lines(servers["on"])[before:]
    prompts = on[1]
    assert [total for _, total in lines] == prompts and lines[0][0] == 0
    # turn 2 starts from all of turn 1's prompt (the reply's text may not come back as the same tokens)
    assert prompts[0] <= lines[1][0] < prompts[1]
    # turn 3: with "embed all" off (the default) the new picture takes the embedding from the second one,
    # whose slots now hold the plain image-token embedding: reuse stops where the second picture starts,
    # after the first one's 576 slots, and everything from there is computed again
    assert 576 < lines[2][0] < prompts[0] - 576 and prompts[2] - prompts[1] > 576
    assert not reuse_lines(servers["off"])


@pytest.mark.skipif(not os.path.exists("/usr/bin/chromedriver"), reason="no chromedriver (prepare.sh --browser)")
def test_the_chat_page_regenerates_continues_and_takes_a_new_picture_alike_with_reuse_on_and_off(servers, tmp_path):
    pytest.importorskip("selenium.webdriver", reason="selenium is not installed (prepare.sh --browser)")
    from testbed.browser import Page
    paths = []
    for seed in (71, 72):
        path = str(tmp_path / f"picture-{seed}.png")
        tiny.picture(300, 200, seed=seed).save(path)
        paths.append(path)

    def session(server) -> tuple[list[str], list[tuple[int, int]]]:
        before = len(reuse_lines(server))
        page = Page(server)
        try:
            page.new_chat()
            page.pick(paths[0])
            page.send("What is this?", wait_for_reply=False)
            page.send("And the colour?", wait_for_reply=False)
            page.press("Regenerate")
            page.press("Continue")
            page.pick(paths[1])  # a new picture: with embed all off, the first one is no longer embedded
            page.send("And this one?", wait_for_reply=False)
            return [message.text for message in page.messages()], reuse_lines(server)[before:]
        finally:
            page.close()

    on, on_lines = session(servers["on"])
    # the closed tab ends its browser session, and its earlier prompts go with it
    servers["on"].wait_for_count("llava: a browser session ended", 1, timeout=90)
    off, off_lines = session(servers["off"])
    assert on == off and len(on) == 6 and not off_lines
    (_, first), (second_reused, second), (regen_reused, regen), (continue_reused, _), (last_reused, last) = on_lines
    assert first <= second_reused < second  # the follow-up reused the first prompt
    assert regen == second and regen_reused == second - 1  # regenerate: all of the same prompt but its last position
    assert continue_reused >= second  # continue: the prompt and the reply so far
    # the third turn: the first picture is no longer embedded, so nothing before it can be reused
    assert last_reused < first - 576 and last > second
