"""Phone photos in the real webui: the figures of the README's "Real photos" table.

    LLAVA_WEBUI_PATH=... LLAVA_WEBUI_PYTHON=... python tools/benchmark_webui.py [--quick]

Starts the current webui (UI and API, the bundled demo, default settings) with testbed/encode_probe,
then measures, each picture a fresh 12-megapixel JPEG (so every request pays one decode and one
vision forward, never a cache hit):
1. end-to-end latency of the same kind of photo on /v1/completions, /api/v1/generate and
   /v1/chat/completions (median of 3);
2. a 10-turn chat in the browser with the photo sent through the LLaVA field in turn 1, against a
   text-only chat of the same length: mean time of turns 2-10;
3. the most characters the webui's encode received in any call of each request;
4. the size of the saved history of the chat in 2.
``--quick`` sends one photo per route and chats 2 turns: it checks that the script still runs
against the real webui (CI runs it with the real-webui tests), not the speed.
"""

import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from extensions.llava.cli_ask import DEMO_MODEL  # noqa: E402
from testbed import tool_output  # noqa: E402
from testbed.photos import make_photo  # noqa: E402
from testbed.real_host import WEBUI, post, running_webui  # noqa: E402
from testbed.tiny import file_url  # noqa: E402

QUESTION = "What shape is in the picture?"


def timed(server, action):
    before = len(server.encoded())
    start = time.perf_counter()
    result = action()
    elapsed = time.perf_counter() - start
    return result, elapsed, max(server.encoded()[before:] or [0])


def api_requests(server, folder, repeats: int):
    prompt = "USER: <img src=\"{}\">\n" + QUESTION + "\nASSISTANT:"
    bodies = {
        "/v1/chat/completions": lambda url: {"max_tokens": 16, "temperature": 0, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": QUESTION}]}]},
        "/v1/completions": lambda url: {"prompt": prompt.format(url), "max_tokens": 16, "temperature": 0},
        "/api/v1/generate": lambda url: {"prompt": prompt.format(url), "max_new_tokens": 16, "do_sample": False},
    }
    text_only = {
        "/v1/chat/completions": {"max_tokens": 16, "temperature": 0, "messages": [{"role": "user", "content": [
            {"type": "text", "text": QUESTION}]}]},
        "/v1/completions": {"prompt": prompt.replace('<img src="{}">', ""), "max_tokens": 16, "temperature": 0},
        "/api/v1/generate": {"prompt": prompt.replace('<img src="{}">', ""), "max_new_tokens": 16, "do_sample": False},
    }
    figures, seed = {}, 100
    for path, body_for in bodies.items():
        _, _, twin = timed(server, lambda: post(server.api_base + path, text_only[path]))
        times, chars = [], []
        for _ in range(repeats):
            seed += 1
            url = file_url(make_photo(os.path.join(folder, f"api-{seed}.jpg"), seed=seed))
            (status, answer), elapsed, most = timed(server, lambda: post(server.api_base + path, body_for(url)))
            assert status == 200, answer
            times.append(elapsed)
            chars.append(most)
        figures[path] = (statistics.median(times), max(chars), twin)
    return figures


def chat_turns(server, folder, with_photo: bool, turns: int):
    from testbed.browser import Page
    page = Page(server)
    try:
        page.new_chat()
        if with_photo:
            page.pick(make_photo(os.path.join(folder, "chat.jpg"), seed=999))
        times, chars = [], []
        for turn in range(turns):
            question = QUESTION if turn == 0 else ("What colour is the shape?" if turn % 2 else QUESTION)
            _, elapsed, most = timed(server, lambda: page.send(question))
            times.append(elapsed)
            chars.append(most)
        return times, chars
    finally:
        page.close()


def saved_history_size(server, marker: str) -> int:
    folder = os.path.join(server.user_data, "logs", "instruct")
    sizes = []
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        with open(path, encoding="utf-8") as f:
            if marker in f.read():
                sizes.append(os.path.getsize(path))
    return max(sizes)


def main(argv=None):
    quick = "--quick" in (sys.argv[1:] if argv is None else argv)
    repeats, turns = (1, 2) if quick else (3, 10)
    tool_output.start(quick)
    if not WEBUI:
        sys.exit("set LLAVA_WEBUI_PATH and LLAVA_WEBUI_PYTHON (the hosts' prepare.sh prints both)")
    with tempfile.TemporaryDirectory(prefix="llava-photos-") as folder:
        measure(folder, repeats, turns)


def measure(folder: str, repeats: int, turns: int) -> None:
    models, model = os.path.split(DEMO_MODEL)
    sample = make_photo(os.path.join(folder, "sample.jpg"), seed=1)
    print(f"photo: 4000x3000 JPEG, {os.path.getsize(sample) / 1e6:.1f} MB, "
          f"{len(file_url(sample)) / 1e6:.1f} M characters as a data URL")
    with running_webui(models, model, folder, ui=True, api=True, probe_encode=True) as server:
        post(server.api_base + "/v1/completions", {"prompt": "warm up", "max_tokens": 2})
        figures = api_requests(server, folder, repeats)
        chat_time = figures["/v1/chat/completions"][0]
        print(f"\n1. one photo per request, end to end (median of {repeats}); the most characters any encode call "
              "of the request received, and of the same request without the photo:")
        for path, (seconds, most, twin) in figures.items():
            print(f"   {path:22s} {seconds:6.2f} s  ratio to chat {seconds / chat_time:.2f}  "
                  f"encode <= {most} chars (without the photo: {twin})")
        photo_times, photo_chars = chat_turns(server, folder, with_photo=True, turns=turns)
        text_times, text_chars = chat_turns(server, folder, with_photo=False, turns=turns)
        photo_mean, text_mean = statistics.mean(photo_times[1:]), statistics.mean(text_times[1:])
        print(f"\n2. {turns}-turn chat in the browser, photo through the LLaVA field in turn 1: turn 1 "
              f"{photo_times[0]:.2f} s, turns 2-{turns} mean {photo_mean:.2f} s; text-only chat turns 2-{turns} mean "
              f"{text_mean:.2f} s; ratio {photo_mean / text_mean:.2f}")
        print(f"3. most characters encode received in any turn: {max(photo_chars)} with the photo, "
              f"{max(text_chars)} text only")
        size = saved_history_size(server, "What colour is the shape?\"")
        print(f"4. saved history of the photo chat: {size / 1e6:.2f} MB "
              f"(the photo is {os.path.getsize(os.path.join(folder, 'chat.jpg')) / 1e6:.2f} MB)")


if __name__ == "__main__":
    sys.exit(main())
