"""The API hardening cases against the real current webui, started with ``--api-key``.

Each case is what a hostile or careless client tries; see extensions/llava/api/check.py for what the
extension promises. Memory is measured and bounded.
"""

import http.client
import json
import os
import socket
import time

import pytest
from PIL import Image

from testbed import tiny
from testbed.hostile_files import animated_gif, deep_tiff, eps_stub, ico_holding, jpeg_claiming, tiff_in_strips
from testbed.photos import encoded
from testbed.real_host import WEBUI, is_current, needs_webui, request, running_webui
from testbed.real_models import picture_url, v0_prompt_tokens, write_model
from testbed.tiny import bytes_url, header_only_png

KEY = "a-test-key"
# What 100 requests with a new 640×480 picture each may add to the server: their features in the cache
# take 6.4 MB (256 × 64 floats a picture), the rest is allocator slack. Had each request kept its
# picture (a 1.2 MB data URL, 0.9 MB decoded), they would hold over 200 MB.
MEMORY_BOUND_MB = 50
AUTH = {"Authorization": f"Bearer {KEY}"}
pytestmark = [needs_webui, pytest.mark.slow, pytest.mark.skipif(bool(WEBUI) and not is_current(WEBUI),
                                              reason="the hardening cases follow the current webui's API server")]


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    models = tmp_path_factory.mktemp("models")
    v0 = write_model(os.path.join(models, "tiny-llava"), current=True)
    work = tmp_path_factory.mktemp("keyed-server")
    settings = work / "settings.yaml"  # "embed all" on: every picture of a request counts
    settings.write_text("llava-add_all_images_to_prompt: true\n")
    with running_webui(str(models), "tiny-llava", str(work), extra_args=("--api-key", KEY, "--settings", str(settings))) \
            as server:
        server.tokenizer = v0.tokenizer
        yield server


def call(server, path, body, headers=AUTH, **kwargs):
    status, response_headers, raw = request(server.base + path, body, headers, **kwargs)
    try:
        parsed = json.loads(raw)
    except ValueError:
        parsed = raw.decode("utf-8", "replace")
    return status, response_headers, parsed


def chat(*urls, text="What is this?"):
    return {"max_tokens": 2, "messages": [{"role": "user", "content": [{"type": "text", "text": text}] + [
        {"type": "image_url", "image_url": {"url": u} if not isinstance(u, dict) else u} for u in urls]}]}


def test_every_route_needs_the_key(keyed):
    for path, body in [("/api/v1/generate", {"prompt": "hi", "max_new_tokens": 2}),
                       ("/v1/completions", {"prompt": "hi", "max_tokens": 2}),
                       ("/v1/chat/completions", chat())]:
        assert call(keyed, path, body, headers={})[0] == 401, path
        assert call(keyed, path, body, headers={"Authorization": "Bearer wrong"})[0] == 401, path
        assert call(keyed, path, body)[0] == 200, path


def test_json_only_and_the_webuis_own_cors(keyed):
    status, _, body = call(keyed, "/api/v1/generate", b'{"prompt": "hi"}', headers={**AUTH, "Content-Type": "text/plain"})
    assert status == 415, body
    origin = {"Origin": "https://elsewhere.example"}
    ours = call(keyed, "/api/v1/generate", {"prompt": "hi", "max_new_tokens": 1}, headers={**AUTH, **origin})[1]
    theirs = call(keyed, "/v1/completions", {"prompt": "hi", "max_tokens": 1}, headers={**AUTH, **origin})[1]
    assert ours.get("access-control-allow-origin") == theirs.get("access-control-allow-origin")


def test_no_work_and_nothing_held_for_unauthenticated_requests(keyed):
    big = bytes_url(header_only_png(7000, 7000))
    before, lines = keyed.rss_mb(), keyed.count("llava:")
    for _ in range(20):
        status, _, _ = call(keyed, "/v1/completions", {"prompt": f'x <img src="{big}">'}, headers={})
        assert status == 401
    after = keyed.rss_mb()
    print(f"\nRSS over 20 unauthenticated requests with a 7000x7000 PNG: {before:.0f} -> {after:.0f} MB")
    assert keyed.count("llava:") == lines  # the extension logged nothing: it did nothing


def test_a_bomb_is_refused_without_decoding(keyed):
    start = time.time()
    status, _, body = call(keyed, "/v1/completions", {"prompt": f'x <img src="{bytes_url(header_only_png(10000, 10000))}">'})
    print(f"\n10000x10000 bomb refused in {time.time() - start:.3f} s")
    assert status == 400 and "larger than 50,000,000 pixels" in body["error"]["message"]


@pytest.mark.parametrize("url", [123, None, {}])
def test_a_malformed_image_url_is_a_400(keyed, url):
    status, _, body = call(keyed, "/v1/chat/completions", chat({"url": url}))
    assert status == 400 and "image_url part without a text 'url'" in body["error"]["message"]


def test_malformed_messages_and_completions_with_messages(keyed):
    status, _, body = call(keyed, "/v1/chat/completions", {"messages": 5})
    assert status == 400 and body["error"]["message"] == "'messages' must be a list of messages"
    cut = picture_url(5)[:-120]
    for url, reason in [(cut, "damaged or cut short"), ("http://127.0.0.1:9/a.png", "never fetches")]:
        status, _, body = call(keyed, "/v1/completions", {"prompt": "<__media__> what?", "max_tokens": 2, **chat(url)})
        assert status == 400 and reason in body["error"]["message"], body
    assert "Failed to fetch external image" not in keyed.log_text()


def test_a_streamed_refusal_is_an_error_event(keyed):
    body = {"prompt": f'x <img src="{picture_url(6)}">', "max_tokens": 4000, "stream": True}
    status, _, raw = request(keyed.base + "/v1/completions", body, AUTH)
    events = [line[6:] for line in raw.decode().splitlines() if line.startswith("data: ")]
    assert status == 200 and events[-1] == "[DONE]", raw
    assert "the context is too short for this prompt's last picture" in json.loads(events[-2])["error"]["message"]
    status, _, answer = call(keyed, "/v1/completions", {**body, "stream": False})
    assert status == 400 and "the context is too short" in answer["error"]["message"]


def test_the_2023_route_stops_when_the_client_leaves(keyed):
    done = keyed.count("Output generated in")
    # The random model's byte tokens are banned: after a lone byte the webui yields (and so looks at the
    # stop signal) only once the text decodes again, which with random tokens can be never.
    byte_tokens = ",".join(str(keyed.tokenizer.convert_tokens_to_ids(f"<0x{b:02X}>")) for b in range(256))
    payload = json.dumps({"prompt": "count", "max_new_tokens": 3000, "custom_token_bans": byte_tokens}).encode()
    with socket.create_connection(("127.0.0.1", int(keyed.base.rsplit(":", 1)[1]))) as connection:
        connection.sendall(b"POST /api/v1/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                           + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(payload)}\r\n\r\n".encode() + payload)
        time.sleep(1.0)
    keyed.wait_for_count("Output generated in", done + 1)
    last = keyed.log_text().rsplit("Output generated in", 1)[1]
    generated = int(last.split(" tokens,")[0].rsplit("(", 1)[1].split(",")[-1].split()[-1])
    print(f"\nthe 2023 route generated {generated} of 3000 tokens before the client left")
    assert generated < 3000


def test_pixels_to_embed_are_bounded_per_request(keyed):
    big = bytes_url(header_only_png(7000, 7000))  # 49 million pixels each: allowed alone, not three at once
    start = time.time()
    status, _, body = call(keyed, "/v1/chat/completions", chat(big, big, big))
    print(f"\n3 pictures of 7000x7000 with embed all on refused in {time.time() - start:.3f} s")
    assert status == 400 and "one request may hold 100,000,000" in body["error"]["message"], body


def test_usage_counts_pictures_at_their_token_length(keyed):
    prompt = f'Look: <img src="{picture_url(7)}"> says'
    status, _, body = call(keyed, "/v1/completions", {"prompt": prompt, "max_tokens": 3})
    expected = v0_prompt_tokens(keyed.tokenizer, "Look: <picture> says")
    assert status == 200 and body["usage"]["prompt_tokens"] == expected, body
    assert body["choices"][0]["finish_reason"] == "length"  # the 3 tokens asked for were used
    status, _, raw = request(keyed.base + "/v1/completions", {"prompt": prompt, "max_tokens": 3, "stream": True,
                                                               "stream_options": {"include_usage": True}}, AUTH)
    usage = [json.loads(line[6:]) for line in raw.decode().splitlines() if line.startswith("data: {")][-1]["usage"]
    assert status == 200 and usage["prompt_tokens"] == expected, usage
    status, _, body = call(keyed, "/v1/chat/completions", chat(picture_url(8)))
    _, _, rendered = call(keyed, "/v1/internal/chat-prompt", chat(picture_url(8)))  # the webui's own prompt
    # the webui's chat API renders its instruction template and encodes it without a BOS
    expected = v0_prompt_tokens(keyed.tokenizer, rendered["prompt"], placeholder="<__media__>", bos=False)
    assert status == 200 and body["usage"]["prompt_tokens"] == expected, (body, rendered)


def test_typed_image_tokens_stay_text(keyed):
    typed = "I typed <im_patch> here"
    status, _, body = call(keyed, "/v1/completions", {"prompt": typed, "max_tokens": 1})
    escaped = len(keyed.tokenizer("I typed &lt;im_patch> here")["input_ids"]) + 1
    assert status == 200 and body["usage"]["prompt_tokens"] == escaped, body


def test_memory_over_many_requests(keyed):
    """RSS over 100 requests, each with a new picture: what stays is the feature cache (64 KB a picture
    here), not the pictures or the requests."""
    def photo(seed):
        return tiny.data_url(tiny.picture(640, 480, seed=seed))

    for i in range(10):  # warm up: allocator pools, the tokenizer's caches
        call(keyed, "/v1/chat/completions", chat(photo(1000 + i)))
    before, kept_before = keyed.rss_mb(), prefixes_kept_mb(keyed)
    for i in range(100):
        assert call(keyed, "/v1/chat/completions", chat(photo(100 + i)))[0] == 200
    grown, kept = keyed.rss_mb() - before, prefixes_kept_mb(keyed) - kept_before
    print(f"\nRSS over 100 picture requests: {before:.0f} MB, then {grown:+.1f} MB, of which earlier prompts "
          f"kept for reuse {kept:+.1f} MB")
    # each request's prompt stays for reuse (a reused entry is never taken away), within llava-prefix_cache_mb
    assert 0 < kept < 100 and grown - kept < MEMORY_BOUND_MB


def prefixes_kept_mb(server) -> float:
    """What the store of earlier prompts holds, as its last log line says (0 before any)."""
    said = " ".join(server.log_text().split()).rsplit("earlier prompts kept: ", 1)  # the log wraps its lines
    return float(said[1].split("(", 1)[1].split(" MB", 1)[0]) if len(said) == 2 else 0.0


# ---------------------------------------------------------------- closed doors


def raw_post(server, path: str, raw: bytes, headers: dict) -> tuple[int, bytes]:
    """A POST exactly as given: no Content-Type unless ``headers`` name one (urllib would add its own)."""
    host, port = server.base.rsplit("//", 1)[1].split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=300)
    try:
        connection.request("POST", path, body=raw, headers={**headers, "Content-Length": str(len(raw))})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


@pytest.mark.parametrize("name,data", [
    ("ICO hiding a 9000x9000 PNG", ico_holding(Image.new("RGB", (9000, 9000)))),
    ("EPS", eps_stub()), ("PPM", encoded(Image.new("RGB", (8, 8)), "PPM")),
    ("TGA", encoded(Image.new("RGB", (8, 8)), "TGA"))])
def test_only_the_named_formats_are_opened(keyed, name, data):
    url = bytes_url(data, "image/png")
    started = time.time()
    for path, body in [("/v1/chat/completions", chat(url)), ("/v1/completions", {"prompt": f'x <img src="{url}">'})]:
        status, _, answer = call(keyed, path, body)
        assert status == 400, (name, path, answer)
        assert answer["error"]["message"] == ("picture 1 in the request: " if "chat" in path else "picture 1 in the prompt: ") \
            + "the data is not a picture in a supported format (PNG, JPEG, GIF, WebP, BMP or TIFF)"
    assert time.time() - started < 5  # refused from the first bytes: nothing was decoded


def test_a_body_without_content_type_is_checked(keyed):
    """The webui reads a body without Content-Type as JSON; so does the check: its picture is counted at its
    token length (never tokenized as base64), a broken one refused, a web address never fetched."""
    prompt = f'Look: <img src="{picture_url(21)}"> says'
    status, raw = raw_post(keyed, "/v1/completions", json.dumps({"prompt": prompt, "max_tokens": 2}).encode(), AUTH)
    assert status == 200 and json.loads(raw)["usage"]["prompt_tokens"] == \
        v0_prompt_tokens(keyed.tokenizer, "Look: <picture> says"), raw
    status, raw = raw_post(keyed, "/v1/completions", json.dumps({"prompt": 'x <img src="data:image/png;base64,@@">'})
                           .encode(), AUTH)
    assert status == 400 and "not valid base64" in json.loads(raw)["error"]["message"]
    body = {"prompt": "<__media__> what?", "max_tokens": 2, **chat("http://127.0.0.1:9/a.png")}
    status, raw = raw_post(keyed, "/v1/completions", json.dumps(body).encode(), AUTH)
    assert status == 400 and "never fetches" in json.loads(raw)["error"]["message"]
    status, raw = raw_post(keyed, "/v1/completions", json.dumps({**body, "stream": True}).encode(), AUTH)
    assert status == 400 and "never fetches" in json.loads(raw)["error"]["message"]
    assert "Failed to fetch external image" not in keyed.log_text()


def test_odd_bodies_get_the_webuis_own_answers_not_a_crash(keyed):
    deep = b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    status, raw = raw_post(keyed, "/v1/completions", deep, {**AUTH, "Content-Type": "application/json"})
    assert status == 400, raw  # the webui's answer to a body it cannot parse
    for field, value in [("stopping_strings", 5), ("stopping_strings", True), ("stop", 7)]:
        status, _, answer = call(keyed, "/api/v1/generate", {"prompt": "hi", field: value})
        assert status == 400 and answer["error"]["message"] == f"'{field}' must be a text or a list of texts"
    status, _, answer = call(keyed, "/v1/completions", {"prompt": 'x <img src="data:image/png;base64,AAAA'})
    assert status == 400 and answer["error"]["message"] == \
        "picture 1 in the prompt: the quote after src= is never closed; end the picture's data with a quote"


def test_echo_gives_back_the_clients_prompt(keyed):
    prompt = f'Look: <img src="{picture_url(22)}"> says'
    status, _, answer = call(keyed, "/v1/completions", {"prompt": prompt, "max_tokens": 2, "echo": True})
    assert status == 200 and answer["choices"][0]["text"].startswith(prompt), answer


def test_an_animated_gif_is_used_at_once(keyed):
    gif = bytes_url(animated_gif(400, side=256), "image/gif")
    started = time.time()
    assert call(keyed, "/v1/chat/completions", chat(gif))[0] == 200
    assert time.time() - started < 10 and "is animated; its first frame is used" in keyed.log_text()


ANTHROPIC_KEY = {"x-api-key": KEY}


def anthropic(*blocks, stream=False):
    return {"max_tokens": 2, "stream": stream, "messages": [
        {"role": "user", "content": [*blocks, {"type": "text", "text": "What is this?"}]}]}


def image_block(url: str) -> dict:
    media, data = url[5:].split(";base64,")
    return {"type": "image", "source": {"type": "base64", "media_type": media, "data": data}}


def test_the_anthropic_route_has_the_same_checks_errors_and_usage(keyed):
    good = image_block(picture_url(23))
    assert call(keyed, "/v1/messages", anthropic(good), headers=AUTH)[0] == 401  # its key goes in x-api-key
    status, _, answer = call(keyed, "/v1/messages", anthropic(good), headers=ANTHROPIC_KEY)
    _, _, rendered = call(keyed, "/v1/internal/chat-prompt", chat(picture_url(23)))
    assert status == 200 and answer["usage"]["input_tokens"] == v0_prompt_tokens(
        keyed.tokenizer, rendered["prompt"], placeholder="<__media__>", bos=False), (answer, rendered)
    bomb = image_block(bytes_url(header_only_png(10000, 10000)))
    status, _, answer = call(keyed, "/v1/messages", anthropic(bomb), headers=ANTHROPIC_KEY)
    assert status == 400 and answer == {"type": "error", "error": {"type": "invalid_request_error", "message":
                                        "picture 1 in the request: the picture is larger than 50,000,000 pixels"}}
    web = {"type": "image", "source": {"type": "url", "url": "http://127.0.0.1:9/a.png"}}
    status, _, answer = call(keyed, "/v1/messages", anthropic(web), headers=ANTHROPIC_KEY)
    assert status == 400 and "never fetches web addresses" in answer["error"]["message"]
    cut = image_block(picture_url(24)[:-120])  # its header is whole: it fails when it is decoded
    status, _, raw = request(keyed.base + "/v1/messages", anthropic(cut, stream=True), ANTHROPIC_KEY)
    events = raw.decode()
    assert status == 200 and "event: error" in events and "damaged or cut short" in events, events


# ---------------------------------------------------------------- doors of the 2026-05-03 attack


def post_headers(server, path: str, body: dict, header_pairs: list[tuple[str, str]]) -> tuple[int, dict]:
    """A JSON POST with the headers exactly as listed, a name given twice sent twice."""
    host, port = server.base.rsplit("//", 1)[1].split(":")
    raw = json.dumps(body).encode()
    connection = http.client.HTTPConnection(host, int(port), timeout=300)
    try:
        connection.putrequest("POST", path)
        for name, value in [("Content-Type", "application/json"), ("Content-Length", str(len(raw))), *header_pairs]:
            connection.putheader(name, value)
        connection.endheaders(raw)
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def test_a_second_key_header_does_not_make_the_check_stand_aside(keyed):
    web = {"prompt": "<__media__> what?", "max_tokens": 2, **chat("http://127.0.0.1:9/a.png")}
    twice = [("Authorization", f"Bearer {KEY}"), ("Authorization", "Bearer bogus")]
    status, answer = post_headers(keyed, "/v1/completions", web, twice)
    assert status == 400 and "never fetches" in answer["error"]["message"], answer
    eps = image_block(bytes_url(eps_stub(), "image/png"))
    status, answer = post_headers(keyed, "/v1/messages", anthropic(eps), [("x-api-key", KEY), ("x-api-key", "bogus")])
    assert status == 400 and "not a picture in a supported format" in answer["error"]["message"], answer
    assert "Failed to fetch external image" not in keyed.log_text()


def test_the_2023_route_answers_a_deeply_nested_body_with_a_400(keyed):
    deep = b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    status, raw = raw_post(keyed, "/api/v1/generate", deep, {**AUTH, "Content-Type": "application/json"})
    assert status == 400 and json.loads(raw)["error"]["message"] == "the request body is not valid JSON", raw


BAD_SETTINGS = "llava-cache_size_mb: .nan\nllava-prefix_cache_mb: .inf\nllava-projector_filename: ../../../../etc/passwd\n"


@pytest.fixture(scope="module")
def badly_set(tmp_path_factory):
    models = tmp_path_factory.mktemp("models")
    write_model(os.path.join(models, "tiny-llava"), current=True)
    work = tmp_path_factory.mktemp("badly-set-server")
    settings = work / "settings.yaml"
    settings.write_text(BAD_SETTINGS)
    with running_webui(str(models), "tiny-llava", str(work), extra_args=("--api-key", KEY, "--settings", str(settings))) \
            as server:
        yield server


def test_bad_settings_are_named_at_start_up_and_switch_no_check_off(badly_set):
    log = badly_set.log_text()
    assert all(f"llava-{name} is" in log for name in ("cache_size_mb", "prefix_cache_mb", "projector_filename")), log
    eps = bytes_url(eps_stub(), "image/png")
    status, _, answer = call(badly_set, "/v1/chat/completions", chat(eps))
    assert status == 400 and "not a picture in a supported format" in answer["error"]["message"], answer
    status, _, answer = call(badly_set, "/api/v1/generate", {"prompt": f'x <img src="{picture_url(31)}">',
                                                             "max_new_tokens": 2})
    assert status == 400 and "llava-prefix_cache_mb is inf" in answer["error"]["message"], answer
    status, _, answer = call(badly_set, "/v1/chat/completions", chat(picture_url(32)))
    assert status == 400 and "llava-cache_size_mb is nan" in answer["error"]["message"], answer
    assert call(badly_set, "/api/v1/generate", {"prompt": "hi", "max_new_tokens": 2})[0] == 200


def test_the_items_of_one_request_are_bounded(keyed):
    tiny_url = tiny.data_url(tiny.picture(2, 2))
    started = time.time()
    for path, body in [("/v1/chat/completions", chat(*[tiny_url] * 2500)),
                       ("/v1/completions", {"prompt": f'<img src="{tiny_url}"> ' * 129})]:
        status, _, answer = call(keyed, path, body)
        assert status == 400 and answer["error"]["message"] == (
            f"the request holds {2500 if 'chat' in path else 129:,} pictures; one request may hold 128 "
            "(the setting llava-max_items)"), answer
    assert time.time() - started < 5



@pytest.fixture(scope="module")
def last_only(tmp_path_factory):
    """A server with the default settings: "embed all" off, only a prompt's last picture is embedded."""
    models = tmp_path_factory.mktemp("models")
    write_model(os.path.join(models, "tiny-llava"), current=True)
    work = tmp_path_factory.mktemp("last-only-server")
    with running_webui(str(models), "tiny-llava", str(work), extra_args=("--api-key", KEY)) as server:
        yield server


NOT_NAMED = "picture 1 in the request: the data is not a picture in a supported format (PNG, JPEG, GIF, WebP, BMP or TIFF)"


def test_a_picture_that_will_not_be_embedded_costs_no_decoding(last_only):
    ico = bytes_url(ico_holding(Image.new("RGB", (4000, 4000))), "image/png")
    body = {"prompt": "<__media__> <__media__> <__media__> what?", "max_tokens": 2, **chat(ico, ico, picture_url(33))}
    before = last_only.rss_mb()
    started = time.time()
    for path in ("/v1/completions", "/api/v1/generate"):
        status, _, answer = call(last_only, path, body)
        assert status == 400 and answer["error"]["message"] == NOT_NAMED, (path, answer)
    grown = last_only.rss_mb() - before
    print(f"\ntwo ICOs of a 4000x4000 PNG beside the embedded picture: refused in {time.time() - started:.2f} s, "
          f"RSS {grown:+.0f} MB")
    assert time.time() - started < 5 and grown < 20
    assert call(last_only, "/v1/completions", {**body, **chat(picture_url(34), picture_url(35), picture_url(33))})[0] \
        == 200


def test_tiff_and_jpeg_amplification_is_refused_from_the_header(last_only):
    cases = [(tiff_in_strips(200_000), "image/tiff", "is stored in 200,000 strips or tiles"),
             (jpeg_claiming(7000, 7000), "image/jpeg", "more than its 633 bytes of JPEG data can hold"),
             (deep_tiff(4200, 4200), "image/tiff", "pixels of 32 bits (mode 'F')")]
    before = last_only.rss_mb()
    started = time.time()
    for data, media, reason in cases:
        status, _, answer = call(last_only, "/v1/chat/completions", chat(bytes_url(data, media)))
        assert status == 400 and reason in answer["error"]["message"], (reason, answer)
    # where it would not be embedded, the webui would still open it: its directory is read all the same
    status, _, answer = call(last_only, "/v1/chat/completions", chat(bytes_url(cases[0][0], "image/tiff"), picture_url(36)))
    assert status == 400 and cases[0][2] in answer["error"]["message"], answer
    grown = last_only.rss_mb() - before
    print(f"\nTIFF strips, forged JPEG, deep TIFF refused in {time.time() - started:.2f} s, RSS {grown:+.0f} MB")
    assert time.time() - started < 10 and grown < 40


def test_a_constant_negative_deep_picture_is_stretched(last_only):
    for mode, value in [("F", -2.5), ("I", -40)]:
        status, _, answer = call(last_only, "/v1/chat/completions", chat(bytes_url(deep_tiff(64, 64, mode, value), "image/tiff")))
        assert status == 200, (mode, answer)


def written_in_text(*urls) -> str:
    return "What is this? " + " ".join(f'<img src="{url}">' for url in urls)


def test_pictures_written_in_chat_text_are_checked_and_never_tokenized(keyed):
    eps = bytes_url(eps_stub(), "image/png")
    big = bytes_url(header_only_png(7000, 7000))
    for path, headers, body in [
            ("/v1/chat/completions", AUTH, lambda text: {"max_tokens": 2, "messages": [{"role": "user", "content": text}]}),
            ("/v1/messages", ANTHROPIC_KEY, lambda text: {"max_tokens": 2, "messages": [
                {"role": "user", "content": [{"type": "text", "text": text}]}]})]:
        status, _, answer = call(keyed, path, body(written_in_text(eps)), headers=headers)
        assert status == 400 and "not a picture in a supported format" in answer["error"]["message"], (path, answer)
        status, _, answer = call(keyed, path, body(written_in_text(big, big, big)), headers=headers)
        assert status == 400 and "one request may hold 100,000,000" in answer["error"]["message"], (path, answer)
        started = time.time()  # the same size of picture as an image part, whose data is never tokenized
        assert call(keyed, "/v1/chat/completions", chat(tiny.data_url(tiny.picture(1600, 1200, seed=40))))[0] == 200
        as_a_part = time.time() - started
        photo = tiny.data_url(tiny.picture(1600, 1200, seed=37))  # 2.5 MB of base64: seconds were it tokenized
        started = time.time()
        status, _, answer = call(keyed, path, body(written_in_text(photo)), headers=headers)
        elapsed = time.time() - started
        print(f"\n{path}: a picture written in the text answered in {elapsed:.2f} s, as an image_url {as_a_part:.2f} s")
        usage = answer["usage"].get("prompt_tokens", answer["usage"].get("input_tokens"))
        assert status == 200 and 256 < usage < 1000 and elapsed < 2 * as_a_part + 1, (path, answer)


def test_each_prompt_of_a_list_counts_towards_the_budget(last_only):
    big = bytes_url(header_only_png(7000, 7000))
    prompts = [f'x <img src="{big}">' for _ in range(3)]
    status, _, answer = call(last_only, "/v1/completions", {"prompt": prompts, "max_tokens": 2})
    assert status == 400 and "one request may hold 100,000,000" in answer["error"]["message"], answer


def test_the_logits_route_is_checked_and_refuses_with_a_400(keyed):
    eps = bytes_url(eps_stub(), "image/png")
    status, _, answer = call(keyed, "/v1/internal/logits", {"prompt": f'x <img src="{eps}">', "use_samplers": True})
    assert status == 400 and "not a picture in a supported format" in answer["error"]["message"], answer
    cut = picture_url(38)[:-120]  # its header is whole: refused when it is decoded, inside the generation
    status, _, answer = call(keyed, "/v1/internal/logits", {"prompt": f'x <img src="{cut}">', "use_samplers": True})
    assert status == 400 and "damaged or cut short" in answer["error"]["message"], answer
    status, _, answer = call(keyed, "/v1/internal/logits", {"prompt": f'x <img src="{picture_url(39)}">',
                                                            "use_samplers": True})
    assert status == 200 and isinstance(answer, dict) and len(answer) > 0, answer


def reused_positions(server, done: int) -> int:
    """The positions the generation after the first ``done`` ones reused, from its log line."""
    server.wait_for_count("prompt positions came from an earlier", done + 1)
    lines = [part for part in server.log_text().split("llava: ") if "prompt positions came from" in part]
    return int(lines[done].split(" of ")[0])


def test_a_cache_salt_keeps_a_clients_earlier_prompts_its_own(keyed):
    prompt = f'USER: <img src="{picture_url(41)}"> What is it? Tell me all about it.\nASSISTANT:'
    other = f'USER: <img src="{picture_url(41)}"> What is'  # shares only the picture and a few words

    def reused(text, **extra) -> int:
        done = keyed.count("prompt positions came from an earlier")
        status, _, answer = call(keyed, "/v1/completions", {"prompt": text, "max_tokens": 2, "temperature": 0, **extra})
        assert status == 200, answer
        return reused_positions(keyed, done)

    assert reused(prompt, cache_salt="victim") == 0
    assert reused(prompt, cache_salt="someone else") == 0  # another salt cannot tell the victim sent it
    assert reused(prompt) == 0  # nor can a client without a salt
    full = reused(prompt, cache_salt="victim")
    assert full > 256
    assert 256 < reused(other, cache_salt="victim") < full  # the owner's shorter prefix takes a copy
    assert reused(prompt, cache_salt="victim") == full  # the entry stayed whole for its owner
    status, _, answer = call(keyed, "/v1/chat/completions", {**chat(picture_url(42)), "cache_salt": ["x"]})
    assert status == 400 and answer["error"]["message"] == "'cache_salt' must be a non-empty text"
