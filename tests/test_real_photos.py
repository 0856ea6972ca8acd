"""Phone photos in the real webui: on every path, the webui's tokenizer never reads picture data.

One server (UI and API, the bundled demo, the webui's defaults) with testbed/encode_probe installed,
which records the length of every text the webui's ``encode`` receives. A 12-megapixel JPEG of about
4 MB is about 6 million characters of base64: any of it reaching ``encode`` shows at once.
"""

import os

import pytest

from extensions.llava.cli_ask import DEMO_MODEL
from testbed.photos import make_photo
from testbed.real_host import WEBUI, is_current, needs_webui, post, running_webui
from testbed.tiny import file_url
from testbed.watch import run_in_threads

pytestmark = [needs_webui, pytest.mark.slow, pytest.mark.skipif(bool(WEBUI) and not is_current(WEBUI),
                                              reason="the photo paths follow the current webui")]
QUESTION = "What shape is in the picture?"
# What twelve photos, four at a time, may leave in the server: their features (16 × 64 floats each on
# the demo), the webui's own caches and the allocator's slack (measured: +85 MB). Without handing freed
# memory back to the operating system the server kept +346 MB.
MEMORY_AFTER_PHOTOS_MB = 170
# The text around a picture on these paths is under 200 characters; a picture may add 100 (its reference).
MOST_CHARACTERS = 300


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    models, model = os.path.split(DEMO_MODEL)
    with running_webui(models, model, str(tmp_path_factory.mktemp("photo-server")), ui=True, api=True,
                       probe_encode=True) as running:
        yield running


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return [make_photo(str(tmp_path_factory.mktemp("photos") / f"photo-{seed}.jpg"), seed=seed) for seed in range(3)]


def encoded_during(server, action):
    before = len(server.encoded())
    result = action()
    lengths = server.encoded()[before:]
    assert lengths, "the probe saw no call of encode"
    return result, lengths


def test_the_apis_never_tokenize_picture_data(server, photos):
    prompt = "USER: <img src=\"{}\">\n" + QUESTION + "\nASSISTANT:"
    cases = [
        ("/v1/completions", {"prompt": prompt.format(file_url(photos[0])), "max_tokens": 16, "temperature": 0},
         lambda body: body["choices"][0]["text"]),
        ("/api/v1/generate", {"prompt": prompt.format(file_url(photos[1])), "max_new_tokens": 16, "do_sample": False},
         lambda body: body["results"][0]["text"]),
        ("/v1/chat/completions", {"max_tokens": 16, "temperature": 0, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": file_url(photos[2])}}, {"type": "text", "text": QUESTION}]}]},
         lambda body: body["choices"][0]["message"]["content"]),
    ]
    for path, body, answer_of in cases:
        (status, answer), lengths = encoded_during(server, lambda: post(server.api_base + path, body))
        assert status == 200, (path, answer)
        assert answer_of(answer).strip() == "A red circle.", (path, answer)
        assert max(lengths) <= MOST_CHARACTERS, (path, lengths)


def test_the_chat_ui_never_tokenizes_picture_data(server, photos, open_page):
    page = open_page(server).in_new_chat()
    turns = [(lambda: page.pick(photos[0]), QUESTION, "A red circle."), (None, "What colour is the shape?", "Red."),
             (lambda: page.in_new_chat().attach(photos[1]), QUESTION, "A red circle.")]
    for before, question, expected in turns:
        if before is not None:
            before()
        reply, lengths = encoded_during(server, lambda: page.send(question))
        assert reply == expected and max(lengths) <= MOST_CHARACTERS, (question, lengths)


def test_the_notebook_never_tokenizes_picture_data(server, photos, open_page):
    from selenium.webdriver.common.by import By
    page = open_page(server)
    page.driver.find_element(By.XPATH, "//button[normalize-space()='Notebook']").click()
    box = page.wait_for(lambda: page.driver.find_element(By.CSS_SELECTOR, "#textbox-notebook textarea"), "the notebook")
    tab = page.driver.find_element(By.ID, "notebook-parent-tab")
    # a fresh user_data folder has no notebook prompt to save into yet: start one, as a user would
    next(b for b in tab.find_elements(By.XPATH, ".//button[normalize-space()='New']") if b.is_displayed()).click()
    page.wait_for(lambda: box.get_attribute("value"), "a new notebook prompt")
    text = "USER: <img src=\"" + file_url(photos[2]) + "\">\n" + QUESTION + "\nASSISTANT:"
    page.driver.execute_script("arguments[0].value = arguments[1];"
                               "arguments[0].dispatchEvent(new Event('input', {bubbles: true}));", box, text)
    done = server.count("Output generated in")
    generate = next(button for button in page.driver.find_elements(
        By.XPATH, "//*[@id='notebook-parent-tab']//button[normalize-space()='Generate']") if button.is_displayed())
    _, lengths = encoded_during(server, lambda: (generate.click(), server.wait_for_count("Output generated in", done + 1)))
    assert max(lengths) <= MOST_CHARACTERS, lengths
    page.wait_for(lambda: box.get_attribute("value").rstrip().endswith("A red circle."), "the notebook's answer")


def test_memory_comes_back_after_photos_sent_at_once(tmp_path):
    """Three rounds of four new 12 MP photos at once, on a server of its own: the server ends near where it
    started (the decoded pixels and the tower's work are freed and handed back; the features stay)."""
    models, model = os.path.split(DEMO_MODEL)
    urls = [file_url(make_photo(str(tmp_path / f"round-{i}.jpg"), seed=100 + i)) for i in range(12)]
    with running_webui(models, model, str(tmp_path / "work"), api=True) as server:
        post(server.api_base + "/v1/completions", {"prompt": "warm up", "max_tokens": 2})
        start = server.rss_mb()
        for round_urls in (urls[:4], urls[4:8], urls[8:]):
            def ask(i, round_urls=round_urls):
                post(server.api_base + "/v1/chat/completions", {"max_tokens": 4, "messages": [{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": round_urls[i]}}, {"type": "text", "text": QUESTION}]}]})

            assert run_in_threads(ask, len(round_urls)) == []
        grown = server.rss_mb() - start
    print(f"\nRSS after three rounds of 4 photos at once: {start:.0f} MB, then {grown:+.0f} MB")
    assert grown <= MEMORY_AFTER_PHOTOS_MB
