"""The extension in the real webui's UI, driven in headless Chromium as a person would use it.

Needs a webui checkout with its Python (``LLAVA_WEBUI_PATH`` / ``LLAVA_WEBUI_PYTHON``), selenium in
that Python's environment or this one, and ``/usr/bin/chromium`` with ``/usr/bin/chromedriver``;
the hosts' ``prepare.sh DIR --browser`` sets all of it up. The servers run the bundled demo with the
webui's default settings (instruct mode, the Top-P preset, max_new_tokens 512). A failing test leaves a
screenshot in ``test-artifacts/`` (see conftest.py).
"""

import os
import time

import pytest

from extensions.llava.cli_ask import DEMO_MODEL
from testbed.photos import corner_picture, drawn_corners, shape_picture
from testbed.real_host import ROOT, WEBUI, is_current, needs_webui, running_webui

pytest.importorskip("selenium.webdriver", reason="selenium is not installed (prepare.sh --browser)")
from selenium.webdriver.common.by import By  # noqa: E402

from testbed.browser import CHROMEDRIVER  # noqa: E402

pytestmark = [
    needs_webui,
    pytest.mark.slow,
    pytest.mark.skipif(not os.path.exists(CHROMEDRIVER), reason="no chromedriver (prepare.sh --browser installs it)"),
    pytest.mark.skipif(bool(WEBUI) and not is_current(WEBUI), reason="the browser tests follow the current webui's UI"),
]
RED_CIRCLE = os.path.join(ROOT, "examples", "red-circle.png")
EMBEDDED_ONE = "llava: 1 picture(s) in the prompt, 1 embedded"


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    def drawn(name, colour, shape):
        return shape_picture(str(tmp_path_factory.mktemp("pictures") / name), colour, shape)

    return {"red circle": RED_CIRCLE, "blue square": drawn("blue-square.png", (40, 70, 215), "square"),
            "green triangle": drawn("green-triangle.png", (35, 165, 50), "triangle")}


def start_demo(tmp_path_factory, name: str, *extra_args):
    models, model = os.path.split(DEMO_MODEL)
    return running_webui(models, model, str(tmp_path_factory.mktemp(name)), ui=True, api=False, extra_args=extra_args)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with start_demo(tmp_path_factory, "ui-server") as running:
        yield running


@pytest.fixture(scope="module")
def multi_user_server(tmp_path_factory):
    with start_demo(tmp_path_factory, "multi-user-server", "--multi-user") as running:
        yield running


def shows_picture(message) -> bool:
    return bool(message.find_elements(By.CSS_SELECTOR, "img.image-preview"))


def test_the_llava_field_goes_with_the_message_and_a_follow_up_is_about_it(server, open_page):
    page = open_page(server).in_new_chat()
    seen = server.count(EMBEDDED_ONE)
    assert page.preview() is None
    page.pick(RED_CIRCLE)
    shown = page.wait_for(page.preview, "the picked picture under the field")
    assert "red-circle.png" in shown  # the picked file itself, as the browser draws it
    assert page.send("What shape is in the picture?") == "A red circle."
    assert shows_picture(page.last_user_message())  # the picture is shown in the message
    assert server.count(EMBEDDED_ONE) == seen + 1
    assert page.field_files() == []  # the field was emptied for the next message
    page.wait_for(lambda: page.preview() is None, "an empty preview")
    # a text-only follow-up in the same chat is answered about the earlier picture
    assert page.send("What colour is the shape?") == "Red."
    assert not shows_picture(page.last_user_message())
    assert server.count(EMBEDDED_ONE) == seen + 2


@pytest.mark.parametrize("size", [(640, 480), (224, 224), (300, 900)])
def test_the_preview_shows_the_whole_picture_at_a_readable_size(server, open_page, tmp_path, size):
    page = open_page(server).in_new_chat()
    page.pick(corner_picture(str(tmp_path / f"corners-{size[0]}x{size[1]}.png"), size))
    page.wait_for(page.preview, "the picked picture under the field")
    time.sleep(0.5)  # the picture loads after its element appears
    shot, inside = page.preview_screenshot()
    corners = drawn_corners(shot)
    assert inside, "the preview box does not fit in the window"
    assert all(corners.values()), corners  # all four corners of the picture are drawn
    left, top = corners["top left"][:2]
    right, bottom = corners["bottom right"][2:]
    assert corners["top right"][2] == right and corners["bottom left"][3] == bottom, corners
    drawn_width, drawn_height = right - left, bottom - top
    assert abs(drawn_width / drawn_height - size[0] / size[1]) < 0.03, corners  # its own proportions
    assert max(drawn_width, drawn_height) >= 280, corners  # large enough to read, whatever the picture's size
    page.clear_field()


def test_the_attach_button(server, open_page, pictures):
    page = open_page(server).in_new_chat()
    page.attach(pictures["blue square"])
    assert page.send("What shape is in the picture?") == "A blue square."
    assert shows_picture(page.last_user_message())


def test_clearing_the_field_cancels_the_picture(server, open_page, pictures):
    page = open_page(server).in_new_chat()
    seen = server.log_text().count("picture(s) in the prompt")
    page.pick(pictures["green triangle"])
    page.wait_for(page.preview, "the picked picture under the field")
    page.clear_field()
    page.wait_for(lambda: page.preview() is None, "an empty preview")
    page.send("Hello")
    assert not shows_picture(page.last_user_message())
    assert server.log_text().count("picture(s) in the prompt") == seen  # no picture reached the model


def test_embed_all_changes_what_is_embedded(server, open_page, pictures):
    page = open_page(server).in_new_chat()
    page.pick(pictures["green triangle"])
    assert page.send("What shape is in the picture?") == "A green triangle."
    page.pick(pictures["blue square"])
    seen_one = server.count("llava: 2 picture(s) in the prompt, 1 embedded")
    assert page.send("What shape is in the picture?") == "A blue square."
    assert server.count("llava: 2 picture(s) in the prompt, 1 embedded") == seen_one + 1
    page.set_embed_all(True)
    seen_two = server.count("llava: 2 picture(s) in the prompt, 2 embedded")
    page.send("What colour is the shape?")
    assert server.count("llava: 2 picture(s) in the prompt, 2 embedded") == seen_two + 1
    page.set_embed_all(False)


def test_two_browser_sessions_stay_apart(multi_user_server, open_page, pictures):
    server = multi_user_server
    alice, bob = open_page(server), open_page(server)
    alice.pick(RED_CIRCLE)
    alice.set_embed_all(True)
    seen = server.log_text().count("picture(s) in the prompt")
    bob.send("Hello")  # Alice's picture must not go with Bob's message
    assert not shows_picture(bob.last_user_message())
    assert server.log_text().count("picture(s) in the prompt") == seen
    assert alice.send("What shape is in the picture?") == "A red circle."
    assert shows_picture(alice.last_user_message())
    # Alice's "embed all" is hers: Bob's chat with two pictures embeds only the last
    bob.pick(pictures["green triangle"])
    bob.send("What shape is in the picture?")
    bob.pick(pictures["blue square"])
    seen_one = server.count("llava: 2 picture(s) in the prompt, 1 embedded")
    assert bob.send("What shape is in the picture?") == "A blue square."
    assert server.count("llava: 2 picture(s) in the prompt, 1 embedded") == seen_one + 1


def test_a_saved_chat_shows_and_gives_its_picture_after_a_restart(tmp_path_factory, open_page):
    work = str(tmp_path_factory.mktemp("restart"))
    models, model = os.path.split(DEMO_MODEL)
    with running_webui(models, model, work, ui=True, api=False) as first:
        page = open_page(first)
        page.new_chat()
        page.pick(RED_CIRCLE)
        assert page.send("What shape is in the picture?") == "A red circle."
    chats = {}
    for root, _, names in os.walk(os.path.join(work, "user_data", "logs", "instruct")):
        for name in names:
            with open(os.path.join(root, name), encoding="utf-8") as f:
                chats[os.path.join(root, name)] = f.read()
    [saved] = [path for path, text in chats.items() if "What shape" in text]
    assert chats[saved].count("data:image/png;base64,") == 1  # stored once, as the message's attachment
    print(f"\nsaved chat with a {os.path.getsize(RED_CIRCLE)}-byte picture: {os.path.getsize(saved)} bytes")
    with running_webui(models, model, work, ui=True, api=False, log_name="server-2.log") as second:
        page = open_page(second)
        page.wait_for(lambda: page.driver.find_elements(By.CSS_SELECTOR, "#chat .user-message img.image-preview"),
                      "the saved chat's picture")
        assert page.send("What colour is the shape?") == "Red."
        assert second.count(EMBEDDED_ONE) == 1  # the picture went to the model again
