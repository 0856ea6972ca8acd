"""LLaVA-1.6 in the real webui: a converted tiny LLaVA-NeXT (1.6) model in its models folder, served
over its three APIs and its chat page, pictures of different sizes taking different numbers of
tokens. The webui trims old messages itself (``generate_chat_prompt``), asking the extension for
each prompt's length; these tests check that it keeps whole pictures and drops the right ones.

The model's text side has 4096 positions, so the webui's context (truncation_length) is 4096.
Three pictures of 1368, 1014 and 1944 tokens do not fit in it; the last two do; and two pictures
counted at the most any picture can take (2 × 2928) would not.
"""

import re

import pytest
import torch
from PIL import Image

from extensions.llava.families import max_slot_count, slot_count
from extensions.llava.families.pipelines import PIPELINES
from testbed import tiny
from testbed.hostile_files import exif_chunk, png_with, xmp_chunk
from testbed.real_host import WEBUI, is_current, needs_webui, post
from testbed.real_models import convert_into, serving
from testbed.tiny_next import build_next, processor, save_next_hf

pytestmark = [needs_webui, pytest.mark.slow,
              pytest.mark.skipif(bool(WEBUI) and not is_current(WEBUI), reason="LLaVA-1.6 is for the current webui")]

NEXT = PIPELINES["llava-v1.6-vicuna-7b"]
CONTEXT = 4096
# oldest first: a picture smaller than a tile, a very wide one, a wide one
SIZES = [(200, 150), (2400, 200), (700, 300)]
COUNTS = [slot_count(NEXT, *size) for size in SIZES]  # 1368, 1014, 1944
TEXT_ROOM = 400  # more than the text and template around the pictures in these prompts
MAX_NEW_TOKENS = 16  # the chat page's (settings.yaml), and the API requests'


def test_the_sizes_make_the_case():
    room = CONTEXT - MAX_NEW_TOKENS
    assert sum(COUNTS) > room  # all three do not fit
    assert COUNTS[1] + COUNTS[2] + TEXT_ROOM <= room  # the last two do
    assert 2 * max_slot_count(NEXT) > room  # pictures counted at the most would leave one


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    reference, tokenizer = build_next()
    assert reference.config.text_config.max_position_embeddings == CONTEXT
    models = convert_into(tmp_path_factory.mktemp("next-models"), "tiny-llava-next",
                          lambda folder: save_next_hf(folder, reference, tokenizer))
    return reference, tokenizer, models


@pytest.fixture(scope="module")
def server(model, tmp_path_factory):
    work = tmp_path_factory.mktemp("next-server")
    with serving(model[2], "tiny-llava-next", work, probe_encode=True, max_new_tokens=MAX_NEW_TOKENS,
                 auto_max_new_tokens=False) as running:
        yield running


def pictures(seed: int):
    return [tiny.picture(*size, seed=seed + i) for i, size in enumerate(SIZES)]


def reference_answer(model, prompt_with_image_token: str, picture, max_new_tokens: int) -> tuple[str, int]:
    """transformers' LlavaNextForConditionalGeneration, greedy, on the prompt the webui builds (its BOS
    first); the answer and the prompt's length."""
    reference, tokenizer, _ = model
    batch = processor(tokenizer)(text=prompt_with_image_token, images=[picture], return_tensors="pt")
    ids = torch.cat([torch.tensor([[tokenizer.bos_token_id]]), batch["input_ids"]], dim=1)
    with torch.no_grad():
        out = reference.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=batch["pixel_values"],
                                 image_sizes=batch["image_sizes"], max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True), ids.shape[1]


def log(server) -> str:
    """The server's log with its wrapped lines joined."""
    return re.sub(r"\s+", " ", server.log_text())


def generations(server) -> list[tuple[int, int]]:
    """(prompt length, pictures included; new tokens) of each generation so far (the webui's own log line)."""
    return [(int(context), int(new)) for new, context in
            re.findall(r"Output generated in [^,]*, (\d+) tokens, context (\d+)", log(server))]


def contexts(server) -> list[int]:
    return [context for context, _ in generations(server)]


def test_completions_and_the_2023_route_answer_as_the_reference(server, model):
    picture = tiny.picture(*SIZES[2], seed=5)
    prompt = f"USER: {tiny.img_tag(picture)} What is this? ASSISTANT:"
    expected, length = reference_answer(model, "USER: <image> What is this? ASSISTANT:", picture, 6)
    assert length == 1 + len(model[1].encode("USER:  What is this? ASSISTANT:", add_special_tokens=False)) + COUNTS[2]
    before = server.count("llava: 1 picture(s) in the prompt, 1 embedded")
    status, body = post(server.api_base + "/v1/completions",
                        {"prompt": prompt, "max_tokens": 6, "do_sample": False, "temperature": 0})
    assert status == 200, body
    assert body["choices"][0]["text"] == expected
    assert body["usage"]["prompt_tokens"] == length  # the picture at its own 1944 tokens
    status, answer = post(server.api_base + "/api/v1/generate", {"prompt": prompt, "max_new_tokens": 6,
                                                                  "do_sample": False})
    assert status == 200, answer
    assert answer["results"][0]["text"] == expected
    assert server.count("llava: 1 picture(s) in the prompt, 1 embedded") == before + 2
    assert contexts(server)[-2:] == [length, length]


def chat_turn(text: str, url: str) -> dict:
    return {"role": "user", "content": [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": url}}]}


def test_chat_completions_count_each_picture_at_its_size(server):
    lengths = []
    for size in (SIZES[0], SIZES[2]):
        status, body = post(server.api_base + "/v1/chat/completions", {
            "max_tokens": 2, "messages": [chat_turn("What is this?", tiny.data_url(tiny.picture(*size, seed=7)))]})
        assert status == 200, body
        lengths.append(body["usage"]["prompt_tokens"])
    assert lengths[1] - lengths[0] == COUNTS[2] - COUNTS[0]  # 576: the same text, pictures of 1368 and 1944


def test_the_webuis_trimming_over_the_chat_api_keeps_whole_pictures(server):
    """Three user messages with pictures of different sizes: the webui drops the oldest message,
    its picture with it, and the prompt holds the last two pictures whole."""
    messages = []
    for i, picture in enumerate(pictures(seed=20)):
        messages += [chat_turn(f"Turn {i}: what is this?", tiny.data_url(picture)),
                     {"role": "assistant", "content": "A picture."}]
    messages.pop()
    seen = server.count("llava: 2 picture(s) in the prompt, 1 embedded")
    status, body = post(server.api_base + "/v1/chat/completions", {"max_tokens": MAX_NEW_TOKENS, "messages": messages})
    assert status == 200, body
    assert server.count("llava: 2 picture(s) in the prompt, 1 embedded") == seen + 1
    assert "3 picture(s) in the prompt" not in log(server)
    assert "were cut off" not in log(server)  # the hook had nothing to cut
    prompt_tokens = body["usage"]["prompt_tokens"]
    assert COUNTS[1] + COUNTS[2] < prompt_tokens <= min(COUNTS[1] + COUNTS[2] + TEXT_ROOM, CONTEXT - MAX_NEW_TOKENS)


def test_the_webuis_trimming_in_the_chat_page_keeps_whole_pictures(server, model, open_page, tmp_path):
    """The same in the browser, a picture attached to each of three messages with the attach button,
    "Embed all" on."""
    page = open_page(server)
    page.new_chat()
    page.set_embed_all(True)
    for turn, picture in enumerate(pictures(seed=30)):
        path = str(tmp_path / f"picture-{turn}.png")
        picture.save(path)
        seen = len(contexts(server))
        page.attach(path)
        page.send(f"Turn {turn}: what is this?", wait_for_reply=False)
        assert len(contexts(server)) == seen + 1
        kept = {0: COUNTS[:1], 1: COUNTS[:2], 2: COUNTS[1:]}[turn]
        context = contexts(server)[-1]
        # the random model's replies (16 tokens of up to 12 characters) take room too
        assert sum(kept) < context <= CONTEXT - MAX_NEW_TOKENS, (turn, context, kept)
    assert server.count("llava: 2 picture(s) in the prompt, 2 embedded") == 2  # turns 2 and 3
    assert "3 picture(s) in the prompt" not in log(server)
    assert "were cut off" not in log(server)


def test_an_automatic_reply_length_ends_at_the_context_length(server):
    """Without max_tokens the webui sizes the reply as (context − prompt), measuring the prompt with
    each picture as a short reference; the reply still ends where the context ends."""
    picture = tiny.picture(*SIZES[2], seed=40)
    limit = COUNTS[2] + 600  # the prompt must leave the 512 tokens the webui then assumes for the reply
    status, body = post(server.api_base + "/v1/completions", {
        "prompt": f"USER: {tiny.img_tag(picture)} What is this? ASSISTANT:", "max_tokens": None,
        "truncation_length": limit})
    assert status == 200, body
    context, new = generations(server)[-1]
    assert context > COUNTS[2] and context + new <= limit, (context, new, limit)
    assert new >= limit - context - 1  # the random model ran until the context was full


def test_a_phone_photo_over_each_api(server, tmp_path):
    """A 12 MP JPEG (4000×3000, about 4 MB) takes 2340 tokens on every route, and no text the
    webui tokenizes holds its data."""
    from testbed.photos import make_photo
    with open(make_photo(str(tmp_path / "photo.jpg")), "rb") as f:
        url = tiny.bytes_url(f.read(), "image/jpeg")
    assert len(url) > 5_000_000 and slot_count(NEXT, 4000, 3000) == 2340
    tag = f'<img src="{url}">'
    seen = len(contexts(server))
    encoded = len(server.encoded())
    for path, body in [
            ("/v1/chat/completions", {"max_tokens": 2, "messages": [chat_turn("What is this?", url)]}),
            ("/v1/completions", {"prompt": f"USER: {tag} What is this? ASSISTANT:", "max_tokens": 2}),
            ("/api/v1/generate", {"prompt": f"USER: {tag} What is this? ASSISTANT:", "max_new_tokens": 2})]:
        status, answer = post(server.api_base + path, body)
        assert status == 200, (path, answer)
    lengths = contexts(server)[seen:]
    assert len(lengths) == 3 and all(2340 < n < 2340 + TEXT_ROOM for n in lengths), lengths
    assert lengths[1] == lengths[2]  # the same prompt over the completion and seed routes
    assert max(server.encoded()[encoded:]) < 300


@pytest.mark.parametrize("place", ["XMP before the pixels", "EXIF after the pixels"])
def test_a_png_turned_in_an_unusual_place_is_counted_as_its_pixels(server, place):
    """Each picture's count comes from its header and its features from its pixels: they follow the same
    orientation wherever a PNG keeps it (here 700×300 stored, 300×700 when the XMP turns it)."""
    chunk = xmp_chunk(6) if place.startswith("XMP") else exif_chunk(6)
    stored = tiny.picture(*SIZES[2], seed=9)
    data = png_with(stored, [chunk], []) if "before" in place else png_with(stored, [], [chunk])
    assert slot_count(NEXT, 300, 700) != slot_count(NEXT, 700, 300)  # a turn changes the count
    lengths = []
    for url in (tiny.bytes_url(data), tiny.data_url(stored.transpose(Image.Transpose.ROTATE_270)
                                                    if "before" in place else stored)):
        status, body = post(server.api_base + "/v1/chat/completions",
                            {"max_tokens": 2, "messages": [chat_turn("What is this?", url)]})
        assert status == 200, body
        lengths.append(body["usage"]["prompt_tokens"])
    assert lengths[0] == lengths[1]  # counted as the same picture drawn upright
